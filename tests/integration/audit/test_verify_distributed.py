"""`sdbatch verify` on the cluster (issue 23): objects checked shard by shard in Ray tasks
(``--workers``) find a missing object, a corrupt one and orphans exactly as the in-process check
does, on local and S3 (moto) output; ``--sample N`` reads N seeded random rows in full and says
which; ``--listing-only`` reads nothing: it sees a missing object and a wrong size, not a
same-size corruption. Outputs are built synthetically (tests/synthetic_output.py), the CLI runs
as a subprocess against the session's Ray cluster."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from synthetic_output import build_output

from sdbatch.storage.local import LocalStorage

ROWS, PER_SHARD, FAILED_EVERY = 600, 100, 50  # 6 shards, 12 failed rows
GONE, SAME_SIZE, RESIZED = 130, 250, 420  # rows of shards 00001, 00002, 00004
STRAY, UNCOMMITTED = "images/00003/stray.png", "images/00042/img-000004200.png"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return build_output(tmp_path_factory.mktemp("verify-distributed") / "job", ROWS, rows_per_shard=PER_SHARD,
                        failed_every=FAILED_EVERY)


def index_rows(out: Path) -> dict[int, dict]:
    return {r["row"]: r for r in pq.read_table(out / "index.parquet", columns=["id", "row", "key", "bytes"]).to_pylist()}


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def upload(local: Path, endpoint: str, bucket: str, prefix: str) -> str:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        client.put_object(Bucket=bucket, Key=f"{prefix}/{path.relative_to(local).as_posix()}", Body=path.read_bytes())
    return f"s3://{bucket}/{prefix}"


@pytest.fixture(params=["local", "s3"])
def damaged(request, built, tmp_path):
    """A copy of the job with row GONE's image deleted, row SAME_SIZE's flipped (same size), row
    RESIZED's grown, a stray file in a shard's folder and an uncommitted shard's folder: (OUT,
    its --s3-endpoint or None, the index rows by row number)."""
    out = tmp_path / "out"
    shutil.copytree(built, out)
    rows = index_rows(out)
    (out / rows[GONE]["key"]).unlink()
    flip_a_byte(out / rows[SAME_SIZE]["key"])
    with open(out / rows[RESIZED]["key"], "ab") as grown:
        grown.write(b"\0" * 7)
    (out / STRAY).write_bytes(b"leftover of a dead attempt")
    (out / UNCOMMITTED).parent.mkdir()
    (out / UNCOMMITTED).write_bytes(b"an uncommitted shard's image")
    if request.param == "local":
        return str(out), None, rows
    endpoint, bucket = request.getfixturevalue("s3_bucket")
    return upload(out, endpoint, bucket, "run"), endpoint, rows


def endpoint_args(endpoint: str | None) -> list[str]:
    return ["--s3-endpoint", endpoint] if endpoint else []


def test_verify_on_two_workers_finds_what_the_in_process_check_finds(damaged, run_cli):
    from sdbatch.audit.verify import verify

    out, endpoint, rows = damaged
    result = run_cli("verify", out, "--workers", "2", *endpoint_args(endpoint))
    assert result.returncode == 1, result.stdout + result.stderr
    text = result.stdout
    assert "checked    by 2 Ray tasks at a time" in text
    assert f"ok         {ROWS - ROWS // FAILED_EVERY - 3} objects present with the recorded size and sha256" in text
    assert "missing    1" in text and f"{rows[GONE]['id']}  {rows[GONE]['key']}" in text
    assert "mismatched 2" in text
    assert f"{rows[SAME_SIZE]['id']}  {rows[SAME_SIZE]['key']}  (sha256 differs)" in text
    assert f"{rows[RESIZED]['id']}  {rows[RESIZED]['key']}  (size {rows[RESIZED]['bytes'] + 7} ≠ recorded " \
           f"{rows[RESIZED]['bytes']}, sha256 differs)" in text
    assert "orphans    2" in text and f"    {STRAY}\n    {UNCOMMITTED}\n" in text
    assert "PROBLEMS FOUND" in text

    here = verify(out, endpoint_url=endpoint, workers=0)
    assert here.checked_by == "this process"
    assert (here.ok, here.missing, sorted(here.mismatched), here.orphans) == (
        ROWS - ROWS // FAILED_EVERY - 3, [(rows[GONE]["id"], rows[GONE]["key"])],
        sorted([(rows[SAME_SIZE]["id"], rows[SAME_SIZE]["key"], "sha256 differs"),
                (rows[RESIZED]["id"], rows[RESIZED]["key"],
                 f"size {rows[RESIZED]['bytes'] + 7} ≠ recorded {rows[RESIZED]['bytes']}, sha256 differs")]),
        [STRAY, UNCOMMITTED])
    assert here.rows_failed == ROWS // FAILED_EVERY and not here.index_problems


def test_listing_only_sees_a_missing_object_and_a_wrong_size_not_a_same_size_corruption(damaged, run_cli):
    out, endpoint, rows = damaged
    result = run_cli("verify", out, "--listing-only", "--workers", "2", *endpoint_args(endpoint))
    assert result.returncode == 1, result.stdout + result.stderr
    text = result.stdout
    assert f"ok         {ROWS - ROWS // FAILED_EVERY - 2} objects present with the recorded size (listing only: " \
           "contents not read, a same-size corruption is not seen)" in text
    assert "missing    1" in text and rows[GONE]["id"] in text
    assert "mismatched 1" in text
    assert f"{rows[RESIZED]['id']}  {rows[RESIZED]['key']}  (size {rows[RESIZED]['bytes'] + 7} ≠ recorded " \
           f"{rows[RESIZED]['bytes']})" in text
    assert rows[SAME_SIZE]["id"] not in text
    assert "orphans    2" in text


def test_a_sample_is_read_in_full_and_named(built, tmp_path, run_cli):
    from sdbatch.audit.verify import verify

    out = tmp_path / "out"
    shutil.copytree(built, out)
    first = verify(str(out), sample=5, seed=11)
    assert first.clean and first.read == 5 and first.sample_seed == 11 and len(first.sampled) == 5
    assert first.ok == ROWS - ROWS // FAILED_EVERY
    by_id = {r["id"]: r for r in index_rows(out).values()}
    assert all(by_id[i]["key"] for i in first.sampled)  # ok rows only
    assert verify(str(out), sample=5, seed=12).sampled != first.sampled

    flip_a_byte(out / by_id[first.sampled[2]]["key"])  # same size: only a read sees it
    result = run_cli("verify", out, "--sample", "5", "--seed", "11", "--workers", "2")
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"sample     5 random ok rows (seed 11): {', '.join(first.sampled)}" in result.stdout
    assert "the 5 of the sample read in full: sha256 checked too" in result.stdout
    assert "mismatched 1" in result.stdout and f"{first.sampled[2]}  {by_id[first.sampled[2]]['key']}  (sha256 differs)" in result.stdout
    assert verify(str(out), listing_only=True).clean


def test_sample_and_listing_only_together_are_refused(built, run_cli):
    result = run_cli("verify", built, "--sample", "3", "--listing-only", "--workers", "0")
    assert result.returncode == 2 and "--sample reads rows in full and --listing-only reads none" in result.stderr
    assert "Traceback" not in result.stderr


def test_webdataset_listing_and_orphan_tars(tmp_path):
    """A tar per shard: a missing tar's rows are missing from the listing alone; a tar no shard of
    the index owns is an orphan; a shard's retry tar no row names is an orphan too. A tar read for
    a sample of its rows: its other rows' members are no orphans."""
    from sdbatch.audit.verify import verify

    out = build_output(tmp_path / "wds", 300, fmt="webdataset", rows_per_shard=100)
    (out / "shards" / "00001.tar").unlink()
    (out / "shards" / "00007.tar").write_bytes(b"an uncommitted shard's tar")
    (out / "shards" / "00002-retry-0badc0de.tar").write_bytes(b"a retry nothing names")
    for mode in ({"listing_only": True}, {}, {"sample": 50, "seed": 1}):
        report = verify(str(out), **mode)
        assert report.ok == 200 and len(report.missing) == 100 and not report.mismatched
        assert {k for _, k in report.missing} == {f"shards/00001.tar#img-{i:09d}.png" for i in range(100, 200)}
        assert report.orphans == ["shards/00002-retry-0badc0de.tar", "shards/00007.tar"]


def test_index_checks_stream_by_row(tmp_path):
    """The index against job.json, the manifest and the commits, merged by row: a row indexed
    twice is a duplicate, a row holding another id differs from its commit and from the manifest."""
    from sdbatch.audit.verify import verify

    out = build_output(tmp_path / "job", 300, rows_per_shard=100)
    table = pq.read_table(out / "index.parquet")
    ids = table.column("id").to_pylist()
    ids[7] = "stranger"
    table = table.set_column(table.schema.get_field_index("id"), "id", [ids])
    table = pa.concat_tables([table.slice(0, 6), table.slice(5)])  # row 5 twice
    pq.write_table(table, out / "index.parquet")  # the schema keeps the job's stamp
    report = verify(str(out))
    assert report.duplicates == ["img-000000005"]
    assert report.index_problems == [
        "index.parquet holds 301 rows, the job's manifest 300 (job.json); rebuild it with --rebuild-index",
        "1 rows of index.parquet differ from their commit (e.g. stranger); rebuild it with --rebuild-index",
        "1 manifest rows are not in the index (e.g. img-000000007)",
        "1 index rows are not in the manifest (e.g. stranger)",
    ]
    assert not report.clean


@pytest.mark.parametrize("workers", [0, 2])
def test_index_rows_of_an_uncommitted_shard_and_commits_out_of_order(tmp_path, workers, request):
    """Each task compares its shards' index rows with their commits: rows whose shard has no
    commit are in no commit (the first of them named, in row order, whichever task ends first);
    a commit holding another shard's rows leaves the commits unordered, and nothing compared.
    ``--listing-only`` reads no commit: it names the shard without one, from the listing."""
    from sdbatch.audit.verify import verify

    if workers:
        request.getfixturevalue("ray_address")
    out = build_output(tmp_path / "job", 300, rows_per_shard=100)
    (out / "metadata" / "00001.parquet").unlink()
    report = verify(str(out), workers=workers)
    assert report.index_problems == ["100 rows of index.parquet are in no commit (e.g. img-000000100, img-000000101, "
                                     "img-000000102, img-000000103, img-000000104)"]
    listed = verify(str(out), listing_only=True, workers=workers)
    assert listed.index_problems == ["1 shards the index holds rows of have no commit (e.g. 00001)"]
    shutil.copy(out / "metadata" / "00002.parquet", out / "metadata" / "00001.parquet")
    (out / "metadata" / "00002.parquet").unlink()
    shutil.copy(out / "metadata" / "00000.parquet", out / "metadata" / "00002.parquet")
    report = verify(str(out), workers=workers)
    assert report.index_problems == ["the commits are not in row order (a commit holds rows of another shard): the "
                                     "index was not compared with them"]


def test_an_index_out_of_row_order_is_reported(tmp_path):
    from sdbatch.audit.verify import verify

    out = build_output(tmp_path / "job", 300, rows_per_shard=100)
    table = pq.read_table(out / "index.parquet")
    pq.write_table(pa.concat_tables([table.slice(100), table.slice(0, 100)]), out / "index.parquet")
    report = verify(str(out), listing_only=True)
    assert report.ok == 300 and not report.orphans and not report.clean
    assert report.index_problems == ["index.parquet is not in row order: it was not compared with the commits nor the "
                                     "manifest; rebuild it with --rebuild-index"]


class CountingStorage(LocalStorage):
    """A local OUT whose reads are recorded by key."""

    def __init__(self, root: Path):
        super().__init__(root)
        self.read: list[str] = []

    def open_read(self, key: str):
        self.read.append(key)
        return super().open_read(key)


def test_listing_only_reads_no_commit_and_checks_them_from_the_listing(tmp_path):
    """``--listing-only`` reads the index and no commit: each indexed shard's commit and each
    commit's shard in the index are checked from one listing of metadata/."""
    from sdbatch.audit.verify import verify

    out = build_output(tmp_path / "job", 300, rows_per_shard=100)
    storage = CountingStorage(out)
    assert verify(storage, listing_only=True).clean
    assert storage.read and not [key for key in storage.read if key.startswith("metadata/")], storage.read
    shutil.copy(out / "metadata" / "00002.parquet", out / "metadata" / "00007.parquet")  # no index row of shard 00007
    (out / "metadata" / "00001.parquet").unlink()
    report = verify(CountingStorage(out), listing_only=True)
    assert report.index_problems == [
        "1 shards the index holds rows of have no commit (e.g. 00001)",
        "1 commits are of shards index.parquet holds no row of (e.g. 00007): their rows are not indexed; rebuild it with "
        "--rebuild-index",
    ]
    assert not report.clean



def test_a_sample_of_every_row_finds_a_missing_and_a_corrupt_object(built, tmp_path):
    """``--sample`` as large as the job reads every ok row: nothing is left to the listing."""
    from sdbatch.audit.verify import verify

    out = tmp_path / "out"
    shutil.copytree(built, out)
    rows = index_rows(out)
    (out / rows[GONE]["key"]).unlink()
    flip_a_byte(out / rows[SAME_SIZE]["key"])
    report = verify(str(out), sample=ROWS, seed=3, workers=0)
    ok_rows = ROWS - ROWS // FAILED_EVERY
    assert (report.read, len(report.sampled), report.sample_seed) == (ok_rows, ok_rows, 3)
    assert report.missing == [(rows[GONE]["id"], rows[GONE]["key"])]
    assert report.mismatched == [(rows[SAME_SIZE]["id"], rows[SAME_SIZE]["key"], "sha256 differs")]
    assert report.ok == ok_rows - 2 and not report.index_problems and not report.clean


def shard_of(row_id: str) -> str:
    return f"{int(row_id.rsplit('-', 1)[1]) // PER_SHARD:05d}"


def change_an_id(commit: Path) -> None:
    table = pq.read_table(commit)
    ids = table.column("id").to_pylist()
    ids[3] = "stranger"
    pq.write_table(table.set_column(table.schema.get_field_index("id"), "id", [ids]), commit)  # keeps the job's stamp


def test_a_sample_reads_only_its_rows_and_their_shards_commits(built, tmp_path):
    """``--sample``: the commits of the sampled rows' shards are read and compared with the index
    (a differing row there is found), every other commit only listed (one missing is named, one
    differing is not seen); the objects read are the sampled rows' alone."""
    from sdbatch.audit.verify import verify

    out = tmp_path / "out"
    shutil.copytree(built, out)
    first = verify(CountingStorage(out), sample=2, seed=5, workers=0)
    sampled = {shard_of(i) for i in first.sampled}
    assert first.clean and 1 <= len(sampled) <= 2
    others = sorted({f"{n:05d}" for n in range(ROWS // PER_SHARD)} - sampled)
    storage = CountingStorage(out)
    report = verify(storage, sample=2, seed=5, workers=0)
    assert report.sampled == first.sampled and report.clean
    assert sorted(k for k in storage.read if k.startswith("metadata/")) == sorted(f"metadata/{s}.parquet" for s in sampled)
    by_id = {r["id"]: r for r in index_rows(out).values()}
    assert sorted(k for k in storage.read if k.startswith("images/")) == sorted(by_id[i]["key"] for i in first.sampled)
    assert f"note       index.parquet compared with the commits of the sample's {len(sampled)} shard" in report.render()

    change_an_id(out / "metadata" / f"{others[0]}.parquet")  # not sampled: its commit is listed, not read
    assert verify(str(out), sample=2, seed=5, workers=0).clean
    change_an_id(out / "metadata" / f"{min(sampled)}.parquet")
    (out / "metadata" / f"{others[1]}.parquet").unlink()
    report = verify(str(out), sample=2, seed=5, workers=0)
    assert report.index_problems == [
        f"1 rows of index.parquet differ from their commit (e.g. img-{int(min(sampled)) * PER_SHARD + 3:09d}); rebuild it "
        "with --rebuild-index",
        f"1 shards the index holds rows of have no commit (e.g. {others[1]})",
    ]


class ListingStorage(LocalStorage):
    """A local OUT whose prefix listings are recorded."""

    def __init__(self, root: Path):
        super().__init__(root)
        self.listed: list[str] = []

    def list_sizes(self, prefix: str = ""):
        self.listed.append(prefix)
        return super().list_sizes(prefix)


def test_a_flat_folder_of_tars_is_listed_once_per_hundred_shards_not_per_shard(tmp_path):
    """A local listing walks the whole ``shards/`` folder for any prefix: listed once per shard,
    verify was quadratic in the job's shards."""
    from sdbatch.audit.verify import verify

    out = build_output(tmp_path / "wds", 500, fmt="webdataset", rows_per_shard=50)  # 10 shards
    storage = ListingStorage(out)
    report = verify(storage, listing_only=True, workers=0)
    assert report.clean and report.ok == 500
    tars = [p for p in storage.listed if p.startswith("shards/")]
    assert set(tars) == {"shards/000"} and len(tars) < 10  # once per task (of whole shards), not per shard
