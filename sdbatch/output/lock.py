"""The job lock: one driver at a time writes an output location (design.md §5.5, ``_sdbatch/lock.json``).

The lock is a lease: created once, renewed every HEARTBEAT_S, valid for LOCK_LEASE_S after its
last renewal, and taken over by another driver only once expired (or, in the same PID namespace
of the same host, once its process is gone). A lease's age is first read by the storage's own
clock (the lock object's modification time: S3 ``Last-Modified`` against the server's ``Date``,
a local file's mtime against the reader's clock), never by a time the writer put in the body;
the body carries a renewal count instead, so every renewal writes new bytes. Because a file's
mtime and the reader's clock can disagree (a shared filesystem, hosts with skewed clocks), a
lease that looks expired is taken over only after the reader has watched it unchanged (same
bytes: same renewal count) for a whole lease by its own monotonic clock — a live driver renews
it within a heartbeat. A process id is checked only where it means something: the same host
and the same PID namespace (``/proc/self/ns/pid``, recorded in the lease), not a container
beside it that shares the hostname. Renewal and takeover are compare-and-swap writes on the
store (``Storage.replace_if``: S3 ``If-Match``, a local ``flock``). Needs no Ray, so ``sdbatch
status`` can say who holds a job.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from sdbatch.errors import BadInput
from sdbatch.output.documents import LOCK_KEY, CorruptState, parse_json, read_json, utc_now
from sdbatch.storage.base import NotFound, Storage

log = logging.getLogger("sdbatch.lock")


LOCK_LEASE_S = 60.0
HEARTBEAT_S = 10.0


class LockHeld(BadInput, RuntimeError):
    """Another live driver holds the job lock on OUT."""


class LockLost(LockHeld):
    """Another driver took over this driver's lock (its lease ran out: heartbeats failed)."""


@dataclass
class JobLock:
    """The driver's lease on OUT (``_sdbatch/lock.json``): created once, renewed every
    HEARTBEAT_S, taken over by another driver only when expired. Renewal and takeover are
    compare-and-swap writes (``Storage.replace_if``), so of two drivers racing for an expired
    lock exactly one wins, and a driver whose lease was taken over learns it at its next
    heartbeat (``lost``) instead of overwriting the new owner's lease."""

    storage: Storage
    owner: dict[str, Any]
    tag: str = ""
    renewals: int = 0  # a monotonic count: each renewal's body differs from the last
    lost: dict[str, Any] | None = None  # the lock body of the driver that took over
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @classmethod
    def acquire(cls, storage: Storage) -> JobLock:
        owner = {"driver": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
                 "pid_ns": pid_namespace(), "started_at": utc_now()}
        lock = cls(storage, owner)
        body = lock._body()
        while True:
            if storage.put_new(LOCK_KEY, body).created:
                stored, tag = storage.get_tagged(LOCK_KEY)
                if parse_json(storage, LOCK_KEY, stored).get("driver") == owner["driver"]:
                    break
                continue  # a takeover replaced ours between the two calls: look again
            try:
                stored, tag = storage.get_tagged(LOCK_KEY)
            except NotFound:  # released meanwhile: try to create it again
                continue
            held = parse_json(storage, LOCK_KEY, stored)
            try:
                age = storage.age(LOCK_KEY)
            except NotFound:
                continue
            if not may_take_over(storage, held, tag, age):
                if not storage.exists(LOCK_KEY):
                    continue  # released while we watched it: try to create it again
                raise LockHeld(
                    f"{storage.url} is being written by another sdbatch driver "
                    f"(host {held.get('host')}, pid {held.get('pid')}; {_why_alive(held, age)}). "
                    f"Wait for it to finish, or for its lease to expire ({int(LOCK_LEASE_S)} s after its last "
                    "heartbeat) if it died."
                )
            new_tag = storage.replace_if(LOCK_KEY, body, tag)
            if new_tag is not None:
                log.warning("took over the expired lock of driver %s on %s", held.get("driver"), held.get("host"))
                tag = new_tag
                break
            # another driver renewed or took over the lock first: look again
        lock.tag = tag
        lock._thread = threading.Thread(target=lock._heartbeat, name="sdbatch-lock", daemon=True)
        lock._thread.start()
        return lock

    def _body(self) -> bytes:
        self.renewals += 1
        return json.dumps({**self.owner, "renewals": self.renewals, "lease_s": LOCK_LEASE_S}).encode()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self.renew()
            except Exception as exc:  # a missed heartbeat is survivable; the lease is 6 beats long
                log.warning("lock heartbeat failed: %s", exc)
            if self.lost is not None:
                return

    def renew(self) -> None:
        new_tag = self.storage.replace_if(LOCK_KEY, self._body(), self.tag)
        if new_tag is not None:
            self.tag = new_tag
            return
        held = read_json(self.storage, LOCK_KEY) or {}
        self.lost = held
        log.error("lost the job lock on %s to driver %s on %s (pid %s): this driver's lease had expired",
                  self.storage.url, held.get("driver"), held.get("host"), held.get("pid"))

    def check(self) -> None:
        """Raise LockLost if another driver has taken the lock over."""
        if self.lost is not None:
            raise LockLost(
                f"another sdbatch driver (host {self.lost.get('host')}, pid {self.lost.get('pid')}) took over "
                f"the job lock on {self.storage.url} after this driver's lease expired (heartbeats failed for "
                f"{int(LOCK_LEASE_S)} s); this driver stopped. Committed shards are kept; the other driver goes on."
            )

    def release(self) -> None:
        self._stop.set()
        held = read_json(self.storage, LOCK_KEY) or {}
        if held.get("driver") == self.owner["driver"]:
            self.storage.delete(LOCK_KEY)


def break_lock(storage: Storage, *, force: bool = False) -> dict[str, Any] | None:
    """``sdbatch unlock``: delete OUT's lock once no driver can be holding it — in this PID
    namespace of this host, its pid is gone; elsewhere, its lease has expired (``may_take_over``)
    — or at once with ``force``. Returns the lock body removed (None: there was none); LockHeld while a driver
    may be alive."""
    try:
        stored, tag = storage.get_tagged(LOCK_KEY)
        held = parse_json(storage, LOCK_KEY, stored)
    except NotFound:
        return None
    except CorruptState:
        if not force:
            raise LockHeld(f"{storage.url}/{LOCK_KEY} is unreadable, so whether its driver is alive cannot be "
                           "told; fix: make sure no sdbatch driver runs on this job, then `sdbatch unlock OUT --force`") from None
        held = {}
    if not force:
        try:
            age = storage.age(LOCK_KEY)
        except NotFound:  # released meanwhile
            return None
        if not may_take_over(storage, held, tag, age):
            if not storage.exists(LOCK_KEY):
                return None  # released while we watched it
            raise LockHeld(
                f"the lock on {storage.url} belongs to a driver that may be alive (host {held.get('host')}, pid "
                f"{held.get('pid')}; {_why_alive(held, age)}); fix: stop that "
                f"driver, or wait {int(LOCK_LEASE_S)} s after its last heartbeat, or pass --force if you are sure it is gone"
            )
    storage.delete(LOCK_KEY)
    return held


def pid_namespace() -> str | None:
    """This process's PID namespace (``pid:[4026531836]``), None where there is no such file."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _pid_is_checkable(held: dict[str, Any]) -> bool:
    """Whether the lease's pid names a process this one can see: same host and same PID
    namespace. Containers (or hostNetwork pods) share a hostname, not their pids."""
    ns = held.get("pid_ns")
    return held.get("host") == socket.gethostname() and ns is not None and ns == pid_namespace()


def _driver_is_gone(held: dict[str, Any]) -> bool:
    """Its process is gone (a dead pid cannot heartbeat), where that can be told."""
    if not _pid_is_checkable(held):
        return False
    try:
        os.kill(int(held.get("pid", -1)), 0)
    except (ProcessLookupError, ValueError):
        return True
    except PermissionError:
        return False
    return False


def _why_alive(held: dict[str, Any], age_s: float) -> str:
    """Why a lease ``may_take_over`` refused is taken for a live driver's."""
    if _pid_is_checkable(held):
        why = "on this host, its process is alive"
    elif age_s > LOCK_LEASE_S:
        why = "it was renewed while this driver watched it, so it is alive whatever the clocks say"
    else:
        why = "its lease has not expired"
    return f"{why}, last heartbeat {age_s:.0f} s ago by the storage's clock"


def lock_is_stale(held: dict[str, Any], age_s: float) -> bool:
    """At a glance (``status``): whether the lease in ``held`` (a lock.json body), last renewed
    ``age_s`` seconds ago by the storage's clock, looks expired or its driver gone."""
    return age_s > LOCK_LEASE_S or _driver_is_gone(held)


def may_take_over(storage: Storage, held: dict[str, Any], tag: str, age_s: float) -> bool:
    """Whether the lease ``held`` (its tag ``tag``, ``age_s`` old by the storage's clock) may be
    taken over: its driver is gone, or it looks expired and stays unchanged for a whole lease
    watched by this host's own clock (an mtime and a reader's clock may disagree)."""
    if _driver_is_gone(held):
        return True
    if age_s <= LOCK_LEASE_S:
        return False
    log.warning("the lock on %s was last renewed %.0f s ago by the storage's clock; watching it for %.0f s by this "
                "host's clock before taking it over (clocks can disagree) …", storage.url, age_s, LOCK_LEASE_S)
    until = time.monotonic() + LOCK_LEASE_S
    while time.monotonic() < until:
        time.sleep(min(1.0, LOCK_LEASE_S / 10))
        try:
            if storage.get_tagged(LOCK_KEY)[1] != tag:
                return False  # renewed (or taken) meanwhile: its driver is alive
        except NotFound:
            return False  # released meanwhile: the caller looks again
    return True
