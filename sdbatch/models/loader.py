"""The one way a job's worker and ``reproduce`` load a resolved model: a family whose runtime needs no
torch (``builtin:null``) through ``models.loading``, never importing torch; any other through
``models.runtime``, imported only then, with CPython's cyclic collector off (``import_runtime``)."""

from __future__ import annotations

import gc
from types import ModuleType

from sdbatch.models.adapter import LoadedModel, LoadRequest
from sdbatch.models.loading import load_torch_free


def load(request: LoadRequest, *, torch_threads: int | None = None) -> LoadedModel:
    """``request``'s model loaded, its samplers built; ``torch_threads``: the CPU threads torch may use, where
    the model runs on torch."""
    loaded = load_torch_free(request)
    if loaded is not None:
        return loaded
    runtime = import_runtime()
    if torch_threads is not None:
        runtime.torch.set_num_threads(torch_threads)
    return runtime.load(request)


def import_runtime() -> ModuleType:
    """``models.runtime``, imported with the cyclic collector off, then what the import made frozen.

    Importing torch, diffusers, transformers and peft creates ~800k objects that live as long as the
    process, and the collector, triggered by allocations, scanned them again and again: the import took
    5.2–6.2 s with it and 4.2–4.3 s without (``benchmarks/bench_worker_import.py``). Frozen
    (``gc.freeze``), later full collections — during generation too — skip them; the few cycles the
    import left as garbage (<10 MiB) are kept with them."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        from sdbatch.models import runtime
    finally:
        gc.freeze()
        if enabled:
            gc.enable()
    return runtime
