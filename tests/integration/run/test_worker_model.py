"""How the worker actor holds its model. It calls the model from one thread only
(``ShardRunner._on_model_thread``), though two of its shards are in flight at once on two threads,
as the driver hands them out: on the CPU a second thread calling torch got an OpenMP team of its
own, and libgomp then stopped spinning between parallel regions (more threads than CPUs), each
batch 1.3–1.6× slower. And it imports torch only for a model that runs on it (not builtin:null), with
the cyclic collector off and what the import made frozen (``models.loader.import_runtime``)."""

from __future__ import annotations

import pyarrow.parquet as pq
from conftest import write_manifest

ROWS = [{"id": f"t{i}", "prompt": f"a green square {i}", "seed": i} for i in range(8)]
TORCH_MODULES = ["torch", "diffusers", "sdbatch.models.runtime"]


def start_worker(tmp_path, model: str):
    """A worker actor for ``model`` on ROWS, in a process of its own (no other actor or task shares
    this test's runtime_env), its progress tracker, and its output folder."""
    from sdbatch.manifest.sources import open_manifest
    from sdbatch.models.resolve import preflight
    from sdbatch.run.driver import ProgressTracker
    from sdbatch.run.worker import WorkerActor
    from sdbatch.spec import load_spec

    manifest = open_manifest(str(write_manifest(tmp_path / "m.parquet", ROWS)))
    spec = load_spec(overrides={"model.name": model, "defaults.steps": 2, "resources.batch_size": 4})
    out = tmp_path / "out"
    out.mkdir()
    tracker = ProgressTracker.remote()
    actor = WorkerActor.options(runtime_env={"env_vars": {"SDBATCH_TEST_WORKER": tmp_path.name}}).remote(
        spec.model_dump_json(), str(out), None, tracker, manifest, "job-fingerprint", preflight(model).pin)
    return actor, tracker, out


def torch_modules_in(actor) -> list[str]:
    """Which of TORCH_MODULES the actor's process has imported."""
    import ray

    return ray.get(actor.__ray_call__.remote(
        lambda worker: [m for m in TORCH_MODULES if m in __import__("sys").modules]))


def test_two_shards_in_flight_call_the_model_from_the_one_model_thread(ray_address, tmp_path):
    import ray

    from sdbatch.run.plan import make_plan

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

    actor, tracker, out = start_worker(tmp_path, "builtin:tiny")
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
        assert torch_modules_in(actor) == TORCH_MODULES  # the next test's probe sees them where they are
        collector_on, frozen = ray.get(actor.__ray_call__.remote(
            lambda w: (__import__("gc").isenabled(), __import__("gc").get_freeze_count())))
        assert collector_on and frozen > 200_000, (collector_on, frozen)  # torch, diffusers, …: ~800k objects
    finally:
        ray.kill(actor)
        ray.kill(tracker)


def test_a_builtin_null_worker_never_imports_torch(ray_address, tmp_path):
    import ray

    from sdbatch.run.plan import make_plan

    actor, tracker, out = start_worker(tmp_path, "builtin:null")
    try:
        assert "refused" not in ray.get(actor.ready.remote())
        result = ray.get(actor.run_shard.remote(make_plan(len(ROWS), 8, 8).shard(0), 0, 1))
        assert (result.committed, result.rows_ok, result.rows_failed) == (True, 8, 0)
        assert len(list((out / "images" / "00000").glob("*.png"))) == 8
        assert torch_modules_in(actor) == []
    finally:
        ray.kill(actor)
        ray.kill(tracker)
