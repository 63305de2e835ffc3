"""Manifest contract (design.md §3): reading, seeds, and the bad-input corpus of issue 3.

Every bad input must produce a report that names the row, the column and the rule — through
the Python API here (and the CLI in process); as a subprocess (exit code 2, OUT untouched) and
on S3 in tests/integration/cli/test_manifest_cli.py.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO
from typer.testing import CliRunner

from sdbatch.cli.app import app as cli_app
from sdbatch.data.row import default_row_id, derive_seed
from sdbatch.manifest.hashing import DistinctCounter, hash_strings
from sdbatch.manifest.reader import iter_row_batches, read_rows
from sdbatch.manifest.report import RowIssue, ValidationReport
from sdbatch.manifest.sources import Manifest, ManifestError, open_manifest
from sdbatch.manifest.validate import validate_manifest
from sdbatch.spec import JobSpec, SpecError, load_spec

# --- helpers ------------------------------------------------------------------------------------


def write(path: Path, row_group_size: int | None = None, **cols) -> str:
    """Write a Parquet file from column lists/arrays; prompts default to 'a cat' per row."""
    n = max(len(v) for v in cols.values())
    cols.setdefault("prompt", ["a cat"] * n)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), path, row_group_size=row_group_size)
    return str(path)


def check(path: str, spec: JobSpec | None = None) -> ValidationReport:
    return validate_manifest(open_manifest(path), spec or JobSpec())


def find(report: ValidationReport, row: int, column: str, rule_part: str) -> RowIssue:
    """The issue at (row, column) whose rule mentions ``rule_part``; also checks its rendering."""
    assert not report.ok
    for issue in report.issues:
        if issue.row == row and issue.column == column and rule_part in issue.rule:
            text = report.render()
            line = issue.render()
            assert line in text
            if row >= 0:
                assert f"row {row}" in line
            assert f"column {column!r}" in line and "rule:" in line and "fix:" in line and issue.fix
            return issue
    raise AssertionError(f"no issue at row {row}, column {column!r} with rule ~{rule_part!r}:\n{report.render()}")


@pytest.fixture
def m_path(tmp_path: Path):
    def make(name: str = "m.parquet", **cols) -> str:
        return write(tmp_path / name, **cols)

    return make


# --- sources --------------------------------------------------------------------------------------


def test_open_single_file(m_path, tmp_path):
    p = m_path(prompt=["a", "b", "c"], label=[1, 2, 3])
    m = open_manifest(p)
    assert isinstance(m, Manifest) and m.files == (str(Path(p).resolve()),)
    assert m.num_rows == 3 and m.columns == ("prompt", "label") and m.base_dir == str(tmp_path)
    assert m.passthrough_columns == ("label",)
    assert len(m.fingerprint) == 16


def test_open_directory_and_glob(tmp_path):
    d = tmp_path / "man"
    write(d / "part-1.parquet", prompt=["c", "d"], id=["c", "d"])
    write(d / "part-0.parquet", prompt=["a", "b"], id=["a", "b"])
    write(d / "sub" / "part-2.parquet", prompt=["e"], id=["e"])
    (d / "_SUCCESS").write_text("")
    write(d / ".hidden.parquet", prompt=["zzz"], id=["zzz"])
    write(d / "_tmp" / "x.parquet", prompt=["zzz"], id=["zzz"])
    spec = JobSpec()

    m = open_manifest(str(d))
    assert [Path(f).relative_to(d).as_posix() for f in m.files] == ["part-0.parquet", "part-1.parquet", "sub/part-2.parquet"]
    assert m.num_rows == 5 and m.file_rows == (2, 2, 1) and m.base_dir == str(d)
    rows = read_rows(m, spec, 1, 5)  # spans three files
    assert [(r.index, r.id) for r in rows] == [(1, "b"), (2, "c"), (3, "d"), (4, "e")]
    assert check(str(d)).ok

    g = open_manifest(str(d / "part-*.parquet"))
    assert g.num_rows == 4 and g.base_dir == str(d)
    assert [r.id for r in read_rows(g, spec, 0, 4)] == ["a", "b", "c", "d"]
    assert [r.id for r in read_rows(open_manifest(str(d / "**" / "*.parquet")), spec, 0, 5)] == ["a", "b", "c", "d", "e"]


def test_directory_with_mismatched_columns(tmp_path):
    write(tmp_path / "a.parquet", prompt=["a"], label=["x"])
    write(tmp_path / "b.parquet", prompt=["b"])
    with pytest.raises(ManifestError, match="columns differ"):
        open_manifest(str(tmp_path))


def test_missing_sources(tmp_path):
    with pytest.raises(ManifestError, match="no such file"):
        open_manifest(str(tmp_path / "nope.parquet"))
    with pytest.raises(ManifestError, match="matches no files"):
        open_manifest(str(tmp_path / "*.parquet"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="no .parquet files"):
        open_manifest(str(tmp_path / "empty"))


def test_fingerprint_tracks_content_not_location(tmp_path):
    a = write(tmp_path / "a" / "m.parquet", prompt=["x", "y"])
    b = write(tmp_path / "b" / "m.parquet", prompt=["x", "y"])
    c = write(tmp_path / "c" / "m.parquet", prompt=["x", "z"])
    fa, fb, fc = (open_manifest(p).fingerprint for p in (a, b, c))
    assert fa == fb != fc


# --- seeds, ids ---------------------------------------------------------------------------------


def test_derive_seed_is_the_documented_hash():
    expected = int.from_bytes(hashlib.sha256(b"42:cat-3").digest()[:8], "big") & (2**63 - 1)
    assert derive_seed(42, "cat-3") == expected
    assert 0 <= derive_seed(0, "x") < 2**63
    assert derive_seed(0, "x") != derive_seed(1, "x") != derive_seed(1, "y")
    assert default_row_id(17) == "00000017"


def test_seeds_stable_under_reordering_and_filtering(tmp_path):
    ids = [f"img-{i}" for i in range(50)]
    spec = JobSpec(seed=7)
    full = read_rows(open_manifest(write(tmp_path / "full.parquet", id=ids)), spec, 0, 50)
    shuffled = list(reversed(ids))[::3]
    part = read_rows(open_manifest(write(tmp_path / "part.parquet", id=shuffled)), spec, 0, len(shuffled))
    by_id = {r.id: r.seed for r in full}
    assert all(r.seed == by_id[r.id] == derive_seed(7, r.id) for r in part)
    assert len(set(by_id.values())) == 50
    # without an id column the id is the row number, and the seed follows it
    rows = read_rows(open_manifest(write(tmp_path / "noid.parquet", prompt=["a", "b"])), spec, 0, 2)
    assert [r.id for r in rows] == ["00000000", "00000001"]
    assert [r.seed for r in rows] == [derive_seed(7, "00000000"), derive_seed(7, "00000001")]


# --- reading rows ---------------------------------------------------------------------------------


def test_defaults_applied_and_passthrough_preserved(tmp_path):
    (tmp_path / "img").mkdir()
    p = write(
        tmp_path / "m.parquet",
        id=pa.array([1, 2, 3], pa.int64()),
        prompt=["a", "b", "c"],
        steps=pa.array([None, 30, None], pa.int64()),
        width=pa.array([None, 128, None], pa.int32()),
        negative_prompt=[None, "", "blurry"],
        scheduler=[None, "euler_a", None],
        init_image=[None, "img/x.png", "s3://bucket/y.png"],
        strength=[None, None, 0.4],
        seed=pa.array([5, 6, 7], pa.uint64()),
        label=["cat", "dog", None],
        score=[0.5, 1.5, 2.5],
        tags=[["a"], [], ["b", "c"]],
        flag=[True, False, True],
    )
    spec = load_spec(None, ["defaults.steps=25", "defaults.negative_prompt=ugly", "defaults.strength=0.6"])
    r0, r1, r2 = read_rows(open_manifest(p), spec, 0, 3)
    assert (r0.id, r0.steps, r0.width, r0.height, r0.negative_prompt, r0.scheduler) == ("1", 25, 64, 64, "ugly", "default")
    assert r0.init_image is None and r0.strength is None and not r0.is_img2img
    assert (r1.steps, r1.width, r1.negative_prompt, r1.scheduler) == (30, 128, "", "euler_a")
    assert r1.init_image == str(tmp_path / "img" / "x.png") and r1.strength == 0.6
    assert r2.init_image == "s3://bucket/y.png" and r2.strength == 0.4
    assert (r0.seed, r1.seed, r2.seed) == (5, 6, 7)
    assert r0.guidance_scale == 7.5 and isinstance(r0.guidance_scale, float)
    assert r0.extra == {"label": "cat", "score": 0.5, "tags": ["a"], "flag": True}
    assert r2.extra == {"label": None, "score": 2.5, "tags": ["b", "c"], "flag": True}
    assert check(p, spec).ok


def test_pandas_index_column_is_not_passed_through(tmp_path):
    p = write(tmp_path / "m.parquet", prompt=["a"], __index_level_0__=[17], label=["x"])
    m = open_manifest(p)
    assert m.passthrough_columns == ("label",)
    assert read_rows(m, JobSpec(), 0, 1)[0].extra == {"label": "x"}
    assert list(check(p).summary["passthrough_columns"]) == ["label"]


def test_read_rows_seeks_to_the_end_of_a_multi_row_group_file(tmp_path, monkeypatch):
    n = 1050
    p = write(tmp_path / "m.parquet", row_group_size=100, id=[f"r{i}" for i in range(n)], prompt=[f"p{i}" for i in range(n)])
    m = open_manifest(p)
    asked: list[list[int]] = []
    real = pq.ParquetFile.read_row_groups

    def spy(self, row_groups, *a, **k):
        asked.append(list(row_groups))
        return real(self, row_groups, *a, **k)

    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", spy)
    rows = read_rows(m, JobSpec(), 990, 1050)
    assert [r.index for r in rows] == list(range(990, 1050))
    assert rows[0].id == "r990" and rows[-1].prompt == "p1049"
    assert asked == [[9, 10]]  # only the two row groups holding rows 990..1049
    assert read_rows(m, JobSpec(), 1050, 1050) == []
    with pytest.raises(ManifestError):
        read_rows(m, JobSpec(), 1000, 1051)


def test_iter_row_batches_streams_everything(tmp_path):
    write(tmp_path / "d" / "a.parquet", prompt=[f"a{i}" for i in range(300)])
    write(tmp_path / "d" / "b.parquet", prompt=[f"b{i}" for i in range(200)])
    m = open_manifest(str(tmp_path / "d"))
    batches = list(iter_row_batches(m, batch_size=128))
    assert all(b.num_rows <= 128 for b in batches)
    assert sum(b.num_rows for b in batches) == 500


def test_dictionary_encoded_and_large_string_columns(tmp_path):
    p = tmp_path / "m.parquet"
    t = pa.table({
        "prompt": pa.array(["a cat", "a dog"]).dictionary_encode(),
        "scheduler": pa.array(["euler", None], pa.large_string()),
        "id": pa.array(["x", "y"], pa.large_string()),
    })
    pq.write_table(t, p)
    assert check(str(p)).ok
    assert [r.scheduler for r in read_rows(open_manifest(str(p)), JobSpec(), 0, 2)] == ["euler", "default"]


def test_summary(tmp_path):
    p = write(tmp_path / "m.parquet", prompt=["a", "b", "a", "c"], width=[64, 128, None, 64],
              init_image=[None, "x.png", None, None], label=["l"] * 4)
    r = check(p)
    assert r.ok and r.issue_count == 0 and r.num_rows == 4
    s = r.summary
    assert s["distinct_prompts"] == 3 and not s["distinct_prompts_approximate"]
    assert s["sizes"] == {"64x64": 3, "128x64": 1}
    assert s["steps"] == {20: 4} and s["schedulers"] == {"default": 4}
    assert s["img2img_rows"] == 1 and s["passthrough_columns"] == {"label": "string"}
    text = r.render()
    assert "distinct prompts: 3" in text and "OK" in text


def test_distinct_prompts_estimate_is_close_for_many_prompts():
    counter = DistinctCounter()
    for lo in range(0, 300_000, 50_000):
        counter.add(hash_strings(pa.array([f"prompt {i}" for i in range(lo, lo + 50_000)])))
    est, approx = counter.estimate()
    assert approx and abs(est - 300_000) / 300_000 < 0.03


def test_hash_strings_matches_equal_strings_only():
    a = pa.array(["ab", "", None, "ba", "x" * 5000, "ab"] + [f"s{i}" for i in range(20000)])
    h = hash_strings(a)
    assert h[0] == h[5] and h[0] != h[3] and h[1] == h[2]
    assert len(set(h.tolist())) == len(h) - 2
    assert hash_strings(a.slice(5, 3))[0] == h[0]
    big = pa.array(["y" * (2 << 20), "ab"])  # one string longer than a hashing slice
    assert hash_strings(big)[1] == h[0]


# --- the bad-input corpus (Python API) ----------------------------------------------------------


def test_missing_prompt_column(tmp_path):
    p = str(tmp_path / "m.parquet")
    pq.write_table(pa.table({"text": ["a cat"], "id": ["a"]}), p)
    with pytest.raises(ManifestError, match=r"required column 'prompt' is missing \(rename 'text' to 'prompt'\)"):
        open_manifest(p)


def test_null_and_empty_prompts(m_path):
    r = check(m_path(prompt=["ok", None, "", "   "]))
    find(r, 1, "prompt", "required")
    find(r, 2, "prompt", "must not be empty")
    find(r, 3, "prompt", "must not be empty")
    assert r.issue_count == 3 and r.summary["bad_rows"] == 3
    assert "3 errors in total (first 3 shown)" in r.render()


def test_all_null_prompt_column(tmp_path):
    p = tmp_path / "m.parquet"
    pq.write_table(pa.table({"prompt": pa.nulls(2)}), p)
    r = check(str(p))
    find(r, 0, "prompt", "required")
    find(r, 1, "prompt", "required")


def test_ten_megabyte_prompt(m_path):
    huge = "a" * (10 * 2**20)
    r = check(m_path(prompt=["fine", huge]))
    issue = find(r, 1, "prompt", "at most 4,000 characters")
    assert len(issue.value) < 120 and "10,485,760 chars" in issue.value
    assert "max_prompt_chars" in issue.rule + issue.fix
    assert check(m_path("ok.parquet", prompt=["x" * 5000]), load_spec(None, ["limits.max_prompt_chars=5000"])).ok


def test_nul_in_prompt_and_negative_prompt(m_path):
    r = check(m_path(prompt=["a\x00b", "ok"], negative_prompt=[None, "bad\x00"]))
    find(r, 0, "prompt", "NUL")
    find(r, 1, "negative_prompt", "NUL")


def _invalid_utf8(values: list[bytes]) -> pa.Array:
    # What a non-Python writer can leave in a Parquet "string" column: UTF-8-encoded lone
    # surrogates (b"\xed\xa0\x80" is U+D800) or broken bytes. pyarrow reads them without checking.
    return pa.array(values, pa.binary()).view(pa.string())


def test_lone_surrogates_and_invalid_utf8(tmp_path):
    p = tmp_path / "m.parquet"
    pq.write_table(pa.table({
        "prompt": _invalid_utf8([b"ok", b"half \xed\xa0\x80 surrogate", b"broken \xff"]),
        "id": _invalid_utf8([b"a", b"b", b"c\xed\xb0\x80"]),
    }), p)
    r = check(str(p))
    find(r, 1, "prompt", "valid UTF-8")
    find(r, 2, "prompt", "valid UTF-8")
    find(r, 2, "id", "valid UTF-8")
    assert r.issue_count == 3  # not also reported as null
    assert "\\xed\\xa0\\x80" in r.render()  # the value is shown as bytes, no traceback
    with pytest.raises(ManifestError, match="row 1, column 'prompt': invalid UTF-8"):
        read_rows(open_manifest(str(p)), JobSpec(), 0, 3)


@pytest.mark.parametrize(
    ("column", "values", "found"),
    [
        ("prompt", pa.array([1, 2]), "int64"),
        ("steps", pa.array(["30", "40"]), "string"),
        ("seed", pa.array([1.0, 2.5]), "double"),
        ("width", pa.array([512.0, 64.0]), "double"),
        ("guidance_scale", pa.array(["7.5", "8"]), "string"),
        ("scheduler", pa.array([1, 2]), "int64"),
        ("init_image", pa.array([b"x", b"y"], pa.binary()), "binary"),
        ("id", pa.array([1.5, 2.5]), "double"),
        ("strength", pa.array([True, False]), "bool"),
    ],
)
def test_wrong_column_types(tmp_path, column, values, found):
    cols = {"prompt": pa.array(["a", "b"]), column: values}
    p = tmp_path / "m.parquet"
    pq.write_table(pa.table(cols), p)
    r = check(str(p))
    issue = find(r, 0, column, f"{column} must be a")
    assert found in issue.value and "m.parquet" in issue.value


def test_bad_seeds(tmp_path):
    r = check(write(tmp_path / "a.parquet", seed=pa.array([3, -5, None, 2**63 - 1], pa.int64())))
    find(r, 1, "seed", "0 <= seed < 2**63")
    find(r, 2, "seed", "must be set")
    assert r.issue_count == 2
    r = check(write(tmp_path / "b.parquet", seed=pa.array([2**63, 2**64 - 1, 0], pa.uint64())))
    find(r, 0, "seed", "0 <= seed < 2**63")
    find(r, 1, "seed", "0 <= seed < 2**63")
    assert r.issue_count == 2
    # 2**64 does not fit any integer column: it arrives as a float or a decimal
    r = check(write(tmp_path / "c.parquet", seed=pa.array([float(2**64), 1.5])))
    assert "double" in find(r, 0, "seed", "integer column").value
    import decimal

    r = check(write(tmp_path / "d.parquet", seed=pa.array([decimal.Decimal(2**64)], pa.decimal128(20, 0))))
    find(r, 0, "seed", "integer column")


def test_sizes(m_path):
    r = check(m_path(width=[513, 100000, 512, 64, 2048], height=[64, 100000, 512, 60, 2048]))
    find(r, 0, "width", "multiple of 8")
    find(r, 1, "width", "64 <= width <= 2,048")
    find(r, 1, "height", "64 <= height <= 2,048")
    find(r, 3, "height", "multiple of 8")
    find(r, 3, "height", "64 <= height")
    assert all(i.row != 2 for i in r.issues)
    # each side within its limit, the product over the pixel budget
    spec = load_spec(None, ["limits.max_pixels=262144"])
    r = check(m_path("px.parquet", width=[512, 1024], height=[512, 1024]), spec)
    issue = find(r, 1, "width", "width*height <= 262,144")
    assert issue.value == "'1024x1024'" and r.issue_count == 1
    # ... also when one side comes from the job default
    r = check(m_path("px2.parquet", width=[2048]), load_spec(None, ["defaults.height=1024", "limits.max_pixels=1000000"]))
    find(r, 0, "width", "width*height")


def test_steps_out_of_range(m_path):
    r = check(m_path(steps=pa.array([0, 10**9, 200, None], pa.int64())))
    find(r, 0, "steps", "1 <= steps <= 200")
    find(r, 1, "steps", "1 <= steps <= 200")
    assert r.issue_count == 2


def test_guidance_nan_and_infinite(m_path):
    r = check(m_path(guidance_scale=[math.nan, math.inf, -math.inf, 51.0, -1.0, 7.5, None]))
    for row in (0, 1, 2):
        find(r, row, "guidance_scale", "finite")
    find(r, 3, "guidance_scale", "0 <= guidance_scale <= 50")
    find(r, 4, "guidance_scale", "0 <= guidance_scale <= 50")
    assert r.issue_count == 5


def test_unknown_scheduler(m_path):
    r = check(m_path(scheduler=["ddim", "Euler-A", "warp_drive", None]))
    assert "did you mean 'euler_a'" in find(r, 1, "scheduler", "one of").fix
    find(r, 2, "scheduler", "one of")
    assert r.issue_count == 2


def test_strength_without_init_image(m_path):
    r = check(m_path(strength=[0.5]))
    find(r, 0, "strength", "needs init_image")
    r = check(m_path("b.parquet", init_image=["a.png", None, "b.png", "c.png", ""], strength=[0.5, 0.5, 0.0, 1.5, None]))
    find(r, 1, "strength", "needs init_image")
    find(r, 2, "strength", "0 < strength <= 1")
    find(r, 3, "strength", "0 < strength <= 1")
    find(r, 4, "init_image", "non-empty")
    assert r.issue_count == 4


@pytest.mark.parametrize(
    ("bad_id", "rule"),
    [
        ("a/b", "must match"),
        ("..", "must not be '.' or '..'"),
        (".", "must not be '.' or '..'"),
        ("tab\there", "must match"),
        ("bell\x07", "must match"),
        ("x" * 300, "must match"),
        ("", "must match"),
        ("sp ace", "must match"),
    ],
)
def test_bad_ids(m_path, bad_id, rule):
    r = check(m_path(id=["good-1", bad_id]))
    issue = find(r, 1, "id", rule)
    assert issue.id == bad_id and r.issue_count == 1
    assert len(issue.value) <= 90


def test_null_id(m_path):
    r = check(m_path(id=["a", None]))
    find(r, 1, "id", "must be set")


def test_duplicate_ids(tmp_path):
    r = check(write(tmp_path / "a.parquet", id=["a", "b", "a", "c", "b", "a"]))
    find(r, 2, "id", "unique (also used by row 0)")
    find(r, 4, "id", "unique (also used by row 1)")
    find(r, 5, "id", "unique (also used by row 0)")
    assert r.issue_count == 3
    # int and string ids name the same object; duplicates across files
    write(tmp_path / "d" / "0.parquet", id=pa.array([7, 8]))
    write(tmp_path / "d" / "1.parquet", id=pa.array(["9", "7"]))
    find(check(str(tmp_path / "d")), 3, "id", "also used by row 0")


def test_many_duplicates_counted_in_full(tmp_path):
    n = 5000
    r = check(write(tmp_path / "m.parquet", id=[f"id{i % 100}" for i in range(n)]), load_spec(None, ["limits.max_errors_shown=5"]))
    assert r.issue_count == n - 100 and len(r.issues) == 5
    assert [i.row for i in r.issues] == [100, 101, 102, 103, 104]
    assert f"{n - 100:,} errors in total (first 5 shown)" in r.render()


def test_issue_list_is_first_k_by_row_with_total(tmp_path):
    n = 200_000  # several record batches
    steps = np.full(n, 20, dtype=np.int64)
    steps[[5, 70_000, 199_999]] = 0
    width = np.full(n, 64, dtype=np.int64)
    width[[3, 150_000]] = 65
    r = check(write(tmp_path / "m.parquet", steps=steps, width=width), load_spec(None, ["limits.max_errors_shown=3"]))
    assert r.issue_count == 5 and [(i.row, i.column) for i in r.issues] == [(3, "width"), (5, "steps"), (70_000, "steps")]


def test_empty_file_and_not_parquet(tmp_path):
    (tmp_path / "empty.parquet").write_bytes(b"")
    with pytest.raises(ManifestError, match="empty.parquet: the file is empty"):
        open_manifest(str(tmp_path / "empty.parquet"))
    (tmp_path / "m.csv").write_text("prompt\na cat\n")
    with pytest.raises(ManifestError, match="not a readable Parquet file"):
        open_manifest(str(tmp_path / "m.csv"))
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), tmp_path / "zero.parquet")
    with pytest.raises(ManifestError, match="has no rows"):
        open_manifest(str(tmp_path / "zero.parquet"))


def test_unknown_spec_key(tmp_path):
    bad = tmp_path / "job.yaml"
    bad.write_text("defaults:\n  stpes: 30\n")
    with pytest.raises(SpecError, match=r"defaults\.stpes: unknown key"):
        load_spec(bad)


def test_spec_defaults_are_validated_like_rows(m_path):
    spec = load_spec(None, ["defaults.width=513", "defaults.steps=300", "defaults.guidance_scale=60"])
    r = check(m_path(prompt=["a"]), spec)
    for key in ("defaults.width", "defaults.steps", "defaults.guidance_scale"):
        issue = next(i for i in r.issues if i.column == key)
        assert issue.row == -1 and issue.render().startswith("job spec, column")
    # a limit raised in the spec accepts it
    assert check(m_path("b.parquet", prompt=["a"]), load_spec(None, ["defaults.steps=300", "limits.max_steps=300"])).ok


def test_type_error_does_not_hide_other_columns(tmp_path):
    p = write(tmp_path / "m.parquet", steps=["30"], width=[513])
    r = check(p)
    find(r, 0, "steps", "integer column")
    find(r, 0, "width", "multiple of 8")


# --- example job specs ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted((REPO / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_example_job_specs_are_valid(path):
    spec = load_spec(path)
    assert isinstance(spec, JobSpec)


def test_example_full_sets_every_key():
    import yaml
    from pydantic import BaseModel

    data = yaml.safe_load((REPO / "jobs" / "example-full.yaml").read_text())

    def keys(model_cls, prefix=""):
        out = set()
        for name, f in model_cls.model_fields.items():
            ann = f.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):  # a section
                out |= keys(ann, f"{prefix}{name}.")
            else:
                out.add(f"{prefix}{name}")
        return out

    def flat(d, prefix=""):
        out = set()
        for k, v in d.items():
            out |= flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}"}
        return out

    assert keys(JobSpec) <= flat(data)


# --- the CLI ------------------------------------------------------------------------------------------


def test_cli_validate_in_process(tmp_path):
    runner = CliRunner()
    good = write(tmp_path / "good.parquet", prompt=["a", "b"])
    res = runner.invoke(cli_app, ["validate", good])
    assert res.exit_code == 0, res.output
    assert "OK" in res.stdout
    bad = write(tmp_path / "bad.parquet", prompt=["a", ""], steps=[0, 20])
    res = runner.invoke(cli_app, ["validate", bad])
    assert res.exit_code == 2
    assert "row 0 (id '00000000'), column 'steps': value 0 — rule: 1 <= steps <= 200" in res.stderr
    assert "row 1 (id '00000001'), column 'prompt'" in res.stderr
    assert "2 errors in total (first 2 shown)" in res.stderr
    res = runner.invoke(cli_app, ["validate", bad, "--json"])
    assert res.exit_code == 2 and '"issue_count": 2' in res.stdout
    res = runner.invoke(cli_app, ["validate", str(tmp_path / "missing.parquet")])
    assert res.exit_code == 2 and "no such file" in res.stderr and "Traceback" not in res.output
    spec = tmp_path / "job.yaml"
    spec.write_text("limits:\n  max_stepz: 5\n")
    res = runner.invoke(cli_app, ["validate", good, "--spec", str(spec)])
    assert res.exit_code == 2 and "limits.max_stepz: unknown key" in res.stderr
    res = runner.invoke(cli_app, ["validate", good, "--set", "defaults.width=100"])
    assert res.exit_code == 2 and "defaults.width" in res.stderr


def test_cli_size_fix_says_which_way_to_go(tmp_path):
    """Issue 21 finding 19(b): a width below the minimum is told to go up, one above the limit
    to go down — in the manifest and in the spec's defaults alike."""
    runner = CliRunner()
    sizes = write(tmp_path / "sizes.parquet", prompt=["a", "b"], width=[8, 4096])
    res = runner.invoke(cli_app, ["validate", sizes])
    assert res.exit_code == 2
    assert ("row 0 (id '00000000'), column 'width': value 8 — rule: 64 <= width <= 2,048 (limits.max_width) — fix: "
            "use a width of at least 64, a multiple of 8 (e.g. 512), or null for the model's native width") in res.stderr
    assert ("row 1 (id '00000001'), column 'width': value 4096 — rule: 64 <= width <= 2,048 (limits.max_width) — fix: "
            "use a smaller width, or raise the limit: --set limits.max_width=N") in res.stderr
    good = write(tmp_path / "good.parquet", prompt=["a"])
    res = runner.invoke(cli_app, ["validate", good, "--set", "defaults.height=8"])
    assert res.exit_code == 2
    assert "value 8 — rule: a multiple of 8 with 64 <= height <= 2,048 (limits.max_height) — fix: use a height of at least 64" in res.stderr


def test_cli_spec(tmp_path):
    runner = CliRunner()
    res = runner.invoke(cli_app, ["spec", "--schema"])
    assert res.exit_code == 0 and '"title": "JobSpec"' in res.stdout
    res = runner.invoke(cli_app, ["spec", "--spec", str(REPO / "jobs" / "example-full.yaml")])
    assert res.exit_code == 0 and "max_prompt_chars" in res.stdout
    res = runner.invoke(cli_app, ["spec", "--set", "resources.batch_size=0"])
    assert res.exit_code == 2 and "batch_size" in res.stderr


def test_wrong_type_id_column_shows_no_made_up_id(m_path):
    r = check(m_path(id=[1.5, 2.5], steps=[20, 0]))
    find(r, 0, "id", "string or integer")
    assert find(r, 1, "steps", "1 <= steps").id is None


def test_corrupt_data_pages_are_a_manifest_error(tmp_path):
    p = tmp_path / "m.parquet"
    pq.write_table(pa.table({"prompt": [f"prompt number {i}" for i in range(20000)]}), p, row_group_size=5000)
    data = bytearray(p.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 2000] = np.random.default_rng(0).bytes(2000)  # footer intact, a data page garbled
    p.write_bytes(bytes(data))
    m = open_manifest(str(p))
    with pytest.raises(ManifestError, match="corrupt Parquet"):
        validate_manifest(m, JobSpec())
    with pytest.raises(ManifestError, match="corrupt Parquet"):
        read_rows(m, JobSpec(), 0, m.num_rows)


def test_passthrough_column_cannot_shadow_index_columns(m_path):
    r = check(m_path(prompt=["a"], status=["keep"], label=["x"]))
    issue = find(r, 0, "status", "must differ from the index's own columns")
    assert "label_status" in issue.fix and r.issue_count == 1


def test_img2img_with_no_denoising_step_is_refused(m_path):
    r = check(m_path(prompt=["a", "b"], init_image=["x.png", "y.png"], strength=[0.2, 0.5], steps=[4, 4]))
    issue = find(r, 0, "strength", "steps * strength >= 1")
    assert "raise strength or steps" in issue.fix and r.issue_count == 1
