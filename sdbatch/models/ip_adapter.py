"""The job's IP-Adapter on a loaded pipeline (torch): its image encoder loaded as the pipeline's
``image_encoder`` (with a ``CLIPImageProcessor`` of the encoder's input size), its weights loaded
into the UNet once (diffusers' ``load_ip_adapter``) and switched on for an IP-Adapter batch (its
scale set, each row's reference image encoded alone) and off for any other batch: the UNet's own
attention processors and no image projection, so a row without a reference image renders exactly
as in a job without the adapter. diffusers repeats the image embeddings it is given for every
prompt of a batch (one reference image for all of them); each pipeline that runs IP-Adapter rows
takes sdbatch's, one per row, as they are (``install``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers
from diffusers.models.embeddings import ImageProjection

from sdbatch.models.errors import ModelError


def image_encoder_components(folder: Path, dtype: torch.dtype) -> dict[str, Any]:
    """The pipeline components an IP-Adapter reads reference images with, from the image
    encoder ``folder`` (``resolve`` checked it is a CLIPVisionModelWithProjection)."""
    try:
        encoder = transformers.CLIPVisionModelWithProjection.from_pretrained(folder, dtype=dtype, use_safetensors=True, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelError(f"ip_adapter.image_encoder {str(folder)!r} could not be loaded: {exc}") from exc
    size = encoder.config.image_size  # as load_ip_adapter makes its processor
    return {"image_encoder": encoder, "feature_extractor": transformers.CLIPImageProcessor(size=size, crop_size=size)}


class IPAdapterSwitch:
    """The IP-Adapter loaded into ``pipe``'s UNet (shared by every pipeline made from it with
    ``from_pipe``), off until a batch turns it on."""

    def __init__(self, pipe: Any, weights: Path):
        self._pipe = pipe
        # the UNet itself: model.compile later wraps pipe.unet, and attributes set on the wrapper
        # would not reach the module that runs
        self._unet = unet = pipe.unet
        self._plain = dict(unet.attn_processors)
        try:
            pipe.load_ip_adapter(str(weights.parent), subfolder="", weight_name=weights.name, image_encoder_folder=None, local_files_only=True)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:  # a shape mismatch is a RuntimeError
            raise ModelError(f"ip_adapter {str(weights)!r} does not fit the model's UNet: {exc}") from exc
        self._adapted = dict(unet.attn_processors)
        self._projection = unet.encoder_hid_proj
        self._on = True
        self.use(None)

    def use(self, scale: float | None) -> None:
        """The adapter on at ``scale`` (a batch's ``ip_adapter_scale``), or off (None)."""
        unet = self._unet
        on = scale is not None
        if on != self._on:
            unet.set_attn_processor(dict(self._adapted if on else self._plain))
            unet.encoder_hid_proj = self._projection if on else None
            unet.config.encoder_hid_dim_type = "ip_image_proj" if on else None  # as load/unload_ip_adapter set it
            self._on = on
        if scale is not None:
            self._pipe.set_ip_adapter_scale(scale)  # reads the processors (through a compiled wrapper too)

    @staticmethod
    def install(pipe: Any) -> None:
        """``pipe`` takes its ``ip_adapter_image_embeds`` as given: per row, in the form its
        ``prepare_ip_adapter_image_embeds`` returns (an instance attribute shadows the method)."""
        pipe.prepare_ip_adapter_image_embeds = lambda ip_adapter_image, ip_adapter_image_embeds, *args, **kwargs: ip_adapter_image_embeds

    def embeds(self, images: list[Any], guided: bool) -> list[torch.Tensor]:
        """The batch's ``ip_adapter_image_embeds``: per row its reference image's embeddings (each
        encoded alone, so a row's do not depend on its batch-mates), the unconditional ones first
        when the pipeline runs both guidance branches (``guided``)."""
        pipe = self._pipe
        hidden = not isinstance(self._projection.image_projection_layers[0], ImageProjection)  # IP-Adapter Plus
        pairs = [pipe.encode_image(image, pipe._execution_device, 1, hidden) for image in images]
        positive = torch.cat([p for p, _ in pairs])
        both = torch.cat([torch.cat([n for _, n in pairs]), positive]) if guided else positive
        return [both.unsqueeze(1)]  # one adapter; one image per row
