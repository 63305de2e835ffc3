"""Per-row LoRA adapters, torch-free: the ``loras`` column and ``<lora:NAME:SCALE>`` prompt tags,
the job's adapter declarations (``loras: {NAME: PATH}`` / ``--lora NAME=PATH``); parsing only
(the adapter files' checks are ``models.pins``').

A row's adapter set is a sorted tuple of ``(name, scale)``; it is part of the row's batch key.
Tags are taken out of the prompt the text encoder reads (as AUTOMATIC1111 does), and written
back into the infotext's prompt line with ``Lora hashes`` (``encode.infotext``).

Textual-inversion embeddings (``embeddings: {NAME: PATH}``) are named in prompts as ``<NAME>``
(the token they are loaded under) or ComfyUI's ``embedding:NAME`` (``embedding_tokens``)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

from sdbatch.errors import BadInput

#: One A1111 extra-network tag for a LoRA: ``<lora:NAME>`` or ``<lora:NAME:SCALE>``.
TAG_RE = re.compile(r"<lora:([^<>]*)>")


ASSIGNMENT_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # no '.': a name is also a spec key (loras.NAME)


LoraSet = tuple[tuple[str, float], ...]


class LoraError(BadInput, ValueError):
    """A malformed adapter reference; the message says what is wrong and how to write it."""


def _entry(text: str, where: str) -> tuple[str, float]:
    name, sep, scale_text = text.strip().partition(":")
    name = name.strip()
    if not ASSIGNMENT_RE.match(name):
        raise LoraError(f"{where} {text!r}: adapter names use letters, digits, '_' and '-' (1-64 characters)")
    if not sep:
        return name, 1.0
    try:
        scale = float(scale_text)
    except ValueError:
        raise LoraError(f"{where} {text!r}: the scale {scale_text.strip()!r} is not a number (write NAME:0.8)") from None
    if not math.isfinite(scale):
        raise LoraError(f"{where} {text!r}: the scale must be finite")
    return name, scale


def _merge(entries: list[tuple[str, float]], where: str) -> LoraSet:
    merged: dict[str, float] = {}
    for name, scale in entries:
        if merged.get(name, scale) != scale:
            raise LoraError(f"{where}: adapter {name!r} is given twice with different scales ({merged[name]:g} and {scale:g})")
        merged[name] = scale
    return tuple(sorted(merged.items()))


def parse_column(value: str | None) -> LoraSet:
    """``"NAME:SCALE[,NAME:SCALE…]"`` (scale default 1.0; null or empty = no adapter)."""
    if value is None or not value.strip():
        return ()
    return _merge([_entry(part, "loras entry") for part in value.split(",")], "loras")


def split_prompt(prompt: str) -> tuple[str, LoraSet]:
    """The prompt without its ``<lora:…>`` tags, and the adapters the tags name."""
    if "<lora:" not in prompt:
        return prompt, ()
    entries = [_entry(m.group(1), "prompt tag") for m in TAG_RE.finditer(prompt)]
    text = TAG_RE.sub("", prompt)
    if "<lora:" in text:
        raise LoraError("prompt tag: a '<lora:' has no closing '>' (write <lora:NAME:SCALE>)")
    return re.sub(r"\s{2,}", " ", text).strip(" ,"), _merge(entries, "prompt tags")


def row_loras(prompt: str, column: str | None, declared: dict[str, str]) -> tuple[str, LoraSet]:
    """A row's text-encoder prompt and adapter set from its prompt tags and ``loras`` column;
    LoraError for a malformed entry, a name the job does not declare, or a conflicting scale."""
    text, tagged = split_prompt(prompt)
    both = _merge(list(tagged) + list(parse_column(column)), "prompt tags and loras column")
    unknown = sorted(name for name, _ in both if name not in declared)
    if unknown:
        known = ", ".join(sorted(declared)) or "none declared"
        raise LoraError(f"adapter(s) {', '.join(unknown)} not declared for this job (declared: {known}); "
                        "declare with --lora NAME=PATH or spec loras: {NAME: PATH}")
    return text, both


def format_set(loras: LoraSet) -> str:
    """The ``loras`` column form of an adapter set."""
    return ",".join(f"{name}:{scale:g}" for name, scale in loras)


def parse_declaration(item: str) -> tuple[str, str]:
    """``--lora NAME=PATH``."""
    name, sep, path = item.partition("=")
    if not sep or not ASSIGNMENT_RE.match(name.strip()) or not path.strip():
        raise LoraError(f"--lora {item!r}: expected NAME=PATH, e.g. --lora style=./style.safetensors")
    return name.strip(), path.strip()


def embedding_tokens(text: str, names: Iterable[str]) -> str:
    """``text`` with ComfyUI's ``embedding:NAME`` (and ``embedding:NAME.safetensors``) written as
    ``<NAME>``, the token a declared embedding is loaded under; other text is left as it is."""
    for name in names:
        if "embedding:" in text:
            text = re.sub(rf"embedding:{re.escape(name)}(?:\.safetensors)?(?![\w.-])", f"<{name}>", text)
    return text
