"""A LoRA's keys against a model's modules, from safetensors headers alone (issue 26 item 5):
LoRAs that fit builtin:tiny (diffusers/PEFT and kohya layouts) pass; a missing module, a width
that differs, a component the model lacks are each named; original-checkpoint names are left
to the loader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors.numpy import save

from sdbatch.models.builtin import resolve_builtin
from sdbatch.models.lora_keys import ModelModules, describe_misfits, lora_misfits, safetensors_shapes

TINY = ModelModules(resolve_builtin("builtin:tiny"))
Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
K2 = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
TE_Q = "text_model.encoder.layers.0.self_attn.q_proj"


def _lora(shapes: dict[str, tuple[int, ...]]) -> dict[str, list[int]]:
    """A LoRA file's header as the checker reads it, from real safetensors bytes."""
    data = save({k: np.zeros(s, np.float16) for k, s in shapes.items()})
    return safetensors_shapes(data)


def _fitting(module: str, component: str, rank: int = 4) -> tuple[tuple[int, ...], tuple[int, ...]]:
    out, inp = (TINY.shapes(component) or {})[module.removeprefix("text_model.")][:2]  # held without it
    return (rank, inp), (out, rank)


def test_a_peft_lora_that_fits_passes():
    (a, b), (ta, tb) = _fitting(K2, "unet"), _fitting(TE_Q, "text_encoder")
    lora = _lora({f"unet.{K2}.lora_A.weight": a, f"unet.{K2}.lora_B.weight": b,
                  f"text_encoder.{TE_Q}.lora_linear_layer.down.weight": ta,
                  f"text_encoder.{TE_Q}.lora_linear_layer.up.weight": tb})
    assert lora_misfits(lora, TINY) == []


def test_a_kohya_lora_that_fits_passes_and_original_names_are_left_to_the_loader():
    a, b = _fitting(Q, "unet")
    name = "lora_unet_" + Q.replace(".", "_")
    lora = _lora({f"{name}.lora_down.weight": a, f"{name}.lora_up.weight": b, f"{name}.alpha": (),
                  "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": (4, 640)})
    assert lora_misfits(lora, TINY) == []


def test_a_width_that_differs_is_named():
    (rank, inp), (out, _) = _fitting(K2, "unet")
    lora = _lora({f"unet.{K2}.lora_A.weight": (rank, inp * 24), f"unet.{K2}.lora_B.weight": (out, rank)})
    [problem] = lora_misfits(lora, TINY)
    assert problem == f"unet.{K2}.lora_A.weight: its input width is {inp * 24}, the model's module takes {inp}"
    kohya = "lora_unet_" + K2.replace(".", "_")
    [problem] = lora_misfits(_lora({f"{kohya}.lora_up.weight": (out + 1, rank)}), TINY)
    assert f"its output width is {out + 1}, the model's module takes {out}" in problem


def test_a_missing_module_and_a_missing_component_are_named():
    lora = _lora({"unet.down_blocks.7.attentions.0.to_q.lora_A.weight": (4, 32),
                  "transformer.single_transformer_blocks.0.proj_out.lora_A.weight": (4, 32),
                  "transformer.single_transformer_blocks.0.proj_out.lora_B.weight": (32, 4)})
    problems = lora_misfits(lora, TINY)
    assert problems == [
        "it adapts component 'transformer', which the model does not have (its components: text_encoder, unet, vae)",
        "unet.down_blocks.7.attentions.0.to_q.lora_A.weight: the model has no such module"]
    assert describe_misfits(problems * 2).endswith("; … 1 more")


def test_the_real_peft_lora_layout_of_a_pipeline_fits(tmp_path: Path):
    """Keys as diffusers' save_lora_weights writes them (PEFT's lora_A/lora_B under 'unet.')."""
    shapes = TINY.shapes("unet") or {}
    targets = [m for m in shapes if m.endswith((".to_q", ".to_k", ".to_v", ".to_out.0")) and len(shapes[m]) == 2]
    lora = {}
    for module in targets:
        (a, b) = _fitting(module, "unet")
        lora[f"unet.{module}.lora_A.weight"], lora[f"unet.{module}.lora_B.weight"] = a, b
    assert len(targets) > 4 and lora_misfits(_lora(lora), TINY) == []
