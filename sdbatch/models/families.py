"""Model families: what each diffusers pipeline class can do, read torch-free from its folder.

A family is found from ``model_index.json`` ``_class_name``. The table below says, for each
supported class, which diffusers pipelines make its text-to-image and img2img stages (built
from the same loaded components), which samplers it accepts and where its native size comes
from (denoiser ``sample_size`` × the VAE's scale factor), and which refiner class it takes
(``model.refiner``: SDXL's ``StableDiffusionXLImg2ImgPipeline``). Nothing here imports torch, so
the driver can refuse an unsupported model, refiner or row sampler before any worker starts.
The configs are read through a ``models.JsonReader``, so preflight reads each file once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdbatch.data.samplers import SCHEDULERS, family_samplers
from sdbatch.models.builtin import NULL_CLASS_NAME
from sdbatch.models.configs import JsonReader
from sdbatch.models.errors import FamilyError

#: Samplers of the noise-prediction families (SD 1.x/2.x, SDXL), from the sampler table.
DIFFUSION_SAMPLERS = family_samplers(flow=False)


#: Samplers of the flow-matching families (SD3).
FLOW_SAMPLERS = family_samplers(flow=True)


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
    refiner: str | None = None  # the pipeline class of the refiner this family takes (model.refiner)


FAMILIES: dict[str, Family] = {
    f.class_name: f
    for f in (
        Family("SD 1.x / 2.x", "StableDiffusionPipeline", "StableDiffusionPipeline",
               "StableDiffusionImg2ImgPipeline", DIFFUSION_SAMPLERS, "unet"),
        Family("SDXL", "StableDiffusionXLPipeline", "StableDiffusionXLPipeline",
               "StableDiffusionXLImg2ImgPipeline", DIFFUSION_SAMPLERS, "unet", size_conditioning=True,
               refiner="StableDiffusionXLImg2ImgPipeline"),
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


def family_for_class(class_name: str | None, where: str) -> Family:
    try:
        return FAMILIES[str(class_name)]
    except KeyError:
        raise FamilyError(
            f"model {where}: model_index.json names pipeline class {class_name!r}, which sdbatch does not run; "
            f"supported: {', '.join(FAMILIES)}. Convert the model to one of these diffusers layouts."
        ) from None


def _model_index(read_json: JsonReader, where: str) -> dict[str, Any]:
    index = read_json("model_index.json")
    if not isinstance(index, dict):
        raise FamilyError(f"model at {where}: model_index.json is missing or not a JSON object; "
                          "pass a diffusers folder as written by save_pretrained")
    return index


def read_traits(read_json: JsonReader, where: str) -> ModelTraits:
    """Family and native size of the model whose files ``read_json`` reads."""
    family = family_for_class(_model_index(read_json, where).get("_class_name"), where)
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


def check_refiner(read_json: JsonReader, where: str, base: Family) -> None:
    """``model.refiner`` must be the refiner class ``base``'s family takes (SDXL's:
    ``StableDiffusionXLImg2ImgPipeline``); FamilyError naming what was found and the fix."""
    if base.refiner is None:
        takes = ", ".join(f"{f.name} ({f.class_name})" for f in FAMILIES.values() if f.refiner)
        raise FamilyError(f"model.refiner {where}: the base model is a {base.name} model ({base.class_name}), which "
                          f"takes no refiner; only {takes} bases do. Remove model.refiner (--refiner), or use an SDXL base")
    class_name = _model_index(read_json, where).get("_class_name")
    if class_name != base.refiner:
        raise FamilyError(f"model.refiner {where}: model_index.json names pipeline class {class_name!r}; an {base.name} "
                          f"refiner is a {base.refiner} folder (such as stabilityai/stable-diffusion-xl-refiner-1.0 "
                          "saved with save_pretrained). Point model.refiner (--refiner) at one")


def local_traits(folder: Path) -> ModelTraits:
    from sdbatch.models.configs import folder_json_reader

    return read_traits(folder_json_reader(folder), str(folder))


def model_traits(name: str, endpoint_url: str | None = None) -> ModelTraits:
    """Traits of ``--model`` (builtin, local folder or ``s3://`` prefix) from its configs;
    FamilyError naming the model and the fix when it is missing or not a supported family."""
    from sdbatch.models.configs import model_json_reader
    from sdbatch.models.errors import ModelError

    try:
        read = model_json_reader(name, endpoint_url)
    except ModelError as exc:
        raise FamilyError(str(exc)) from None
    return read_traits(read, name)
