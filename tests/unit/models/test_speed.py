"""Speed profiles, torch-free: presets and switches resolved, the job fingerprint (exact keeps
the fingerprint jobs had before profiles), the refusals of the spec, and what the record and
the infotext carry."""

from __future__ import annotations

import json

import pytest

from sdbatch.data.record import ImageRecord
from sdbatch.data.row import Row
from sdbatch.models.speed import PRESETS, AppliedSpeed, SpeedSpec
from sdbatch.output.encode import infotext, parse_infotext
from sdbatch.spec import SpecError, fingerprint, load_spec

#: the fingerprint of the default spec before speed profiles existed (measured on main before
#: issue 25): an exact job must keep it, or every OUT made before would refuse its resume
DEFAULT_FINGERPRINT_BEFORE_PROFILES = "bb33c5d2c2dd3a22"


def test_presets_resolve_to_their_switches_and_explicit_switches_override():
    assert SpeedSpec().switches().on() == {}
    assert SpeedSpec(profile="fast").switches().on() == {
        "regional_compile": True, "cuda_graphs": True, "fuse_qkv": True, "quantize": "auto"}
    assert SpeedSpec(profile="fastest").switches().on() == {
        **PRESETS["fast"].on(), "step_cache": "first_block", "step_cache_threshold": 0.08}
    tuned = SpeedSpec(profile="fast", fuse_qkv=False, cuda_graphs=False)
    assert tuned.switches().on() == {"regional_compile": True, "quantize": "auto"}
    assert tuned.explicit() == {"fuse_qkv": False, "cuda_graphs": False}
    # a step cache asked on its own takes the stated threshold
    assert SpeedSpec(step_cache="first_block").switches().step_cache_threshold == 0.08
    assert SpeedSpec(fuse_qkv=True).summary() == "exact (fuse_qkv)"
    assert SpeedSpec(profile="exact", fuse_qkv=False).is_exact


def test_the_profile_is_part_of_the_job_fingerprint_and_exact_keeps_the_old_one():
    exact = load_spec(overrides={"speed.profile": "exact"})
    assert "speed" not in exact.fingerprint_fields()
    assert fingerprint(exact.fingerprint_fields()) == DEFAULT_FINGERPRINT_BEFORE_PROFILES
    prints = {fingerprint(load_spec(overrides={"speed.profile": p}).fingerprint_fields()) for p in PRESETS}
    assert len(prints) == 3
    fast = load_spec(overrides={"speed.profile": "fast"})
    assert fast.fingerprint_fields()["speed"]["profile"] == "fast"
    no_graphs = load_spec(overrides={"speed.profile": "fast"}, sets=["speed.cuda_graphs=false"])
    assert fingerprint(no_graphs.fingerprint_fields()) != fingerprint(fast.fingerprint_fields())


@pytest.mark.parametrize("sets, words", [
    (["speed.quantize=fp8"], ["speed.quantize needs a GPU", "gpus_per_worker=0", "--gpus-per-worker 1"]),
    (["speed.cuda_graphs=true", "speed.regional_compile=true"], ["speed.cuda_graphs needs a GPU"]),
    (["speed.quantize=int8", "model.device=cpu", "resources.gpus_per_worker=1"], ["model.device=cpu"]),
    (["speed.profile=fast", "model.compile=true"], ["model.compile", "speed.regional_compile=false"]),
    (["speed.cuda_graphs=true", "resources.gpus_per_worker=1"], ["cuda_graphs needs regional_compile"]),
    (["speed.step_cache_threshold=0.1"], ["no step cache is on", "speed.step_cache=first_block"]),
    (["speed.profile=fstest"], ["speed.profile", "'exact', 'fast' or 'fastest'"]),
    (["speed.step_cach=first_block"], ["speed.step_cach: unknown key", "speed.step_cache"]),
])
def test_the_spec_refuses_what_the_workers_cannot_do(sets, words):
    with pytest.raises(SpecError) as caught:
        load_spec(sets=sets)
    for word in words:
        assert word in str(caught.value)


def test_a_preset_with_gpu_switches_is_accepted_for_cpu_workers():
    """A preset asks "where the worker can": on a CPU its GPU switches are skipped and recorded."""
    spec = load_spec(overrides={"speed.profile": "fastest"})
    assert spec.resources.gpus_per_worker == 0 and spec.speed.switches().quantize == "auto"


def _row() -> Row:
    return Row(index=0, id="r0", prompt="a red circle", negative_prompt="", seed=1, steps=20, guidance_scale=7.5,
               width=64, height=64, scheduler="ddim", extra={})


def _record(speed) -> ImageRecord:
    return ImageRecord(row=_row(), shard="00000", batch_id="00000-000", batch_rows=("r0",), loras=(),
                       prompt_truncated_at=None, init_image_sha256=None, model_fingerprint="f" * 64, device="cpu",
                       dtype="float32", versions={"torch": "2"}, torch_threads=2, model_name="builtin:shapes",
                       model_family="StableDiffusionPipeline", scheduler_config={}, speed=speed)


def test_exact_records_nothing_and_a_profile_is_in_the_record_and_infotext():
    exact = AppliedSpeed("exact", {}, {})
    assert exact.record() is None and exact.bit_reproducible
    assert "speed" not in _record(exact.record()).to_embedded()
    assert "Speed profile" not in infotext(_record(None).to_embedded())

    fast = AppliedSpeed("fast", {"fuse_qkv": True, "regional_compile": True},
                        {"cuda_graphs": "needs a CUDA device; this worker runs on cpu"})
    assert not fast.bit_reproducible
    record = _record(fast.record())
    embedded = json.loads(json.dumps(record.to_embedded()))
    assert embedded["speed"] == {"profile": "fast", "applied": {"fuse_qkv": True, "regional_compile": True},
                                 "skipped": {"cuda_graphs": "needs a CUDA device; this worker runs on cpu"}}
    assert ImageRecord.from_embedded(embedded) == record
    text = infotext(embedded)
    assert "Speed profile: fast (fuse_qkv regional_compile)" in text
    assert parse_infotext(text)["Speed profile"] == "fast (fuse_qkv regional_compile)"
    assert AppliedSpeed.from_record(embedded["speed"]) == fast
