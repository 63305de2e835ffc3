"""AUTOMATIC1111 / ComfyUI prompt syntax that sdbatch does not interpret: the one table of its
forms, each a regular expression (Arrow's RE2 dialect, matched per row by manifest validation)
and what validation does with a prompt that uses it.

sdbatch hands the prompt to the pipeline as written, so ``(red:1.3)`` or ``BREAK`` reach the
text encoder as literal text. Forms whose meaning cannot be approximated by reading them
literally (prompt editing ``[a:b:0.5]``, alternation ``[a|b]``) are refused; emphasis,
``BREAK`` and ``embedding:`` references are warned about. ``--literal-prompts`` says the
brackets are meant literally and turns both off.

A leaf module: the standard library only."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SyntaxForm:
    name: str  # what the user wrote, in A1111's words
    pattern: str  # RE2, searched anywhere in the prompt
    refused: bool  # True: a row error; False: a warning counting the rows


PROMPT_SYNTAX: tuple[SyntaxForm, ...] = (
    SyntaxForm("prompt editing [from:to:when]", r"\[[^\[\]]*:\s*[0-9]*\.?[0-9]+\s*\]", refused=True),
    SyntaxForm("alternation [a|b]", r"\[[^\[\]]*\|[^\[\]]*\]", refused=True),
    SyntaxForm("emphasis (word:1.3)", r"\([^()]*:\s*[0-9]*\.?[0-9]+\s*\)", refused=False),
    SyntaxForm("emphasis ((word)) / [word]", r"\(\([^()]+\)\)|\[[^\[\]:|]+\]", refused=False),
    SyntaxForm("BREAK", r"(^|\s)BREAK(\s|$)", refused=False),
    SyntaxForm("embedding:NAME", r"(^|[\s,(])embedding:[A-Za-z0-9_.-]+", refused=False),
)

#: What every form above contains: a prompt without it is checked by this one pattern alone.
ANY_FORM = r"[\[(]|BREAK|embedding:"

REFUSED_RULE = "AUTOMATIC1111's {form} is not built by sdbatch: the text encoder would read it as literal text"
REFUSED_FIX = ("write the variants as separate rows (sdbatch manifest -t 'a {red|blue} cat' expands them), or pass "
               "--literal-prompts if the brackets are meant literally")
WARNING = ("{count:,} row(s) use AUTOMATIC1111's {form} (first: row {row}); sdbatch does not interpret it: the text "
           "encoder reads it as literal text, and a prompt is read up to the encoder's token limit "
           "(prompt_truncated_at records where). Remove it, or pass --literal-prompts if it is meant literally.")
