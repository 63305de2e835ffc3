"""Fault injection for S3 tests: a botocore ``before-send`` hook that fails chosen requests.

In this process::

    from integration.faults import FaultInjector
    inj = FaultInjector({"PutObject": {"fraction": 0.2, "errors": ["503", "500", "reset"], "seed": 1}})
    inj.install()            # every cached storage.py client, present and future
    ...                      # run code using sdbatch.storage
    inj.uninstall()
    print(inj.summary())     # e.g. "PutObject: 212 requests, 41 faults (503=14, 500=13, reset=14)"

In other processes: ``fault_env(rules, counts_dir=...)`` gives the environment of a process
that should inject faults; ``setup_process()`` (called there by ``faulty_sdbatch.py``, the
test entry point of the CLI, and — through Ray's ``runtime_env`` ``worker_process_setup_hook``
— by every Ray worker process of that job, see ``worker_runtime_env``) builds one injector
from ``SDBATCH_TEST_FAULTS`` and installs it with ``sdbatch.storage.s3_client.register_client_hook``.
When ``counts_dir`` is given each process writes its counts to ``<counts_dir>/<pid>.json``
after each fault; ``read_counts(counts_dir)`` sums them. The package itself reads none of
these variables.

Rules: ``{op: rule}``; ``op`` is a botocore operation name (PutObject, GetObject, HeadObject,
ListObjectsV2, ...) or ``"*"`` for all S3 operations. A rule has:

- ``errors``: list of kinds, chosen uniformly per fault:
    ``"503"``     503 SlowDown (throttling; botocore retries it)
    ``"500"``     500 InternalError
    ``"409"``     409 ConditionalRequestConflict (botocore does not retry it; S3Storage.put_new does)
    ``"reset"``   ``ConnectionClosedError`` before the request reaches the server
    ``"connect"`` ``EndpointConnectionError`` (server unreachable)
    ``"timeout"`` ``ReadTimeoutError`` before the request reaches the server
    ``"lost"``    the request IS sent and applied by the server, then the response is lost
                  (``ConnectionClosedError``) — exercises "retry finds its own write" (412 → adopt)
- ``fraction``: probability a matching request fails (seeded ``random.Random(seed)``), default 1.0
- ``seed``: RNG seed (default 0)
- ``first``: fail only the first N matching requests (then pass)
- ``after``: let the first N matching requests pass (then apply the rule)
- ``max``: stop injecting after N faults
- ``outage``: ``{"after": s, "duration": s}`` relative to install time, or
  ``{"start": epoch_s, "duration": s}`` absolute (works across processes): inside the window
  matching requests fail (subject to ``fraction``), outside they pass.
"""

from __future__ import annotations

import json
import os
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

ENV_RULES = "SDBATCH_TEST_FAULTS"
ENV_COUNTS = "SDBATCH_TEST_FAULTS_COUNTS_DIR"
ENV_CHAOS = "SDBATCH_TEST_CHAOS"  # read by tests/integration/chaos.py
TEST_ENV = (ENV_RULES, ENV_COUNTS, ENV_CHAOS)  # what a process of a faulty job is started with
TESTS = Path(__file__).resolve().parents[1]  # tests/: what makes ``integration.faults`` importable

KINDS = ("503", "500", "409", "reset", "connect", "timeout", "lost")


class _Raw:
    """Minimal urllib3-like body for botocore.awsrequest.AWSResponse."""

    def __init__(self, body: bytes):
        self._body = body

    def stream(self, *args, **kwargs):
        yield self._body

    def read(self, *args, **kwargs):
        b, self._body = self._body, b""
        return b


_ERROR_XML = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{msg}</Message>'
    "<RequestId>sdbatch-fault</RequestId></Error>"
)


class _Rule:
    def __init__(self, op: str, spec: dict[str, Any], t0: float):
        self.op = op
        self.errors = list(spec.get("errors", ["503"]))
        for k in self.errors:
            if k not in KINDS:
                raise ValueError(f"unknown fault kind {k!r}; known: {KINDS}")
        self.fraction = float(spec.get("fraction", 1.0))
        self.rng = random.Random(spec.get("seed", 0))
        self.first = spec.get("first")
        self.after = int(spec.get("after", 0))
        self.max = spec.get("max")
        self.window: tuple[float, float] | None = None
        if "outage" in spec:
            o = spec["outage"]
            start = float(o["start"]) if "start" in o else t0 + float(o.get("after", 0.0))
            self.window = (start, start + float(o["duration"]))
        self.seen = 0
        self.injected = 0

    def decide(self) -> str | None:
        """Called under the injector lock. Returns the fault kind or None."""
        self.seen += 1
        if self.first is not None and self.seen > int(self.first):
            return None
        if self.seen <= self.after:
            return None
        if self.max is not None and self.injected >= int(self.max):
            return None
        if self.window is not None:
            now = time.time()
            if not (self.window[0] <= now < self.window[1]):
                return None
        if self.fraction < 1.0 and self.rng.random() >= self.fraction:
            return None
        self.injected += 1
        return self.errors[0] if len(self.errors) == 1 else self.rng.choice(self.errors)


class FaultInjector:
    def __init__(self, rules: dict[str, dict[str, Any]], *, counts_dir: str | Path | None = None):
        t0 = time.time()
        self.rules = {op: _Rule(op, spec, t0) for op, spec in rules.items()}
        self.counts: dict[str, dict[str, int]] = {}  # op -> {"requests": n, kind: n}
        self.counts_dir = Path(counts_dir) if counts_dir else None
        self._lock = threading.Lock()
        self._clients: list[Any] = []
        self._unregister = None

    # -- attaching -------------------------------------------------------------------------
    def attach(self, client) -> None:
        """Register the hook on one botocore S3 client."""
        client.meta.events.register("before-send.s3", self._before_send, unique_id=f"sdbatch-faults-{id(self)}")
        self._clients.append(client)

    def install(self) -> "FaultInjector":
        """Attach to every cached client of sdbatch.storage, present and future."""
        from sdbatch.storage import s3_client as storage

        self._unregister = storage.register_client_hook(self.attach)
        return self

    def uninstall(self) -> None:
        if self._unregister is not None:
            self._unregister()
            self._unregister = None
        for c in self._clients:
            c.meta.events.unregister("before-send.s3", unique_id=f"sdbatch-faults-{id(self)}")
        self._clients.clear()

    def __enter__(self) -> "FaultInjector":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    # -- the hook --------------------------------------------------------------------------
    def _before_send(self, request, event_name: str = "", **kwargs):
        op = event_name.rsplit(".", 1)[-1]
        rule = self.rules.get(op) or self.rules.get("*")
        if rule is None:
            return None
        with self._lock:
            kind = rule.decide()
            c = self.counts.setdefault(op, {"requests": 0})
            c["requests"] += 1
            if kind is not None:
                c[kind] = c.get(kind, 0) + 1
            snapshot = None
            if self.counts_dir is not None and (kind is not None or c["requests"] % 20 == 0):
                snapshot = json.dumps(self.counts)
        if snapshot is not None:
            self._write_counts(snapshot)
        if kind is None:
            return None
        return _fail(kind, request)

    def _write_counts(self, snapshot: str) -> None:
        self.counts_dir.mkdir(parents=True, exist_ok=True)
        path = self.counts_dir / f"{os.getpid()}.json"
        tmp = path.with_suffix(f".tmp{threading.get_ident()}")
        tmp.write_text(snapshot)
        os.replace(tmp, path)

    # -- reading ---------------------------------------------------------------------------
    def faults(self, op: str | None = None) -> int:
        with self._lock:
            return sum(_faults_in(c) for o, c in self.counts.items() if op is None or o == op)

    def requests(self, op: str | None = None) -> int:
        with self._lock:
            return sum(c["requests"] for o, c in self.counts.items() if op is None or o == op)

    def summary(self) -> str:
        with self._lock:
            return summarize(self.counts)


def _faults_in(c: dict[str, int]) -> int:
    return sum(v for k, v in c.items() if k != "requests")


def summarize(counts: dict[str, dict[str, int]]) -> str:
    parts = []
    for op, c in sorted(counts.items()):
        kinds = ", ".join(f"{k}={v}" for k, v in sorted(c.items()) if k != "requests")
        parts.append(f"{op}: {c.get('requests', 0)} requests, {_faults_in(c)} faults" + (f" ({kinds})" if kinds else ""))
    return "; ".join(parts) or "no requests seen"


def _fail(kind: str, request):
    from botocore import exceptions as bx
    from botocore.awsrequest import AWSResponse

    if kind in ("503", "500", "409"):
        status, code, msg = {
            "503": (503, "SlowDown", "Please reduce your request rate."),
            "500": (500, "InternalError", "We encountered an internal error. Please try again."),
            "409": (409, "ConditionalRequestConflict", "A conflicting conditional operation is in progress."),
        }[kind]
        body = _ERROR_XML.format(code=code, msg=msg).encode()
        return AWSResponse(request.url, status, {"Content-Type": "application/xml",
                                                 "Content-Length": str(len(body))}, _Raw(body))
    if kind == "reset":
        raise bx.ConnectionClosedError(endpoint_url=request.url)
    if kind == "connect":
        raise bx.EndpointConnectionError(endpoint_url=request.url)
    if kind == "timeout":
        raise bx.ReadTimeoutError(endpoint_url=request.url)
    if kind == "lost":
        from botocore.httpsession import URLLib3Session

        session = URLLib3Session()
        try:
            session.send(request)  # the server applies it; we drop the answer
        finally:
            session.close()
        if hasattr(request, "reset_stream"):
            request.reset_stream()
        raise bx.ConnectionClosedError(endpoint_url=request.url)
    raise ValueError(kind)


# ---- cross-process activation ---------------------------------------------------------------


def fault_env(rules: dict[str, dict[str, Any]], *, counts_dir: str | Path | None = None) -> dict[str, str]:
    """The environment of a process (and its job's Ray workers) that injects these faults."""
    env = {ENV_RULES: json.dumps(rules)}
    if counts_dir is not None:
        env[ENV_COUNTS] = str(counts_dir)
    return env


def install_from_env() -> FaultInjector | None:
    """Install the injector ``SDBATCH_TEST_FAULTS`` describes in this process, if it names one."""
    raw = os.environ.get(ENV_RULES)
    if not raw:
        return None
    return FaultInjector(json.loads(raw), counts_dir=os.environ.get(ENV_COUNTS) or None).install()


def setup_process() -> None:
    """Every fault the environment asks for, installed in this process: the storage faults
    here, the chaos (killed, hung, failing workers; a driver dying mid-merge) in chaos.py.
    Ray's ``worker_process_setup_hook`` of a faulty job (``worker_runtime_env``)."""
    from integration import chaos

    install_from_env()
    chaos.install_from_env()


def worker_runtime_env(env: dict[str, str] | None = None) -> dict[str, Any]:
    """The Ray ``runtime_env`` that runs ``setup_process`` in every worker process of a job,
    with the test variables of ``env`` (default: this process's) and tests/ importable."""
    env = os.environ if env is None else env
    path = os.pathsep.join(p for p in (str(TESTS), env.get("PYTHONPATH", "")) if p)
    return {
        "worker_process_setup_hook": "integration.faults.setup_process",
        "env_vars": {"PYTHONPATH": path, **{k: env[k] for k in TEST_ENV if k in env}},
    }


def sdbatch_command(env: dict[str, str] | None) -> list[str]:
    """How a test starts the CLI: ``python -m sdbatch`` as a user would, or — when ``env``
    asks for faults — through faulty_sdbatch.py, which installs them first."""
    if env and any(k in env for k in TEST_ENV):
        return [sys.executable, str(TESTS / "integration" / "faulty_sdbatch.py")]
    return [sys.executable, "-m", "sdbatch"]


def read_counts(counts_dir: str | Path) -> dict[str, dict[str, int]]:
    """Sum the per-process counts files written under counts_dir."""
    total: dict[str, dict[str, int]] = {}
    d = Path(counts_dir)
    if not d.is_dir():
        return total
    for p in sorted(d.glob("*.json")):
        try:
            data = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        for op, c in data.items():
            t = total.setdefault(op, {})
            for k, v in c.items():
                t[k] = t.get(k, 0) + v
    return total
