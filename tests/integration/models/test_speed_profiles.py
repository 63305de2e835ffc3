"""Speed profiles on real tiny pipelines (CPU): every switch of every preset applied to the
modules or skipped with its reason, an explicit switch the worker cannot apply refused; and
prompt-embedding reuse byte-identical to encoding each batch, hit on repeated prompts
(builtin:tiny and an SDXL tiny pipeline). Compiled blocks are inspected, not run: compiling
on CPU takes minutes (bench_gpu.py measures what it buys)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from sdbatch.data.row import Row
from sdbatch.models.errors import ModelError
from sdbatch.models.speed import SpeedSpec

CPU_SKIPS = {"cuda_graphs": "needs a CUDA device; this worker runs on cpu",
             "quantize": "needs a CUDA device; this worker runs on cpu"}


def rows(prompts: list[str], negatives: list[str] | None = None, *, width: int = 64, steps: int = 3) -> list[Row]:
    negatives = negatives or [""] * len(prompts)
    return [Row(index=i, id=f"r{i}", prompt=p, negative_prompt=n, seed=100 + i, steps=steps, guidance_scale=5.0,
                width=width, height=width, scheduler="default", extra={}) for i, (p, n) in enumerate(zip(prompts, negatives))]


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    from integration.model_families import NATIVE, build_sdxl

    return build_sdxl(tmp_path_factory.mktemp("speed") / "sdxl"), NATIVE["sdxl"]


def _load(model, speed=None):
    from sdbatch.models.runtime import load_model

    return load_model(str(model), device="cpu", dtype="float32", speed=speed)


def _compiled_blocks(module) -> list[str]:
    return [type(m).__name__ for m in module.modules() if getattr(m, "_compiled_call_impl", None) is not None]


@pytest.mark.parametrize("profile", ["fast", "fastest"])
def test_a_unet_profile_fuses_qkv_compiles_the_repeated_blocks_and_records_what_it_skipped(profile):
    from diffusers.models.attention_processor import FusedAttnProcessor2_0

    model = _load("builtin:tiny", SpeedSpec(profile=profile))
    unet, vae = model.txt2img.unet, model.txt2img.vae
    assert {type(p) for p in unet.attn_processors.values()} == {FusedAttnProcessor2_0}
    assert {type(p) for p in vae.attn_processors.values()} == {FusedAttnProcessor2_0}
    assert set(_compiled_blocks(unet)) == {"BasicTransformerBlock"}
    assert model.compiled  # so the first batch of each shape warms up (compiles) before the real one
    skipped = dict(CPU_SKIPS)
    if profile == "fastest":
        skipped["step_cache"] = ("UNet2DConditionModel has no diffusers cache hooks (the step cache applies to "
                                 "transformers such as FLUX's)")
    assert model.speed.applied == {"fuse_qkv": True, "regional_compile": True}
    assert model.speed.skipped == skipped
    assert model.facts(rows(["x"])[0]).speed == {"profile": profile, "applied": model.speed.applied, "skipped": skipped}


def test_exact_changes_no_module_and_records_nothing():
    from diffusers.models.attention_processor import AttnProcessor2_0

    model = _load("builtin:tiny", SpeedSpec())
    assert {type(p) for p in model.txt2img.unet.attn_processors.values()} == {AttnProcessor2_0}
    assert not _compiled_blocks(model.txt2img.unet) and not model.compiled
    assert model.facts(rows(["x"])[0]).speed is None


def test_fused_qkv_alone_generates_within_a_level_of_exact():
    """Fusing is a different matmul, not a different model: the same images to the last level."""
    exact = _load("builtin:tiny").generate(rows(["a red circle", "a blue square"])).pixels
    fused = _load("builtin:tiny", SpeedSpec(fuse_qkv=True)).generate(rows(["a red circle", "a blue square"])).pixels
    assert np.abs(exact.astype(int) - fused).max() <= 1


def test_the_step_cache_and_regional_compile_go_on_a_flux_transformer():
    from diffusers import FluxTransformer2DModel
    from diffusers.hooks import FirstBlockCacheConfig

    from sdbatch.models.speed_runtime import apply_speed

    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
    applied = apply_speed(SimpleNamespace(transformer=transformer, vae=None), "transformer",
                          SpeedSpec(profile="fastest"), "cpu")
    assert applied.applied == {"fuse_qkv": True, "step_cache": 0.08, "regional_compile": True}
    assert applied.skipped == CPU_SKIPS
    assert isinstance(transformer._cache_config, FirstBlockCacheConfig) and transformer._cache_config.threshold == 0.08
    assert set(_compiled_blocks(transformer)) == {"FluxTransformerBlock", "FluxSingleTransformerBlock"}


@pytest.mark.parametrize("speed, refused", [
    (SpeedSpec(regional_compile=True, cuda_graphs=True), "speed.cuda_graphs=True cannot be applied on this worker: "
                                                         "needs a CUDA device; this worker runs on cpu"),
    (SpeedSpec(quantize="int8"), "speed.quantize=int8 cannot be applied"),
    (SpeedSpec(step_cache="first_block"), "speed.step_cache=first_block cannot be applied on this worker: "
                                          "UNet2DConditionModel has no diffusers cache hooks"),
])
def test_an_explicit_switch_the_worker_cannot_apply_fails_its_start(speed, refused):
    with pytest.raises(ModelError, match="leave speed"):
        try:
            _load("builtin:tiny", speed)
        except ModelError as exc:
            assert refused in str(exc)
            raise


def _without_prompt_cache(model):
    for pipe in (model.txt2img, model.img2img):
        del pipe.encode_prompt  # the instance attribute PromptCache installed: back to the pipeline's own


@pytest.mark.parametrize("which", ["builtin:tiny", "sdxl"])
def test_prompt_embedding_reuse_is_byte_identical_and_hit_on_repeated_prompts(which, request):
    if which == "sdxl":
        folder, size = request.getfixturevalue("sdxl_folder")
    else:
        folder, size = which, 64
    prompts = ["a red circle", "a blue square", "a red circle", "a red circle"]
    negatives = ["", "blurry", "", "blurry"]  # (prompt, negative) pairs: 3 distinct
    batch = rows(prompts, negatives, width=size)
    cached = _load(folder)
    first = cached.generate(batch)
    assert (cached.prompts.misses, cached.prompts.hits) == (3, 1)
    again = cached.generate(rows(prompts[::-1], negatives[::-1], width=size))
    assert (cached.prompts.misses, cached.prompts.hits) == (3, 5)

    plain = _load(folder)
    _without_prompt_cache(plain)
    expected = plain.generate(batch)
    assert plain.prompts.misses == plain.prompts.hits == 0
    assert first.pixels.tobytes() == expected.pixels.tobytes()
    assert again.pixels.tobytes() == plain.generate(rows(prompts[::-1], negatives[::-1], width=size)).pixels.tobytes()


def test_the_prompt_cache_is_bounded():
    model = _load("builtin:tiny")
    model.prompts.__init__(max_bytes=1)  # room for one entry: the newest is always kept
    model.generate(rows(["a", "b", "a"]))  # "a" encoded once for both of its rows
    assert (model.prompts.misses, model.prompts.hits) == (2, 1) and len(model.prompts._entries) == 1
