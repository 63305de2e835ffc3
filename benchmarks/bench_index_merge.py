"""Benchmark: the final index merge, streaming vs in memory (design.md §10: bounded driver memory).

Builds a local job output with ``--rows`` committed rows in shards of ``--rows-per-shard``
(realistic index columns: ~90-character prompts, sha256s, keys, a versions JSON, an
8-id ``batch_rows`` list, a passthrough label, quality columns with every tenth row's phash
repeating an earlier one), then merges it, each contender in a fresh process, side by side:

* ``in memory`` — every shard index concatenated into one table, sorted, written
  (what ``merge_index`` did before it streamed);
* ``streaming`` — ``sdbatch.output.index.merge_index``: shard by shard through a ParquetWriter,
  then ``duplicate_of`` filled in by DuckDB (phash distance ``--duplicate-distance``).

Prints wall time and peak RSS (``ru_maxrss`` of that one child, from ``os.wait4``) of each,
their ratios, and checks that both indexes hold the same rows in the same order.

    python benchmarks/bench_index_merge.py [--rows 1000000] [--rows-per-shard 1000] [--duplicate-distance 0]
    python benchmarks/bench_index_merge.py --wide-columns 20000   # the merge of a 20,000-column index
    python benchmarks/bench_index_merge.py --duplicates-only --rows 100000 1000000 10000000 --baseline /work/main

``--duplicates-only`` (issue 23: the merge at 10M rows): ``quality.mark_duplicates`` alone on a
synthetic merged index (row, id, random sha256 / phash / colour hash, all distinct, written in
16,384-row groups), this tree against the code at ``--baseline PATH`` if given, each in a fresh
process; a contender that fails (DuckDB out of memory) is reported as failed, and the two
outputs' ``duplicate_of`` columns must be equal.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time

BUILD = r"""
import sys, hashlib, json
import pyarrow as pa, pyarrow.parquet as pq
from pathlib import Path
sys.path.insert(0, "benchmarks")
from _common import PROMPTS
out, rows, rps = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
(out / "metadata").mkdir(parents=True)
versions = json.dumps({"torch": "2.13.0", "diffusers": "0.42.0", "transformers": "5.23.0", "python": "3.11.7"})
for number, start in enumerate(range(0, rows, rps)):
    ids = [f"img-{i:09d}" for i in range(start, min(start + rps, rows))]
    n = len(ids)
    name = f"{number:05d}"
    table = pa.table({
        "id": ids, "row": list(range(start, start + n)),
        "prompt": [PROMPTS[i % len(PROMPTS)] + f", detailed, variation {i}" for i in range(start, start + n)],
        "negative_prompt": ["blurry, low quality"] * n, "seed": list(range(start, start + n)),
        "steps": [30] * n, "guidance_scale": [7.5] * n, "width": [512] * n, "height": [512] * n,
        "scheduler": ["dpmpp_2m"] * n, "init_image": pa.nulls(n), "strength": pa.nulls(n),
        "shard": [name] * n, "batch_id": [f"{name}-{j // 8:03d}" for j in range(n)],
        "batch_rows": [ids[j - j % 8: j - j % 8 + 8] for j in range(n)],
        "model_fingerprint": ["ab" * 32] * n, "device": ["cuda"] * n, "dtype": ["float16"] * n,
        "torch_threads": [8] * n, "versions": [versions] * n, "init_image_sha256": pa.nulls(n),
        "status": ["ok"] * n, "error": pa.nulls(n), "key": [f"images/{name}/{i}.png" for i in ids],
        "sha256": [hashlib.sha256(i.encode()).hexdigest() for i in ids], "bytes": [350_000 + j for j in range(n)],
        "attempt": [1] * n, "worker": ["node-3:41234"] * n, "generate_seconds": [0.731] * n,
        "label": [j % 10 for j in range(n)],
        "phash": [hashlib.blake2b(str(i if i % 10 else i // 10).encode(), digest_size=8).hexdigest()
                  for i in range(start, start + n)],
        "luma_mean": [120.5] * n, "luma_std": [40.25] * n, "blank": [False] * n, "clip_score": pa.nulls(n),
        "duplicate_of": pa.nulls(n),
    })
    table = table.replace_schema_metadata({b"sdbatch.job_fingerprint": b"bench"})  # the job's stamp
    pq.write_table(table, out / "metadata" / f"{name}.parquet", compression="zstd")
"""

MERGE = {
    "in memory": (  # the baseline: every commit in one table, sorted, written (not in the package: no reader does this)
        "import pyarrow as pa\nfrom sdbatch.output.commits import committed_shards, read_shard_index, table_to_parquet\n"
        "from sdbatch.output.index import INDEX_KEY\n"
        "tables = [read_shard_index(storage, n, 'bench') for n in sorted(committed_shards(storage), key=int)]\n"
        "storage.put(INDEX_KEY, table_to_parquet(pa.concat_tables(tables, promote_options='permissive').sort_by('row')))\n"
    ),
    "streaming": (
        "import os, pyarrow as pa\nfrom sdbatch.output.index import merge_index\n"
        "from sdbatch.output.quality import DuplicateRule\n"
        "names = sorted(n[:-len('.parquet')] for n in os.listdir(sys.argv[1] + '/metadata'))\n"
        "merge_index(storage, names, int(sys.argv[3]), {'label': pa.int64()}, 'bench', DuplicateRule(int(sys.argv[2])))\n"
    ),
}

#: ``--wide-columns N``: one row of N int64 label columns committed, then merged (issue 21
#: finding 12: the merge of an index that wide is linear in its columns).
WIDE = r"""
import sys, time
import pyarrow as pa
from sdbatch.data.index import index_schema
from sdbatch.output.commits import records_to_parquet
from sdbatch.output.index import merge_index
from sdbatch.storage.local import LocalStorage
storage, columns = LocalStorage(sys.argv[1]), int(sys.argv[2])
labels = {f"label_{n}": pa.int64() for n in range(columns)}
storage.put("metadata/00000.parquet", records_to_parquet(
    [{"id": "a", "row": 0, "status": "ok", **{name: 1 for name in labels}}], index_schema(labels), "fp"))
started = time.perf_counter()
assert merge_index(storage, ["00000"], 1, labels, "fp").rows == 1
print(f"{time.perf_counter() - started:.2f}")
"""
#: ``--duplicates-only``: a synthetic merged index of ``rows`` rows, all images distinct.
DUPLICATES_INDEX = r"""
import os, sys
import numpy as np, pyarrow as pa, pyarrow.parquet as pq
rows, group = int(sys.argv[2]), 16_384
schema = pa.schema([("row", pa.int64()), ("id", pa.string()), ("sha256", pa.string()), ("phash", pa.string()),
                    ("colour_hash", pa.string()), ("status", pa.string()), ("duplicate_of", pa.string())])
def hexes(n, width):
    return pa.array(np.frombuffer(os.urandom(n * width // 2).hex().encode(), dtype=f"S{width}").astype(str))
with pq.ParquetWriter(sys.argv[1], schema, compression="zstd") as writer:
    for start in range(0, rows, group):
        n = min(group, rows - start)
        writer.write_table(pa.table({"row": np.arange(start, start + n), "id": [f"img-{i:09d}" for i in range(start, start + n)],
            "sha256": hexes(n, 64), "phash": hexes(n, 16), "colour_hash": hexes(n, 11), "status": ["ok"] * n,
            "duplicate_of": pa.nulls(n, pa.string())}, schema=schema))
"""
MARK_DUPLICATES = r"""
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from sdbatch.output.quality import DuplicateRule, mark_duplicates
mark_duplicates(Path(sys.argv[2]), Path(sys.argv[3]), DuplicateRule())
"""
PRELUDE = "import sys\nfrom sdbatch.storage.local import LocalStorage\nstorage = LocalStorage(sys.argv[1])\n"


def run_child(code: str, *args: str, check: bool = True) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of ``python -c code args`` in a fresh process; with
    ``check=False`` a failed child's RSS is negative."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code, *args])
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        if check:
            raise SystemExit(f"child failed with {os.waitstatus_to_exitcode(status)}")
        return time.perf_counter() - started, -usage.ru_maxrss * 1024
    return time.perf_counter() - started, usage.ru_maxrss * 1024


def bench_duplicates(sizes: list[int], baseline: str | None) -> None:
    """``--duplicates-only``: mark_duplicates at each size, this tree (and ``baseline``) side by side."""
    import pyarrow.parquet as pq

    contenders = {"this tree": os.path.dirname(os.path.dirname(os.path.abspath(__file__))), **({"baseline": baseline} if baseline else {})}
    print(f"{platform.node()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    for rows in sizes:
        with tempfile.TemporaryDirectory(prefix="sdbatch-bench-dups-") as tmp:
            index = os.path.join(tmp, "index.parquet")
            run_child(DUPLICATES_INDEX, index, str(rows))
            marked = {}
            for name, tree in contenders.items():
                out = os.path.join(tmp, f"{name}.parquet")
                wall, rss = run_child(MARK_DUPLICATES, tree, index, out, check=False)
                ok = rss > 0
                marked[name] = pq.read_table(out, columns=["duplicate_of"]).column(0) if ok else None
                print(f"{rows:>11,} rows, {name:>9}: {wall:7.1f} s wall, peak RSS {abs(rss) / 2**20:5.0f} MiB"
                      f"{'' if ok else '  FAILED'}", flush=True)
            if all(v is not None for v in marked.values()) and len({str(v) for v in marked.values()}) > 1:
                raise SystemExit(f"{rows:,} rows: the contenders' duplicate_of columns differ")


def index_ids(path: str) -> tuple[int, str, int]:
    """Rows, a digest of the ids in order, and rows marked duplicate."""
    code = ("import sys, hashlib, pyarrow.parquet as pq\n"
            "t = pq.read_table(sys.argv[1], columns=['id', 'duplicate_of'])\n"
            "print(t.num_rows, hashlib.sha256('\\n'.join(t.column('id').to_pylist()).encode()).hexdigest(),"
            " t.num_rows - t.column('duplicate_of').null_count)")
    rows, digest, duplicates = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True,
                                              check=True).stdout.split()
    return int(rows), digest, int(duplicates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--rows-per-shard", type=int, default=1000)
    parser.add_argument("--duplicate-distance", type=int, default=0)
    parser.add_argument("--wide-columns", type=int, default=0,
                        help="instead: merge one row of this many passthrough columns (e.g. 20000)")
    parser.add_argument("--duplicates-only", action="store_true", help="instead: mark_duplicates alone at each --rows")
    parser.add_argument("--baseline", help="with --duplicates-only: a checkout of the code to compare with")
    args = parser.parse_args()
    if args.duplicates_only:
        bench_duplicates(args.rows, args.baseline)
        return
    args.rows = args.rows[0]
    if args.wide_columns:
        with tempfile.TemporaryDirectory(prefix="sdbatch-bench-wide-") as tmp:
            started = time.perf_counter()
            merge_s = subprocess.run([sys.executable, "-c", WIDE, os.path.join(tmp, "out"), str(args.wide_columns)],
                                     capture_output=True, text=True, check=True).stdout.split()[-1]
            print(f"one row of {args.wide_columns:,} passthrough columns: merge {float(merge_s):.1f} s "
                  f"(commit + merge in a fresh process {time.perf_counter() - started:.1f} s); "
                  f"{platform.node()}, {os.cpu_count()} CPUs")
        return
    with tempfile.TemporaryDirectory(prefix="sdbatch-bench-index-") as tmp:
        out = os.path.join(tmp, "out")
        build_s, _ = run_child(BUILD, out, str(args.rows), str(args.rows_per_shard))
        shards = len(os.listdir(os.path.join(out, "metadata")))
        print(f"{args.rows:,} rows in {shards} committed shards (built in {build_s:.1f} s); "
              f"{platform.node()}, {os.cpu_count()} CPUs")
        results, digests = {}, {}
        for name, body in MERGE.items():
            results[name] = run_child(PRELUDE + body, out, str(args.duplicate_distance), str(args.rows))
            digests[name] = index_ids(os.path.join(out, "index.parquet"))
            size = os.path.getsize(os.path.join(out, "index.parquet"))
            wall, rss = results[name]
            print(f"{name:>10}: {wall:6.1f} s wall, peak RSS {rss / 2**20:7.0f} MiB, index {size / 2**20:.0f} MiB, "
                  f"{digests[name][2]:,} rows marked duplicate")
        if digests["in memory"][:2] != digests["streaming"][:2] or digests["streaming"][0] != args.rows:
            raise SystemExit(f"the two indexes differ: {digests}")
        (mem_s, mem_rss), (stream_s, stream_rss) = results["in memory"], results["streaming"]
        print(f"streaming / in memory: time {stream_s / mem_s:.2f}x, peak RSS {stream_rss / mem_rss:.2f}x "
              f"(same {args.rows:,} ids in the same order)")


if __name__ == "__main__":
    main()
