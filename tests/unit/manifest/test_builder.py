"""``sdbatch manifest``: prompts/CSV/JSONL/templates × seeds + constant columns → Parquet."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from sdbatch.manifest.builder import build_manifest
from sdbatch.manifest.reader import read_rows
from sdbatch.manifest.sources import open_manifest
from sdbatch.manifest.templates import expand_template
from sdbatch.manifest.validate import validate_manifest
from sdbatch.manifest.values import ManifestBuildError, parse_constant, parse_seeds
from sdbatch.spec import JobSpec


def rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


# --- templates ----------------------------------------------------------------------------------


def test_template_product_in_reading_order():
    prompts, labels = expand_template("a photo of a {red|green|blue} {cat|dog}")
    assert prompts == [
        "a photo of a red cat", "a photo of a red dog", "a photo of a green cat",
        "a photo of a green dog", "a photo of a blue cat", "a photo of a blue dog",
    ]
    assert labels == {}


def test_template_named_groups_escapes_and_empty_alternatives():
    prompts, labels = expand_template("{{x}} a {size=|very }big {animal=cat|dog}")
    assert prompts == ["{x} a big cat", "{x} a big dog", "{x} a very big cat", "{x} a very big dog"]
    assert labels == {"size": ["", "", "very ", "very "], "animal": ["cat", "dog", "cat", "dog"]}
    assert expand_template("no groups") == (["no groups"], {})


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("a {red|blue", "never closed"),
        ("a red} cat", "no opening"),
        ("{steps=10|20}", "is a manifest column"),
        ("{c=a|b} {c=x|y}", "used twice"),
    ],
)
def test_template_errors(template, message):
    with pytest.raises(ManifestBuildError, match=message):
        expand_template(template)


def test_dynamicprompts_syntax_wildcards_variants_nesting_and_sampling(tmp_path):
    (tmp_path / "colour.txt").write_text("red\ngreen\n")
    prompts, labels = expand_template("a {size=small|large} __colour__ {2$$a|b|c}, {x|{y|z}}", wildcards=tmp_path)
    assert len(prompts) == 2 * 2 * 6 * 3 and len(set(prompts)) == len(prompts)
    assert "a small red b,c, z" in prompts and "a large green a,b, x" in prompts
    assert labels["size"] == ["small"] * 36 + ["large"] * 36
    assert all(p.split()[1] == s for p, s in zip(prompts, labels["size"]))
    sampled, sampled_labels = expand_template("a {size=small|large} __colour__ {x|y|z}", wildcards=tmp_path, sample=5, sample_seed=7)
    assert len(sampled) == 5 and all(p.split()[1] == s for p, s in zip(sampled, sampled_labels["size"]))
    assert (sampled, sampled_labels) == expand_template(
        "a {size=small|large} __colour__ {x|y|z}", wildcards=tmp_path, sample=5, sample_seed=7)
    assert {p.split()[2] for p in sampled} <= {"red", "green"}
    with pytest.raises(ManifestBuildError, match="pass --wildcards DIR"):
        expand_template("a __colour__ cat")
    with pytest.raises(ManifestBuildError, match="wildcard __animal__ has no values; add .*animal.txt"):
        expand_template("a __animal__", wildcards=tmp_path)


def test_every_named_choice_is_a_label_wildcards_and_nested_too(tmp_path):
    """Issue 27: a named wildcard records its pick, a named group with a nested group works
    and records the expanded choice, a named group inside an alternative not taken is null."""
    (tmp_path / "colour.txt").write_text("blue\nred\n")
    prompts, labels = expand_template("a {colour=__colour__} {shape=circle|square}", wildcards=tmp_path)
    assert prompts == ["a blue circle", "a blue square", "a red circle", "a red square"]
    assert labels == {"colour": ["blue", "blue", "red", "red"], "shape": ["circle", "square"] * 2}
    prompts, labels = expand_template("{shape={small|large} circle|square}")
    assert prompts == ["small circle", "large circle", "square"]
    assert labels == {"shape": ["small circle", "large circle", "square"]}
    prompts, labels = expand_template("a {shape={size=small|__colour__} circle|square} on {bg=white|black}", wildcards=tmp_path)
    assert len(prompts) == 8 and prompts[0] == "a small circle on white" and prompts[-1] == "a square on black"
    assert labels["size"] == ["small", "small", "blue", "blue", "red", "red", None, None]
    assert labels["shape"][2:4] == ["blue circle"] * 2 and labels["bg"] == ["white", "black"] * 4
    assert all(p == f"a {s} on {b}" for p, s, b in zip(prompts, labels["shape"], labels["bg"]))


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{shape={small|large circle|square}", "template '{shape={small|large circle|square}': '{' is never closed"),
        ("{shape={s=a|b} x|{s=c|d}}", None),  # one name in two exclusive alternatives: fine
        ("{shape={s=a|b} {s=c|d}}", "template '{shape={s=a|b} {s=c|d}}': group name(s) ['s'] used twice"),
        ("{shape=a}|b}", "template '{shape=a}|b}': '}' has no opening"),
    ],
)
def test_nested_template_errors_quote_what_the_user_wrote(template, message):
    if message is None:
        assert expand_template(template)[1]["s"] == ["a", "b", "c", "d"]
        return
    with pytest.raises(ManifestBuildError) as raised:
        expand_template(template)
    assert str(raised.value).startswith(message)


def test_sample_draws_without_replacement():
    template = "{a|b|c} {x|y|z}"
    sampled, _ = expand_template(template, sample=9, sample_seed=1)
    assert sorted(sampled) == sorted(expand_template(template)[0])  # all 9, each once
    sampled, labels = expand_template("{n=1|2|3} {x|y}", sample=4, sample_seed=2)
    assert len(set(sampled)) == 4 and all(p.startswith(n) for p, n in zip(sampled, labels["n"]))
    sampled, _ = expand_template(template, sample=20, sample_seed=1)
    assert len(sampled) == len(set(sampled)) == 9  # all there are (the builder warns: see the CLI test)


def test_template_too_large():
    group = "{" + "|".join(str(i) for i in range(100)) + "}"
    with pytest.raises(ManifestBuildError, match="expands to 10,000,000,000 prompts"):
        expand_template(group * 5)


# --- seeds, constants ---------------------------------------------------------------------------


def test_parse_seeds():
    assert parse_seeds("0-99") == [(0, 100)]
    assert parse_seeds("1,5,9") == [(1, 2), (5, 6), (9, 10)]
    assert parse_seeds(" 0-2 , 10 ") == [(0, 3), (10, 11)]
    for bad, msg in [("a-b", "not a seed"), ("5-1", "ends before"), ("1,1", "listed twice"),
                     ("0-5,3", "listed twice"), (str(2**63), "below 2\\*\\*63"), ("-3", "not a seed"), ("", "not a seed")]:
        with pytest.raises(ManifestBuildError, match=msg):
            parse_seeds(bad)


def test_parse_constant():
    assert parse_constant("steps=30") == ("steps", 30)
    assert parse_constant("guidance_scale=7") == ("guidance_scale", 7.0)
    assert parse_constant("scheduler=euler_a") == ("scheduler", "euler_a")
    assert parse_constant("negative_prompt=blurry, ugly") == ("negative_prompt", "blurry, ugly")
    assert parse_constant("split=train") == ("split", "train")
    assert parse_constant("version=3") == ("version", 3)
    for bad, msg in [("steps=abc", "must be an integer"), ("steps=1.5", "must be an integer"),
                     ("guidance_scale=high", "must be a number"), ("noequals", "NAME=VALUE"), ("prompt=x", "cannot be a constant")]:
        with pytest.raises(ManifestBuildError, match=msg):
            parse_constant(bad)


# --- building -------------------------------------------------------------------------------------


def test_prompts_file_times_seeds_with_constants(tmp_path):
    src = tmp_path / "prompts.txt"
    src.write_text("a cat\n\n   \nthe dog\r\nß unicode ✓\n", encoding="utf-8")
    out = tmp_path / "m.parquet"
    n = build_manifest(out, prompts_file=src, seeds="0-1,7", columns=["steps=30", "split=train"])
    assert n == 9
    got = rows(out)
    assert [r["id"] for r in got[:4]] == ["00000000-s0", "00000000-s1", "00000000-s7", "00000001-s0"]
    assert [r["seed"] for r in got[:3]] == [0, 1, 7]
    assert got[-1]["prompt"] == "ß unicode ✓" and all(r["steps"] == 30 and r["split"] == "train" for r in got)
    schema = pq.read_schema(out)
    assert schema.field("seed").type == pa.int64() and schema.field("steps").type == pa.int64()
    report = validate_manifest(open_manifest(str(out)), JobSpec())
    assert report.ok, report.render()


def test_ids_are_deterministic(tmp_path):
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    for out in (a, b):
        build_manifest(out, templates=["a {red|blue} {cat|dog}"], seeds="0-4")
    assert open_manifest(str(a)).fingerprint == open_manifest(str(b)).fingerprint
    assert pq.read_table(a).equals(pq.read_table(b))


def test_templates_with_labels(tmp_path):
    out = tmp_path / "m.parquet"
    n = build_manifest(out, templates=["a {color=red|blue} {shape=circle|square}", "a {size=big|small} star"])
    assert n == 6
    got = rows(out)
    assert got[0] == {"id": "00000000", "prompt": "a red circle", "color": "red", "shape": "circle", "size": None}
    assert got[5] == {"id": "00000005", "prompt": "a small star", "color": None, "shape": None, "size": "small"}
    r = read_rows(open_manifest(str(out)), JobSpec(), 0, 1)[0]
    assert r.extra == {"color": "red", "shape": "circle", "size": None}


def test_csv_with_mapping_and_passthrough(tmp_path):
    src = tmp_path / "in.csv"
    src.write_text('text,label,id\n"a cat, sitting",cat,c1\na dog,dog,d1\n', encoding="utf-8")
    out = tmp_path / "m.parquet"
    assert build_manifest(out, table_file=src, mapping=["prompt=text"], seeds="3") == 2
    assert rows(out) == [
        {"id": "c1-s3", "prompt": "a cat, sitting", "seed": 3, "label": "cat"},
        {"id": "d1-s3", "prompt": "a dog", "seed": 3, "label": "dog"},
    ]


def test_csv_text_columns_stay_text(tmp_path):
    src = tmp_path / "in.csv"
    src.write_text("name,text,steps\n007,1984,30\n010,a cat,20\n")
    out = tmp_path / "m.parquet"
    build_manifest(out, table_file=src, mapping=["prompt=text", "id=name"])
    assert rows(out) == [{"id": "007", "prompt": "1984", "steps": 30}, {"id": "010", "prompt": "a cat", "steps": 20}]


def test_jsonl_source(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(d) for d in [{"prompt": "a", "steps": 10}, {"prompt": "b", "steps": 30}]) + "\n")
    out = tmp_path / "m.parquet"
    build_manifest(out, table_file=src)
    assert rows(out) == [{"id": "00000000", "prompt": "a", "steps": 10}, {"id": "00000001", "prompt": "b", "steps": 30}]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one prompt source"),
        ({"prompts_file": "p.txt", "templates": ["x"]}, "exactly one prompt source"),
        ({"table_file": "in.csv"}, "no 'prompt' column"),
        ({"table_file": "in.csv", "mapping": ["prompt=nope"]}, "has no column 'nope'"),
        ({"table_file": "in.csv", "mapping": ["prompt"]}, "TARGET=SOURCE"),
        ({"table_file": "in.xlsx"}, "no such file"),
        ({"prompts_file": "empty.txt"}, "holds no prompts"),
        ({"prompts_file": "latin1.txt"}, "line 2: not valid UTF-8"),
        ({"prompts_file": "p.txt", "columns": ["steps=ten"]}, "must be an integer"),
        ({"prompts_file": "p.txt", "seeds": "0-9", "columns": ["seed=3"]}, "already has a 'seed' column"),
        ({"templates": ["{a|b}" * 1, "{" + "|".join(map(str, range(1000))) + "}"], "seeds": "0-199999"}, "limit 100,000,000"),
        ({"prompts_file": "p.txt", "mapping": ["prompt=x"]}, "--map only applies"),
    ],
)
def test_build_errors(tmp_path, monkeypatch, kwargs, message):
    monkeypatch.chdir(tmp_path)
    Path("p.txt").write_text("a cat\n")
    Path("empty.txt").write_text("\n\n")
    Path("latin1.txt").write_bytes("ok\ncaf\xe9\n".encode("latin-1"))
    Path("in.csv").write_text("text\na cat\n")
    with pytest.raises(ManifestBuildError, match=message):
        build_manifest(tmp_path / "out.parquet", **kwargs)
    assert not (tmp_path / "out.parquet").exists()


def test_refuses_to_overwrite(tmp_path):
    src = tmp_path / "p.txt"
    src.write_text("a\n")
    out = tmp_path / "m.parquet"
    build_manifest(out, prompts_file=src)
    with pytest.raises(ManifestBuildError, match="exists"):
        build_manifest(out, prompts_file=src)
    src.write_text("b\n")
    build_manifest(out, prompts_file=src, overwrite=True)
    assert rows(out)[0]["prompt"] == "b"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_row_groups_and_large_products(tmp_path):
    out = tmp_path / "m.parquet"
    n = build_manifest(out, templates=["{" + "|".join(f"p{i}" for i in range(300)) + "}"], seeds="0-999", row_group_size=50_000)
    assert n == 300_000
    md = pq.ParquetFile(out).metadata
    assert md.num_row_groups == 6
    m = open_manifest(str(out))
    last = read_rows(m, JobSpec(), n - 2, n)
    assert [(r.id, r.seed, r.prompt) for r in last] == [("00000299-s998", 998, "p299"), ("00000299-s999", 999, "p299")]


# --- the command ------------------------------------------------------------------------------------


def test_cli_manifest(tmp_path):
    from sdbatch.cli.app import app as cli_app

    runner = CliRunner()
    out = tmp_path / "m.parquet"
    res = runner.invoke(cli_app, ["manifest", "-o", str(out), "-t", "a {red|blue} cat", "--seeds", "0-2", "-c", "steps=25"])
    assert res.exit_code == 0, res.output
    assert "wrote 6 rows" in res.stdout and "OK" in res.stdout
    res = runner.invoke(cli_app, ["manifest", "-o", str(out), "-t", "a {red|blue cat"])
    assert res.exit_code == 2 and "never closed" in res.stderr and "Traceback" not in res.output
    # builds, but does not validate: exit 2 with the report
    res = runner.invoke(cli_app, ["manifest", "-o", str(tmp_path / "bad.parquet"), "-t", "x", "-c", "steps=0"])
    assert res.exit_code == 2 and "column 'steps': value 0" in res.stderr


def test_cli_manifest_wildcards_sampling_and_grid_errors(tmp_path):
    from sdbatch.cli.app import app as cli_app

    (tmp_path / "wc").mkdir()
    (tmp_path / "wc" / "colour.txt").write_text("red\nblue\n")
    runner = CliRunner()
    out = tmp_path / "m.parquet"
    args = ["manifest", "-o", str(out), "-t", "a {size=small|large} __colour__ {circle|square}", "--wildcards",
            str(tmp_path / "wc"), "--sample", "5", "--sample-seed", "3", "--seeds", "0-1"]
    res = runner.invoke(cli_app, args)
    assert res.exit_code == 0, res.output
    first = rows(out)
    assert len(first) == 10 and [r["seed"] for r in first[:2]] == [0, 1]
    assert all(r["prompt"].split()[1] == r["size"] and r["prompt"].split()[2] in ("red", "blue") for r in first)
    assert runner.invoke(cli_app, [*args, "--overwrite"]).exit_code == 0 and rows(out) == first  # seeded
    res = runner.invoke(cli_app, [*args[:-4], "--sample", "9", "--overwrite"])  # 8 combinations
    assert res.exit_code == 0 and len({r["prompt"] for r in rows(out)}) == 8
    assert "--sample 9: template 'a {size=small|large} __colour__ {circle|square}' has only 8 distinct prompts; wrote all 8" in res.stderr
    for grid, message in [("foo=1", "COLUMN one of seed"), ("seed=1-2 steps=2 guidance_scale=3", "one or two axes"),
                          ("steps=2,2", "each value once"), ("guidance_scale=x", "must be a number")]:
        res = runner.invoke(cli_app, ["manifest", "-o", str(tmp_path / "g.parquet"), "-t", "a cat", "--grid", grid])
        assert res.exit_code == 2 and message in res.stderr and "Traceback" not in res.output, (grid, res.output)
    res = runner.invoke(cli_app, ["manifest", "-o", str(tmp_path / "g.parquet"), "-t", "a cat", "--grid", "seed=1-2",
                                  "--seeds", "0-3"])
    assert res.exit_code == 2 and "already has a 'seed' column" in res.stderr
