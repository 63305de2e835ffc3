"""Duplicate ids and distinct prompts by 64-bit hashes, in bounded memory."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

from sdbatch.manifest.reader import iter_row_batches, plain_array
from sdbatch.manifest.report import RowIssue, repr_value
from sdbatch.manifest.rules import IssueCollector
from sdbatch.manifest.sources import Manifest

_P = np.uint64(0x100000001B3)


_P_INV = np.uint64(pow(0x100000001B3, -1, 2**64))


_powers: dict[str, np.ndarray] = {"p": np.ones(1, np.uint64), "inv": np.ones(1, np.uint64)}


def _pow_tables(n: int) -> tuple[np.ndarray, np.ndarray]:
    if len(_powers["p"]) < n + 1:
        size = min(max(n + 1, 2 * len(_powers["p"])), _HASH_SLICE_BYTES + 1)
        p = np.full(size, _P, dtype=np.uint64)
        p[0] = 1
        inv = np.full(size, _P_INV, dtype=np.uint64)
        inv[0] = 1
        with np.errstate(over="ignore"):
            _powers["p"] = np.cumprod(p, dtype=np.uint64)
            _powers["inv"] = np.cumprod(inv, dtype=np.uint64)
    return _powers["p"], _powers["inv"]


_HASH_SLICE_BYTES = 1 << 20  # bounds the per-byte temporaries (8 bytes per text byte, a few arrays)


def hash_strings(arr: pa.Array) -> np.ndarray:
    """A 64-bit hash of every string of ``arr`` (nulls hash like ''): a polynomial hash
    modulo 2**64 (made position-independent with the modular inverse of the odd base),
    then the splitmix64 finaliser. Rows are hashed in slices of about 1 MiB of text; a
    single longer string is hashed with blake2b. Collisions only cost a re-check; they are
    never trusted."""
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        arr = arr.cast(pa.large_string())
    n = len(arr)
    out = np.zeros(n, dtype=np.uint64)
    if n == 0:
        return out
    bufs = arr.buffers()
    otype = np.int32 if pa.types.is_string(arr.type) else np.int64
    offs = np.frombuffer(bufs[1], dtype=otype)[arr.offset : arr.offset + n + 1].astype(np.int64)
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    s = 0
    while s < n:
        e = int(np.searchsorted(offs, offs[s] + _HASH_SLICE_BYTES, side="right")) - 1
        e = min(max(e, s), n)
        if e == s:  # one string longer than a slice
            raw = data[offs[s] : offs[s + 1]].tobytes()
            out[s] = np.uint64(int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little"))
            s += 1
            continue
        out[s:e] = _poly_hash(data, offs[s : e + 1])
        s = e
    return out


def _poly_hash(data: np.ndarray, offs: np.ndarray) -> np.ndarray:
    lo, hi = int(offs[0]), int(offs[-1])
    d = data[lo:hi]
    rel = offs - lo
    pw, inv = _pow_tables(len(d))
    with np.errstate(over="ignore"):
        cs = np.zeros(len(d) + 1, dtype=np.uint64)
        v = d.astype(np.uint64)
        v += np.uint64(1)
        v *= pw[: len(d)]
        np.cumsum(v, out=cs[1:])
        del v
        starts, ends = rel[:-1], rel[1:]
        h = (cs[ends] - cs[starts]) * inv[starts]
        h ^= (ends - starts).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        h ^= h >> np.uint64(30)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(27)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(31)
    return h


class DistinctCounter:
    """Distinct count of 64-bit hashes: exact up to K values, then the K-minimum-values
    estimate (relative error about 1/sqrt(K) ≈ 0.4%)."""

    K = 1 << 16

    def __init__(self) -> None:
        self.kept = np.zeros(0, np.uint64)
        self.saturated = False

    def add(self, hashes: np.ndarray) -> None:
        if len(hashes) == 0:
            return
        if self.saturated:
            hashes = hashes[hashes < self.kept[-1]]
        merged = np.union1d(self.kept, hashes)
        if len(merged) > self.K:
            self.saturated = True
            merged = merged[: self.K]
        self.kept = merged

    def estimate(self) -> tuple[int, bool]:
        if not self.saturated:
            return len(self.kept), False
        kth = float(self.kept[-1]) / 2.0**64
        return int(round((self.K - 1) / kth)), True


def find_duplicate_ids(manifest: Manifest, hashes: np.ndarray, valid: np.ndarray, coll: IssueCollector, batch_size: int) -> int:
    """Count rows whose id an earlier row already used (8-byte hash per row, sorted), and
    report the first ones, confirmed by their actual strings (a second pass over ``id``).
    Peak: three arrays of 8 bytes per row (hashes, a sorted copy, the stable sort order)."""
    rows = None if valid.all() else np.flatnonzero(valid)
    hv = hashes if rows is None else hashes[rows]
    srt = np.sort(hv)
    dup_pos = np.flatnonzero(srt[1:] == srt[:-1]) + 1
    if len(dup_pos) == 0:
        return 0
    order = np.argsort(hv, kind="stable")  # equal hashes keep row order: the first is the original
    del hv
    first_pos = np.searchsorted(srt, srt[dup_pos], side="left")
    dup_rows, first_rows = order[dup_pos], order[first_pos]
    if rows is not None:
        dup_rows, first_rows = rows[dup_rows], rows[first_rows]
    del order, srt, rows
    count = len(dup_rows)
    # report the first ones, confirmed by their actual strings
    sel = np.argsort(dup_rows, kind="stable")[: coll.limit * 2]
    want_dup, want_first = dup_rows[sel], first_rows[sel]
    needed = np.unique(np.concatenate([want_dup, want_first]))
    id_of: dict[int, str] = {}
    base = 0
    for rb in iter_row_batches(manifest, columns=["id"], batch_size=batch_size):
        n = rb.num_rows
        lo, hi = np.searchsorted(needed, [base, base + n])
        if hi > lo:
            col = plain_array(rb.column("id"))
            for r in needed[lo:hi].tolist():
                v = col[r - base].as_py()
                id_of[r] = str(v)
        base += n
        if base > needed[-1]:
            break
    reported = 0
    for r, f in zip(want_dup.tolist(), want_first.tolist()):
        if id_of.get(r) != id_of.get(f):
            count -= 1  # a 64-bit hash collision, not a duplicate
            continue
        if reported < coll.limit and not coll.full_before(r):
            coll.kept.append(RowIssue(r, id_of[r], "id", repr_value(id_of[r]),
                                      f"ids must be unique (also used by row {f})",
                                      "give each row its own id, or drop the id column to use row numbers"))
            reported += 1
    coll.count += count
    coll._sort()
    return count
