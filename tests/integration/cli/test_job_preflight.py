"""Job-level problems found before any worker starts: exit 2, a message naming what is wrong
and the fix, nothing written (issue 11). Validation runs in process (CliRunner); ``submit``
runs as a subprocess, and every case here stops before Ray starts.
"""

from __future__ import annotations

import datetime
import decimal
import struct
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_manifest
from typer.testing import CliRunner

from sdbatch.cli.app import app

runner = CliRunner()


def validate(*args) -> tuple[int, str]:
    result = runner.invoke(app, ["validate", *map(str, args)])
    return result.exit_code, " ".join((result.stdout + result.stderr).split())


def submit(*args: object, prelude: str = "pass") -> subprocess.CompletedProcess:
    """``sdbatch submit`` in a subprocess; ``prelude`` runs first (to hide a package)."""
    code = f"import sys; {prelude}; from sdbatch.cli.main import main; sys.argv = ['sdbatch', 'submit', *sys.argv[1:]]; main()"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=300)


def test_id_storage_would_refuse_is_a_validation_error(tmp_path):
    path = write_manifest(tmp_path / "m.parquet", [{"id": "ok-1", "prompt": "a"}, {"id": "x.sdbatch-tmp-y", "prompt": "b"}])
    code, text = validate(path)
    assert code == 2 and "row 1 (id 'x.sdbatch-tmp-y'), column 'id'" in text and "'.sdbatch-tmp-'" in text, text


@pytest.mark.parametrize("value, type_text", [
    (datetime.datetime(2024, 5, 1, 12), "timestamp[us]"),
    (datetime.date(2024, 5, 1), "date32[day]"),
    (decimal.Decimal("1.25"), "decimal128(3, 2)"),
    (b"\x00\x01", "binary"),
    (datetime.timedelta(seconds=3), "duration[us]"),
    ([datetime.date(2024, 5, 1)], "date32[day]"),  # nested
])
def test_passthrough_types_the_record_cannot_hold_are_refused(tmp_path, value, type_text):
    path = write_manifest(tmp_path / "m.parquet", [{"prompt": "a", "taken": value}])
    code, text = validate(path)
    assert code == 2, text
    assert "column 'taken'" in text and f"no faithful form for {type_text}" in text and "cast the column to string" in text


def test_mixed_passthrough_types_across_files_are_refused(tmp_path):
    folder = tmp_path / "parts"
    folder.mkdir()
    write_manifest(folder / "a.parquet", [{"prompt": "a", "label": 1}])
    write_manifest(folder / "b.parquet", [{"prompt": "b", "label": "one"}])
    write_manifest(folder / "c.parquet", [{"prompt": "c", "label": None}])  # all-null: fine
    code, text = validate(folder)
    assert code == 2 and "1 error in total" in text and "row 1, column 'label'" in text, text
    assert f"{folder / 'a.parquet'}: int64; {folder / 'b.parquet'}: string" in text and "row 1" in text


def test_footer_row_count_that_disagrees_with_the_data_is_refused(tmp_path):
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"prompt": [f"p{i}" for i in range(300)]}), path)
    data = path.read_bytes()
    size = struct.unpack("<i", data[-8:-4])[0]
    footer = data[-8 - size:-8]
    at = footer.find(bytes([0x16, 0xD8, 0x04]))  # FileMetaData.num_rows = 300 (zigzag varint), before the row groups
    path.write_bytes(data[:-8 - size] + footer[:at] + bytes([0x16, 0xDA, 0x04]) + footer[at + 3:] + data[-8:])
    assert pq.ParquetFile(path).metadata.num_rows == 301
    code, text = validate(path)
    assert code == 2 and "footer says 301 rows but its data holds 300" in text and "Traceback" not in text, text


def test_misspelled_columns_warn_and_strict_refuses(tmp_path):
    path = write_manifest(tmp_path / "m.parquet", [{"promt_x": "x", "prompt": "a", "widht": 64, "negativ_prompt": "b",
                                                    "label": "cat"}])
    code, text = validate(path)
    assert code == 0, text
    assert "column 'widht' is not a per-row column" in text and "did you mean 'width'?" in text
    assert "did you mean 'negative_prompt'?" in text and text.count("warning: ") == 2  # not 'label', not 'promt_x'

    code, text = validate(path, "--strict")
    assert code == 2 and "(--strict refuses it)" in text and "rename it to 'width'" in text, text
    out = tmp_path / "out"
    refused = submit(path, "--out", out, "--strict")
    assert refused.returncode == 2 and "did you mean 'width'?" in refused.stderr and not out.exists(), refused.stderr
    # without --strict submit warns (here it then stops at a missing CLIP model, before Ray; the
    # model itself is read before validation, which checks samplers against its family)
    warned = submit(path, "--out", out, "--set", f"scoring.clip_model={tmp_path / 'no-clip'}")
    assert warned.returncode == 2 and "warning: column 'widht'" in warned.stderr and not out.exists(), warned.stderr


def test_unknown_set_key_suggests_the_known_one(tmp_path):
    path = write_manifest(tmp_path / "m.parquet", [{"prompt": "a"}])
    result = submit(path, "--out", tmp_path / "out", "--set", "defaults.stpes=3")
    assert result.returncode == 2 and "did you mean `defaults.steps`?" in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_sampler_missing_its_package_is_refused_naming_the_pip_command(tmp_path):
    path = write_manifest(tmp_path / "m.parquet", [{"prompt": "a", "scheduler": "lms"}, {"prompt": "b"}])
    out = tmp_path / "out"
    result = submit(path, "--out", out, prelude="sys.modules['scipy'] = None")  # as if scipy were not installed
    assert result.returncode == 2, result.stderr
    assert "the 'lms' sampler (1 rows) needs the Python package scipy" in result.stderr
    assert "pip install scipy" in result.stderr and "Traceback" not in result.stderr and not out.exists()


def test_clip_skip_flag_sets_the_default(tmp_path):
    path = write_manifest(tmp_path / "m.parquet", [{"prompt": "a"}])
    result = submit(path, "--out", tmp_path / "out", "--clip-skip", "13")
    assert result.returncode == 2 and "defaults.clip_skip" in result.stderr and not Path(tmp_path / "out").exists()


def test_a_sampler_the_model_cannot_build_fails_the_worker_start(tmp_path):
    """Every installed sampler is built when a worker loads the model, so one that cannot be
    built from the model's scheduler config fails the start (job-level), naming the sampler."""
    import json
    import shutil

    from sdbatch.models.builtin import local_model_dir
    from sdbatch.models.errors import ModelError
    from sdbatch.models.runtime import load_model

    model = tmp_path / "tiny"
    shutil.copytree(local_model_dir("builtin:tiny"), model)
    config = model / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "solver_type": "no-such-solver"}))  # DDIM ignores it
    with pytest.raises(ModelError, match=r"sampler 'dpmpp_2m' \(DPMSolverMultistepScheduler\) cannot be built .*no-such-solver"):
        load_model(str(model), device="cpu")


def test_clip_skip_deeper_than_the_text_encoder_is_refused_at_preflight(tmp_path):
    """A model-dependent row rule (the family adapter's ``row_rules``): builtin:shapes' text
    encoder has 2 layers, so clip_skip 4 cannot run; refused naming row, column, value and fix,
    before any worker starts (it used to fail the batch at generation time)."""
    path = write_manifest(tmp_path / "m.parquet", [{"id": "ok", "prompt": "a", "clip_skip": 3},
                                                   {"id": "deep", "prompt": "b", "clip_skip": 4}])
    code, text = validate(path)
    assert code == 2 and "row 1 (id 'deep'), column 'clip_skip'" in text and "4" in text, text
    assert "this model's has 2" in text and "use clip_skip <= 3" in text and "row 0" not in text, text
    out = tmp_path / "out"
    result = submit(path, "--out", out)
    assert result.returncode == 2, result.stderr
    assert "column 'clip_skip'" in result.stderr and "use clip_skip <= 3" in result.stderr
    assert "Traceback" not in result.stderr and "worker" not in result.stderr.lower() and not out.exists()
    default_too_deep = submit(write_manifest(tmp_path / "d.parquet", [{"prompt": "a"}]), "--out", out, "--clip-skip", "5")
    assert default_too_deep.returncode == 2 and "defaults.clip_skip" in default_too_deep.stderr
    assert "use clip_skip <= 3" in default_too_deep.stderr and not out.exists()


def test_a_resume_of_the_same_job_does_not_validate_its_manifest_again(tmp_path):
    """Issue 23 item 3: validation reads every row (minutes at 10M rows); a resume whose OUT holds
    this job's record skips it — and validates again once anything the fingerprint covers
    changed, or with --strict."""
    from sdbatch.job.preflight import SubmitRequest, load_settings, prepare, validate
    from sdbatch.output.claim import claim_job

    manifest = write_manifest(tmp_path / "m.parquet", [{"id": f"r{i}", "prompt": f"a circle {i}"} for i in range(8)])
    out = tmp_path / "out"

    def validated(**changes):
        request = SubmitRequest(**{"manifest": str(manifest), "out": str(out), "spec_path": None, "sets": [],
                                   "overrides": {"model.name": "builtin:null"}, "loras": [], "address": None,
                                   "endpoint_url": None, "deadline_at": None, **changes})
        return validate(request, load_settings(request))

    first = validated()
    assert "distinct_prompts" in first.report.summary and "validated_at_claim" not in first.report.summary
    claim_job(prepare(first).storage, prepare(first).job)

    resumed = validated()
    assert resumed.report.ok and resumed.report.summary["validated_at_claim"], resumed.report.summary
    assert "distinct_prompts" not in resumed.report.summary  # no row was read
    assert resumed.report.summary["schedulers"] == {"default": 8}  # what prepare's sampler check needs
    assert prepare(resumed).job.fingerprint == prepare(first).job.fingerprint

    assert "validated_at_claim" not in validated(strict=True).report.summary
    assert "validated_at_claim" not in validated(overrides={"model.name": "builtin:null", "defaults.steps": 7}).report.summary
    write_manifest(manifest, [{"id": f"r{i}", "prompt": f"a square {i}"} for i in range(8)])
    assert "validated_at_claim" not in validated().report.summary


def test_a_lora_whose_keys_do_not_fit_the_model_exits_2_at_preflight(tmp_path):
    """Issue 26: a LoRA for another architecture (here: an SD 1.x attention width of 768 on
    builtin:tiny's 32) is refused before Ray starts, naming the file, the model and the keys."""
    import numpy as np
    from safetensors.numpy import save_file

    module = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    lora = tmp_path / "sd15-style.safetensors"
    save_file({f"{module}.lora_A.weight": np.zeros((4, 768), np.float16),
               f"{module}.lora_B.weight": np.zeros((320, 4), np.float16)}, str(lora))
    manifest = write_manifest(tmp_path / "m.parquet", [{"prompt": "a red circle", "loras": "style:1"}])
    out = tmp_path / "out"
    result = submit(manifest, "--model", "builtin:tiny", "--out", out, "--lora", f"style={lora}", "--dry-run",
                    prelude="sys.modules['ray'] = None")  # preflight must not need Ray
    assert result.returncode == 2, result.stderr
    err = " ".join(result.stderr.split())
    assert f"LoRA style={lora} does not fit model 'builtin:tiny'" in err
    assert f"{module}.lora_A.weight: its input width is 768, the model's module takes 32" in err
    assert "Fix: use a LoRA trained for this model's architecture" in err and "Traceback" not in err
    assert not out.exists()


def test_a1111_column_names_exit_2_and_a1111_sampler_names_are_accepted(tmp_path):
    """Issue 26: ``cfg_scale`` is refused naming ``guidance_scale`` (no Ray started); samplers
    written A1111's way, on --scheduler and in the column, pass preflight (the rows holding
    sdbatch's names: tests/unit/manifest/test_foreign_columns.py)."""
    out = tmp_path / "out"
    foreign = write_manifest(tmp_path / "a1111.parquet", [{"prompt": "a red circle", "cfg_scale": 9.0}])
    refused = submit(foreign, "--model", "builtin:tiny", "--out", out, prelude="sys.modules['ray'] = None")
    err = " ".join(refused.stderr.split())
    assert refused.returncode == 2 and "rename column 'cfg_scale' to 'guidance_scale'" in err, err
    assert "Traceback" not in err and not out.exists()
    samplers = write_manifest(tmp_path / "s.parquet", [{"prompt": "a", "scheduler": "DPM++ 2M Karras"}, {"prompt": "b"}])
    planned = submit(samplers, "--model", "builtin:tiny", "--out", out, "--scheduler", "Euler a", "--dry-run",
                     prelude="sys.modules['ray'] = None")
    assert planned.returncode == 0, planned.stderr  # an unknown sampler name is refused (exit 2)
    assert "batches 2 of up to 8 rows" in " ".join(planned.stdout.split())  # one per sampler
    assert not out.exists()
