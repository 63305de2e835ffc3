"""The scheduling policy, free of Ray: which work runs next, what a failure costs, when to stop.

``Schedule`` holds the queue of work (a shard, or the failed rows of a committed shard, with
its attempt number) and decides, from plain facts the Ray driver reports to it:

- a shard task that failed transiently, or the shard a worker was running when it died or
  hung, is charged one attempt and goes back to the front of the queue, until
  ``max_attempts`` — then the shard is failed for this run; a deterministic error fails it at
  once (``give_up``): another attempt would fail the same way;
- shards queued behind on a worker that is lost go back uncharged: they never started;
- at the deadline no more work is handed out: the queue is left for a rerun, and a shard a
  worker returns ``deferred`` (it reached the worker after the deadline) is counted with it;
- a shard is hung when its worker reported no batch for the hang timeout;
- when the queue is empty and nothing runs, ``verdict`` says how the run ended.

Before that, ``place_workers`` decides how many workers the cluster can take: those that
fit now, or — with an autoscaler (``autoscaler_in_status``) — wait for it to add the rest,
up to a timeout, then start those that fit or refuse naming the missing resource.

Results come as ``ShardResult`` (``protocol``: the worker returns it, the policy reads it).
Nothing here imports Ray, storage or torch, so every rule has a fast unit test
(tests/unit/run/test_policy.py)."""

from __future__ import annotations

import logging
import re
from collections import deque
from collections.abc import Container, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sdbatch.run.plan import ShardSpec
from sdbatch.run.protocol import ShardResult

log = logging.getLogger("sdbatch.policy")


# the node type Ray's read-only provider (a cluster without an autoscaling config) gives each node
READ_ONLY_NODE_TYPE = re.compile(r"node_[0-9a-f]{56}")
MIN_HANG_TIMEOUT_S = 300.0  # first batches include warm-up; a GPU batch rarely takes minutes
HANG_FACTOR = 10.0

# how a run ended (also the state written to progress.json)
FINISHED = "finished"  # every shard is committed: merge the index
STOPPED = "stopped"  # the deadline left shards for a rerun
INCOMPLETE = "incomplete"  # some shards failed on every attempt


@dataclass
class Work:
    """One unit of work: a shard, or (``retry_ids``, --retry-failed) some rows of a committed one."""

    shard: ShardSpec
    attempt: int = 1
    retry_ids: frozenset[str] | None = None
    future: Any = None  # the driver's handle on the running call

    def again(self, charged: bool) -> Work:
        return Work(self.shard, self.attempt + charged, self.retry_ids)


def at_the_model(inflight: list[Work], started: Container[str]) -> Work | None:
    """Which of the calls handed to one worker (in hand-out order) holds its model: they take
    turns in that order, so it is the last one that has reported its start (those before it have
    generated and are storing), or the first when none has."""
    for work in reversed(inflight):
        if work.shard.name in started:
            return work
    return inflight[0] if inflight else None


class WorkQueue:
    """The work still to hand out: work that came back (or was given first) in a deque, then
    the plan's pending shards, read from their compact sequence (``plan.PendingShards``) in
    order and made into ``Work`` only when handed out — the driver holds no object per shard
    it has not dispatched yet."""

    def __init__(self, work: Iterable[Work] = (), shards: Sequence[ShardSpec] = ()):
        self.front: deque[Work] = deque(work)
        self.shards = shards
        self.next_shard = 0  # position in ``shards`` of the first not handed out

    def __len__(self) -> int:
        return len(self.front) + len(self.shards) - self.next_shard

    def __iter__(self) -> Iterator[Work]:
        yield from self.front
        for position in range(self.next_shard, len(self.shards)):
            yield Work(self.shards[position])

    def popleft(self) -> Work:
        if self.front:
            return self.front.popleft()
        if self.next_shard >= len(self.shards):
            raise IndexError("the work queue is empty")
        self.next_shard += 1
        return Work(self.shards[self.next_shard - 1])

    def appendleft(self, work: Work) -> None:
        self.front.appendleft(work)

    def clear(self) -> None:
        self.front.clear()
        self.next_shard = len(self.shards)


def workers_to_start(workers: int, units: int, *, rows: int, rows_per_shard: int, fresh_job: bool) -> tuple[int, str | None]:
    """Start no more workers than there are units of work, and say why when that is fewer
    than asked for. Shards are never sized by the worker count (they are a function of the
    manifest and the spec, so a resume with any number of workers finds the same shards);
    for a job not yet started the notice names the ``--rows-per-shard`` that would give every
    worker a shard."""
    if units >= workers:
        return workers, None
    notice = (f"{units} {'shard' if units == 1 else 'shards'} to generate for {workers} workers: starting {units}; "
              f"shards hold {rows_per_shard} rows each whatever the number of workers, so that a resume with "
              "another worker count finds the same shards")
    if fresh_job:
        notice += (f". To spread these {rows} rows over {workers} workers, start the job with --rows-per-shard "
                   f"{max(1, -(-rows // workers))} (choose it before the first run: it is part of the job)")
    return units, notice


def failed_shard_text(failure: dict[str, Any]) -> str:
    """``00003 after 1 attempt: RuntimeError: …`` for one entry of ``Schedule.failures``."""
    attempts = failure["attempts"]
    return f"{failure['shard']} after {attempts} attempt{'s' * (attempts != 1)}: {failure['error']}"


@dataclass(frozen=True)
class Placement:
    """How many workers to start now; or ``wait`` (ask the autoscaler for ``target`` workers'
    resources and look again); ``workers == 0`` without ``wait`` is a refusal, ``message`` its text."""

    workers: int
    target: int = 0
    wait: bool = False
    message: str | None = None  # the notice (fewer workers, waiting) or the refusal


def workers_that_fit(resources: Mapping[str, float], need: Mapping[str, float]) -> int:
    """Workers of ``need`` (resource -> amount per worker) that ``resources`` holds."""
    return int(min(resources.get(name, 0) // amount for name, amount in need.items() if amount > 0))


def _missing(workers: int, need: Mapping[str, float], cluster: Mapping[str, float]) -> str:
    return ", ".join(f"{workers * amount - cluster.get(name, 0):g} {name}" for name, amount in need.items()
                     if workers * amount > cluster.get(name, 0))


def place_workers(
    wanted: int, need: Mapping[str, float], cluster: Mapping[str, float], *, autoscaler: bool,
    reachable: Mapping[str, float] | None = None, waited_s: float = 0.0, wait_s: float = 0.0,
) -> Placement:
    """Start as many of ``wanted`` workers as ``cluster`` (its total resources) fits. With an
    ``autoscaler`` (``reachable``: the most it can grow to, None if unknown) wait up to
    ``wait_s`` for it to add what more workers need, then start those that fit; refuse when
    not one fits (at once when the autoscaler can never provide it)."""
    fit = workers_that_fit(cluster, need)
    if fit >= wanted:
        return Placement(wanted, wanted)
    target = wanted
    if autoscaler and reachable is not None:
        target = min(wanted, max(fit, workers_that_fit(reachable, need)))
    if autoscaler and fit < target:
        if waited_s < wait_s:
            return Placement(0, target, wait=True, message=(
                f"waiting up to {wait_s - waited_s:.0f} s for the Ray autoscaler to add {_missing(target, need, cluster)} "
                f"for {target} {'worker' if target == 1 else 'workers'} (the cluster fits {fit} now; "
                "resources.autoscaler_wait_s sets how long)"))
    if fit < 1:
        def short_of(name: str, amount: float) -> str:
            text = f"{name} (a worker needs {amount:g}, the cluster has {cluster.get(name, 0):g}"
            if autoscaler and target < 1:
                text += f", and its autoscaler can grow it to {(reachable or {}).get(name, 0):g} at most"
            elif autoscaler:
                text += f", also after waiting {wait_s:.0f} s for its autoscaler"
            return text + ")"

        missing = [short_of(name, amount) for name, amount in need.items() if amount > cluster.get(name, 0)]
        return Placement(0, target, message=(
            f"the Ray cluster cannot place one worker: not enough {' nor '.join(missing)}; fix: lower "
            "--gpus-per-worker / resources.cpus_per_worker, or add nodes with those resources"))
    why = (f"the autoscaler did not add {_missing(target, need, cluster)} within {wait_s:.0f} s" if autoscaler and fit < target
           else "its autoscaler can grow it no further" if autoscaler else "it has no autoscaler to add nodes")
    return Placement(fit, target, message=f"the cluster fits {fit} of the {wanted} workers asked for ({why}); using {fit}")


def autoscaler_in_status(status: Mapping[str, Any] | None) -> bool:
    """Whether the status the Ray monitor writes to the GCS (``__autoscaling_status``) comes
    from an autoscaler that can launch nodes. Every Ray head runs the monitor; without an
    autoscaling config it uses Ray's read-only provider, whose node types are all
    ``node_<node id>`` — a node type of any other name comes from a launch config."""
    report = (status or {}).get("autoscaler_report") or {}
    types = {*(report.get("node_type_mapping") or {}).values(), *(report.get("active_nodes") or {}),
             *(report.get("pending_launches") or {})}
    return any(not READ_ONLY_NODE_TYPE.fullmatch(name) for name in types)


@dataclass(frozen=True)
class Verdict:
    state: str  # FINISHED, STOPPED or INCOMPLETE
    message: str


class Schedule:
    def __init__(
        self, work: Iterable[Work] = (), *, shards: Sequence[ShardSpec] = (), max_attempts: int,
        deadline: float | None = None, hang_timeout_s: float | None = None, shards_committed: int = 0,
    ):
        """``work`` goes out first (the --retry-failed rows), then ``shards`` in order."""
        self.queue = WorkQueue(work, shards)
        self.max_attempts = max_attempts
        self.deadline = deadline  # epoch seconds: no work is handed out at or after it
        self.hang_timeout_s = hang_timeout_s  # None: derived from the batch times measured
        self.deadline_passed = False
        self.failed_shards: list[str] = []
        self.errors: dict[str, str] = {}  # failed shard -> its last error
        self.attempts: dict[str, int] = {}  # failed shard -> the attempts it was given
        self.shards_left = 0  # not started because of the deadline; a rerun does them
        self.shards_committed = shards_committed
        self.rows_ok = self.rows_failed = 0
        self.regenerated = 0  # shards an earlier attempt had committed (their results were kept)
        self.truncation_warned = False

    # -- handing work out ------------------------------------------------------------------
    def past_deadline(self, now: float) -> bool:
        return self.deadline_passed or (self.deadline is not None and now >= self.deadline)

    def stop_at_deadline(self, now: float) -> None:
        """Past the deadline, the queue is left for a rerun."""
        if self.queue and self.past_deadline(now):
            log.warning("deadline reached: starting no new shards; %d queued shards left for a rerun", len(self.queue))
            self.shards_left += len(self.queue)
            self.queue.clear()

    def next(self, now: float) -> Work | None:
        """The next work to hand out, or None (queue empty, or the deadline reached)."""
        self.stop_at_deadline(now)
        return self.queue.popleft() if self.queue else None

    def may_read_ahead(self, idle_workers: int) -> bool:
        """Whether a busy worker may take a shard to read ahead: only while the queue holds
        more than one unit for each worker that has nothing (a short queue goes to them)."""
        return len(self.queue) > idle_workers

    # -- what came back --------------------------------------------------------------------
    def completed(self, work: Work, result: ShardResult) -> None:
        if result.deferred:  # reached its worker after the deadline: nothing was written
            log.info("shard %s not started: the deadline had passed", work.shard.name)
            self.deadline_passed = True  # the worker's clock says so, whatever ours says
            self.shards_left += 1
            return
        self.shards_committed += work.retry_ids is None
        if result.committed:
            if result.prompts_truncated and not self.truncation_warned:
                self.truncation_warned = True  # once per job: the index names every such row
                log.warning("some prompts are longer than the text encoder reads (%d in shard %s); "
                            "the index column prompt_truncated_at says where each was cut",
                            result.prompts_truncated, result.shard)
            self.rows_ok += result.rows_ok
            self.rows_failed += result.rows_failed
        else:
            self.regenerated += 1
        if result.rows_failed:
            # the count last: no "1 rows" (run.progress.plural would bring Ray into this pure module)
            log.warning("shard %s: rows failed permanently: %d", result.shard, result.rows_failed)

    def attempt_failed(self, work: Work, error: str) -> None:
        """Charge ``work`` one attempt: requeue it at the front, or fail its shard for this run."""
        if work.attempt >= self.max_attempts:
            log.error("shard %s failed on all %d attempts; last error: %s", work.shard.name, work.attempt, error)
            self.give_up(work, error)
        else:
            self.queue.appendleft(work.again(charged=True))

    def give_up(self, work: Work, error: str) -> None:
        """Fail ``work``'s shard for this run (a rerun tries it again)."""
        self.failed_shards.append(work.shard.name)
        self.errors[work.shard.name] = error
        self.attempts[work.shard.name] = work.attempt

    def worker_lost(self, inflight: list[Work], error: str, culprit: Work | None = None) -> None:
        """A worker died or was replaced with ``inflight`` handed to it: ``culprit`` (the call at
        its model, ``at_the_model``) is charged one attempt — none is when it is None (its failure
        was charged already and it is not in ``inflight``) — and the others go back uncharged,
        in order, at the front of the queue."""
        for work in reversed(inflight):
            if work is not culprit:
                self.queue.appendleft(work.again(charged=False))
        if culprit is not None:
            self.attempt_failed(culprit, error)

    # -- the watchdog ----------------------------------------------------------------------
    def hang_timeout(self, slowest_batch: float) -> float:
        """``hang_timeout_s`` if set, else HANG_FACTOR × the slowest batch gap measured so far,
        never under MIN_HANG_TIMEOUT_S."""
        return self.hang_timeout_s or max(MIN_HANG_TIMEOUT_S, HANG_FACTOR * slowest_batch)

    def is_hung(self, last_report: float, now: float, slowest_batch: float) -> bool:
        return now - last_report >= self.hang_timeout(slowest_batch)

    # -- the end ---------------------------------------------------------------------------
    def failures(self) -> list[dict[str, Any]]:
        """The shards failed this run: name, attempts given, last error (for progress.json)."""
        return [{"shard": name, "attempts": self.attempts[name], "error": self.errors[name]}
                for name in sorted(self.failed_shards)]

    def verdict(self) -> Verdict:
        """How the run ended, once the queue is empty and nothing runs."""
        if self.shards_left:
            return Verdict(STOPPED, f"stopped at the deadline with {self.shards_left} shards left; "
                                    "run the same command again to resume")
        if self.failed_shards:
            errors = "; ".join(failed_shard_text(f) for f in self.failures()[:5])
            return Verdict(INCOMPLETE, f"shards {', '.join(sorted(self.failed_shards))} failed on every attempt they "
                                       f"were given (a deterministic error gets one) — {errors}; run the same command "
                                       "again to retry them")
        return Verdict(FINISHED, "")
