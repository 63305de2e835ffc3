"""The job-state documents (job.json, progress.json, _SUCCESS): typed round trips, and a file
that is not the document — not JSON, a field of the wrong type, a key sdbatch never writes — is
a CorruptState naming the file and the recovery (exit 2 through the CLI). No Ray."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from sdbatch.cli.app import app
from sdbatch.output.documents import CorruptState, FailedRow, JobRecord, Progress, Success, WorkerProgress
from sdbatch.storage.local import LocalStorage

JOB = {"fingerprint": "abc", "spec": {}, "manifest": {"source": "/m.parquet", "fingerprint": "fm", "num_rows": 3},
       "model": {"name": "builtin:tiny", "fingerprint": None}}


def test_documents_round_trip(tmp_path):
    storage = LocalStorage(tmp_path)
    docs = [
        JobRecord.model_validate(JOB),
        Progress(rows_total=3, rows_done=2, per_worker={"w": WorkerProgress(rows_done=2, rows_failed=0, images_per_second=1.5)},
                 history=[(1.5, 2, 0)]),
        Success(fingerprint="abc", rows_total=3, rows_in_index=3, rows_ok=2, rows_failed=1,
                failed_rows=[FailedRow(id="r2", error="init image unreadable")]),
    ]
    for doc in docs:
        assert type(doc).read(storage) is None
        doc.write(storage)
        assert type(doc).read(storage) == doc
    # what older sdbatch versions wrote still reads: a _SUCCESS from before batch_fill and duplicates
    storage.put("_SUCCESS", json.dumps({"fingerprint": "abc", "rows_total": 3, "rows_in_index": 3, "rows_ok": 3,
                                        "rows_failed": 0}).encode())
    assert Success.read(storage).batch_fill is None


@pytest.mark.parametrize("key, content, said, recovery", [
    ("_sdbatch/job.json", '{"fingerprint": "abc", "spec"', "not a JSON object", "--new-run"),
    ("_sdbatch/job.json", json.dumps({**JOB, "fingerprint": 5}), "fingerprint: Input should be a valid string", "--new-run"),
    ("_sdbatch/progress.json", json.dumps({"rows_done": "many"}), "rows_done", "delete it, the next run rewrites it"),
    ("_SUCCESS", json.dumps({"fingerprint": "abc", "rows_total": 3, "rows_in_index": 3, "rows_ok": 3, "rows_failed": 0,
                             "written_by": "another tool"}), "written_by: Extra inputs are not permitted",
     "delete it and rerun the same command"),
])
def test_a_file_that_is_not_the_document_is_corrupt_state(tmp_path, key, content, said, recovery):
    storage = LocalStorage(tmp_path / "out")
    if key != "_sdbatch/job.json":
        JobRecord.model_validate(JOB).write(storage)
    storage.put(key, content.encode())
    kind = {"_sdbatch/job.json": JobRecord, "_sdbatch/progress.json": Progress, "_SUCCESS": Success}[key]
    with pytest.raises(CorruptState) as raised:
        kind.read(storage)
    assert f"{storage.url}/{key} is corrupt" in str(raised.value) and said in str(raised.value)
    assert recovery in str(raised.value)
    result = CliRunner().invoke(app, ["status", str(tmp_path / "out")])
    assert f"{key} is corrupt" in result.output and recovery in result.output and "Traceback" not in result.output
    if key == "_sdbatch/job.json":  # without the job there is nothing to show
        assert result.exit_code == 2 and "error: " in result.output, result.output
    else:  # status shows the job beside a corrupt snapshot or summary and names the unreadable file
        assert result.exit_code == 0 and "job        abc" in result.output and "unreadable" in result.output, result.output
