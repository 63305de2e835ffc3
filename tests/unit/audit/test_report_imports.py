"""``audit.report.import_renderers``: what ``job.submit`` imports ahead, while a job runs, so
that the report at its end only renders (issue 25, the fixed cost of a job)."""

from __future__ import annotations

import sys


def test_import_renderers_imports_what_rendering_needs_with_the_headless_backend():
    import matplotlib

    from sdbatch.audit.report import import_renderers

    import_renderers()
    assert {"jinja2", "matplotlib.figure", "PIL.Image"} <= sys.modules.keys()
    assert matplotlib.get_backend().lower() == "agg"  # no display: the page's chart is drawn off-screen
