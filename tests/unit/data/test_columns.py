"""The column table (sdbatch/columns.py): every schema derived from it agrees with it.

Pure and fast: no torch, no Ray. The end-to-end proof that a column needs only the table
(clip_skip through submit, the index, the infotext and reproduce) is in tests/integration/audit/test_reproduce.py.
"""

from __future__ import annotations

import dataclasses

import pytest
import typer
from conftest import write_manifest

from sdbatch.cli.app import app
from sdbatch.data import columns as C
from sdbatch.data.index import INDEX_COLUMN_TYPES, index_types
from sdbatch.data.record import embedded_record, row_from_stored
from sdbatch.data.row import Row
from sdbatch.data.samplers import SAMPLERS
from sdbatch.manifest.builder import COLUMN_TYPES
from sdbatch.manifest.reader import read_rows
from sdbatch.manifest.sources import open_manifest
from sdbatch.manifest.validate import validate_manifest
from sdbatch.output.encode import A1111_SAMPLER_NAMES, infotext, parse_infotext
from sdbatch.spec import JobSpec, RowDefaults, SpecError, load_spec


def a_row(**changes) -> Row:
    values = dict(index=3, id="r3", prompt="a cat", negative_prompt="", seed=5, steps=20, guidance_scale=7.5,
                  width=64, height=64, scheduler="ddim")
    return Row(**{**values, **changes})


def test_spec_defaults_are_the_table_defaults():
    fields = RowDefaults.model_fields
    assert list(fields) == [c.name for c in C.DEFAULTED]
    for column in C.DEFAULTED:
        assert fields[column.name].default == column.default and fields[column.name].annotation == column.spec_type
    assert RowDefaults().model_dump() == {c.name: c.default for c in C.DEFAULTED}


def test_row_builder_and_index_types_are_the_table_types():
    assert [f.name for f in dataclasses.fields(Row)][1:-1] == sorted(
        C.KNOWN_COLUMNS, key=lambda n: C.COLUMN[n].nullable or C.COLUMN[n].recorded_when_set or C.COLUMN[n].row is not None)
    assert COLUMN_TYPES == C.arrow_types()
    assert {n: INDEX_COLUMN_TYPES[n] for n in C.KNOWN_COLUMNS} == index_types()
    assert list(INDEX_COLUMN_TYPES)[:2] == ["id", "row"]
    assert set(a_row().parameters()) == {"row", *C.KNOWN_COLUMNS}


def test_submit_has_one_flag_per_flagged_column():
    command = typer.main.get_command(app).commands["submit"]
    options = {opt for p in command.params for opt in p.opts}
    assert {c.flag for c in C.COLUMNS if c.flag} <= options
    assert {"--steps", "--guidance-scale", "--width", "--height", "--scheduler", "--clip-skip"} <= options


def test_batch_key_is_every_batch_key_column():
    base = a_row()
    changed = {"steps": 21, "guidance_scale": 5.0, "width": 72, "height": 72, "scheduler": "euler",
               "strength": 0.5, "clip_skip": 2, "loras": (("ink", 0.8),), "refiner_switch": 0.8,
               "hires_scale": 2.0, "hires_strength": 0.4, "hires_steps": 5, "controlnet": "edges:1",
               "ip_adapter_scale": 0.5}
    assert set(changed) == set(C.BATCH_KEY)
    for name, value in changed.items():
        assert dataclasses.replace(base, **{name: value}).batch_key() != base.batch_key(), name
    assert dataclasses.replace(base, seed=6, prompt="a dog").batch_key() == base.batch_key()
    inpaint = dataclasses.replace(base, init_image="/i.png", strength=0.5)
    assert dataclasses.replace(inpaint, mask_image="/m.png").batch_key() != inpaint.batch_key()  # another pipeline


def test_infotext_writes_and_reads_every_labelled_column():
    record = {**a_row(init_image="/i.png", strength=0.5, clip_skip=2, scheduler="euler_a", refiner_switch=0.7).parameters(),
              "model_hash": "abcdef0123", "sdbatch_version": "0.1.0", "refiner_name": "xl-refiner",
              "refiner_fingerprint": "0123456789abcdef"}
    text = infotext(record)
    assert text.splitlines()[-1] == ("Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 5, Size: 64x64, "
                                     "Model hash: abcdef0123, Denoising strength: 0.5, Clip skip: 2, "
                                     "Refiner: xl-refiner [0123456789], Refiner switch at: 0.7, Version: sdbatch 0.1.0")
    parsed = parse_infotext(text)
    for column in C.COLUMNS:
        if column.a1111 and record[column.name] is not None:
            assert parsed[column.name] == record[column.name], column.name
    # the hires-fix pass as A1111 writes it: its strength is the "Denoising strength"
    hires = C.record_parameters(a_row(hires_scale=2.0, hires_strength=0.4, hires_steps=5).parameters())
    hires_text = infotext(hires)
    assert "Size: 64x64, Denoising strength: 0.4, Hires upscale: 2, Hires steps: 5, Hires upscaler: Latent" in hires_text
    assert {k: parse_infotext(hires_text)[k] for k in ("hires_scale", "hires_steps")} == {"hires_scale": 2.0, "hires_steps": 5}
    # A1111 leaves out clip skip 1 and the strength of a text-to-image row
    plain = infotext({**a_row(strength=0.5).parameters()})
    assert "Clip skip" not in plain and "Denoising strength" not in plain and "Refiner" not in plain
    assert A1111_SAMPLER_NAMES == {s.name: s.a1111 for s in SAMPLERS.values() if not s.flow}


def test_record_and_index_round_trip_through_the_table():
    row = a_row(clip_skip=2, extra={"label": "x"})
    assert C.record_parameters(row.parameters())["clip_skip"] == 2
    assert "clip_skip" not in C.record_parameters(a_row().parameters())  # images from before the column
    assert "refiner_switch" not in C.record_parameters(a_row().parameters())  # a row without a refiner
    refined = a_row(refiner_switch=0.8)  # at the job default, still recorded: the row was refined
    assert C.record_parameters(refined.parameters())["refiner_switch"] == 0.8
    assert row_from_stored(C.record_parameters(refined.parameters())) == refined
    assert "refiner_switch" not in C.fingerprint_defaults({"refiner_switch": 0.8, "steps": 20})
    assert row_from_stored(row.parameters(), row.extra) == row
    old_index_row = {k: v for k, v in a_row().parameters().items() if k != "clip_skip"}
    assert row_from_stored(old_index_row) == a_row()
    entry = {**row.parameters(), "batch_id": "00000-000"}
    assert embedded_record({**C.record_parameters(row.parameters()), "batch_id": "00000-000"}, entry) is not None
    assert embedded_record({**row.parameters(), "clip_skip": 1, "batch_id": "00000-000"}, entry) is None
    assert embedded_record({**row.parameters(), "steps": "many", "batch_id": "00000-000"}, entry) is None
    # the job fingerprint is unchanged by a later column left at its default
    assert "clip_skip" not in JobSpec().fingerprint_fields()["defaults"]
    assert load_spec(None, ["defaults.clip_skip=2"]).fingerprint_fields()["defaults"]["clip_skip"] == 2


BAD_VALUES = {"steps": 0, "guidance_scale": 51.0, "width": 72000, "height": 32, "strength": 1.5, "clip_skip": 13,
              "refiner_switch": 1.0, "hires_scale": 5.0, "hires_strength": 1.5, "hires_steps": 0,
              "ip_adapter_scale": 2.5}


@pytest.mark.parametrize("name", [c.name for c in C.COLUMNS if c.range])
def test_every_range_rule_is_checked_in_rows_and_spec_defaults(tmp_path, name):
    column, spec = C.COLUMN[name], JobSpec()
    row = {"prompt": "a", name: BAD_VALUES[name], **({"init_image": "i.png"} if name == "strength" else {}),
           **({"hires_scale": 2.0} if name in ("hires_strength", "hires_steps") else {})}
    report = validate_manifest(open_manifest(str(write_manifest(tmp_path / "m.parquet", [row]))), spec)
    rule = column.range.text(name, spec.limits)
    assert any(i.row == 0 and i.column == name and i.rule == rule and i.fix == column.range.fix_for(BAD_VALUES[name])
               for i in report.issues), report.render()
    # the same value as the job default: refused when the spec loads, or reported as row -1
    try:
        bad_default = load_spec(None, [f"defaults.{name}={BAD_VALUES[name]}"])
    except SpecError as exc:
        assert f"defaults.{name}" in str(exc)
        return
    report = validate_manifest(open_manifest(str(write_manifest(tmp_path / "ok.parquet", [{"prompt": "a"}]))), bad_default)
    assert any(i.row == -1 and i.column == f"defaults.{name}" and rule in i.rule for i in report.issues), report.render()


def test_clip_skip_column_reads_validates_and_defaults(tmp_path):
    path = write_manifest(tmp_path / "m.parquet", [{"prompt": "a", "clip_skip": 2}, {"prompt": "b", "clip_skip": None}])
    manifest = open_manifest(str(path))
    assert validate_manifest(manifest, JobSpec()).ok
    rows = read_rows(manifest, load_spec(None, ["defaults.clip_skip=3"]), 0, 2)
    assert [r.clip_skip for r in rows] == [2, 3] and "clip_skip" not in rows[0].extra
    wrong_type = write_manifest(tmp_path / "s.parquet", [{"prompt": "a", "clip_skip": "2"}])
    issue = validate_manifest(open_manifest(str(wrong_type)), JobSpec()).issues[0]
    assert issue.column == "clip_skip" and "integer column" in issue.rule


def test_a_conditional_column_is_one_table_entry(tmp_path, monkeypatch):
    """Validation refuses a conditional column where it does not apply from its column-table
    declaration alone (``Column.applies_when``): those declared today, and one made up here."""
    from sdbatch.manifest import validate as validate_module

    assert [c.name for c in C.CONDITIONAL] == ["strength", "refiner_switch", "mask_image", "hires_strength", "hires_steps",
                                               "control_image", "ip_adapter_image", "ip_adapter_scale"]
    rows = [{"id": "a", "prompt": "a", "init_image": None, "refiner_switch": 0.5, "strength": 0.5, "clip_skip": 2},
            {"id": "b", "prompt": "b", "init_image": "i.png", "refiner_switch": None, "strength": 0.5, "clip_skip": 2}]
    manifest = open_manifest(str(write_manifest(tmp_path / "m.parquet", rows)))
    issues = {(i.row, i.column): i for i in validate_manifest(manifest, JobSpec()).issues}
    assert set(issues) == {(0, "refiner_switch"), (0, "strength")}
    assert issues[0, "refiner_switch"].fix == C.COLUMN["refiner_switch"].applies_when.fix
    assert "needs init_image in the same row" in issues[0, "strength"].rule
    img2img_only = C.AppliesWhen("clip_skip is only for img2img rows here", "set init_image", row_column="init_image")
    made_up = dataclasses.replace(C.COLUMN["clip_skip"], applies_when=img2img_only)
    monkeypatch.setattr(validate_module, "CONDITIONAL", (*C.CONDITIONAL, made_up))
    issues = {(i.row, i.column): i for i in validate_manifest(manifest, JobSpec()).issues}
    assert issues[0, "clip_skip"].rule == img2img_only.rule and (1, "clip_skip") not in issues
