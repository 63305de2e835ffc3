"""The scheduling policy (sdbatch.run.policy) on its own: attempts, requeues, the deadline, the
hang decision, the verdict and the workers' placement (with or without an autoscaler) — no Ray, no storage, no model.
That the module imports no Ray or torch is import-linter's "torch-free core" contract (pyproject.toml)."""

from __future__ import annotations

import pytest

from sdbatch.run.plan import ShardSpec, make_plan
from sdbatch.run.policy import (
    FINISHED,
    HANG_FACTOR,
    INCOMPLETE,
    MIN_HANG_TIMEOUT_S,
    STOPPED,
    Placement,
    Schedule,
    Work,
    at_the_model,
    autoscaler_in_status,
    place_workers,
    workers_to_start,
)
from sdbatch.run.protocol import ShardResult


def schedule(n: int = 4, **options) -> Schedule:
    return Schedule([Work(ShardSpec(i, range(i * 4, i * 4 + 4))) for i in range(n)], **{"max_attempts": 3, **options})


def names(s: Schedule) -> list[tuple[str, int]]:
    return [(w.shard.name, w.attempt) for w in s.queue]


def test_work_is_handed_out_in_order_and_results_are_counted():
    s = schedule(3, shards_committed=1)
    handed = [s.next(0.0) for _ in range(3)]
    assert [w.shard.name for w in handed] == ["00000", "00001", "00002"] and s.next(0.0) is None
    s.completed(handed[0], ShardResult("00000", rows_ok=4))
    s.completed(handed[1], ShardResult("00001", rows_ok=3, rows_failed=1))
    s.completed(handed[2], ShardResult("00002", committed=False))  # an earlier attempt had committed it
    assert (s.rows_ok, s.rows_failed, s.shards_committed, s.regenerated) == (7, 1, 4, 1)
    assert s.verdict().state == FINISHED


def test_a_failed_attempt_is_charged_and_requeued_first_until_the_last_attempt():
    s = schedule(2, max_attempts=2)
    first = s.next(0.0)
    s.attempt_failed(first, "boom")
    assert names(s) == [("00000", 2), ("00001", 1)]
    again = s.next(0.0)
    s.attempt_failed(again, "boom again")
    assert names(s) == [("00001", 1)] and s.failed_shards == ["00000"]
    s.completed(s.next(0.0), ShardResult("00001", rows_ok=4))
    verdict = s.verdict()
    assert verdict.state == INCOMPLETE
    assert "shards 00000 failed on every attempt" in verdict.message
    assert "00000 after 2 attempts: boom again" in verdict.message
    assert s.failures() == [{"shard": "00000", "attempts": 2, "error": "boom again"}]


def test_a_deterministic_error_fails_its_shard_after_one_attempt():
    s = schedule(2, max_attempts=3)
    s.give_up(s.next(0.0), "RuntimeError: the same every time")
    assert names(s) == [("00001", 1)]  # not requeued
    assert s.failures() == [{"shard": "00000", "attempts": 1, "error": "RuntimeError: the same every time"}]
    s.completed(s.next(0.0), ShardResult("00001", rows_ok=4))
    assert "00000 after 1 attempt: RuntimeError: the same every time" in s.verdict().message


def test_a_lost_worker_charges_only_the_shard_it_was_running():
    s = schedule(4)
    running, queued = s.next(0.0), s.next(0.0)
    s.worker_lost([running, queued], "actor died", culprit=running)
    assert names(s) == [("00000", 2), ("00001", 1), ("00002", 1), ("00003", 1)]
    s.worker_lost([], "failed to start")  # nothing handed to it: nothing changes
    assert len(s.queue) == 4


def test_the_call_at_a_workers_model_is_the_last_started_and_only_it_is_charged():
    s = schedule(4)
    storing, generating, queued = s.next(0.0), s.next(0.0), s.next(0.0)
    assert at_the_model([storing, generating, queued], {"00000": [8, 0], "00001": [0, 0]}) is generating
    assert at_the_model([storing, generating], {"00000": [8, 0]}) is storing
    assert at_the_model([storing, generating], {}) is storing  # none reported yet: the first has the turn
    assert at_the_model([], {}) is None
    s.worker_lost([storing, generating, queued], "actor died", culprit=generating)
    assert names(s) == [("00001", 2), ("00000", 1), ("00002", 1), ("00003", 1)]


def test_a_lost_worker_on_its_last_attempt_fails_the_shard_and_returns_the_rest():
    s = Schedule([Work(ShardSpec(0, range(0, 4)), attempt=3), Work(ShardSpec(1, range(4, 8)))], max_attempts=3)
    running, queued = s.next(0.0), s.next(0.0)
    s.worker_lost([running, queued], "hung", culprit=running)
    assert s.failed_shards == ["00000"] and names(s) == [("00001", 1)]


def test_retried_rows_keep_their_ids_across_attempts():
    ids = frozenset({"a", "b"})
    s = Schedule([Work(ShardSpec(0, range(0, 4)), retry_ids=ids)], max_attempts=3, shards_committed=1)
    work = s.next(0.0)
    s.attempt_failed(work, "storage outage")
    again = s.next(0.0)
    assert (again.attempt, again.retry_ids) == (2, ids)
    s.completed(again, ShardResult("00000", rows_ok=2))
    assert s.shards_committed == 1  # retrying rows of a committed shard commits no new shard


def test_the_deadline_leaves_the_queue_for_a_rerun():
    s = schedule(4, deadline=100.0)
    running = s.next(99.0)
    assert s.next(100.0) is None and not s.queue and s.shards_left == 3
    s.completed(running, ShardResult("00000", rows_ok=4))
    verdict = s.verdict()
    assert verdict.state == STOPPED
    assert verdict.message.startswith("stopped at the deadline with 3 shards left")


def test_a_shard_deferred_by_its_worker_counts_as_left_and_stops_handing_out():
    s = schedule(3)  # no deadline of the driver's own: the worker's clock decided
    deferred = s.next(0.0)
    s.completed(deferred, ShardResult("00000", committed=False, deferred=True))
    assert s.past_deadline(0.0) and s.next(0.0) is None
    assert s.shards_left == 3 and s.shards_committed == 0 and s.regenerated == 0
    assert s.verdict().state == STOPPED


def test_the_deadline_wins_over_failed_shards_in_the_verdict():
    s = schedule(2, max_attempts=1, deadline=10.0)
    s.attempt_failed(s.next(0.0), "boom")
    s.stop_at_deadline(10.0)
    assert s.failed_shards == ["00000"] and s.shards_left == 1 and s.verdict().state == STOPPED


@pytest.mark.parametrize(
    ("hang_timeout_s", "slowest_batch", "timeout"),
    [(None, 0.0, MIN_HANG_TIMEOUT_S), (None, 60.0, HANG_FACTOR * 60.0), (6.0, 60.0, 6.0)],
)
def test_hang_timeout_is_the_setting_or_derived_from_the_slowest_batch(hang_timeout_s, slowest_batch, timeout):
    s = schedule(1, hang_timeout_s=hang_timeout_s)
    assert s.hang_timeout(slowest_batch) == timeout
    assert not s.is_hung(last_report=1000.0, now=1000.0 + timeout - 0.5, slowest_batch=slowest_batch)
    assert s.is_hung(last_report=1000.0, now=1000.0 + timeout, slowest_batch=slowest_batch)


def test_pending_shards_skip_committed_ones_and_count_their_rows():
    pending = make_plan(10, 4, 4).pending(committed={"00001", "00007"})  # shards 0..2; 00007 is no shard of this plan
    assert [(s.name, s.rows) for s in pending] == [("00000", range(0, 4)), ("00002", range(8, 10))]
    assert (len(pending), pending.num_rows) == (2, 6)
    assert make_plan(10, 4, 4).pending(committed={"00002"}).num_rows == 8  # the short last shard is the one left out
    assert not make_plan(8, 4, 4).pending(committed={"00000", "00001"})
    mixed = make_plan(6, 4, 4, codes=[0, 1, 0, 1, 0, 0]).pending(committed={"00000"})  # a plan of row tuples
    assert [(s.name, s.rows) for s in mixed] == [("00001", (1, 3))] and mixed.num_rows == 2


def test_a_ten_million_row_plan_is_one_integer_per_shard_and_work_is_made_when_handed_out():
    pending = make_plan(10_000_000, 64, 8).pending(committed={"00000"})
    assert len(pending) == 156_249 and pending.indices.nbytes <= 8 * 156_250
    s = Schedule([Work(ShardSpec(0, range(0, 64)), retry_ids=frozenset({"x"}))], shards=pending, max_attempts=3)
    assert len(s.queue) == 156_250 and len(s.queue.front) == 1
    first, second, third = s.next(0.0), s.next(0.0), s.next(0.0)
    assert (first.retry_ids, second.shard.name, third.shard.name) == (frozenset({"x"}), "00001", "00002")
    s.worker_lost([second, third], "actor died", culprit=second)
    assert names(s)[:3] == [("00001", 2), ("00002", 1), ("00003", 1)] and len(s.queue) == 156_249


def test_the_deadline_leaves_pending_shards_for_a_rerun_and_counts_them():
    s = Schedule(shards=make_plan(40, 4, 4).pending(), max_attempts=3, deadline=100.0)
    s.next(99.0)
    assert s.next(100.0) is None and not s.queue and s.shards_left == 9


def test_no_more_workers_start_than_there_are_shards_and_the_notice_says_why():
    assert workers_to_start(2, 5, rows=320, rows_per_shard=64, fresh_job=True) == (2, None)
    started, notice = workers_to_start(2, 1, rows=32, rows_per_shard=64, fresh_job=True)
    assert started == 1
    assert notice.startswith("1 shard to generate for 2 workers: starting 1; shards hold 64 rows each")
    assert "start the job with --rows-per-shard 16" in notice
    started, notice = workers_to_start(4, 2, rows=1000, rows_per_shard=64, fresh_job=False)  # a resume
    assert started == 2 and notice.startswith("2 shards to generate for 4 workers") and "--rows-per-shard" not in notice


def test_a_busy_worker_reads_ahead_only_what_no_idle_worker_needs():
    s = schedule(3)
    assert s.may_read_ahead(idle_workers=2)  # 3 queued, 2 workers with nothing: one to spare
    s.next(0.0)
    assert not s.may_read_ahead(idle_workers=2) and s.may_read_ahead(idle_workers=1)


CPU_WORKER = {"CPU": 2.0}
GPU_WORKER = {"CPU": 1.0, "GPU": 1.0}


def test_without_an_autoscaler_workers_are_clipped_to_the_cluster_or_refused():
    assert place_workers(3, CPU_WORKER, {"CPU": 8}, autoscaler=False) == Placement(3, 3)
    fewer = place_workers(3, CPU_WORKER, {"CPU": 4}, autoscaler=False)
    assert fewer.workers == 2 and not fewer.wait
    assert fewer.message == "the cluster fits 2 of the 3 workers asked for (it has no autoscaler to add nodes); using 2"
    refused = place_workers(1, GPU_WORKER, {"CPU": 4}, autoscaler=False)
    assert refused.workers == 0 and not refused.wait
    assert refused.message.startswith("the Ray cluster cannot place one worker: not enough GPU (a worker needs 1, "
                                      "the cluster has 0); fix: lower --gpus-per-worker")


def test_with_an_autoscaler_the_driver_waits_for_it_then_starts_what_fits():
    waiting = place_workers(4, GPU_WORKER, {"CPU": 8, "GPU": 1}, autoscaler=True, waited_s=10, wait_s=600)
    assert waiting.wait and waiting.workers == 0 and waiting.target == 4
    assert waiting.message == ("waiting up to 590 s for the Ray autoscaler to add 3 GPU for 4 workers (the cluster "
                               "fits 1 now; resources.autoscaler_wait_s sets how long)")
    assert place_workers(4, GPU_WORKER, {"CPU": 8, "GPU": 4}, autoscaler=True, waited_s=30, wait_s=600) == Placement(4, 4)
    late = place_workers(4, GPU_WORKER, {"CPU": 8, "GPU": 1}, autoscaler=True, waited_s=600, wait_s=600)
    assert late.workers == 1 and not late.wait
    assert "(the autoscaler did not add 3 GPU within 600 s); using 1" in late.message
    nothing = place_workers(1, GPU_WORKER, {"CPU": 8}, autoscaler=True, waited_s=601, wait_s=600)
    assert nothing.workers == 0 and not nothing.wait
    assert "not enough GPU (a worker needs 1, the cluster has 0, also after waiting 600 s for its autoscaler)" in nothing.message


def test_an_autoscaler_that_can_never_provide_a_worker_is_not_waited_for():
    never = place_workers(2, GPU_WORKER, {"CPU": 8}, autoscaler=True, reachable={"CPU": 64, "GPU": 0}, wait_s=600)
    assert never.workers == 0 and not never.wait
    assert "not enough GPU (a worker needs 1, the cluster has 0, and its autoscaler can grow it to 0 at most)" in never.message
    capped = place_workers(8, GPU_WORKER, {"CPU": 8, "GPU": 1}, autoscaler=True, reachable={"CPU": 64, "GPU": 3}, wait_s=600)
    assert capped.wait and capped.target == 3 and "add 2 GPU for 3 workers" in capped.message
    grown = place_workers(8, GPU_WORKER, {"CPU": 8, "GPU": 3}, autoscaler=True, reachable={"CPU": 64, "GPU": 3}, wait_s=600)
    assert grown.workers == 3 and "(its autoscaler can grow it no further); using 3" in grown.message


def test_the_monitor_status_tells_an_autoscaler_from_the_read_only_provider():
    node = "ce56a5b162aa34ba01571a466f864aef566108ee1d60a0eea1fdf666"
    read_only = {"autoscaler_report": {"active_nodes": {f"node_{node}": 1}, "pending_launches": {},
                                       "node_type_mapping": {node: f"node_{node}"}}}
    assert not autoscaler_in_status(read_only)  # what a plain `ray start` / ray.init() head reports
    launcher = {"autoscaler_report": {"active_nodes": {"ray.head.default": 1}, "pending_launches": {"gpu-group": 2},
                                      "node_type_mapping": {node: "ray.head.default"}}}
    assert autoscaler_in_status(launcher)
    assert not autoscaler_in_status(None) and not autoscaler_in_status({})
