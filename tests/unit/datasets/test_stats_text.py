"""``datasets.stats.render``: the text ``sdbatch stats`` prints. Pure."""

from sdbatch.datasets.stats import render


def test_a_column_named_label_is_named_once():
    stats = {"rows": 3, "ok": 3, "failed": 0, "blank": 0, "duplicates": 0,
             "labels": {"label": {"cat": 2, "dog": 1}, "colour": {"red": 3}},
             "scores": {"clip_score": {"count": 3, "min": 0.2}}}
    assert render(stats).splitlines()[5:] == [
        "labels      label: cat=2, dog=1",
        "            colour: red=3",
        "scores      clip_score: count=3, min=0.2",
    ]
