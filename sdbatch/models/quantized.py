"""Pre-quantized diffusers folders, torch-free: which components a folder holds quantized, by
what method and how many bits (their ``config.json``'s ``quantization_config``, as diffusers'
and transformers' ``save_pretrained`` write it), and whether this job can load them.

diffusers loads such a folder as saved when the method's package is installed
(``QUANTIZERS``: bitsandbytes 4/8-bit, which diffusers runs on a GPU only, and torchao, which
runs on a CPU too). What cannot load is refused at submit, before any worker starts
(``resolve`` on the driver, ``job.preflight`` for the workers' GPU), naming the folder, the
method and the fix; each image's record names what was quantized and the backend's version
(``recorded``), so ``reproduce`` notes a changed backend.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from dataclasses import dataclass
from typing import Any

from packaging.version import Version

from sdbatch.models.configs import JsonReader
from sdbatch.models.errors import ModelError


@dataclass(frozen=True)
class Quantizer:
    """A quantization method diffusers loads pre-quantized weights of: its package, the oldest
    version that loads a safetensors folder, and whether it needs a GPU to load."""

    package: str
    minimum: str
    needs_gpu: bool


#: quant_method -> what loading it needs (diffusers 0.42: ``diffusers.quantizers``). GGUF is a
#: single file (``model.config``), not a folder: ``models.runtime`` records it with the same words.
QUANTIZERS = {
    "bitsandbytes": Quantizer("bitsandbytes", "0.43.3", needs_gpu=True),
    "torchao": Quantizer("torchao", "0.16.0", needs_gpu=False),  # 0.16: torchao's safetensors serialisation
}


@dataclass(frozen=True)
class Quantization:
    """One component saved quantized: its name, the method and how it was quantized."""

    component: str
    method: str
    detail: str  # "4-bit nf4", "Int8WeightOnlyConfig (8-bit)", "" where the config says no more

    @property
    def how(self) -> str:
        return " ".join(filter(None, (self.method, self.detail)))

    def __str__(self) -> str:
        return f"{self.component}: {self.how}"


def describe(component: str, config: dict[str, Any]) -> Quantization:
    """A component's ``quantization_config`` (as saved, or a quantizer's ``to_dict()``) in words."""
    method = config.get("quant_method", "unknown")
    method = str(getattr(method, "value", method))  # a loaded config's is an enum
    if method == "bitsandbytes":
        detail = f"4-bit {config.get('bnb_4bit_quant_type', 'fp4')}" if config.get("load_in_4bit") else "8-bit" if config.get("load_in_8bit") else ""
    elif method == "torchao":
        quant_type = config.get("quant_type")
        # torchao >= 0.15 saves {"default": {"_type": "Int8WeightOnlyConfig", ...}}; older, a name ("int8wo")
        names = sorted(
            {str(c.get("_type")) for c in quant_type.values() if isinstance(c, dict)}
            if isinstance(quant_type, dict)
            else {str(quant_type)}
            if quant_type
            else set()
        )
        bits = sorted({m.group(1) for n in names if (m := re.search(r"(\d+)", n))})
        detail = " ".join(names) + (f" ({'/'.join(bits)}-bit)" if bits else "")
    else:
        detail = ""
    return Quantization(component, method, detail)


def read_quantizations(read: JsonReader) -> tuple[Quantization, ...]:
    """The components of a diffusers folder (``model_index.json``'s) whose ``config.json``
    carries a ``quantization_config``, in the index's order."""
    index = read("model_index.json") or {}
    found = []
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or not entry or entry[0] is None:
            continue
        config = read(f"{name}/config.json")
        if isinstance(config, dict) and isinstance(config.get("quantization_config"), dict):
            found.append(describe(name, config["quantization_config"]))
    return tuple(found)


def check_loadable(where: str, quantizations: tuple[Quantization, ...], no_gpu: str | None) -> None:
    """ModelError naming the folder, the component, the method and the fix when the job's workers
    cannot load the folder's quantized components: a method diffusers loads on a GPU only where
    they have none (``no_gpu`` says why; None: they have one), a method sdbatch does not load, or
    its package missing or too old (looked up, not imported)."""
    needing = gpu_only(quantizations) if no_gpu else []
    if needing:
        raise ModelError(
            f"model {where!r}: its {needing[0].component} ({needing[0].how}) loads on a CUDA GPU only (diffusers' "
            f"{needing[0].method} quantizer), and {no_gpu}: give workers a GPU (--gpus-per-worker 1, "
            "model.device auto or cuda), or use a folder saved unquantized or with torchao"
        )
    for quantization in quantizations:
        quantizer = QUANTIZERS.get(quantization.method)
        if quantizer is None:
            raise ModelError(
                f"model {where!r}: its {quantization.component} is saved quantized by "
                f"{quantization.method!r}, which sdbatch does not load; it loads pre-quantized "
                f"{' and '.join(QUANTIZERS)} folders. Save the component unquantized, or quantized with one "
                "of those"
            )
        found = backend_version(quantizer.package)
        if found is None or Version(found) < Version(quantizer.minimum):
            have = f"version {found} is installed" if found else "it is not installed"
            raise ModelError(
                f"model {where!r}: its {quantization.component} ({quantization.how}) needs the {quantizer.package} package "
                f">= {quantizer.minimum} to load, and {have}: pip install 'sdbatch[quantized]' (or "
                f"pip install -U {quantizer.package}) wherever sdbatch runs; nothing was written"
            )


def gpu_only(quantizations: tuple[Quantization, ...]) -> list[Quantization]:
    """The components whose method loads on a GPU only (bitsandbytes)."""
    return [q for q in quantizations if q.method in QUANTIZERS and QUANTIZERS[q.method].needs_gpu]


def recorded(quantizations: tuple[Quantization, ...]) -> dict[str, str]:
    """What each image's ``versions`` says of a quantized model: the components and methods
    (``quantized``) and each backend package's version."""
    if not quantizations:
        return {}
    packages = {QUANTIZERS[q.method].package if q.method in QUANTIZERS else q.method for q in quantizations}
    return {
        "quantized": ", ".join(sorted(map(str, quantizations))),
        **{package: version for package in sorted(packages) if (version := backend_version(package))},
    }


def backend_version(package: str) -> str | None:
    """The installed version of ``package`` (None when it is not importable), without importing it."""
    if importlib.util.find_spec(package) is None:
        return None
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None
