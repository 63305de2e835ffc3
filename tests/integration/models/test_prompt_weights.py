"""AUTOMATIC1111 prompt syntax read through compel (issue 26 item 2): emphasis changes the
conditioning exactly as compel's own embedding of the same weights does (SD, SDXL, SD3's CLIP
pair), ``(red:1.0)`` renders exactly as ``red``, ``BREAK`` and a 200-token prompt render and
reproduce byte for byte, a long row renders alone as it does in a batch of mixed lengths, the
record and infotext keep the prompt as written, and ``--literal-prompts`` reads it as text."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import load_index, write_manifest
from conftest import sdbatch_cli as cli

from sdbatch.output.encode import parse_infotext, read_embedded

LONG = ", ".join(f"a red circle number {i}" for i in range(40))  # 200+ CLIP tokens: three chunks
ROWS = [
    {"id": "red", "prompt": "a red circle", "seed": 1},
    {"id": "red13", "prompt": "a (red:1.3) circle", "seed": 1},
    {"id": "red10", "prompt": "a (red:1.0) circle", "seed": 1},
    {"id": "long", "prompt": LONG, "seed": 2},
    {"id": "break", "prompt": "a red circle BREAK a [blue] square", "seed": 3},
]
ARGS = ("--model", "builtin:tiny", "--steps", "2", "--width", "64", "--height", "64", "--batch-size", "8")


@pytest.fixture(scope="module")
def jobs(ray_address, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prompt-weights")
    outs = {}
    for name, rows, extra in (("mixed", ROWS, ()), ("alone", [r for r in ROWS if r["id"] == "long"], ()),
                              ("literal", [*ROWS, {"id": "alt", "prompt": "a [red|blue] circle", "seed": 1}],
                               ("--literal-prompts",))):
        outs[name] = tmp / name
        result = cli(ray_address, "submit", write_manifest(tmp / f"{name}.parquet", rows), "--out", outs[name], *ARGS, *extra)
        assert result.returncode == 0, (name, result.stderr)
    return outs


def _index(out) -> dict[str, dict]:
    return {r["id"]: r for r in load_index(out)}


def _pixels(out, entry) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(out / entry["key"]).convert("RGB"))


def test_emphasis_changes_the_image_and_weight_one_is_the_plain_prompt(jobs):
    index = _index(jobs["mixed"])
    red, red13, red10 = (_pixels(jobs["mixed"], index[i]) for i in ("red", "red13", "red10"))
    assert not np.array_equal(red, red13)
    assert np.array_equal(red, red10)


def test_a_long_row_alone_renders_as_in_a_batch_of_mixed_lengths(jobs):
    mixed, alone = _index(jobs["mixed"]), _index(jobs["alone"])
    assert mixed["long"]["batch_rows"] == [r["id"] for r in ROWS]  # one canonical batch of mixed lengths
    assert np.array_equal(_pixels(jobs["mixed"], mixed["long"]), _pixels(jobs["alone"], alone["long"]))


def test_the_record_keeps_the_prompt_as_written_and_says_it_was_read(jobs):
    index = _index(jobs["mixed"])
    embedded = {rid: read_embedded((jobs["mixed"] / r["key"]).read_bytes()) for rid, r in index.items()}
    records = {rid: record for rid, (_, record) in embedded.items()}
    written = {r["id"]: r["prompt"] for r in ROWS}
    assert {rid: rec["prompt"] for rid, rec in records.items()} == written
    assert {rid: parse_infotext(text)["prompt"] for rid, (text, _) in embedded.items()} == written
    assert {rid: rec.get("prompt_syntax") for rid, rec in records.items()} == {
        "red": None, "red13": "a1111", "red10": None, "long": "a1111", "break": "a1111"}
    assert records["long"]["prompt_truncated_at"] is None  # read whole, in chunks
    literal = _index(jobs["literal"])
    assert literal["long"]["prompt_truncated_at"] is not None  # --literal-prompts: cut at 77 tokens
    assert "prompt_syntax" not in read_embedded((jobs["literal"] / literal["red13"]["key"]).read_bytes())[1]


def test_literal_prompts_read_brackets_as_text(jobs):
    interpreted, literal = _index(jobs["mixed"]), _index(jobs["literal"])
    assert literal["alt"]["status"] == "ok"  # [a|b] is refused only where it would be read
    assert not np.array_equal(_pixels(jobs["literal"], literal["red13"]), _pixels(jobs["mixed"], interpreted["red13"]))
    # a plain prompt is read alike, within the project's one level for rows in batches of other sizes
    assert np.abs(_pixels(jobs["literal"], literal["red"]).astype(int) - _pixels(jobs["mixed"], interpreted["red"])).max() <= 1


@pytest.mark.parametrize("row", ["long", "break", "red13"])
def test_weighted_long_and_broken_rows_reproduce_byte_exact(jobs, row):
    from sdbatch.audit.reproduce import reproduce_row

    result = reproduce_row(str(jobs["mixed"]), row)
    assert result.match, (result.summary(), result.notes)


def _compel(pipe, hidden: str, encoders=(("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))):
    from compel import Compel, ReturnedEmbeddingsType

    kind = {"normalized": ReturnedEmbeddingsType.LAST_HIDDEN_STATES_NORMALIZED,
            "penultimate": ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED}[hidden]
    return [Compel(tokenizer=getattr(pipe, t), text_encoder=getattr(pipe, e), returned_embeddings_type=kind,
                   truncate_long_prompts=False) for t, e in encoders if getattr(pipe, e, None) is not None]


def _encode(pipe, prompt: str):
    """The prompt embeddings of one row, as a batch's pipeline call asks for them."""
    import inspect

    texts = {name: None for name in ("prompt_2", "prompt_3") if name in inspect.signature(type(pipe).encode_prompt).parameters}
    return pipe.encode_prompt(prompt=[prompt], **texts, device="cpu", num_images_per_prompt=1,
                              do_classifier_free_guidance=True, negative_prompt=[""])[0]


@pytest.fixture(scope="module")
def tiny_families(tmp_path_factory):
    from integration.model_families import build_sd3, build_sdxl

    root = tmp_path_factory.mktemp("weights-families")
    return {"builtin:tiny": "normalized", str(build_sdxl(root / "sdxl")): "penultimate",
            str(build_sd3(root / "sd3", t5=True)): "penultimate"}


def test_the_conditioning_is_compels_own_for_the_same_weights(tiny_families):
    """pipe.encode_prompt of an A1111 prompt (what every batch calls) against compel's own
    embedding of the prompt in compel's syntax: the CLIP tokens equal, for each CLIP family."""
    import torch

    from sdbatch.models.runtime import load_model

    cases = [("a (red:1.3) circle", "a (red)1.3 circle"), ("a [red] circle", f"a (red){1 / 1.1!r} circle"),
             ("a red circle BREAK a blue square", '("a red circle", "a blue square").and()'),
             (LONG, LONG)]
    for name, hidden in tiny_families.items():
        model = load_model(name)
        pipe = model.txt2img  # type: ignore[attr-defined]
        compels = _compel(pipe, hidden)
        for a1111, compel_syntax in cases:
            ours = _encode(pipe, a1111)
            own = torch.cat([c(compel_syntax) for c in compels], dim=-1)
            assert torch.equal(ours[:, :own.shape[1], :own.shape[2]], own), (name, a1111)
            plain = _encode(pipe, "a red circle")
            # SD3: after the CLIP chunks (zero-padded to T5's width), the T5 tokens of the text as read
            assert not ours[:, :own.shape[1], own.shape[2]:].any()
            assert ours.shape[1] - own.shape[1] == plain.shape[1] - 77


def test_a_job_from_before_prompt_syntax_reproduces_its_prompts_as_text(jobs, tmp_path):
    """A job.json written before sdbatch read A1111 syntax has no ``model.prompt_syntax``: its
    images were read as text, and reproduce reads them so (not by today's default)."""
    import json
    import shutil

    from sdbatch.audit.reproduce import reproduce_row

    old = tmp_path / "old"
    shutil.copytree(jobs["literal"], old)
    job_json = old / "_sdbatch" / "job.json"
    job = json.loads(job_json.read_text())
    del job["spec"]["model"]["prompt_syntax"]
    job_json.write_text(json.dumps(job))
    result = reproduce_row(str(old), "red13")
    assert result.match, (result.summary(), result.notes)
