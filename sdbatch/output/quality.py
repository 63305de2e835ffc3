"""How image quality is measured (the columns are ``data.index``'s), and duplicate detection at
index merge.

In the worker, where the pixels are in memory, ``measure_image`` gives each image a
perceptual hash (``imagehash.phash``, 64 bits as 16 hex digits: shapes and tones, blind to hue),
a colour hash (``imagehash.colorhash``, 42 bits: how much of the image falls in each hue and
greyness bin), the mean and standard deviation of its luminance (0–255) and a ``blank`` flag for near-uniform images (a known
diffusion failure: all black, all grey). ``clip_score`` (prompt–image agreement) comes from
``models.clip_score`` when ``scoring.clip_model`` is set.

At merge, ``mark_duplicates`` fills ``duplicate_of``: the id of the first row in manifest order
whose image has the same sha256, or a phash within ``scoring.duplicate_max_distance`` bits *and*
a colour hash within ``scoring.duplicate_colour_max_distance`` bits — so a green triangle is not
a duplicate of the red triangle of the same seed. With ``scoring.dedup_within`` (a label column)
only rows with the same value of it are compared. Rows merged before the colour hash existed
compare by phash among themselves only. It runs in DuckDB over the merged index on local disk, with a memory limit (spilling to disk
past it), so the driver's memory stays bounded whatever the number of rows: its groups and joins
are keyed on integers (the phash and colour hash as such, the sha256 by its hash, the pairs then
checked on the full sha256) and carry rows, not ids. Near (not exact)
phash matches use multi-index hashing: two 64-bit hashes within d bits agree exactly on at
least one of d+1 disjoint blocks, so only hashes sharing a block are compared.

No torch here, and ``imagehash`` is imported only where images are measured."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from sdbatch.spec import ScoringSpec

#: DuckDB's memory while marking duplicates; past it, it spills to the temporary directory.
#: At 1M rows 128MB took the merge's peak from 290 to 360 MiB (in process; issue 23).
DUPLICATES_MEMORY_LIMIT = "64MB"


PHASH_BITS = 64


#: Bits per bin of the colour hash (14 bins): 3 gives 42 bits, 11 hex digits.
COLOUR_HASH_BINBITS = 3


#: The colour hash of a row that has none (merged before it existed): farther than any real
#: colour hash (42 bits) from all but its likes, so such rows compare by phash among themselves.
NO_COLOUR_HASH = 1 << 63


@dataclass(frozen=True)
class DuplicateRule:
    """When two images are duplicates (``scoring``'s duplicate keys)."""

    max_distance: int = 0  # phash bits
    colour_max_distance: int = 0  # colour-hash bits
    within: str | None = None  # a label column: only rows with the same value are compared

    @property
    def exact(self) -> bool:
        return self.max_distance == 0 and self.colour_max_distance == 0

    @classmethod
    def of(cls, scoring: ScoringSpec) -> DuplicateRule:
        return cls(scoring.duplicate_max_distance, scoring.duplicate_colour_max_distance, scoring.dedup_within)


def measure_image(image: Any, blank_max_std: float) -> dict[str, Any]:
    """The quality columns of one generated image (a PIL image)."""
    import imagehash
    import numpy as np

    luma = np.asarray(image.convert("L"), dtype=np.float64)
    std = float(luma.std())
    return {
        "phash": str(imagehash.phash(image)),
        "colour_hash": str(imagehash.colorhash(image.convert("RGB"), binbits=COLOUR_HASH_BINBITS)),
        "luma_mean": round(float(luma.mean()), 4),
        "luma_std": round(std, 4),
        "blank": std <= blank_max_std,
    }


#: The key of a distinct image in the duplicate search: phash (as an integer), colour hash, scope.
_KEY = "v, cv, scope"

#: The key of a sha256 group: DuckDB's 64-bit hash of it and the scope. Fixed-width, so the
#: aggregate's hash table spills past the memory limit (64-character string keys ran it out of
#: memory at 10M rows; issue 23); the rows it pairs are then checked on the full sha256.
_SHA_KEY = "h, scope"


def _block_joins(rule: DuplicateRule) -> list[str]:
    """For each of the ``max_distance + 1`` blocks of the 64 phash bits: the distinct keys of
    ``p`` joined to the others of their scope that agree on that block and lie within both
    distances, each with the earliest first row among them."""
    blocks = rule.max_distance + 1
    edges = [round(i * PHASH_BITS / blocks) for i in range(blocks + 1)]
    statements = []
    for lo, hi in zip(edges, edges[1:]):
        mask = (1 << (hi - lo)) - 1
        statements.append(
            "INSERT INTO near SELECT a.v, a.cv, a.scope, min(b.r0) FROM p a JOIN p b "
            f"ON (a.v >> {lo}) & {mask} = (b.v >> {lo}) & {mask} AND a.scope = b.scope "
            "AND (a.v <> b.v OR a.cv <> b.cv) "
            f"AND bit_count(xor(a.v, b.v)) <= {rule.max_distance} "
            f"AND bit_count(xor(a.cv, b.cv)) <= {rule.colour_max_distance} GROUP BY a.v, a.cv, a.scope"
        )
    return statements


def duplicates_statements(index_path: str, rule: DuplicateRule, dups_path: str, columns: list[str]) -> list[str]:
    """DuckDB statements writing ``(row, duplicate_of)`` — every row of the index (whose
    columns are ``columns``) with an earlier duplicate, ordered by row — to ``dups_path``. One
    join at a time, each into a table of the on-disk database, so no two hash tables compete
    for the memory limit. The searches carry rows only (``min(row)``, fixed-width states that
    spill); the id of each row's earliest duplicate is looked up once, at the end."""
    colour = (f"coalesce(CAST('0x' || colour_hash AS UBIGINT), {NO_COLOUR_HASH})" if "colour_hash" in columns
              else f"CAST({NO_COLOUR_HASH} AS UBIGINT)")
    # the scope's value as text, a null label its own scope
    scope = (f"CASE WHEN \"{_escape_name(rule.within)}\" IS NULL THEN 'n' "
             f"ELSE 'v' || CAST(\"{_escape_name(rule.within)}\" AS VARCHAR) END") if rule.within else "''"
    rows_marked = f"FROM read_parquet('{index_path}') WHERE status = 'ok' AND sha256 IS NOT NULL"
    near = [] if rule.exact else [
        "CREATE TABLE near (v UBIGINT, cv UBIGINT, scope VARCHAR, r0 BIGINT)",
        *_block_joins(rule),
        f"INSERT INTO c SELECT k.row, n.r0 FROM k JOIN (SELECT {_KEY}, min(r0) AS r0 "
        f"FROM near GROUP BY {_KEY}) n USING ({_KEY}) WHERE n.r0 < k.row",
    ]
    return [
        f"CREATE TABLE k AS SELECT row, hash(sha256) AS h, sha256, CAST('0x' || phash AS UBIGINT) AS v, {colour} AS cv, "
        f"{scope} AS scope {rows_marked}",
        f"CREATE TABLE s AS SELECT {_SHA_KEY}, min(row) AS r0 FROM k GROUP BY {_SHA_KEY}",
        f"CREATE TABLE m AS SELECT k.row, s.r0 FROM k JOIN s USING ({_SHA_KEY}) WHERE s.r0 < k.row",
        # each row paired with the first of its hash group: the same bytes (a duplicate), or a
        # hash collision ("stray"), whose rows are then grouped on the full sha256
        "CREATE TABLE ma AS SELECT m.row, m.r0, a.sha256, a.scope FROM m JOIN k a ON a.row = m.row",
        "CREATE TABLE checked AS SELECT ma.*, ma.sha256 = b.sha256 AS same FROM ma JOIN (SELECT row, sha256 FROM k) b "
        "ON b.row = ma.r0",
        "CREATE TABLE c AS SELECT row, r0 FROM checked WHERE same",
        "INSERT INTO c SELECT t.row, f.r0 FROM checked t JOIN (SELECT sha256, scope, min(row) AS r0 FROM checked "
        "WHERE NOT same GROUP BY sha256, scope) f USING (sha256, scope) WHERE f.r0 < t.row",
        f"CREATE TABLE p AS SELECT {_KEY}, min(row) AS r0 FROM k WHERE v IS NOT NULL GROUP BY {_KEY}",
        f"INSERT INTO c SELECT k.row, p.r0 FROM k JOIN p USING ({_KEY}) WHERE p.r0 < k.row",
        *near,
        "COPY (SELECT d.row, i.id AS duplicate_of FROM (SELECT row, min(r0) AS r0 FROM c GROUP BY row) d "
        f"JOIN (SELECT row, id {rows_marked}) i ON i.row = d.r0 ORDER BY d.row) TO '{dups_path}' (FORMAT parquet)",
    ]


def _escape_name(name: str) -> str:
    return name.replace('"', '""')


def _escape_path(path: Path) -> str:
    return str(path).replace("'", "''")


class _RowCursor:
    """Reads ``(row, duplicate_of)`` batches in row order and answers, batch by batch of the
    index, the duplicate_of value of each of its rows."""

    def __init__(self, batches: Iterator[pa.RecordBatch]):
        self._batches = batches
        self._rows: list[int] = []
        self._values: list[str] = []
        self._at = 0
        self._done = False

    def _fill_past(self, row: int) -> None:
        while not self._done and (self._at >= len(self._rows) or self._rows[-1] <= row):
            try:
                batch = next(self._batches)
            except StopIteration:
                self._done = True
                return
            self._rows = self._rows[self._at:] + batch.column("row").to_pylist()
            self._values = self._values[self._at:] + batch.column("duplicate_of").to_pylist()
            self._at = 0

    def values_for(self, rows: list[int]) -> list[str | None]:
        out: list[str | None] = []
        for row in rows:
            self._fill_past(row)
            if self._at < len(self._rows) and self._rows[self._at] == row:
                out.append(self._values[self._at])
                self._at += 1
            else:
                out.append(None)
        return out


def mark_duplicates(index_path: Path, out_path: Path, rule: DuplicateRule) -> int:
    """Write ``index_path`` (sorted by row, with a ``duplicate_of`` column) to ``out_path``
    with ``duplicate_of`` filled in, row group by row group. Returns the number of duplicates.
    ``ValueError`` when ``rule.within`` is not a column of the index."""
    import duckdb

    source = pq.ParquetFile(index_path)
    columns = source.schema_arrow.names
    if rule.within is not None and rule.within not in columns:
        raise ValueError(f"scoring.dedup_within {rule.within!r} is not a column of the index (columns: {', '.join(columns)})")

    with tempfile.TemporaryDirectory(prefix="sdbatch-dups-") as tmp:
        dups_path = Path(tmp) / "duplicates.parquet"
        # one thread: at 10M rows a join's hash table on two threads ran out of 64MB (issue 23)
        con = duckdb.connect(str(Path(tmp) / "duplicates.duckdb"), config={
            "memory_limit": DUPLICATES_MEMORY_LIMIT, "temp_directory": tmp, "threads": 1,
            "preserve_insertion_order": False,
        })
        try:
            con.execute("SET enable_progress_bar = false")
            for statement in duplicates_statements(_escape_path(index_path), rule, _escape_path(dups_path), columns):
                con.execute(statement)
        finally:
            con.close()
        found = pq.ParquetFile(dups_path)
        cursor = _RowCursor(found.iter_batches(batch_size=65_536))
        column = source.schema_arrow.get_field_index("duplicate_of")
        with pq.ParquetWriter(out_path, source.schema_arrow, compression="zstd") as writer:
            for group in range(source.num_row_groups):
                table = source.read_row_group(group)
                values = cursor.values_for(table.column("row").to_pylist())
                table = table.set_column(column, "duplicate_of", pa.array(values, pa.string()))
                writer.write_table(table, row_group_size=max(table.num_rows, 1))
        return found.metadata.num_rows
