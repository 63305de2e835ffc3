"""A node lost at scale (issue 23 item 5): a job of 20,000 ``builtin:null`` rows on a three-node
``ray.cluster_utils.Cluster`` (a head with no CPUs, two one-CPU worker nodes) loses a worker
node a third of the way through and gains a fresh one. The index must hold every manifest row
exactly once, and nothing committed before the loss may be generated again: the commits and
tars of those shards keep their bytes and their modification times, their rows their first
attempt, and the driver never finds a shard "committed by an earlier attempt"."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

ROWS = 20_000
ROWS_PER_SHARD = 64
SHARDS = -(-ROWS // ROWS_PER_SHARD)
JOB = ["--model", "builtin:null", "--workers", "2", "--rows-per-shard", str(ROWS_PER_SHARD), "--format", "webdataset",
       "--set", "retries.shard_attempts=5"]


def _written(out: Path) -> dict[str, tuple[int, bytes]]:
    """Every commit and tar under OUT: its modification time (ns) and bytes."""
    return {str(p.relative_to(out)): (p.stat().st_mtime_ns, p.read_bytes())
            for part in ("metadata", "shards") for p in (out / part).glob("*") if p.is_file()}


def _committed(out: Path) -> int:
    return sum(1 for _ in (out / "metadata").glob("*.parquet"))


@pytest.mark.slow
def test_a_worker_node_lost_and_another_added_every_row_once_nothing_committed_generated_again(tmp_path):
    from ray.cluster_utils import Cluster

    manifest = tmp_path / "manifest.parquet"
    pq.write_table(pa.table({"id": [f"n{i:06d}" for i in range(ROWS)], "prompt": [f"a circle {i % 97}" for i in range(ROWS)],
                             "seed": list(range(ROWS))}), manifest)
    out, log = tmp_path / "out", tmp_path / "driver.log"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        lost = cluster.add_node(num_cpus=1)
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        with log.open("w") as stderr:  # a file, not a pipe: 20,000 rows of log never block the driver
            driver = subprocess.Popen([sys.executable, "-m", "sdbatch", "submit", str(manifest), "--out", str(out), *JOB],
                                      env={**os.environ, "RAY_ADDRESS": cluster.address}, stdout=stderr, stderr=stderr)
            deadline = time.time() + 240
            while not (out / "metadata").is_dir() or _committed(out) < SHARDS // 3:
                assert driver.poll() is None, log.read_text()[-3000:]
                assert time.time() < deadline, f"only {_committed(out) if (out / 'metadata').is_dir() else 0} shards in 240 s"
                time.sleep(0.2)
            cluster.remove_node(lost)
            before = _written(out)  # after the removal: whatever is committed now was not redone since
            cluster.add_node(num_cpus=1)
            assert driver.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        cluster.shutdown()
    said = log.read_text()
    assert "worker died" in said, said[-3000:]  # the removed node took a worker with it
    assert "committed by an earlier attempt" not in said, said[-3000:]

    index = pq.read_table(out / "index.parquet", columns=["id", "status", "shard", "attempt"])
    ids = index.column("id").to_pylist()
    assert len(ids) == ROWS and sorted(ids) == pq.read_table(manifest, columns=["id"]).column("id").to_pylist()
    assert pc.all(pc.equal(index.column("status"), "ok")).as_py()

    committed_before = {key.split("/")[1].split(".")[0] for key in before if key.startswith("metadata/")}
    after = _written(out)
    changed = sorted(key for key, (mtime, data) in before.items()
                     if key.split("/")[1].split(".")[0] in committed_before and after.get(key) != (mtime, data))
    assert not changed, f"committed before the loss, written again after: {changed[:5]}"
    assert len(committed_before) >= SHARDS // 3
    first_attempt = pc.equal(index.column("attempt"), 1)
    again = set(index.filter(pc.invert(first_attempt)).column("shard").to_pylist())
    assert not again & committed_before, f"shards committed before the loss ran again: {sorted(again & committed_before)}"
    print(f"NODE LOST AT SCALE: {ROWS} rows, {SHARDS} shards, {len(committed_before)} committed before the loss, "
          f"{len(again)} shards retried after it, 0 lost, 0 duplicated, 0 regenerated")
