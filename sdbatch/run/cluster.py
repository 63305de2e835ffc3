"""The Ray cluster a job runs on: connecting (or starting a local one), its reachability, its
autoscaler, and how many workers fit."""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import ray
from ray.autoscaler.sdk import request_resources

from sdbatch.errors import BadInput, JobFailed
from sdbatch.run.policy import autoscaler_in_status, place_workers
from sdbatch.run.protocol import describe
from sdbatch.spec import JobSpec

log = logging.getLogger("sdbatch.scheduler")


AUTOSCALER_POLL_S = 2.0  # how often the cluster's resources are read while the autoscaler adds nodes
_job_local_cluster = threading.Event()  # set once connect_ray started a cluster for this job alone


def connect_ray(address: str | None) -> None:
    address = address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return
    on_sigterm = signal.getsignal(signal.SIGTERM)
    _init_ray(address)
    # Ray's own exit handler sleeps 0.5 s first, for its workers' log lines to reach the console,
    # and sdbatch forwards none (log_to_driver=False): this one, registered later, runs first
    # (atexit runs the last registered first) and leaves Ray's nothing to do
    atexit.register(ray.shutdown)
    if callable(on_sigterm) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_sigterm)  # ray.init replaced the caller's (the CLI's) with sys.exit


def shut_down_job_local_cluster() -> None:
    """The job needs Ray no more: the cluster ``connect_ray`` started for it alone is shut down on a
    thread of its own, while the driver writes the report. Ray's shutdown takes ~0.4 s (its core
    worker's disconnect, then its processes stopped), which a small job otherwise waited for at exit;
    the exit's ``ray.shutdown`` waits for this one (Ray's connect-or-shutdown lock) and finds nothing
    left. A cluster the job joined (``--address``, or one this process already had) is left to exit."""
    if _job_local_cluster.is_set():
        _job_local_cluster.clear()
        threading.Thread(target=ray.shutdown, name="ray-shutdown", daemon=True).start()


class RayStartError(JobFailed):
    """Ray did not come up: the local cluster's processes did not start in time, or the cluster
    at ``--address`` refused the connection mid-way. Nothing was generated; rerunning resumes."""


def _init_ray(address: str | None) -> None:
    try:
        if address:
            log.info("connecting to the Ray cluster at %s …", address)
            check_reachable(address)
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        else:  # loopback only: see sdbatch.job.preflight.local_ray_environment, which ran before ray was imported
            log.info("starting a local Ray cluster …")
            with _without_head_services():
                ray.init(
                    # "local": a new cluster of its own — without it ray.init joins the last cluster a
                    # `ray start` left on this machine, whoever started it and wherever it listens
                    address="local", include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
                    _node_ip_address="127.0.0.1", dashboard_host="127.0.0.1",
                )
            _job_local_cluster.set()
    except BadInput:
        raise
    except Exception as exc:  # noqa: BLE001 - Ray raises bare Exception/RuntimeError when its processes do not come up
        where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
        fix = ("check the cluster (`ray status` on its head node) and that this machine runs the same Ray version"
               if address else "make sure the machine has free memory, CPU and space in /tmp, stop leftover Ray "
               "processes you started (`ray stop`), and look at Ray's logs (/tmp/ray/session_latest/logs)")
        raise RayStartError(f"could not start {where}: {type(exc).__name__}: {short_error(exc)}. Fix: {fix}") from None
    # Ray's core worker installs its own SIGTERM handler (it dumps a stack and exits 1): make
    # SIGTERM an interruption again, so the driver releases its lock and exits 130 as on Ctrl-C
    signal.signal(signal.SIGTERM, signal.default_int_handler)


#: The head node's services a job-local cluster does without, by the method of Ray's ``Node``
#: that starts each: the autoscaler monitor (one node that never grows; ``cluster_autoscaler``
#: reads "no autoscaler" with or without it, and at exit it ignores SIGTERM for the second Ray
#: waits before killing it), the dashboard head (``include_dashboard=False`` still starts it for
#: Ray's usage statistics, and ``ray.init`` waits for it before it starts the raylet) and the log
#: monitor (it forwards the workers' logs to drivers, and sdbatch asks for none:
#: ``log_to_driver=False``). Each is a Python process importing Ray while the cluster starts,
#: beside the model's worker and on a 2-core machine in its way (benchmarks/RESULTS.md).
#: ``ray start`` has switches for some (``--no-monitor``, ``--include-dashboard``); ``ray.init``
#: none, and starts them through these methods.
SKIPPED_HEAD_SERVICES = ("start_monitor", "start_api_server", "start_log_monitor")


@contextmanager
def _without_head_services() -> Iterator[None]:
    """While ``ray.init`` starts a job-local cluster, its ``Node`` starts none of
    ``SKIPPED_HEAD_SERVICES`` (Ray internals, no public API: a Ray without one of those methods
    starts that service as before)."""
    try:
        from ray._private.node import Node
    except ImportError as exc:
        log.debug("starting Ray's head services as Ray does: %s", describe(exc))
        yield
        return
    kept = {name: Node.__dict__[name] for name in SKIPPED_HEAD_SERVICES if name in Node.__dict__}

    def skipped(self: Any, *args: Any, **kwargs: Any) -> None:
        return None

    for name in kept:
        setattr(Node, name, skipped)
    try:
        yield
    finally:
        for name, method in kept.items():
            setattr(Node, name, method)


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail within seconds on an ``--address`` nothing listens at (``ray.init`` would retry for
    minutes). ``auto`` and addresses without a port are left to Ray."""
    match = re.fullmatch(r"(?:ray://)?\[?([^\]/]+?)\]?:(\d+)/?", address.strip())
    if not match:
        return
    host, port = match[1], int(match[2])
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as exc:
        raise BadInput(f"--address {address!r}: cannot reach a Ray cluster there ({type(exc).__name__}: {exc}); "
                       "fix: check the head node's address and port (`ray status` on it), or leave --address "
                       "and RAY_ADDRESS unset to start a local cluster") from None


def cluster_autoscaler() -> tuple[bool, dict[str, float] | None]:
    """Whether the connected cluster has an autoscaler, and the most resources it can grow to
    (None: not known). Read from what Ray keeps in the GCS, through internals no public API
    offers yet (ray-project/ray#37838): the cluster config a platform such as KubeRay reports
    (``get_max_resources_from_cluster_config``), else the monitor's status
    (``policy.autoscaler_in_status``). Whatever fails to read means "no autoscaler known"."""
    try:
        reachable = ray._private.state.state.get_max_resources_from_cluster_config()
        if reachable:
            return True, {name: float(amount) for name, amount in reachable.items()}
        from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
        from ray.experimental.internal_kv import _internal_kv_get

        status = _internal_kv_get(DEBUG_AUTOSCALING_STATUS)
        return autoscaler_in_status(json.loads(status) if status else None), None
    except Exception as exc:  # noqa: BLE001 - Ray internals: an unreadable answer is no autoscaler
        log.debug("could not tell whether the cluster has an autoscaler: %s", describe(exc))
        return False, None


def fit_workers(spec: JobSpec) -> int:
    """As many workers as asked for, but no more than the cluster can place (else they would
    wait for resources forever); on a cluster with an autoscaler, first ask it for what they
    need and wait (``resources.autoscaler_wait_s`` at most) — ``policy.place_workers`` decides."""
    res = spec.resources
    need = {"CPU": res.cpus_per_worker, **({"GPU": res.gpus_per_worker} if res.gpus_per_worker > 0 else {})}
    autoscaler, reachable = cluster_autoscaler()
    started = time.monotonic()
    requested = 0
    try:
        while True:
            placement = place_workers(res.workers, need, ray.cluster_resources(), autoscaler=autoscaler,
                                      reachable=reachable, waited_s=time.monotonic() - started,
                                      wait_s=res.autoscaler_wait_s)
            if not placement.wait:
                break
            if placement.target != requested:
                request_resources(bundles=[need] * placement.target)
                requested = placement.target
                log.warning("%s …", placement.message)
            time.sleep(AUTOSCALER_POLL_S)
    finally:
        if requested:  # the workers' own demand keeps what they were placed on
            request_resources(bundles=[])
    if placement.workers < 1:
        raise BadInput(placement.message)
    if placement.message:
        log.warning("%s", placement.message)
    return placement.workers


def short_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1][:300] if text else type(exc).__name__
