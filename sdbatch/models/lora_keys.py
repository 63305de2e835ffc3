"""Whether a LoRA (or an IP-Adapter) fits a model, decided at preflight from safetensors headers
alone (no torch, no weights read): each adapted module the LoRA names must exist in the model's
component and take the LoRA's input and output widths; an IP-Adapter's key/value projections must
match the UNet's cross-attention layers, in number and widths (``ip_adapter_misfits``).

Two key layouts are checked: diffusers/PEFT (``unet.<module>.lora_A.weight``, ``.lora.down.weight``,
``.lora_linear_layer.down.weight``; components ``unet``, ``transformer``, ``text_encoder*``) and
kohya-ss with diffusers module paths (``lora_unet_<module with _>.lora_down.weight``,
``lora_te1_…``). Layouts named after the original checkpoints (kohya's SDXL ``input_blocks``,
FLUX's ``double_blocks``) have no cheap mapping to diffusers' modules: their unmatched modules are
left for the loader, never refused here, so a LoRA that diffusers would load is not refused."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from pathlib import Path

#: Where a diffusers/PEFT key's adapter part starts, and whether it is the down (input) half.
_PEFT_PARTS = ((".lora_A.", True), (".lora.down.", True), (".lora_linear_layer.down.", True),
               (".lora_B.", False), (".lora.up.", False), (".lora_linear_layer.up.", False))
_KOHYA_PARTS = ((".lora_down.", True), (".lora_up.", False))
#: kohya's prefix → the components it may mean (the denoiser: whichever the model has)
_KOHYA_PREFIXES = {"lora_unet_": ("unet", "transformer"), "lora_transformer_": ("transformer",),
                   "lora_te_": ("text_encoder",), "lora_te1_": ("text_encoder",), "lora_te2_": ("text_encoder_2",),
                   "lora_te3_": ("text_encoder_3",)}
_SHOWN = 3


def safetensors_shapes(head: bytes) -> dict[str, list[int]]:
    """Tensor name → shape from the start of a safetensors file (its 8-byte length and JSON
    header); empty for anything else (the pickle policy has refused those already)."""
    size = struct.unpack("<Q", head[:8])[0] if len(head) >= 8 else 0
    try:
        header = json.loads(head[8 : 8 + size]) if 2 <= size <= len(head) - 8 else None
    except ValueError:
        header = None
    if not isinstance(header, dict):
        return {}
    return {name: list(entry.get("shape", ())) for name, entry in header.items()
            if name != "__metadata__" and isinstance(entry, dict)}


def _file_head(path: Path) -> bytes:
    with path.open("rb") as fh:
        head = fh.read(8)
        size = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        return head + fh.read(min(size, 100 * 2**20))


class ModelModules:
    """The weight shapes of a local diffusers folder's components, read from their safetensors
    headers the first time a LoRA names the component."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._shapes: dict[str, dict[str, list[int]] | None] = {}

    def components(self) -> list[str]:
        return sorted(p.name for p in self.folder.iterdir() if p.is_dir() and any(p.glob("*.safetensors")))

    def shapes(self, component: str) -> dict[str, list[int]] | None:
        """Module → weight shape of ``component`` (None: the model has no such component)."""
        if component not in self._shapes:
            files = sorted((self.folder / component).glob("*.safetensors"))
            shapes: dict[str, list[int]] = {}
            for path in files:
                tensors = safetensors_shapes(_file_head(path))
                shapes.update({_plain(name.removesuffix(".weight")): s for name, s in tensors.items()
                               if name.endswith(".weight")})
            self._shapes[component] = shapes if files else None
        return self._shapes[component]


def _plain(module: str) -> str:
    """A module path without CLIPTextModel's ``text_model.`` (transformers writes it in some
    versions and not in others; LoRAs are written both ways)."""
    return module.removeprefix("text_model.").removeprefix("text_model_")


def _split(key: str) -> tuple[str, str, bool] | None:
    """(component or kohya prefix, module, down half) of a LoRA weight key; None for other keys
    (``alpha``, DoRA magnitudes, layouts not checked here)."""
    for prefix in _KOHYA_PREFIXES:
        if key.startswith(prefix):
            for part, down in _KOHYA_PARTS:
                if part in key:
                    return prefix, _plain(key[len(prefix) : key.index(part)]), down
            return None
    for part, down in _PEFT_PARTS:
        if part in key:
            component, _, module = key[: key.index(part)].partition(".")
            if component in ("unet", "transformer") or component.startswith("text_encoder"):
                return component, _plain(module), down
    return None


def _misfit(shape: list[int], want: list[int] | None, down: bool) -> str | None:
    if want is None:
        return "the model has no such module"
    if len(shape) < 2 or len(want) < 2:
        return None
    got, need, side = (shape[1], want[1], "input") if down else (shape[0], want[0], "output")
    return None if got == need else f"its {side} width is {got}, the model's module takes {need}"


def lora_misfits(lora_keys: dict[str, list[int]], model: ModelModules) -> list[str]:
    """What in a LoRA does not fit the model: a component the model lacks, a module it does not
    have (diffusers/PEFT layout), a width that differs (both layouts); empty when it fits or
    cannot be told here."""
    problems: list[str] = []
    missing_components: set[str] = set()
    underscored: dict[str, dict[str, str]] = {}
    for key, shape in sorted(lora_keys.items()):
        split = _split(key)
        if split is None:
            continue
        where, module, down = split
        if where in _KOHYA_PREFIXES:
            component = next((c for c in _KOHYA_PREFIXES[where] if model.shapes(c) is not None), None)
            if component is None:
                missing_components.add(_KOHYA_PREFIXES[where][0])
                continue
            names = underscored.setdefault(component, {m.replace(".", "_"): m for m in model.shapes(component) or ()})
            if module not in names:
                continue  # an original-checkpoint name (input_blocks, double_blocks): the loader maps it
            module = names[module]
        else:
            component = where
        shapes = model.shapes(component)
        if shapes is None:
            missing_components.add(component)
            continue
        problem = _misfit(shape, shapes.get(module), down)
        if problem is not None:
            problems.append(f"{key}: {problem}")
    have = ", ".join(model.components()) or "none"
    return [f"it adapts component {c!r}, which the model does not have (its components: {have})"
            for c in sorted(missing_components)] + problems


def file_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name → shape of a local safetensors file, from its header."""
    return safetensors_shapes(_file_head(path))


def ip_adapter_misfits(adapter: dict[str, list[int]], model: ModelModules | None, image_embed_width: int | None) -> list[str]:
    """What in an IP-Adapter's tensors (``image_proj.*``, ``ip_adapter.N.to_k_ip`` / ``to_v_ip``)
    does not fit the model's UNet (``model``: None when its weights cannot be read here) or its
    image encoder (``image_embed_width``: the encoder's projection_dim); empty when it fits or
    cannot be told here."""
    foreign = sorted(k for k in adapter if not k.startswith(("image_proj.", "ip_adapter.")))
    if not adapter or foreign:
        return [f"its tensors are not an IP-Adapter's (image_proj.* and ip_adapter.*){': ' + foreign[0] if foreign else ''}"]
    problems = []
    projection = adapter.get("image_proj.proj.weight")  # an ImageProjection (IP-Adapter, not Plus)
    if image_embed_width and projection and len(projection) == 2 and projection[1] != image_embed_width:
        problems.append(f"image_proj takes image embeddings {projection[1]} wide, and the image encoder's are "
                        f"{image_embed_width} (its projection_dim)")
    unet = model.shapes("unet") if model is not None else None
    if unet:
        cross = sorted(shape for module, shape in unet.items() if module.endswith("attn2.to_k"))
        keys = sorted(shape for key, shape in adapter.items() if key.endswith(".to_k_ip.weight"))
        if len(keys) != len(cross):
            problems.append(f"it has {len(keys)} cross-attention layers, the model's unet {len(cross)}")
        elif keys != cross:
            got, want = next((k, c) for k, c in zip(keys, cross) if k != c)
            problems.append(f"its to_k_ip weights are {got[0]}×{got[1]}, the model's unet attn2.to_k weights "
                            f"{want[0]}×{want[1]} (out × cross_attention_dim)")
    return problems


def describe_misfits(problems: Iterable[str]) -> str:
    problems = list(problems)
    more = f"; … {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else ""
    return "; ".join(problems[:_SHOWN]) + more
