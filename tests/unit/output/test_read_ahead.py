"""``output.index._read_ahead``: commits read several at once, handed back in order, with a
bounded number in flight (what keeps an unfinished job's readers fast on S3 and bounded)."""

from __future__ import annotations

import threading
import time

import pytest

from sdbatch.output.index import _read_ahead


def test_reads_come_back_in_order_with_at_most_ahead_in_flight():
    lock, in_flight, most = threading.Lock(), [0], [0]

    def read(name: str) -> str:
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        time.sleep(0.002 * (int(name) % 3))  # finish out of order
        with lock:
            in_flight[0] -= 1
        return name.upper()

    names = [f"{n:05d}" for n in range(100)]
    assert list(_read_ahead(read, names, 4)) == [(n, n.upper()) for n in names]
    assert 1 < most[0] <= 4  # overlapped, and bounded


def test_a_failed_read_is_raised_at_its_place():
    def read(name: str) -> str:
        if name == "3":
            raise KeyError(name)
        return name

    got = []
    with pytest.raises(KeyError):
        for name, _ in _read_ahead(read, [str(n) for n in range(10)], 4):
            got.append(name)
    assert got == ["0", "1", "2"]
