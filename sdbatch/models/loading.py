"""From a model's name to a ``LoadRequest``, without torch: the model resolved, pinned and
checked (``models.resolve``), its family found; and the loaders of the family runtimes that need
no torch (``builtin:null``'s numpy runtime), so a reader regenerating such a model (``reproduce``)
never imports torch. ``models.runtime.load_model`` loads every family through here."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sdbatch.models.adapter import LoadedModel, LoadRequest
from sdbatch.models.families.null import NullModel
from sdbatch.models.pins import controlnets_pin, embeddings_pin, file_sha256, fingerprint_model_dir, ip_adapter_pin, vae_pin
from sdbatch.models.resolve import resolve
from sdbatch.storage.locations import is_s3

#: The loaders of the family runtimes that need no torch (``FamilyAdapter.runtime``).
TORCH_FREE_RUNTIMES: dict[str, Callable[[LoadRequest], LoadedModel]] = {
    "numpy": NullModel.load,
}


def load_request(
    model: str,
    *,
    pin: str | None = None,
    endpoint_url: str | None = None,
    config: str | None = None,
    vae: str | None = None,
    embeddings: dict[str, str] | None = None,
    controlnets: dict[str, str] | None = None,
    ip_adapter: tuple[str, str] | None = None,
    **options: Any,
) -> LoadRequest:
    """Resolve ``model`` (checked against ``pin``; see ``models.runtime.load_model``) into what
    its family's runtime loads; ``options``: the ``LoadRequest``'s load options (device, dtype,
    loras, refiner, speed, …) as the job sets them."""
    ref = resolve(model, pin=pin, endpoint_url=endpoint_url, config=config, vae=vae, embeddings=embeddings, controlnets=controlnets, ip_adapter=ip_adapter)
    traits, folder = ref.traits, ref.folder
    assert traits is not None and folder is not None  # resolve() of a base model gives both
    fingerprint = ref.pin
    if is_s3(model):  # the content of what was downloaded, not the ETags
        fingerprint = fingerprint_model_dir(folder)
        fingerprint = vae_pin(fingerprint, fingerprint_model_dir(ref.vae)) if ref.vae else fingerprint
        fingerprint = embeddings_pin(fingerprint, {n: file_sha256(p) for n, p in ref.embeddings}) if ref.embeddings else fingerprint
        fingerprint = controlnets_pin(fingerprint, {n: fp for n, _, fp in ref.controlnets}) if ref.controlnets else fingerprint
        if ref.ip_adapter:
            fingerprint = ip_adapter_pin(fingerprint, file_sha256(ref.ip_adapter[0]), fingerprint_model_dir(ref.ip_adapter[1]))
    return LoadRequest(
        model,
        folder,
        ref.pin,
        fingerprint,
        traits,
        endpoint_url=endpoint_url,
        checkpoint=ref.checkpoint,
        vae=ref.vae,
        embeddings=ref.embeddings,
        controlnets=ref.controlnets,
        ip_adapter=ref.ip_adapter,
        **options,
    )


def load_torch_free(request: LoadRequest) -> LoadedModel | None:
    """``request``'s model loaded, its samplers built, when its family's runtime needs no torch;
    else None (``models.loader.load`` then loads it with ``models.runtime``)."""
    loader = TORCH_FREE_RUNTIMES.get(request.traits.family.runtime)
    if loader is None:
        return None
    loaded = loader(request)
    loaded.build_samplers()
    return loaded
