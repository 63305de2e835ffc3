"""Benchmark: sdbatch at scale (issue 23) — wall time and peak RSS of every command, by phase.

Three parts, each a subcommand (every sdbatch command runs as ``python -m sdbatch`` in its own
process, its RSS sampled with psutil every 0.1 s, its peak also from ``os.wait4``):

* ``job`` — (a) a real job of ``--rows`` rows of ``builtin:null`` (64², ``--workers 2``,
  webdataset) through the CLI: rows/s and the driver's peak RSS in each phase (plan, dispatch,
  merge, report; the phases are told apart by the driver's log lines).
* ``readers`` — (b)/(c) for each ``--rows`` (e.g. 100000 1000000 10000000), an OUT built
  synthetically (below), then ``submit`` (every shard committed: plan, merge, report), ``submit``
  again ("nothing to generate"), ``status``, ``verify`` (full, ``--listing-only``, ``--sample``;
  a flag this sdbatch does not have yet is skipped with a message), ``reproduce`` (a row of the
  last shard), ``report``, ``stats``, ``export --where``: wall and peak RSS each, and the ratio of
  the largest size to the smallest per command. With ``--index-only`` the OUT is built by
  ``build_index_only`` (the index written directly, tars only for the rows read), for 10M rows;
  ``reproduce`` is also measured up to its "regenerating" line: the lookup apart from the model;
  ``verify --listing-only`` and ``--sample 100`` run in process (a full verify is not run).
* ``resume`` — (item 3) what a resume costs when every shard (or all but one) is committed, on
  local storage and on a moto S3 server on 127.0.0.1: the time until "nothing to generate" and
  until the driver says what it will generate (before Ray starts), and its peak RSS.

The synthetic OUT: a manifest of ``rows`` rows (id, prompt, seed, label); ``_sdbatch/job.json``
written by sdbatch's own preflight and claim for exactly the flags the CLI is given (so the CLI
resumes it); one commit per 64-row shard, made from the commit of a real 64-row job (every index
column as a real worker writes it) with the ids, rows, seeds, prompts, labels, keys, sha256 and
phashes replaced; and one webdataset tar per shard written through sdbatch's own layout, holding
per row a distinct ~90-byte PNG (a 1×1 image with the row's id in a text chunk) and its JSON —
so verify and export read real objects, at ~70 KiB of disk per shard. The images are not what
``builtin:null`` would draw, so ``reproduce`` regenerates its row and reports a mismatch (its
exit code is printed): its figure is the cost of finding the row, loading the model and
generating it. The index and ``_SUCCESS`` are written by the first ``submit`` (the merge).

    python benchmarks/bench_scale.py job --rows 1000000
    python benchmarks/bench_scale.py readers --rows 100000 1000000
    python benchmarks/bench_scale.py resume --rows 1000000 --s3
    python benchmarks/bench_scale.py resume --rows 10000000 --s3 --state-only
    python benchmarks/bench_scale.py readers --rows 2000 20000      # a smoke test, about a minute
    python benchmarks/bench_scale.py readers --index-only --rows 100000 10000000

``--keep DIR`` builds under DIR and keeps the outputs (a later run reuses an OUT already built there).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import PROMPTS, free_port, use_fake_s3_env  # noqa: E402

ROWS_PER_SHARD = 64
#: The flags of every submit: the synthetic OUT's job.json is claimed for exactly these.
JOB_FLAGS = ["--model", "builtin:null", "--workers", "2", "--rows-per-shard", str(ROWS_PER_SHARD),
             "--format", "webdataset"]
JOB_OVERRIDES = {"model.name": "builtin:null", "resources.workers": 2, "resources.rows_per_shard": ROWS_PER_SHARD,
                 "output.format": "webdataset"}
SDBATCH = [sys.executable, "-m", "sdbatch"]
RSS_LIMIT = [8 * 2**30]  # --rss-limit-mib: a command whose RSS passes it is killed (and says so)
MiB = 2**20


# -- measuring one command ------------------------------------------------------------------
@dataclass
class Measured:
    """One command's exit code, wall seconds, peak RSS of its own process (bytes) and, per
    phase (named by the log line that starts it), the phase's wall and peak RSS."""

    code: int
    wall: float
    peak: int
    phases: dict[str, tuple[float, int]] = field(default_factory=dict)
    output: str = ""


def measure(args: list[str], markers: dict[str, str] | None = None, env: dict[str, str] | None = None,
            until: str | None = None, stop: bool = False) -> Measured:
    """Run ``sdbatch args``; ``markers`` (phase name → regex of the log line that starts it,
    in order; the first phase starts at once) split its samples into phases. ``until``: a regex; the wall time reported is
    the time to the first line matching it and the peak RSS is the one sampled until then; with
    ``stop`` the command is killed there (before Ray starts, where it is used), else it runs to its end."""
    started = time.perf_counter()
    # /usr/bin/time reports the peak: the child of a large process (this one) would count the
    # pages it was forked with in its own ru_maxrss; time's child is forked from time
    peak_file = tempfile.NamedTemporaryFile(prefix="sdbatch-bench-rss-", delete=False)
    proc = subprocess.Popen(["/usr/bin/time", "-o", peak_file.name, "-f", "%M", *SDBATCH, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})})
    samples: list[tuple[float, int]] = [(0.0, 0)]
    first = next(iter(markers or {}), None)
    seen: list[tuple[float, str]] = [(0.0, first)] if first else []  # (time, phase) as their lines arrive
    lines: list[str] = []
    reached: list[float] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            now = time.perf_counter() - started
            lines.append(line)
            for phase, pattern in (markers or {}).items():
                if phase not in {p for _, p in seen} and re.search(pattern, line):
                    seen.append((now, phase))
            if until and not reached and re.search(until, line):
                reached.append(now)
                if stop:  # SIGKILL: Ctrl-C there is not always honoured; the lock left behind is taken
                    for child in psutil.Process(proc.pid).children():  # over by the next run (its pid is gone)
                        child.kill()

    import psutil

    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    timer = psutil.Process(proc.pid)
    while proc.poll() is None:  # sample the sdbatch process (time's child) until it exits
        try:
            for child in timer.children():
                samples.append((time.perf_counter() - started, child.memory_info().rss))
                if samples[-1][1] > RSS_LIMIT[0]:  # the machine is shared: a command past the limit is stopped
                    child.kill()
                    lines.append(f"killed: RSS past the benchmark's limit of {RSS_LIMIT[0] / MiB:,.0f} MiB\n")
        except psutil.Error:
            pass
        time.sleep(0.1)
    wall = time.perf_counter() - started
    reader.join(timeout=10)
    code = proc.returncode
    peak = max(int(Path(peak_file.name).read_text().split()[-1]) * 1024, *(rss for _, rss in samples))
    if reached:  # the peak before the line (sampled): what ran after it is not this figure's
        peak = max(rss for t, rss in samples if t <= reached[0])
    os.unlink(peak_file.name)
    phases: dict[str, tuple[float, int]] = {}
    bounds = [*seen, (wall, "")]
    for (begin, phase), (end, _) in zip(bounds, bounds[1:]):
        inside = [rss for t, rss in samples if begin <= t <= end]
        if inside:  # a phase too short to be sampled (Ray's start when nothing is generated) is left out
            phases[phase] = (end - begin, max(inside))
    return Measured(code, reached[0] if reached else wall, peak, phases, "".join(lines))


def has_flag(command: str, flag: str) -> bool:
    shown = subprocess.run([*SDBATCH, command, "--help"], capture_output=True, text=True,
                           env={**os.environ, "COLUMNS": "200"}).stdout
    return flag in shown


# -- the synthetic OUT ----------------------------------------------------------------------
def write_manifest(path: Path, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("seed", pa.int64()), ("label", pa.int64())])
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        for start in range(0, rows, 500_000):
            n = range(start, min(start + 500_000, rows))
            writer.write_table(pa.table({
                "id": [f"img-{i:09d}" for i in n], "prompt": [f"{PROMPTS[i % len(PROMPTS)]}, variation {i}" for i in n],
                "seed": list(n), "label": [i % 10 for i in n],
            }, schema=schema), row_group_size=65_536)


def template_commit(workdir: Path):
    """The commit of a real one-shard ``builtin:null`` job with the benchmark's flags."""
    import pyarrow.parquet as pq

    made = workdir / "template" / "out" / "metadata" / "00000.parquet"
    if not made.exists():
        write_manifest(workdir / "template.parquet", ROWS_PER_SHARD)
        result = subprocess.run([*SDBATCH, "submit", str(workdir / "template.parquet"), "--out",
                                 str(workdir / "template" / "out"), *JOB_FLAGS, "--workers", "1"],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"the template job failed:\n{result.stdout}{result.stderr}")
    return pq.read_table(made)


def tiny_png(row_id: str) -> bytes:
    """A valid 1×1 PNG carrying ``row_id`` in a tEXt chunk: distinct bytes per row, ~90 bytes."""
    header = b"\x89PNG\r\n\x1a\n"

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (header + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
            + chunk(b"tEXt", b"id\x00" + row_id.encode()) + chunk(b"IDAT", zlib.compress(b"\x00\x80\x80\x80"))
            + chunk(b"IEND", b""))


def build_out(workdir: Path, rows: int) -> tuple[Path, Path]:
    """The manifest and the synthetic OUT of ``rows`` rows (see the module docstring); reused
    when already built (its ``.built`` marker), a shard whose commit is missing built again."""
    from sdbatch.output.commits import FINGERPRINT_META, committed_shards, shard_name
    from sdbatch.output.layout import layout_for

    manifest, out = workdir / f"manifest-{rows}.parquet", workdir / f"out-{rows}"
    started, built = time.perf_counter(), (out / ".built").exists()
    if not built:
        shutil.rmtree(out, ignore_errors=True)
        write_manifest(manifest, rows)
    template = template_commit(workdir)
    prepared = claimed(manifest, out)
    storage, layout = prepared.storage, layout_for(prepared.storage, prepared.spec.output)
    stamp = {FINGERPRINT_META: prepared.job.fingerprint.encode()}
    there = committed_shards(storage) if built else set()
    for number in range(-(-rows // ROWS_PER_SHARD)):
        if shard_name(number) not in there:
            _write_shard(storage, layout, template, stamp, number, rows)
    if not built:
        (out / ".built").write_text(f"{rows} rows in {time.perf_counter() - started:.0f} s\n")
        print(f"  built {rows:,} rows ({-(-rows // ROWS_PER_SHARD):,} shards) in {time.perf_counter() - started:.0f} s: "
              f"{du(out) / MiB:,.0f} MiB on disk", flush=True)
    return manifest, out


def _write_shard(storage, layout, template, stamp: dict[bytes, bytes], number: int, rows: int) -> None:
    """Shard ``number``'s tar (through the job's layout) and its commit: the template's rows
    with this shard's ids, rows, seeds, prompts, labels, keys, sha256 and phashes."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from sdbatch.output.commits import metadata_key, shard_name, table_to_parquet

    start = number * ROWS_PER_SHARD
    n, name, names = min(ROWS_PER_SHARD, rows - start), shard_name(number), template.column_names
    ids = [f"img-{i:09d}" for i in range(start, start + n)]
    images = [tiny_png(i) for i in ids]
    digests = [hashlib.sha256(b).hexdigest() for b in images]
    writer = layout.writer(name)
    for row_id, data, digest in zip(ids, images, digests):
        writer.add(row_id, data, digest, {"id": row_id, "shard": name})
    placed = writer.finish(ids)
    batch = len(template.column("batch_rows")[0])
    replaced = {
        "id": ids, "row": list(range(start, start + n)), "seed": list(range(start, start + n)),
        "prompt": [f"{PROMPTS[i % len(PROMPTS)]}, variation {i}" for i in range(start, start + n)],
        "label": [i % 10 for i in range(start, start + n)], "shard": [name] * n,
        "batch_id": [f"{name}-{j // batch:03d}" for j in range(n)],
        "batch_rows": [ids[j - j % batch: j - j % batch + batch] for j in range(n)],
        "key": [placed[i].key for i in ids], "sha256": digests, "bytes": [len(b) for b in images],
        "phash": [hashlib.blake2b(i.encode(), digest_size=8).hexdigest() for i in ids],
    }
    table = template.slice(0, n)
    for column, values in replaced.items():
        position = names.index(column)
        table = table.set_column(position, names[position], pa.array(values, table.schema.field(column).type))
    assert pc.all(pc.equal(table.column("status"), "ok")).as_py()
    storage.put(metadata_key(name), table_to_parquet(table.replace_schema_metadata(stamp)))


def build_index_only(workdir: Path, rows: int) -> tuple[Path, Path]:
    """A finished job of ``rows`` rows whose index is written directly, for sizes whose full OUT
    takes hours to build (10M: ~2 h of tars and commits, then the merge): job.json (claimed as
    ``build_out`` does), ``index.parquet`` as the merge writes it (row groups of
    ``MERGE_ROW_GROUP_ROWS`` rows, the template commit's rows with each row's id, row, seed,
    prompt, label, key, sha256 and phash; every image distinct, so no duplicate is marked), ``_SUCCESS``,
    one commit per shard (the same 64 rows in each: a resume lists them, never reads them), and
    tars only for the shards ``index_only_shards`` names — the rows ``reproduce`` and
    ``export --where`` read. Every row's sha256 and size are those of the tar member
    ``_write_shard`` would write for it. ``verify`` reads every commit and object: not measured here."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sdbatch.data.index import index_schema
    from sdbatch.output.commits import FINGERPRINT_META, shard_name
    from sdbatch.output.index import INDEX_KEY, MERGE_ROW_GROUP_ROWS, _conform
    from sdbatch.output.layout import layout_for, tar_key, webdataset_key

    manifest, out = build_state(workdir, rows, folder="index-only")  # job.json, the commits, _SUCCESS
    if (out / ".index-built").exists():
        return manifest, out
    started = time.perf_counter()
    template, prepared = template_commit(workdir), claimed(manifest, out)  # the job build_state claimed
    storage, stamp = prepared.storage, {FINGERPRINT_META: prepared.job.fingerprint.encode()}
    schema = index_schema({"label": pa.int64()}).with_metadata(stamp)
    shards, batch = -(-rows // ROWS_PER_SHARD), len(template.column("batch_rows")[0])
    tiled = _conform(pa.concat_tables([template] * (MERGE_ROW_GROUP_ROWS // ROWS_PER_SHARD)), schema)
    unmarked = workdir / f"unmarked-{rows}.parquet"  # renamed once whole: a build cut short after it reuses it
    partial = unmarked.with_suffix(".partial")
    with pq.ParquetWriter(partial, schema, compression="zstd") if not unmarked.exists() else nullcontext() as writer:
        for start in range(0, rows if writer is not None else 0, MERGE_ROW_GROUP_ROWS):
            n = min(MERGE_ROW_GROUP_ROWS, rows - start)
            numbers = range(start, start + n)
            ids = [f"img-{i:09d}" for i in numbers]
            images = [tiny_png(i) for i in ids]
            names = [shard_name(i // ROWS_PER_SHARD) for i in numbers]
            first = [i - i % batch - start for i in numbers]  # a batch never spans shards: 64 is a multiple
            replaced = {
                "id": ids, "row": list(numbers), "seed": list(numbers),
                "prompt": [f"{PROMPTS[i % len(PROMPTS)]}, variation {i}" for i in numbers],
                "label": [i % 10 for i in numbers], "shard": names,
                "batch_id": [f"{name}-{i % ROWS_PER_SHARD // batch:03d}" for name, i in zip(names, numbers)],
                "batch_rows": [ids[f:f + batch] for f in first],
                "key": [f"{tar_key(name)}#{webdataset_key(i)}.png" for name, i in zip(names, ids)],
                "sha256": [hashlib.sha256(b).hexdigest() for b in images], "bytes": [len(b) for b in images],
                "phash": [hashlib.blake2b(i.encode(), digest_size=8).hexdigest() for i in ids],
            }
            table = tiled.slice(0, n)
            for column, values in replaced.items():
                position = schema.get_field_index(column)
                table = table.set_column(position, column, pa.array(values, schema.field(column).type))
            assert writer is not None
            writer.write_table(table, row_group_size=n)
    if not unmarked.exists():
        partial.rename(unmarked)
    # every row's image is distinct, so duplicate_of stays null, as mark_duplicates would leave it
    # (at 10M rows its DuckDB query ran out of its memory limit here: see RESULTS.md)
    unmarked.rename(out / INDEX_KEY)
    layout = layout_for(storage, prepared.spec.output)
    for number in index_only_shards(rows):
        _write_shard(storage, layout, template, stamp, number, rows)  # its commit too: the real one
    (out / ".index-built").write_text(f"{rows} rows in {time.perf_counter() - started:.0f} s\n")
    print(f"  built {rows:,} rows index-only ({shards:,} commits, {len(index_only_shards(rows)):,} tars) in "
          f"{time.perf_counter() - started:.0f} s: {du(out) / MiB:,.0f} MiB on disk", flush=True)
    return manifest, out


def exported_from(rows: int) -> int:
    """``export --where``'s 1%: the last hundredth of the rows (contiguous, so an index-only OUT
    holds their tars)."""
    return rows - rows // 100


def index_only_shards(rows: int) -> range:
    """The shards whose tars an index-only OUT holds: those of the exported rows (the last 1%),
    the last shard (``reproduce``'s row) among them."""
    return range(exported_from(rows) // ROWS_PER_SHARD, -(-rows // ROWS_PER_SHARD))


def unfinish(out: Path) -> None:
    """Back to "every shard committed, nothing merged": the next submit merges and reports."""
    for key in ("index.parquet", "_SUCCESS", "report.html", "_sdbatch/progress.json"):
        (out / key).unlink(missing_ok=True)


#: Hard links of one commit file at most (ext4 allows 65,000 per file).
LINKS_PER_FILE = 60_000


def build_state(workdir: Path, rows: int, folder: str = "state") -> tuple[Path, Path]:
    """A finished job's state alone, for the resume at sizes whose full OUT would take too long
    to build: job.json (claimed as ``build_out`` does), one commit per shard — the same 64
    rows in each, hard links of one file (a resume of a finished job lists the commits, never
    reads them) — and
    ``_SUCCESS``; no tars, no index."""
    manifest, out = workdir / f"manifest-{rows}.parquet", workdir / f"{folder}-{rows}"
    if (out / ".built").exists():
        return manifest, out
    shutil.rmtree(out, ignore_errors=True)
    from sdbatch.output.commits import FINGERPRINT_META, metadata_key, shard_name, table_to_parquet
    from sdbatch.output.documents import Success

    started = time.perf_counter()
    if not manifest.exists():
        write_manifest(manifest, rows)
    prepared = claimed(manifest, out)
    stamp = {FINGERPRINT_META: prepared.job.fingerprint.encode()}
    commit = table_to_parquet(template_commit(workdir).replace_schema_metadata(stamp))
    (out / "metadata").mkdir(parents=True)
    for number in range(-(-rows // ROWS_PER_SHARD)):
        path = out / metadata_key(shard_name(number))
        if number % LINKS_PER_FILE == 0:
            path.write_bytes(commit)
            source = path
        else:
            os.link(source, path)  # hard links: 156,250 commits at 10M rows are three files' bytes
    Success(fingerprint=prepared.job.fingerprint, rows_total=rows, rows_in_index=rows, rows_ok=rows,
            rows_failed=0).write(prepared.storage)
    (out / ".built").write_text(f"{rows} rows in {time.perf_counter() - started:.0f} s\n")
    print(f"  built the state of {rows:,} rows ({-(-rows // ROWS_PER_SHARD):,} commits, no tars, no index) in "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    return manifest, out


def claimed(manifest: Path, out: Path):
    """The job record sdbatch's preflight makes for ``JOB_FLAGS``, claimed on ``out``."""
    from sdbatch.job.preflight import SubmitRequest, load_settings, prepare, validate
    from sdbatch.output.claim import claim_job

    request = SubmitRequest(manifest=str(manifest), out=str(out), spec_path=None, sets=[], overrides=JOB_OVERRIDES,
                            loras=[], address=None, endpoint_url=None, deadline_at=None)
    prepared = prepare(validate(request, load_settings(request)))
    claim_job(prepared.storage, prepared.job)
    return prepared


def du(path: Path) -> int:
    return sum(f.stat().st_blocks * 512 for f in path.rglob("*") if f.is_file())


def line(name: str, m: Measured, rows: int | None = None) -> str:
    rate = f", {rows / m.wall:,.0f} rows/s" if rows else ""
    return f"  {name:<28} exit {m.code}  {m.wall:8.1f} s  peak RSS {m.peak / MiB:7.0f} MiB{rate}"


# -- (a) a real job ---------------------------------------------------------------------------
#: The phases of a submit, each begun by a line of the driver's log (the first at the start).
JOB_PHASES = {"preflight, plan, listing": r"^$", "ray start": r"planned [\d,]+ shard", "dispatch": r"to generate, \d+ already committed",
              "merge": r"merging the index", "report": r"writing the report"}


def run_job(workdir: Path, rows: int) -> None:
    manifest, out = workdir / f"job-manifest-{rows}.parquet", workdir / f"job-out-{rows}"
    shutil.rmtree(out, ignore_errors=True)
    write_manifest(manifest, rows)
    m = measure(["submit", str(manifest), "--out", str(out), *JOB_FLAGS], JOB_PHASES)
    print(line(f"submit ({rows:,} rows)", m, rows))
    for phase, (wall, peak) in m.phases.items():
        print(f"    {phase:<10} {wall:8.1f} s  peak RSS {peak / MiB:7.0f} MiB")
    if m.code != 0:
        print(m.output[-3000:])
    from _common import commit_rate

    print(f"  steady-state rate from the commit times: {commit_rate(out, rows, ROWS_PER_SHARD):,.0f} rows/s")


# -- (b)/(c) the readers ----------------------------------------------------------------------
def reader_commands(manifest: Path, out: Path, rows: int) -> list[tuple[str, list[str], dict[str, str] | None]]:
    last_id = f"img-{rows - 1:09d}"
    return [
        ("submit (merge + report)", ["submit", str(manifest), "--out", str(out), *JOB_FLAGS], JOB_PHASES),
        ("submit (nothing to do)", ["submit", str(manifest), "--out", str(out), *JOB_FLAGS], None),
        ("status", ["status", str(out)], None),
        ("verify", ["verify", str(out)], None),
        ("verify --listing-only", ["verify", str(out), "--listing-only"], None),
        ("verify --sample 1000", ["verify", str(out), "--sample", "1000"], None),
        ("reproduce (last shard)", ["reproduce", str(out), last_id, "--output", str(out.parent / "repro.png")], None),
        ("report", ["report", str(out)], None),
        ("stats", ["stats", str(out)], None),
        ("export --where (1%, hf)", ["export", str(out), str(out.parent / f"export-{rows}"), "--to", "hf",
                                     "--where", "label = 0 AND row % 10 = 0"], None),
    ]


def index_only_commands(manifest: Path, out: Path, rows: int) -> list[tuple[str, list[str], dict[str, str] | None]]:
    """What an index-only OUT can answer honestly: no merge (its index was written directly), no
    full verify (it reads every commit and object); ``verify --listing-only`` and ``--sample 100``
    in process (``--workers 0``: the whole cost in the process measured), which report the rows
    without a tar missing and the sampled shards' commits (the template's rows) differing — their
    figures are the index pass, the listings and, for the sample, 100 rows and their commits read;
    ``export --where`` of the last 1% (their tars are there), which grows with the rows, and of
    the last ``EXPORT_FIXED_ROWS``, which does not: the export's own growth with the job."""
    skipped = ("submit (merge + report)", "verify", "verify --listing-only", "verify --sample 1000", "export --where (1%, hf)")
    kept = [c for c in reader_commands(manifest, out, rows) if c[0] not in skipped]
    dest = str(out.parent / f"export-{rows}")
    return [*kept, ("verify --listing-only", ["verify", str(out), "--listing-only", "--workers", "0"], None),
            ("verify --sample 100", ["verify", str(out), "--sample", "100", "--seed", "1", "--workers", "0"], None),
            ("export --where (last 1%, hf)", ["export", str(out), dest, "--to", "hf",
                                                     "--where", f"row >= {exported_from(rows)}"], None),
            (f"export --where (last {EXPORT_FIXED_ROWS:,}, hf)", ["export", str(out), dest, "--to", "hf",
                                                                 "--where", f"row >= {rows - EXPORT_FIXED_ROWS}"], None)]


#: The rows of the fixed-size export: the same output at every size (within the last 1% from 100,000 rows)
EXPORT_FIXED_ROWS = 1_000


#: Where ``reproduce`` has found its row, its batch-mates and checked the model's pin: the
#: lookup's figure is the peak RSS sampled until this line (the generation's is the whole run's).
REPRODUCE_LOOKED_UP = r"regenerating .* …"


def run_readers(workdir: Path, sizes: list[int], index_only: bool = False) -> None:
    flags = {"--listing-only": has_flag("verify", "--listing-only"), "--sample": has_flag("verify", "--sample")}
    figures: dict[str, dict[int, Measured]] = {}
    for rows in sizes:
        print(f"{rows:,} rows{' (index-only OUT)' if index_only else ''}:", flush=True)
        manifest, out = build_index_only(workdir, rows) if index_only else build_out(workdir, rows)
        if not index_only:
            unfinish(out)
        commands = index_only_commands if index_only else reader_commands
        for name, args, markers in commands(manifest, out, rows):
            flag = next((f for f in flags if f in args), None)
            if flag and not flags[flag]:
                print(f"  {name:<28} skipped: this sdbatch's verify has no {flag} (rerun after it lands)")
                continue
            shutil.rmtree(out.parent / f"export-{rows}", ignore_errors=True)
            m = measure(args, markers)
            figures.setdefault(name, {})[rows] = m
            print(line(name, m), flush=True)
            if args[0] == "reproduce":
                lookup = measure(args, until=REPRODUCE_LOOKED_UP, stop=True)
                figures.setdefault("reproduce: the lookup", {})[rows] = lookup
                print(line("reproduce: the lookup", lookup), flush=True)
            for phase, (wall, peak) in m.phases.items() if markers else ():
                print(f"    {phase:<10} {wall:8.1f} s  peak RSS {peak / MiB:7.0f} MiB")
            if m.code not in (0, 3):
                print("    " + "\n    ".join(m.output.strip().splitlines()[-2:]))
    if len(sizes) > 1:
        small, large = min(sizes), max(sizes)
        print(f"ratio {large:,} / {small:,} rows:")
        for name, by_rows in figures.items():
            if small in by_rows and large in by_rows:
                a, b = by_rows[small], by_rows[large]
                print(f"  {name:<28} wall {b.wall / a.wall:6.1f}x  peak RSS {b.peak / a.peak:5.2f}x")


# -- item 3: resume ---------------------------------------------------------------------------
#: Where a resume's cost before its first new shard ends: the driver has listed the commits
#: and planned ("planned N shards", before Ray starts), or found nothing to generate.
RESUME_UNTIL = r"nothing to generate|planned [\d,]+ shard"


def run_resume(workdir: Path, rows: int, s3: bool, state_only: bool) -> None:
    if state_only:
        manifest, out = build_state(workdir, rows)
    else:
        manifest, out = build_out(workdir, rows)
    if not (out / "_SUCCESS").exists():  # "nothing to generate" is a finished job's: merge it first
        m = measure(["submit", str(manifest), "--out", str(out), *JOB_FLAGS])
        print(line("submit (merge)", m))
    shards = -(-rows // ROWS_PER_SHARD)
    print(f"resume of {rows:,} rows, {shards:,} shards committed:")
    places: list[tuple[str, str, dict[str, str]]] = [("local", str(out), {})]
    server = None
    if s3:
        server, endpoint = start_moto()
        places.append(("moto S3", upload(out, endpoint), {"AWS_ENDPOINT_URL": endpoint}))
    try:
        for where, location, env in places:
            args = ["submit", str(manifest), "--out", location, *JOB_FLAGS]
            m = measure(args, env=env, until="nothing to generate", stop=True)  # the report after it: the readers' figure
            print(line(f"{where}: every shard committed", m) + f"  [{said(m.output, 'nothing to generate')}]", flush=True)
            status = measure(["status", location], env=env)
            print(line(f"{where}: status", status), flush=True)
            last = f"metadata/{shards - 1:05d}.parquet"
            removed = remove(location, [last, "_SUCCESS", "index.parquet"], env)
            try:  # stopped once planned, before Ray starts: nothing is generated
                m = measure(args, env=env, until=RESUME_UNTIL, stop=True)
                print(line(f"{where}: all but one committed", m) + f"  [{said(m.output, RESUME_UNTIL)}]", flush=True)
            finally:
                restore(location, removed, env)
    finally:
        if server is not None:
            server.stop()


def said(output: str, pattern: str) -> str:
    found = [ln for ln in output.splitlines() if re.search(pattern, ln)]
    return found[0].split(": ", 1)[-1].strip() if found else "not reached: " + " | ".join(output.strip().splitlines()[-2:])


def start_moto():
    use_fake_s3_env()
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # not a line per request

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server, f"http://127.0.0.1:{port}"


def _s3(endpoint: str):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint, config=Config(max_pool_connections=32))


def upload(out: Path, endpoint: str) -> str:
    """OUT's job state (job.json, commits, index, _SUCCESS; not the tars: a resume never reads
    them) copied to a bucket of the moto server."""
    from concurrent.futures import ThreadPoolExecutor

    client = _s3(endpoint)
    client.create_bucket(Bucket="bench")
    files = [p for p in out.rglob("*") if p.is_file() and not p.name.endswith(".tar") and p.name != ".built"]
    started = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda p: client.put_object(Bucket="bench", Key=f"out/{p.relative_to(out)}", Body=p.read_bytes()),
                      files))
    print(f"  uploaded {len(files):,} objects to moto in {time.perf_counter() - started:.0f} s", flush=True)
    return "s3://bench/out"


def remove(location: str, keys: list[str], env: dict[str, str]) -> dict[str, bytes]:
    """Delete ``keys`` under OUT, returning their bytes (to put back after)."""
    if location.startswith("s3://"):
        client = _s3(env["AWS_ENDPOINT_URL"])
        present = {o["Key"][len("out/"):] for k in keys
                   for o in client.list_objects_v2(Bucket="bench", Prefix=f"out/{k}").get("Contents", [])}
        kept = {k: client.get_object(Bucket="bench", Key=f"out/{k}")["Body"].read() for k in keys if k in present}
        for k in kept:
            client.delete_object(Bucket="bench", Key=f"out/{k}")
        return kept
    kept = {k: (Path(location) / k).read_bytes() for k in keys if (Path(location) / k).exists()}
    for k in kept:
        (Path(location) / k).unlink()
    return kept


def restore(location: str, kept: dict[str, bytes], env: dict[str, str]) -> None:
    if location.startswith("s3://"):
        client = _s3(env["AWS_ENDPOINT_URL"])
        for k, data in kept.items():
            client.put_object(Bucket="bench", Key=f"out/{k}", Body=data)
        return
    for k, data in kept.items():
        (Path(location) / k).write_bytes(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["job", "readers", "resume"])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000])
    parser.add_argument("--s3", action="store_true", help="resume: also on a moto S3 server on 127.0.0.1")
    parser.add_argument("--state-only", action="store_true",
                        help="resume: build only job.json, the commits and _SUCCESS (minutes at 10M rows, not hours)")
    parser.add_argument("--index-only", action="store_true",
                        help="readers: write the index directly, tars only for the rows reproduce and export read")
    parser.add_argument("--keep", type=Path, help="build under this folder and keep what was built")
    parser.add_argument("--rss-limit-mib", type=int, default=8192, help="kill a command whose RSS passes this")
    args = parser.parse_args()
    RSS_LIMIT[0] = args.rss_limit_mib * MiB
    print(f"bench_scale {args.part}: {platform.node()}, {os.cpu_count()} CPUs, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    with tempfile.TemporaryDirectory(prefix="sdbatch-bench-scale-") as tmp:
        workdir = args.keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        if args.part == "job":
            for rows in args.rows:
                run_job(workdir, rows)
        elif args.part == "readers":
            run_readers(workdir, sorted(args.rows), args.index_only)
        else:
            for rows in args.rows:
                run_resume(workdir, rows, args.s3, args.state_only)


if __name__ == "__main__":
    main()
