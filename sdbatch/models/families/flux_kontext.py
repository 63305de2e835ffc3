"""FLUX.1 Kontext: ``FluxKontextPipeline``, FLUX.1 [dev]'s architecture as an instruction-edit
model — the transformer attends to the source image's latent tokens beside the target's, and
the prompt says what to change.

Every row edits its ``init_image`` (required: an edit-pair dataset is one manifest of source
images and instructions); there is no img2img ``strength`` (the source image conditions the
whole run; the target starts from noise). The img2img pipeline is a second Kontext pipeline over the
same modules (``from_pipe``). The source image is scaled to cover the row's size and
centre-cropped, as init images are, and the pipeline is told to keep that size: unless given
``max_area`` and ``_auto_resize=False`` it scales the output to about 1024² and the source to
one of its preferred resolutions. Guidance, steps, T5 length and native size are FLUX.1
[dev]'s (``flux.Flux``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sdbatch.models.families.base import COMMON_COLUMNS
from sdbatch.models.families.flux import Flux

if TYPE_CHECKING:
    from sdbatch.data.row import Row


class FluxKontext(Flux):
    name = "FLUX.1 Kontext"
    class_name = "FluxKontextPipeline"
    txt2img = "FluxKontextPipeline"
    img2img = "FluxKontextPipeline"
    edits = True
    honours = COMMON_COLUMNS - {"strength"}

    def img2img_kwargs(self, first: Row) -> dict[str, Any]:
        # max_area = the row's area: the pipeline's output size is sqrt(max_area × aspect), the row's own
        return {"height": first.height, "width": first.width, "max_area": first.width * first.height, "_auto_resize": False}
