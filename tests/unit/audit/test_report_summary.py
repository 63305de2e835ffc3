"""``audit.report.devices_text``: what report.html says a job ran on. Pure."""

import pytest

from sdbatch.audit.report import devices_text


@pytest.mark.parametrize(("workers", "gpus", "text"), [
    (1, 0, "1 worker"), (3, 0, "3 workers"), (1, 1, "1 worker × 1 GPU"), (2, 2, "2 workers × 2 GPUs"),
    (4, 0.5, "4 workers × 0.5 GPU"),
])
def test_devices_are_counted_in_words(workers, gpus, text):
    assert devices_text(workers, gpus) == text
