"""Prompt templates: ``{a|b}`` alternatives and ``__wildcard__`` files, parsed and expanded."""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Iterable
from pathlib import Path

from sdbatch.data.columns import KNOWN_COLUMNS
from sdbatch.manifest.values import ASSIGNMENT_RE, ManifestBuildError

MAX_TEMPLATE_PROMPTS = 10_000_000

#: ``{{`` / ``}}`` (literal braces) travel through dynamicprompts as these private-use characters.
_LITERAL_OPEN, _LITERAL_CLOSE = "\ue000", "\ue001"
_WILDCARD_RE = re.compile(r"__([A-Za-z0-9_./-]+?)__")


def _group_end(template: str, start: int) -> int:
    """Index of the ``}`` closing the ``{`` at ``start`` (groups may nest, as in dynamicprompts)."""
    depth = 0
    for i in range(start, len(template)):
        if template[i] == "{":
            depth += 1
        elif template[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    raise ManifestBuildError(f"template {template!r}: '{{' at position {start} is never closed; write '{{{{' for a literal brace")


def parse_template(template: str) -> list[tuple[str, list[str]] | str]:
    """Split a template into text and ``(name, alternatives)`` label groups (``{name=a|b}``).

    Text keeps every other ``{...}`` group (``{a|b}``, ``{2$$a|b|c}``, nested ones) and
    ``__wildcard__`` for dynamicprompts; ``{{`` and ``}}`` become literal braces.
    """
    parts: list[tuple[str, list[str]] | str] = []
    text: list[str] = []
    i = 0
    while i < len(template):
        if template.startswith("{{", i) or template.startswith("}}", i):
            text.append(_LITERAL_OPEN if template[i] == "{" else _LITERAL_CLOSE)
            i += 2
        elif template[i] == "{":
            end = _group_end(template, i)
            m = ASSIGNMENT_RE.match(template[i + 1 : end])
            if m is None:
                text.append(template[i : end + 1])
            else:
                name = m.group(1)
                if name in KNOWN_COLUMNS:
                    raise ManifestBuildError(
                        f"template {template!r}: group name {name!r} is a manifest column; use a label name such as 'color'"
                    )
                if text:
                    parts.append("".join(text))
                    text = []
                parts.append((name, m.group(2).split("|")))
            i = end + 1
        elif template[i] == "}":
            raise ManifestBuildError(f"template {template!r}: '}}' at position {i} has no opening '{{'; write '}}}}' for a literal brace")
        else:
            text.append(template[i])
            i += 1
    if text:
        parts.append("".join(text))
    return parts


def _known_size(parts: list[tuple[str, list[str]] | str]) -> int:
    """How many prompts the label groups and the plain ``{a|b}`` groups make (a lower bound when
    the template also has wildcards or ``$$`` groups, which are counted as they expand)."""
    total = 1
    for part in parts:
        if isinstance(part, tuple):
            total *= len(part[1])
        else:
            for body in re.findall(r"\{([^{}]*)\}", part):
                if "$$" not in body and "__" not in body:
                    total *= body.count("|") + 1
    return total


class _Expander:
    """dynamicprompts over one set of wildcard files: every expansion (combinatorial) or
    ``sample`` seeded random draws."""

    def __init__(self, wildcards: Path | None, sample: int | None, seed: int):
        from dynamicprompts.generators import CombinatorialPromptGenerator, RandomPromptGenerator
        from dynamicprompts.wildcards import WildcardManager

        self.wildcards = wildcards
        self.manager = WildcardManager(wildcards) if wildcards else WildcardManager()
        self.sample = sample
        self.combinatorial = CombinatorialPromptGenerator(self.manager)
        self.random = RandomPromptGenerator(self.manager, seed=seed)
        self.rng = random.Random(seed)  # label-group choices when sampling

    def random_choice(self, alternatives: list[str]) -> str:
        return self.rng.choice(alternatives)

    def check_wildcards(self, template: str) -> None:
        for name in _WILDCARD_RE.findall(template):
            if self.wildcards is None:
                raise ManifestBuildError(f"template {template!r} uses the wildcard __{name}__; pass --wildcards DIR "
                                         f"with a file {name}.txt (one value per line)")
            if not self.manager.get_values(name):
                raise ManifestBuildError(f"template {template!r}: wildcard __{name}__ has no values; "
                                         f"add {Path(self.wildcards) / name}.txt (one value per line)")

    def expand(self, text: str, limit: int) -> list[str]:
        if "{" not in text and "__" not in text:
            return [text]
        try:
            if self.sample:
                return [str(p) for p in self.random.generate(text, 1)]
            return [str(p) for p in self.combinatorial.generate(text, max_prompts=limit + 1)]
        except Exception as exc:  # pyparsing's ParseException and dynamicprompts' own errors
            raise ManifestBuildError(f"template {text!r} is not valid prompt syntax: {exc}") from None


def expand_template(
    template: str, *, wildcards: Path | None = None, sample: int | None = None, sample_seed: int = 0,
) -> tuple[list[str], dict[str, list[str]]]:
    """The prompts of a template and, for each label group, the chosen alternative per prompt.

    Combinatorial by default (every prompt, first group slowest); ``sample=N`` draws N prompts
    at random instead, reproducibly for a ``sample_seed``. Expansion is dynamicprompts'
    (variants ``{a|b}``, ``{2$$a|b|c}``, wildcards ``__name__`` from files in ``wildcards``).
    """
    parts = parse_template(template)
    groups = [p for p in parts if isinstance(p, tuple)]
    names = [name for name, _ in groups]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ManifestBuildError(f"template {template!r}: group name(s) {sorted(dup)} used twice")
    total = sample if sample else _known_size(parts)
    if total > MAX_TEMPLATE_PROMPTS:
        raise ManifestBuildError(f"template {template!r} expands to {total:,} prompts (limit {MAX_TEMPLATE_PROMPTS:,}); split it")
    expander = _Expander(wildcards, sample, sample_seed)
    expander.check_wildcards(template)
    choices: Iterable[tuple[str, ...]] = (
        [tuple(expander.random_choice(alts) for _, alts in groups) for _ in range(sample)] if sample
        else itertools.product(*(alts for _, alts in groups))
    )
    prompts: list[str] = []
    labels: dict[str, list[str]] = {n: [] for n in names}
    for choice in choices:
        it = iter(choice)
        text = "".join(next(it) if isinstance(p, tuple) else p for p in parts)
        expanded = expander.expand(text, MAX_TEMPLATE_PROMPTS - len(prompts))
        if len(prompts) + len(expanded) > MAX_TEMPLATE_PROMPTS:
            raise ManifestBuildError(f"template {template!r} expands to more than {MAX_TEMPLATE_PROMPTS:,} prompts; split it")
        prompts.extend(p.replace(_LITERAL_OPEN, "{").replace(_LITERAL_CLOSE, "}") for p in expanded)
        for name, value in zip(names, choice):
            labels[name].extend([value] * len(expanded))
    return prompts, labels
