"""Prompt templates: ``{a|b}`` alternatives and ``__wildcard__`` files, parsed and expanded.

A named group ``{name=...}`` is expanded here, alternative by alternative (each a template
itself: nested groups, named or not, and wildcards), so every choice it makes is recorded as
its label column — ``{colour=__colour__}`` records the colour drawn, ``{shape={small|large}
circle|square}`` records "small circle"; a named group inside an alternative not taken is null.
The rest of the text (unnamed ``{a|b}``, ``{2$$a|b|c}``, ``__wildcard__``) is dynamicprompts'."""

from __future__ import annotations

import itertools
import random
import re
from pathlib import Path

from sdbatch.data.columns import KNOWN_COLUMNS
from sdbatch.manifest.values import ASSIGNMENT_RE, ManifestBuildError

MAX_TEMPLATE_PROMPTS = 10_000_000

#: ``{{`` / ``}}`` (literal braces) travel through dynamicprompts as these private-use characters.
_LITERAL_OPEN, _LITERAL_CLOSE = "\ue000", "\ue001"
_WILDCARD_RE = re.compile(r"__([A-Za-z0-9_./-]+?)__")


def _group_end(template: str, start: int, quoted: str) -> int:
    """Index of the ``}`` closing the ``{`` at ``start`` (groups may nest, as in dynamicprompts)."""
    depth = 0
    for i in range(start, len(template)):
        if template[i] == "{":
            depth += 1
        elif template[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    raise ManifestBuildError(f"template {quoted!r}: '{{' is never closed (in {template!r}); write '{{{{' for a literal brace")


def _split_alternatives(body: str) -> list[str]:
    """``body`` split at the ``|`` outside nested groups."""
    alternatives, depth, last = [], 0, 0
    for i, char in enumerate(body):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if char == "|" and depth == 0:
            alternatives.append(body[last:i])
            last = i + 1
    return [*alternatives, body[last:]]


def parse_template(template: str, origin: str | None = None) -> list[tuple[str, list[str]] | str]:
    """Split a template into text and ``(name, alternatives)`` label groups (``{name=a|b}``).

    Text keeps every other ``{...}`` group (``{a|b}``, ``{2$$a|b|c}``, nested ones) and
    ``__wildcard__`` for dynamicprompts; ``{{`` and ``}}`` become literal braces. ``origin``:
    the template the user wrote, quoted in errors (``template`` may be a part of it).
    """
    quoted = origin if origin is not None else template
    parts: list[tuple[str, list[str]] | str] = []
    text: list[str] = []
    i = 0
    while i < len(template):
        if template.startswith("{{", i) or template.startswith("}}", i):
            text.append(_LITERAL_OPEN if template[i] == "{" else _LITERAL_CLOSE)
            i += 2
        elif template[i] == "{":
            end = _group_end(template, i, quoted)
            m = ASSIGNMENT_RE.match(template[i + 1 : end])
            if m is None:
                text.append(template[i : end + 1])
            else:
                name = m.group(1)
                if name in KNOWN_COLUMNS:
                    raise ManifestBuildError(
                        f"template {quoted!r}: group name {name!r} is a manifest column; use a label name such as 'color'"
                    )
                if text:
                    parts.append("".join(text))
                    text = []
                parts.append((name, _split_alternatives(m.group(2))))
            i = end + 1
        elif template[i] == "}":
            raise ManifestBuildError(f"template {quoted!r}: '}}' has no opening '{{' (in {template!r}); write '}}}}' for a literal brace")
        else:
            text.append(template[i])
            i += 1
    if text:
        parts.append("".join(text))
    return parts


def _known_size(parts: list[tuple[str, list[str]] | str]) -> int:
    """How many prompts the label groups and the plain ``{a|b}`` groups make (a lower bound when
    the template also has wildcards, nested or ``$$`` groups, which are counted as they expand)."""
    total = 1
    for part in parts:
        if isinstance(part, tuple):
            total *= len(part[1])
        else:
            for body in re.findall(r"\{([^{}]*)\}", part):
                if "$$" not in body and "__" not in body:
                    total *= body.count("|") + 1
    return total


#: One way a template (or a part of it) expands: its text, and the label of each named group chosen.
_Option = tuple[str, dict[str, str]]


def _restore_literals(text: str) -> str:
    return text.replace(_LITERAL_OPEN, "{").replace(_LITERAL_CLOSE, "}")


class _Expander:
    """dynamicprompts over one set of wildcard files, and the named groups expanded around it,
    for the template ``origin`` (quoted in errors)."""

    def __init__(self, wildcards: Path | None, origin: str):
        from dynamicprompts.generators import CombinatorialPromptGenerator
        from dynamicprompts.wildcards import WildcardManager

        self.wildcards = wildcards
        self.origin = origin
        self.manager = WildcardManager(wildcards) if wildcards else WildcardManager()
        self.combinatorial = CombinatorialPromptGenerator(self.manager)

    def check_wildcards(self) -> None:
        for name in _WILDCARD_RE.findall(self.origin):
            if self.wildcards is None:
                raise ManifestBuildError(f"template {self.origin!r} uses the wildcard __{name}__; pass --wildcards DIR "
                                         f"with a file {name}.txt (one value per line)")
            if not self.manager.get_values(name):
                raise ManifestBuildError(f"template {self.origin!r}: wildcard __{name}__ has no values; "
                                         f"add {Path(self.wildcards) / name}.txt (one value per line)")

    def expand(self, text: str) -> list[str]:
        """Every expansion of ``text`` (no named groups left in it) by dynamicprompts."""
        if "{" not in text and "__" not in text:
            return [text]
        try:
            return [str(p) for p in self.combinatorial.generate(text, max_prompts=MAX_TEMPLATE_PROMPTS + 1)]
        except Exception as exc:  # pyparsing's ParseException and dynamicprompts' own errors
            raise ManifestBuildError(f"template {self.origin!r}: {text!r} is not valid prompt syntax: {exc}") from None

    def options(self, template: str) -> list[_Option]:
        """``template``'s named groups expanded (first group slowest); the rest of its text is
        left to ``expand``."""
        per_part: list[list[_Option]] = []
        for part in parse_template(template, self.origin):
            if isinstance(part, str):
                per_part.append([(part, {})])
                continue
            name, alternatives = part
            per_part.append([(chosen, {name: _restore_literals(chosen), **labels})
                             for alternative in alternatives
                             for text, labels in self.options(alternative)
                             for chosen in self.expand(text)])
        combined: list[_Option] = []
        for combination in itertools.product(*per_part):
            labels: dict[str, str] = {}
            for _, part_labels in combination:
                twice = labels.keys() & part_labels.keys()
                if twice:
                    raise ManifestBuildError(f"template {self.origin!r}: group name(s) {sorted(twice)} used twice")
                labels.update(part_labels)
            combined.append(("".join(text for text, _ in combination), labels))
            if len(combined) > MAX_TEMPLATE_PROMPTS:
                raise ManifestBuildError(f"template {self.origin!r} expands to more than {MAX_TEMPLATE_PROMPTS:,} prompts; split it")
        return combined


def expand_template(
    template: str, *, wildcards: Path | None = None, sample: int | None = None, sample_seed: int = 0,
) -> tuple[list[str], dict[str, list[str | None]]]:
    """The prompts of a template and, for each named group, the choice it made per prompt
    (null where the group was inside an alternative not taken).

    Combinatorial by default (every prompt, first group slowest); ``sample=N`` draws N distinct
    prompts at random instead (without replacement: all of them, shuffled, when there are
    fewer), reproducibly for a ``sample_seed``. Expansion is dynamicprompts'
    (variants ``{a|b}``, ``{2$$a|b|c}``, wildcards ``__name__`` from files in ``wildcards``).
    """
    total = _known_size(parse_template(template))
    if total > MAX_TEMPLATE_PROMPTS:
        raise ManifestBuildError(f"template {template!r} expands to {total:,} prompts (limit {MAX_TEMPLATE_PROMPTS:,}); split it")
    expander = _Expander(wildcards, template)
    expander.check_wildcards()
    expanded: list[tuple[str, dict[str, str]]] = []
    for text, labels in expander.options(template):
        for prompt in expander.expand(text):
            expanded.append((_restore_literals(prompt), labels))
        if len(expanded) > MAX_TEMPLATE_PROMPTS:
            raise ManifestBuildError(f"template {template!r} expands to more than {MAX_TEMPLATE_PROMPTS:,} prompts; split it")
    if sample:
        expanded = random.Random(sample_seed).sample(expanded, min(sample, len(expanded)))
    names = list(dict.fromkeys(name for _, labels in expanded for name in labels))
    return [p for p, _ in expanded], {name: [labels.get(name) for _, labels in expanded] for name in names}
