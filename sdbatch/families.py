"""Model families: what each diffusers pipeline class can do, read torch-free from its folder.

A family is found from ``model_index.json`` ``_class_name``. The table below says, for each
supported class, which diffusers pipelines make its text-to-image and img2img stages (built
from the same loaded components), which samplers it accepts and where its native size comes
from (denoiser ``sample_size`` × the VAE's scale factor). Nothing here imports torch, so the
driver can refuse an unsupported model or a row's sampler before any worker starts.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdbatch.columns import SCHEDULERS, family_samplers
from sdbatch.errors import BadInput
from sdbatch.models import NULL_CLASS_NAME

#: Samplers of the noise-prediction families (SD 1.x/2.x, SDXL), from the sampler table.
DIFFUSION_SAMPLERS = family_samplers(flow=False)
#: Samplers of the flow-matching families (SD3).
FLOW_SAMPLERS = family_samplers(flow=True)


class FamilyError(BadInput, ValueError):
    """The folder is not a model family sdbatch runs; the message names the class and the fix."""


@dataclass(frozen=True)
class Family:
    name: str  # short label for the README table and logs
    class_name: str  # model_index.json _class_name
    txt2img: str  # diffusers pipeline class for text-to-image
    img2img: str  # diffusers pipeline class for img2img, built with from_pipe (shared modules)
    samplers: tuple[str, ...]
    denoiser: str  # the component folder whose config holds sample_size
    size_conditioning: bool = False  # SDXL micro-conditioning (original/target size, crop)
    fixed_size: int | None = None  # a native size not read from configs (builtin:null)


FAMILIES: dict[str, Family] = {
    f.class_name: f
    for f in (
        Family("SD 1.x / 2.x", "StableDiffusionPipeline", "StableDiffusionPipeline",
               "StableDiffusionImg2ImgPipeline", DIFFUSION_SAMPLERS, "unet"),
        Family("SDXL", "StableDiffusionXLPipeline", "StableDiffusionXLPipeline",
               "StableDiffusionXLImg2ImgPipeline", DIFFUSION_SAMPLERS, "unet", size_conditioning=True),
        Family("SD3", "StableDiffusion3Pipeline", "StableDiffusion3Pipeline",
               "StableDiffusion3Img2ImgPipeline", FLOW_SAMPLERS, "transformer"),
        # builtin:null draws from seed and size alone (models.null_model): any sampler, no weights
        Family("null (machinery)", NULL_CLASS_NAME, "", "", SCHEDULERS, "", fixed_size=64),
    )
}


@dataclass(frozen=True)
class ModelTraits:
    """What the driver learns about a model from its configs alone."""

    family: Family
    native_width: int
    native_height: int


JsonReader = Callable[[str], "dict[str, Any] | None"]  # relative path in the folder -> parsed JSON or None


def family_for_class(class_name: str | None, where: str) -> Family:
    try:
        return FAMILIES[str(class_name)]
    except KeyError:
        raise FamilyError(
            f"model {where}: model_index.json names pipeline class {class_name!r}, which sdbatch does not run; "
            f"supported: {', '.join(FAMILIES)}. Convert the model to one of these diffusers layouts."
        ) from None


def read_traits(read_json: JsonReader, where: str) -> ModelTraits:
    """Family and native size of the model whose files ``read_json`` reads."""
    index = read_json("model_index.json") or {}
    family = family_for_class(index.get("_class_name"), where)
    if family.fixed_size:
        return ModelTraits(family, native_width=family.fixed_size, native_height=family.fixed_size)
    denoiser = read_json(f"{family.denoiser}/config.json") or {}
    vae = read_json("vae/config.json") or {}
    sample = denoiser.get("sample_size")
    blocks = vae.get("block_out_channels")
    if not sample or not blocks:
        raise FamilyError(
            f"model {where}: {family.denoiser}/config.json needs sample_size and vae/config.json "
            "block_out_channels to know the native size; is the folder complete?"
        )
    sample_h, sample_w = (sample, sample) if isinstance(sample, int) else sample
    scale = 2 ** (len(blocks) - 1)
    return ModelTraits(family, native_width=int(sample_w) * scale, native_height=int(sample_h) * scale)


def local_traits(folder: Path) -> ModelTraits:
    def read(rel: str) -> dict[str, Any] | None:
        path = folder / rel
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    return read_traits(read, str(folder))


def model_traits(name: str, endpoint_url: str | None = None) -> ModelTraits:
    """Traits of ``--model`` (builtin, local folder or ``s3://`` prefix) from its configs;
    FamilyError naming the model and the fix when it is missing or not a supported family."""
    if not name.startswith("s3://"):
        from sdbatch.models import local_model_dir

        try:
            folder = local_model_dir(name)
        except ValueError as exc:
            raise FamilyError(str(exc)) from None
        return local_traits(folder)
    from sdbatch.storage import NotFound, StorageError, open_storage

    try:
        storage = open_storage(name, endpoint_url=endpoint_url)
    except StorageError as exc:
        raise FamilyError(f"model {name!r}: {exc}") from None

    def read(rel: str) -> dict[str, Any] | None:
        try:
            return json.loads(storage.get(rel))
        except NotFound:
            return None
        except StorageError as exc:
            raise FamilyError(f"model {name!r}: {exc}") from None

    if read("model_index.json") is None:
        raise FamilyError(f"model {name!r}: no model_index.json under that prefix; it must hold a diffusers folder")
    return read_traits(read, name)
