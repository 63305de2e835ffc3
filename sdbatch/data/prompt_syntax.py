"""AUTOMATIC1111 / ComfyUI prompt syntax: the one table of its forms, each a regular expression
(Arrow's RE2 dialect, matched per row by manifest validation) and what validation does with a
prompt that uses it; and the reading of A1111's emphasis and ``BREAK`` into weighted text
fragments (``weighted_segments``), which ``models.prompt_weights`` hands to compel.

Emphasis ``(word:1.3)`` / ``(word)`` / ``[word]`` and ``BREAK`` are interpreted for the families
whose adapter declares ``weighted_prompts`` (CLIP text encoders: SD 1.x/2.x, SDXL, SD3's CLIP
pair); the others' T5/LLM encoders read them as literal text, which validation warns about.
Prompt editing ``[a:b:0.5]`` and alternation ``[a|b]`` are not built: refused per row.
``--literal-prompts`` (``model.prompt_syntax: literal``) says the brackets are meant literally
and turns all of it off.

A leaf module: the standard library only."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SyntaxForm:
    name: str  # what the user wrote, in A1111's words
    pattern: str  # RE2, searched anywhere in the prompt
    refused: bool  # True: a row error; False: a warning counting the rows
    weighting: bool = False  # read by the families that interpret emphasis (no warning for them)


PROMPT_SYNTAX: tuple[SyntaxForm, ...] = (
    SyntaxForm("prompt editing [from:to:when]", r"\[[^\[\]]*:\s*[0-9]*\.?[0-9]+\s*\]", refused=True),
    SyntaxForm("alternation [a|b]", r"\[[^\[\]]*\|[^\[\]]*\]", refused=True),
    SyntaxForm("emphasis (word:1.3)", r"\([^()]*:\s*[0-9]*\.?[0-9]+\s*\)", refused=False, weighting=True),
    SyntaxForm("emphasis ((word)) / [word]", r"\(\([^()]+\)\)|\[[^\[\]:|]+\]", refused=False, weighting=True),
    SyntaxForm("BREAK", r"(^|\s)BREAK(\s|$)", refused=False, weighting=True),
    SyntaxForm("embedding:NAME", r"(^|[\s,(])embedding:[A-Za-z0-9_.-]+", refused=False),
)

#: What every form above contains: a prompt without it is checked by this one pattern alone.
ANY_FORM = r"[\[(]|BREAK|embedding:"

REFUSED_RULE = "AUTOMATIC1111's {form} is not built by sdbatch: the text encoder would read it as literal text"
REFUSED_FIX = ("write the variants as separate rows (sdbatch manifest -t 'a {red|blue} cat' expands them), or pass "
               "--literal-prompts if the brackets are meant literally")
WARNING = ("{count:,} row(s) use AUTOMATIC1111's {form} (first: row {row}); {reader} reads it as literal text, "
           "and a prompt is read up to the encoder's token limit (prompt_truncated_at records where). Remove it, or "
           "pass --literal-prompts if it is meant literally.")
#: who reads a form literally, for WARNING: a family without ``weighted_prompts``, or any model
#: when validation does not know the model
LITERAL_READER = "sdbatch weights it for CLIP text encoders only: the {family} model's text encoder (T5 or an LLM)"
UNKNOWN_READER = ("sdbatch weights it for CLIP text encoders only (SD 1.x/2.x, SDXL, SD3): any other model's text "
                  "encoder")

#: A1111's emphasis factors: ``(x)`` multiplies x's weight by 1.1, ``[x]`` divides it by 1.1
EMPHASIS_UP = 1.1
EMPHASIS_DOWN = 1 / 1.1
# A1111's emphasis tokens, in its order: escaped brackets and backslashes, an opening bracket,
# a weight closing a round bracket, a closing bracket, a run of plain text, a lone colon
_EMPHASIS_TOKEN = re.compile(r"\\[()\[\]\\]|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")
_BREAK = re.compile(r"\s*\bBREAK\b\s*")

#: a prompt's reading: segments (separated by BREAK, each starting a new 75-token chunk) of
#: (text, weight) fragments
Segments = list[list[tuple[str, float]]]


def weighted_segments(prompt: str) -> Segments:
    """``prompt`` read by AUTOMATIC1111's emphasis rules: ``(x)`` ×1.1, ``[x]`` ÷1.1, ``(x:w)``
    ×w, nesting multiplies, an unclosed bracket applies to the rest, ``\\(`` ``\\)`` ``\\[``
    ``\\]`` ``\\\\`` are the literal characters, a bracket closing nothing is text; ``BREAK``
    (a word of its own, capitals) ends a segment. Adjacent fragments of one weight are merged,
    so a prompt without these characters is one fragment holding it unchanged."""
    parts: list[list[Any] | None] = []  # [text, weight], or None where a BREAK stands
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for part in parts[start:]:
            if part is not None:
                part[1] *= factor

    for match in _EMPHASIS_TOKEN.finditer(prompt):
        token, weight = match.group(0), _number(match.group(1))
        if token.startswith("\\"):
            parts.append([token[1:] or token, 1.0])
        elif token == "(":
            round_open.append(len(parts))
        elif token == "[":
            square_open.append(len(parts))
        elif weight is not None and round_open:
            multiply(round_open.pop(), weight)
        elif token == ")" and round_open:
            multiply(round_open.pop(), EMPHASIS_UP)
        elif token == "]" and square_open:
            multiply(square_open.pop(), EMPHASIS_DOWN)
        else:
            for i, piece in enumerate(_BREAK.split(token)):
                if i:
                    parts.append(None)
                parts.append([piece, 1.0])
    for start in round_open:
        multiply(start, EMPHASIS_UP)
    for start in square_open:
        multiply(start, EMPHASIS_DOWN)
    segments: Segments = [[]]
    for part in parts:
        if part is None:
            segments.append([])
        elif part[0]:
            fragments = segments[-1]
            if fragments and fragments[-1][1] == part[1]:
                fragments[-1] = (fragments[-1][0] + part[0], part[1])
            else:
                fragments.append((part[0], part[1]))
    return [fragments or [("", 1.0)] for fragments in segments]


def plain_text(segments: Segments) -> str | None:
    """The text of a reading that weights nothing and breaks nothing (None otherwise): what the
    model's own prompt encoding is given, so ``(red:1.0)`` renders exactly as ``red``."""
    if len(segments) == 1 and all(weight == 1.0 for _, weight in segments[0]):
        return "".join(text for text, _ in segments[0])
    return None


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:  # "1.2.3" or ".": not a weight, so the bracket and the text stay literal
        return None
