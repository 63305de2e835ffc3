"""AUTOMATIC1111 prompt syntax that sdbatch does not interpret (issue 26 item 2, the validation
part): prompt editing and alternation are refused naming the row, emphasis / BREAK /
embedding: are warned about, and --literal-prompts turns both off."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from sdbatch.cli.app import app
from sdbatch.manifest.sources import open_manifest
from sdbatch.manifest.validate import validate_manifest
from sdbatch.spec import JobSpec

PROMPTS = ["a plain red square", "a [red:blue:0.5] square", "a [red|blue] square", "a (red:1.3) square",
           "a ((red)) square BREAK a blue circle", "embedding:style a square", "a [cat] in [brackets]"]


@pytest.fixture
def manifest(tmp_path) -> str:
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(len(PROMPTS))], "prompt": PROMPTS,
                             "negative_prompt": [None, None, None, None, None, None, "[a|b]"]}), path)
    return str(path)


def test_editing_and_alternation_are_refused_naming_the_row(manifest):
    report = validate_manifest(open_manifest(manifest), JobSpec())
    refused = {(i.id, i.column, i.rule.split("'s ")[1].split(" is")[0]) for i in report.issues}
    assert refused == {("r1", "prompt", "prompt editing [from:to:when]"), ("r2", "prompt", "alternation [a|b]"),
                       ("r6", "negative_prompt", "alternation [a|b]")}
    assert all("--literal-prompts" in i.fix for i in report.issues)


def test_emphasis_break_and_embeddings_are_warned_about(manifest):
    warnings = " ".join(validate_manifest(open_manifest(manifest), JobSpec()).warnings)
    assert "1 row(s) use AUTOMATIC1111's emphasis (word:1.3) (first: row 3)" in warnings
    assert "2 row(s) use AUTOMATIC1111's emphasis ((word)) / [word] (first: row 4)" in warnings
    assert "1 row(s) use AUTOMATIC1111's BREAK (first: row 4)" in warnings
    assert "1 row(s) use AUTOMATIC1111's embedding:NAME (first: row 5)" in warnings


def test_literal_prompts_turns_the_checks_off(manifest):
    report = validate_manifest(open_manifest(manifest), JobSpec(), literal_prompts=True)
    assert report.ok and not report.warnings, report.render()
    result = CliRunner().invoke(app, ["validate", manifest])
    assert result.exit_code == 2 and "row 2 (id 'r2'), column 'prompt'" in result.stderr
    assert CliRunner().invoke(app, ["validate", manifest, "--literal-prompts"]).exit_code == 0


def test_emphasis_and_break_are_not_warned_about_for_a_clip_model(manifest):
    from sdbatch.models.families import model_traits

    traits = model_traits("builtin:tiny")  # SD 1.x: its CLIP encoder reads them through compel
    report = validate_manifest(open_manifest(manifest), JobSpec(model={"name": "builtin:tiny"}), model=traits)
    assert [w.split(" (first")[0] for w in report.warnings] == ["1 row(s) use AUTOMATIC1111's embedding:NAME"]
    assert report.issue_count == 3  # editing and alternation are refused all the same


def test_a_t5_family_is_named_in_the_warning(manifest):
    from sdbatch.models.families import FAMILIES
    from sdbatch.models.families.base import ModelTraits

    flux = ModelTraits(FAMILIES["FluxPipeline"], 64, 64)
    warnings = " ".join(validate_manifest(open_manifest(manifest), JobSpec(), model=flux).warnings)
    assert "emphasis (word:1.3) (first: row 3); sdbatch weights it for CLIP text encoders only: the FLUX" in warnings


def test_model_prompt_syntax_literal_is_the_flag_in_the_spec(manifest):
    spec = JobSpec(model={"name": "builtin:tiny", "prompt_syntax": "literal"})
    assert validate_manifest(open_manifest(manifest), spec).ok
    assert spec.fingerprint_fields()["prompt_syntax"] == "literal"
    assert "prompt_syntax" not in JobSpec(model={"name": "builtin:tiny"}).fingerprint_fields()
