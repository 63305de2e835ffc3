"""Textual-inversion embeddings (issue 26): declared in the spec (``embeddings: {NAME: PATH}``,
safetensors), named in prompts as ``<NAME>`` or ComfyUI's ``embedding:NAME`` — both render the
same image, and another embedding under the same name renders another —, pinned by content with
the model (job.json, each image's model hash) and reproduced; a family without CLIP encoders,
a missing file and a pickle exit 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from conftest import assert_refused, assert_reproduces, load_index, stored_pixels, submit_jobs, write_manifest

from sdbatch.models.builtin import resolve_builtin

ROWS = [{"id": "tag", "prompt": "a <foo> circle", "seed": 3}, {"id": "comfy", "prompt": "a embedding:foo circle", "seed": 3}]


def build_embedding(path, *, seed: int):
    """A two-vector embedding for builtin:tiny's text encoder, in the SD 1.x file layout."""
    import torch
    from safetensors.torch import save_file

    hidden = json.loads((resolve_builtin("builtin:tiny") / "text_encoder" / "config.json").read_text())["hidden_size"]
    save_file({"emb_params": torch.randn(2, hidden, generator=torch.Generator().manual_seed(seed)) * 5}, path)
    return path


def write_spec(path, embedding) -> str:
    path.write_text(yaml.safe_dump({"model": {"name": "builtin:tiny"}, "embeddings": {"foo": str(embedding)}}))
    return str(path)


@pytest.fixture(scope="module")
def jobs(ray_address, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("embeddings")
    manifest = write_manifest(tmp / "m.parquet", ROWS)
    runs = {name: ["--spec", write_spec(tmp / f"{name}.yaml", build_embedding(tmp / f"foo-{name}.safetensors", seed=seed))]
            for name, seed in (("a", 1), ("b", 2))}
    return {"tmp": tmp, **submit_jobs(ray_address, manifest, tmp / "out", runs, "--steps", "2")}


def test_an_embedding_changes_the_image_and_both_spellings_name_it(jobs):
    a, b = ({r["id"]: r for r in load_index(jobs[n])} for n in ("a", "b"))
    assert np.array_equal(stored_pixels(jobs["a"], a["tag"]), stored_pixels(jobs["a"], a["comfy"]))
    assert not np.array_equal(stored_pixels(jobs["a"], a["tag"]), stored_pixels(jobs["b"], b["tag"]))


def test_an_embedding_is_pinned_by_content(jobs):
    from sdbatch.models.resolve import preflight

    pins = {n: preflight("builtin:tiny", embeddings={"foo": str(jobs["tmp"] / f"foo-{n}.safetensors")}).pin for n in "ab"}
    assert pins["a"].startswith("ti:") and pins["a"] != pins["b"] != preflight("builtin:tiny").pin
    for n in "ab":
        job = json.loads((jobs[n] / "_sdbatch" / "job.json").read_text())
        assert job["model"]["fingerprint"] == pins[n]
        assert {r["model_fingerprint"] for r in load_index(jobs[n])} == {pins[n]}


def test_an_embedding_row_reproduces(jobs):
    assert_reproduces(jobs["a"], "comfy")


def test_embedding_refusals_exit_2(jobs, ray_address, tmp_path):
    manifest = write_manifest(tmp_path / "m.parquet", ROWS[:1])
    pickle = tmp_path / "bad.safetensors"
    pickle.write_bytes(b"\x80\x04\x95 a pickle")
    good = jobs["tmp"] / "foo-a.safetensors"
    cases = [(["--spec", write_spec(tmp_path / "missing.yaml", tmp_path / "none.safetensors")], "no such file"),
             (["--spec", write_spec(tmp_path / "pickle.yaml", pickle)], "not a safetensors file"),
             (["--spec", write_spec(tmp_path / "pt.yaml", tmp_path / "foo.pt")], "pickle .pt/.bin embeddings are refused"),
             (["--spec", write_spec(tmp_path / "null.yaml", good), "--model", "builtin:null"],
              "takes no textual-inversion embeddings")]
    assert_refused(ray_address, manifest, tmp_path / "out", cases)
