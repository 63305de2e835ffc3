"""The one way a job's worker and ``reproduce`` load a resolved model: a family whose runtime needs no
torch (``builtin:null``) through ``models.loading``, never importing torch; any other through
``models.runtime``, imported only then (torch and diffusers cost a worker ~6 s)."""

from __future__ import annotations

from sdbatch.models.adapter import LoadedModel, LoadRequest
from sdbatch.models.loading import load_torch_free


def load(request: LoadRequest, *, torch_threads: int | None = None) -> LoadedModel:
    """``request``'s model loaded, its samplers built; ``torch_threads``: the CPU threads torch may use, where
    the model runs on torch."""
    loaded = load_torch_free(request)
    if loaded is not None:
        return loaded
    from sdbatch.models import runtime

    if torch_threads is not None:
        runtime.torch.set_num_threads(torch_threads)
    return runtime.load(request)
