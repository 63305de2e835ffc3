"""The worker actor calls its model from one thread only (``ShardRunner._on_model_thread``), though
two of its shards are in flight at once on two threads, as the driver hands them out. On the CPU
a second thread calling torch got an OpenMP team of its own, and libgomp then stopped spinning
between parallel regions (more threads than CPUs): each batch ran 1.3–1.6× slower."""

from __future__ import annotations

import pyarrow.parquet as pq
from conftest import write_manifest

ROWS = [{"id": f"t{i}", "prompt": f"a green square {i}", "seed": i} for i in range(8)]


def test_two_shards_in_flight_call_the_model_from_the_one_model_thread(ray_address, tmp_path):
    import ray

    from sdbatch.manifest.sources import open_manifest
    from sdbatch.models.resolve import preflight
    from sdbatch.run.driver import ProgressTracker
    from sdbatch.run.plan import make_plan
    from sdbatch.run.worker import WorkerActor
    from sdbatch.spec import load_spec

    def record_threads(worker) -> None:
        """Run in the actor (``__ray_call__``; nested, so Ray sends it by value): note the thread
        of every model call and of every shard's call."""
        import threading

        runner = worker.runner
        worker.model_calls, worker.shard_calls = [], []
        generate, run_shard = runner.generator.generate, runner.run_shard

        def recorded_generate(*args, **kwargs):
            worker.model_calls.append(threading.current_thread().name)
            return generate(*args, **kwargs)

        def recorded_run_shard(*args, **kwargs):
            worker.shard_calls.append(threading.current_thread().name)
            return run_shard(*args, **kwargs)

        runner.generator.generate, runner.run_shard = recorded_generate, recorded_run_shard

    manifest = open_manifest(str(write_manifest(tmp_path / "m.parquet", ROWS)))
    spec = load_spec(overrides={"model.name": "builtin:tiny", "defaults.steps": 2, "resources.batch_size": 4})
    out = tmp_path / "out"
    out.mkdir()
    tracker = ProgressTracker.remote()
    actor = WorkerActor.remote(spec.model_dump_json(), str(out), None, tracker, manifest, "job-fingerprint",
                               preflight("builtin:tiny").pin)
    try:
        assert "refused" not in ray.get(actor.ready.remote())
        ray.get(actor.__ray_call__.remote(record_threads))
        plan = make_plan(len(ROWS), 4, 4)
        results = ray.get([actor.run_shard.remote(plan.shard(turn), turn, 1) for turn in range(2)])
        assert [(r.committed, r.rows_ok, r.rows_failed) for r in results] == [(True, 4, 0)] * 2
        model_calls, shard_calls = ray.get(actor.__ray_call__.remote(lambda w: (w.model_calls, w.shard_calls)))
        assert len(set(shard_calls)) == 2, shard_calls  # the two shards were in flight on two threads
        assert len(model_calls) == 2 and len(set(model_calls)) == 1, model_calls  # both batches: one thread
        model_thread = ray.get(actor.__ray_call__.remote(lambda w: [t.name for t in w.model_thread._threads]))
        assert model_thread == model_calls[:1] and model_thread[0].startswith("sdbatch-model"), model_thread
        assert sorted(pq.read_table(out / "metadata" / "00001.parquet").column("id").to_pylist()) == ["t4", "t5", "t6", "t7"]
    finally:
        ray.kill(actor)
        ray.kill(tracker)
