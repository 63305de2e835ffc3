"""Other tools' column names and sampler names (issue 26 item 1): every name of the alias table
is refused naming the sdbatch column or setting, with or without --strict; AUTOMATIC1111 sampler
names are accepted in the scheduler column and the spec default, and rows hold sdbatch's name."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sdbatch.data.aliases import FOREIGN_COLUMNS, foreign
from sdbatch.data.columns import KNOWN_COLUMNS
from sdbatch.data.samplers import SAMPLERS, sampler_name
from sdbatch.manifest.reader import read_rows
from sdbatch.manifest.sources import open_manifest
from sdbatch.manifest.validate import validate_manifest
from sdbatch.spec import JobSpec, SpecError, load_spec


def _manifest(tmp_path: Path, **cols) -> str:
    cols.setdefault("prompt", ["a cat", "a dog"])
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table(cols), path)
    return str(path)


def test_the_table_names_only_real_columns_and_no_sdbatch_column():
    for name, entry in FOREIGN_COLUMNS.items():
        assert name not in KNOWN_COLUMNS, name
        assert (entry.column is None) != (entry.instead is None), name
        if entry.column is not None:
            assert entry.column in KNOWN_COLUMNS, name


@pytest.mark.parametrize("strict", [False, True])
def test_each_foreign_name_is_refused_naming_the_sdbatch_column(tmp_path, strict):
    names = sorted(FOREIGN_COLUMNS)
    path = _manifest(tmp_path, **{name: [1.0, 2.0] for name in names})
    spec = load_spec(None, [f"limits.max_errors_shown={len(names)}"])
    report = validate_manifest(open_manifest(path), spec, strict=strict)
    assert report.issue_count == len(names)
    for name in names:
        entry = FOREIGN_COLUMNS[name]
        [issue] = [i for i in report.issues if i.column == name]
        if entry.column is not None:
            assert f"sdbatch's column {entry.column!r}" in issue.rule
            assert issue.fix == entry.fix(name) and issue.fix.startswith(f"rename column {name!r} to {entry.column!r}")
        else:
            assert entry.instead is not None and entry.instead in issue.fix
        assert issue.render() in report.render()


def test_a1111_spellings_of_a_name_are_refused_too(tmp_path):
    for spelling in ("CFG scale", "Denoising-strength", "Sampler"):
        assert foreign(spelling) is not None
    report = validate_manifest(open_manifest(_manifest(tmp_path, **{"CFG scale": [7.0, 8.0]})), JobSpec())
    assert not report.ok and "rename column 'CFG scale' to 'guidance_scale'" in report.render()


def test_a_label_not_in_the_table_still_passes(tmp_path):
    report = validate_manifest(open_manifest(_manifest(tmp_path, label_style=["x", "y"])), JobSpec())
    assert report.ok, report.render()


def test_a1111_sampler_names_map_to_sdbatch_samplers():
    for sampler in SAMPLERS.values():
        assert sampler_name(sampler.name) == sampler.name
        mapped = sampler_name(sampler.a1111.upper())
        assert SAMPLERS[mapped].a1111 == sampler.a1111
    assert sampler_name("DPM++ 2M Karras") == "dpmpp_2m_karras"
    assert sampler_name("Euler") == "euler"  # the noise-prediction one, which A1111 means
    assert sampler_name("no such sampler") == "no such sampler"


def test_a1111_sampler_names_are_accepted_in_the_column_and_rows_hold_sdbatch_names(tmp_path):
    path = _manifest(tmp_path, prompt=["a", "b", "c"], scheduler=["DPM++ 2M Karras", "euler a", None])
    spec = load_spec(None, ["defaults.scheduler=Euler a"])
    assert spec.defaults.scheduler == "euler_a"
    manifest = open_manifest(path)
    report = validate_manifest(manifest, spec)
    assert report.ok, report.render()
    assert report.summary["schedulers"] == {"dpmpp_2m_karras": 1, "euler_a": 2}
    assert [r.scheduler for r in read_rows(manifest, spec, 0, 3)] == ["dpmpp_2m_karras", "euler_a", "euler_a"]


def test_an_unknown_sampler_is_still_refused(tmp_path):
    report = validate_manifest(open_manifest(_manifest(tmp_path, scheduler=["DPM++ 9M", "euler"])), JobSpec())
    assert not report.ok and "'DPM++ 9M'" in report.render()
    with pytest.raises(SpecError, match="DPM\\+\\+ 9M"):
        load_spec(None, ["defaults.scheduler=DPM++ 9M"])
