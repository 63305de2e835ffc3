"""Properties of the scheduling policy (sdbatch.run.policy) under any order of events a driver
can report: work handed out, shards completed, attempts failing transiently or for good,
workers lost with their queued work. Whatever happens, every shard ends either finished
(committed once) or failed, a shard is never charged more attempts than ``max_attempts``,
an uncharged requeue keeps its attempt number, and the verdict follows from the failures."""

from __future__ import annotations

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from sdbatch.run.plan import make_plan
from sdbatch.run.policy import FINISHED, INCOMPLETE, Schedule, Work
from sdbatch.run.protocol import ShardResult

EVENTS = ["hand_out", "complete", "fail", "give_up", "lose_worker"]


@given(num_shards=st.integers(1, 8), workers=st.integers(1, 3), max_attempts=st.integers(1, 4), data=st.data())
def test_every_shard_ends_finished_or_failed_and_charges_never_exceed_the_attempts(num_shards, workers, max_attempts, data):
    plan = make_plan(num_shards * 3, 3, 2)
    schedule = Schedule(shards=plan.pending(), max_attempts=max_attempts)
    inflight: list[list[Work]] = [[] for _ in range(workers)]  # each worker's calls, oldest (at the model) first
    finished: Counter[str] = Counter()
    charges: Counter[str] = Counter()

    def check(work: Work) -> None:
        assert 1 + charges[work.shard.name] == work.attempt <= max_attempts

    for _ in range(data.draw(st.integers(0, 60))):
        event = data.draw(st.sampled_from(EVENTS))
        worker = inflight[data.draw(st.integers(0, workers - 1))]
        if event == "hand_out":
            work = schedule.next(0.0)
            if work is not None:
                check(work)
                worker.append(work)
        elif worker and event == "complete":
            work = worker.pop(0)
            finished[work.shard.name] += 1
            schedule.completed(work, ShardResult(work.shard.name, rows_ok=work.shard.num_rows))
        elif worker and event in ("fail", "give_up"):
            work = worker.pop(0)
            charges[work.shard.name] += event == "fail"
            (schedule.attempt_failed if event == "fail" else schedule.give_up)(work, "boom")
        elif worker and event == "lose_worker":
            charges[worker[0].shard.name] += 1  # the call at the model is the culprit; the rest never started
            schedule.worker_lost(list(worker), "actor died", culprit=worker[0])
            worker.clear()
    # drain: every worker finishes what it holds, then the queue runs to its end
    for worker in inflight:
        for work in worker:
            finished[work.shard.name] += 1
            schedule.completed(work, ShardResult(work.shard.name, rows_ok=work.shard.num_rows))
    while (work := schedule.next(0.0)) is not None:
        check(work)
        finished[work.shard.name] += 1
        schedule.completed(work, ShardResult(work.shard.name, rows_ok=work.shard.num_rows))

    failed = set(schedule.failed_shards)
    assert len(failed) == len(schedule.failed_shards)  # a shard fails at most once
    assert all(count == 1 for count in finished.values()) and not failed & set(finished)
    assert failed | set(finished) == {s.name for s in plan.pending()}
    assert schedule.shards_committed == len(finished) and schedule.rows_ok == 3 * len(finished)
    assert all(f["attempts"] <= max_attempts and charges[f["shard"]] <= f["attempts"] for f in schedule.failures())
    assert all(charges[name] <= max_attempts for name in charges)
    assert schedule.verdict().state == (INCOMPLETE if failed else FINISHED)
