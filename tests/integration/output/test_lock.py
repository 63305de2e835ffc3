"""The job lock (``_sdbatch/lock.json``) on a local directory and on S3: one owner at a time,
an expired lease taken over by exactly one of several racing drivers, a lost lease noticed."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import sdbatch_cli, write_manifest

from sdbatch.output import lock as job_lock
from sdbatch.output.documents import LOCK_KEY
from sdbatch.output.lock import JobLock, LockHeld, LockLost


def lease(driver: str) -> bytes:
    return json.dumps({"driver": driver, "host": "elsewhere", "pid": 1, "renewals": 1}).encode()


def expire(store, monkeypatch) -> None:
    """Let the lease at LOCK_KEY expire by the storage's clock (S3 Last-Modified has 1 s steps)."""
    monkeypatch.setattr(job_lock, "LOCK_LEASE_S", 2.0)
    time.sleep(3.5)


def test_live_lock_refuses_a_second_driver(store):
    first = JobLock.acquire(store)
    try:
        with pytest.raises(LockHeld, match="is being written by another sdbatch driver"):
            JobLock.acquire(store)
        assert json.loads(store.get(LOCK_KEY))["driver"] == first.owner["driver"]
    finally:
        first.release()
    assert not store.exists(LOCK_KEY)


def test_racing_drivers_take_an_expired_lock_exactly_once(store, monkeypatch):
    store.put(LOCK_KEY, lease("dead-driver"))
    expire(store, monkeypatch)
    n = 6
    barrier = threading.Barrier(n)

    def acquire(_):
        barrier.wait()
        try:
            return JobLock.acquire(store)
        except LockHeld:
            return None

    with ThreadPoolExecutor(n) as pool:
        locks = list(pool.map(acquire, range(n)))
    winners = [lock for lock in locks if lock is not None]
    try:
        assert len(winners) == 1
        assert json.loads(store.get(LOCK_KEY))["driver"] == winners[0].owner["driver"]
    finally:
        for lock in winners:
            lock.release()


def test_a_lease_taken_over_is_noticed_and_left_to_its_new_owner(store, monkeypatch):
    monkeypatch.setattr(job_lock, "HEARTBEAT_S", 0.2)
    lock = JobLock.acquire(store)
    time.sleep(0.5)
    first_beat = json.loads(store.get(LOCK_KEY))
    assert first_beat["driver"] == lock.owner["driver"] and lock.lost is None
    lock.check()  # still ours

    usurper = lease("usurper")  # our lease lapsed; another driver took over
    store.put(LOCK_KEY, usurper)
    deadline = time.time() + 10
    while lock.lost is None and time.time() < deadline:
        time.sleep(0.05)
    assert lock.lost is not None and lock.lost["driver"] == "usurper"
    with pytest.raises(LockLost, match="another sdbatch driver .host elsewhere, pid 1. took over the job lock"):
        lock.check()
    time.sleep(0.5)  # no more heartbeats: the new owner's lease is never overwritten
    assert store.get(LOCK_KEY) == usurper
    lock.release()
    assert store.get(LOCK_KEY) == usurper


def test_lease_age_is_the_storages_clock_not_the_writers(store, monkeypatch):
    """Finding 10: a lease renewed just now by a driver whose clock is an hour behind (its body
    says it expired long ago) is still held; one whose last write is older than the lease is
    free, whatever times its body claims."""
    behind = time.time() - 3600
    store.put(LOCK_KEY, json.dumps({"driver": "skewed", "host": "elsewhere", "pid": 1,
                                    "heartbeat_at": behind, "expires_at": behind + 60}).encode())
    with pytest.raises(LockHeld, match="is being written by another sdbatch driver"):
        JobLock.acquire(store)
    ahead = time.time() + 3600
    store.put(LOCK_KEY, json.dumps({"driver": "ahead", "host": "elsewhere", "pid": 1,
                                    "heartbeat_at": ahead, "expires_at": ahead + 60}).encode())
    expire(store, monkeypatch)
    lock = JobLock.acquire(store)
    try:
        assert json.loads(store.get(LOCK_KEY))["driver"] == lock.owner["driver"]
    finally:
        lock.release()


# --- issue 21 finding 15: a live driver's lease is judged by the lease, through the CLI ---------


class LiveDriverElsewhere(threading.Thread):
    """A live driver this process cannot see: it renews OUT's lock.json every second (a new
    renewal count each time), with the lock body ``owner`` and, after each renewal, the file's
    mtime set ``mtime_shift`` seconds off (its host's clock, or a shared filesystem's)."""

    def __init__(self, out, mtime_shift: float = 0.0, **owner):
        super().__init__(daemon=True)
        self.path, self.mtime_shift, self.owner = out / "_sdbatch" / "lock.json", mtime_shift, owner
        self.stop = threading.Event()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.renew(1)

    def renew(self, count: int) -> None:
        temp = self.path.with_name(".lock.json.test-writing")
        temp.write_text(json.dumps({"driver": "e" * 32, **self.owner, "renewals": count, "lease_s": 60}))
        os.replace(temp, self.path)
        if self.mtime_shift:
            stamp = time.time() + self.mtime_shift
            os.utime(self.path, (stamp, stamp))

    def run(self) -> None:
        count = 1
        while not self.stop.wait(1.0):
            count += 1
            self.renew(count)


@pytest.mark.parametrize("case", ["same hostname, another pid namespace", "file mtime 120 s behind the reader"])
def test_a_live_drivers_lock_is_not_taken_over(case, run_cli, tmp_path):
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": "a", "prompt": "a red square"}])
    out = tmp_path / "out"
    if case.startswith("same hostname"):  # a container beside us: its pid 1 means nothing here
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        holder = LiveDriverElsewhere(out, host=socket.gethostname(), pid=int(dead.stdout), pid_ns="pid:[1]")
    else:  # NFS, or a writer whose clock is 120 s behind this reader's
        holder = LiveDriverElsewhere(out, mtime_shift=-120, host="another-host", pid=1, pid_ns="pid:[1]")
    holder.start()
    try:
        result = run_cli("submit", manifest, "--out", out, "--model", "builtin:null", timeout=180)
    finally:
        holder.stop.set()
        holder.join()
    text = " ".join(result.stderr.split())
    assert result.returncode == 2, result.stderr
    assert "is being written by another sdbatch driver" in text and "took over" not in text
    assert json.loads(holder.path.read_text())["driver"] == "e" * 32
    assert not (out / "_sdbatch" / "job.json").exists()
    if case.startswith("file mtime"):
        assert "it was renewed while this driver watched it, so it is alive whatever the clocks say" in text
    else:
        assert "its lease has not expired" in text


def test_status_after_ctrl_c_counts_only_committed_rows_as_done(tmp_path):
    """A run stopped at 16 of 96 rows generated, no shard committed: none of them is done."""
    from sdbatch.manifest.sources import open_manifest
    from sdbatch.output.claim import job_record
    from sdbatch.output.documents import Progress
    from sdbatch.spec import load_spec
    from sdbatch.storage.local import LocalStorage

    manifest = write_manifest(tmp_path / "m.parquet", [{"id": f"r{i}", "prompt": "a red square"} for i in range(96)])
    out = LocalStorage(tmp_path / "out")
    job_record(load_spec(None, [], {}), open_manifest(str(manifest)), "pin").write(out)
    Progress(state="interrupted", rows_total=96, rows_done=0, rows_in_flight=16, rows_remaining=80,
             rows_generated_this_run=16, images_per_second=0.49, shards_total=6).write(out)
    status = sdbatch_cli("", "status", tmp_path / "out")
    assert status.returncode == 0, status.stderr
    assert "shards     0/6 committed" in status.stdout
    assert ("rows       0/96 done (in committed shards), 16 generated in shards never committed "
            "(lost; generated again on resume), 0 failed this run") in status.stdout, status.stdout
