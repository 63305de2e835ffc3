"""AUTOMATIC1111's emphasis and BREAK read into weighted fragments (``data.prompt_syntax.
weighted_segments``), by A1111's own rules; compel turns them into conditioning
(tests/integration/models/test_prompt_weights.py)."""

from __future__ import annotations

import pytest

from sdbatch.data.prompt_syntax import plain_text, weighted_segments

UP = 1.1


@pytest.mark.parametrize(("prompt", "segments"), [
    ("a red circle", [[("a red circle", 1.0)]]),
    ("a (red:1.3) circle", [[("a ", 1.0), ("red", 1.3), (" circle", 1.0)]]),
    ("a (red) circle", [[("a ", 1.0), ("red", UP), (" circle", 1.0)]]),
    ("a ((red)) circle", [[("a ", 1.0), ("red", UP * UP), (" circle", 1.0)]]),
    ("a [red] circle", [[("a ", 1.0), ("red", 1 / UP), (" circle", 1.0)]]),
    ("(a (red:2) b)", [[("a ", UP), ("red", 2 * UP), (" b", UP)]]),
    ("a (red circle", [[("a ", 1.0), ("red circle", UP)]]),  # unclosed: to the end
    (r"a \(red\) \[x\] circle", [[("a (red) [x] circle", 1.0)]]),  # escaped: literal
    ("a red) circle: 2", [[("a red) circle: 2", 1.0)]]),  # closing nothing, a lone colon: text
    ("(red:1.0) circle", [[("red circle", 1.0)]]),
    ("a circle BREAK a (square:1.2)", [[("a circle", 1.0)], [("a ", 1.0), ("square", 1.2)]]),
    ("BREAKFAST Break", [[("BREAKFAST Break", 1.0)]]),  # BREAK is a word of its own, in capitals
    ("", [[("", 1.0)]]),
])
def test_a1111_emphasis_rules(prompt, segments):
    read = weighted_segments(prompt)
    assert [[text for text, _ in s] for s in read] == [[text for text, _ in s] for s in segments]
    assert [w for s in read for _, w in s] == pytest.approx([w for s in segments for _, w in s])


def test_plain_text_is_the_reading_that_weights_nothing():
    assert plain_text(weighted_segments("(red:1.0) circle")) == "red circle"
    assert plain_text(weighted_segments(r"a \(b\)")) == "a (b)"
    assert plain_text(weighted_segments("a (red) circle")) is None
    assert plain_text(weighted_segments("a BREAK b")) is None
