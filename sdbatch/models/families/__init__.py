"""Model families: the table from ``model_index.json`` ``_class_name`` to the family's adapter.

Each family is one adapter file here (``base.FamilyAdapter``: what it loads, which row
columns it honours and how, its native size read from its configs, its model-dependent row
rules, how its latents decode); a new family is one file plus one entry in ``FAMILIES``
(design.md §8.2). Nothing here imports torch, so the driver can refuse an unsupported model,
refiner or row before any worker starts. The configs are read through a
``models.configs.JsonReader``, so preflight reads each file once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdbatch.models.configs import JsonReader
from sdbatch.models.errors import FamilyError
from sdbatch.models.families.base import FamilyAdapter, ModelTraits, RowRule
from sdbatch.models.families.chroma import Chroma
from sdbatch.models.families.flux import Flux
from sdbatch.models.families.flux2 import Flux2Dev, Flux2Klein
from sdbatch.models.families.flux_kontext import FluxKontext
from sdbatch.models.families.null import NullFamily
from sdbatch.models.families.qwen_image import QwenImage, QwenImageEdit
from sdbatch.models.families.sd import StableDiffusion, StableDiffusionInpainting
from sdbatch.models.families.sd3 import StableDiffusion3
from sdbatch.models.families.sdxl import StableDiffusionXL
from sdbatch.models.families.z_image import ZImage

__all__ = ["FAMILIES", "FamilyAdapter", "ModelTraits", "RowRule", "check_refiner", "family_for_class",
           "local_traits", "model_traits", "read_traits"]

FAMILIES: dict[str, FamilyAdapter] = {
    f.class_name: f for f in (StableDiffusion(), StableDiffusionInpainting(), StableDiffusionXL(), StableDiffusion3(), Flux(), Chroma(), Flux2Klein(),
                              FluxKontext(), Flux2Dev(), QwenImage(), QwenImageEdit(), ZImage(), NullFamily())
}


#: pipeline classes of families sdbatch knows and does not run yet: what is missing, and what to use
NOT_YET_RUN: dict[str, str] = {
    "QwenImageEditPlusPipeline": "Qwen-Image-Edit-2509/2511 (QwenImageEditPlusPipeline, several source images) is not "
                                 "run yet: its images are references shared by every prompt of a call, so each row's own "
                                 "source would need a call of its own. For instruction edits use Qwen-Image-Edit "
                                 "(QwenImageEditPipeline) or FLUX.1 Kontext (FluxKontextPipeline): the source image in "
                                 "init_image, the instruction in prompt",
}


def family_for_class(class_name: str | None, where: str) -> FamilyAdapter:
    if str(class_name) in NOT_YET_RUN:
        raise FamilyError(f"model {where}: model_index.json names pipeline class {class_name!r}: "
                          f"{NOT_YET_RUN[str(class_name)]}")
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
    """Family, native size and text-encoder depth of the model whose files ``read_json`` reads."""
    family = family_for_class(_model_index(read_json, where).get("_class_name"), where)
    return family.read_traits(read_json, where)


def check_refiner(read_json: JsonReader, where: str, base: FamilyAdapter) -> None:
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
