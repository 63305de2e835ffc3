"""``submit --notify URL`` (issue 27): one JSON POST when the job ends, however it ends, to a
real HTTP server on 127.0.0.1; the token in the URL is never printed or logged."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from conftest import write_manifest

TOKEN = "s3cr3t-t0ken"


class Receiver:
    """A webhook on 127.0.0.1 that keeps every JSON body POSTed to it."""

    def __init__(self) -> None:
        self.bodies: list[tuple[str, dict]] = []
        received = self.bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                length = int(self.headers["Content-Length"])
                received.append((self.path, json.loads(self.rfile.read(length))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook?token={TOKEN}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    server = Receiver()
    yield server
    server.close()


def test_a_finished_job_and_a_refused_one_are_both_notified(tmp_path: Path, run_cli, receiver):
    manifest = write_manifest(tmp_path / "m.parquet",
                              [{"id": f"r{i}", "prompt": f"a red circle {i}", "seed": i, "label": "red"} for i in range(4)])
    done = run_cli("submit", manifest, "--out", tmp_path / "out", "--model", "builtin:null", "--notify", receiver.url)
    assert done.returncode == 0, done.stderr
    refused = run_cli("submit", manifest, "--out", tmp_path / "out2", "--model", "builtin:null", "--notify", receiver.url,
                      "--dedup-within", "shape")
    assert refused.returncode == 2 and "--dedup-within / scoring.dedup_within 'shape' is not a label column" in refused.stderr
    assert "its label columns: label" in refused.stderr and "Traceback" not in refused.stderr

    (path, finished), (_, refusal) = receiver.bodies
    assert path == f"/hook?token={TOKEN}"
    assert (finished["state"], finished["exit_code"], finished["rows"]) == ("done", 0, {"total": 4, "generated": 4, "failed": 0})
    assert finished["failures"] == {"rows": 0, "shards": []}
    assert finished["report_url"].endswith("report.html") and Path(finished["report_url"].removeprefix("file://")).exists()
    assert (refusal["state"], refusal["exit_code"], refusal["out"]) == ("refused", 2, str(tmp_path / "out2"))
    assert "'shape' is not a label column" in refusal["message"]
    for run in (done, refused):
        assert f"notified http://127.0.0.1:{receiver.server.server_port}/hook: job" in run.stderr
        assert TOKEN not in run.stdout + run.stderr


def test_an_unreachable_webhook_is_a_warning_not_the_jobs_failure(tmp_path: Path, run_cli):
    gone = Receiver()
    gone.close()  # nothing listens on its port now
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": "r0", "prompt": "a red circle"}])
    run = run_cli("submit", manifest, "--out", tmp_path / "out", "--model", "builtin:null", "--notify", gone.url,
                  "--dry-run")
    assert run.returncode == 0 and "notif" not in run.stderr  # a dry run ends no job: nothing is posted
    run = run_cli("submit", manifest, "--out", tmp_path / "out", "--model", "builtin:null", "--notify", gone.url,
                  "--steps", "0")
    assert run.returncode == 2, run.stderr
    assert f"could not notify http://127.0.0.1:{gone.server.server_port}/hook that the job ended (refused)" in run.stderr
    assert TOKEN not in run.stdout + run.stderr
    bad = run_cli("submit", manifest, "--out", tmp_path / "out", "--notify", f"ftp://host/x?token={TOKEN}")
    assert bad.returncode == 2 and "--notify 'ftp://host/x': not an http:// or https:// URL" in bad.stderr
    assert TOKEN not in bad.stdout + bad.stderr
