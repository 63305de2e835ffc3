"""The model-adapter interface (models/families/base.py), torch-free: every table entry is a
complete adapter, the built-in models' traits, and a family declared in a test (as the next
family files will be) gets its row rules and honoured columns checked by manifest validation."""

from __future__ import annotations

from conftest import write_manifest

from sdbatch.data.row import Row
from sdbatch.manifest.sources import open_manifest
from sdbatch.manifest.validate import validate_manifest
from sdbatch.models.builtin import local_model_dir
from sdbatch.models.families import FAMILIES, ModelTraits, local_traits
from sdbatch.models.families.base import ALL_COLUMNS, DiffusersFamily
from sdbatch.models.families.sdxl import StableDiffusionXL
from sdbatch.spec import JobSpec


def a_row(**changes) -> Row:
    values = dict(index=0, id="r0", prompt="a cat", negative_prompt="blurry", seed=5, steps=20, guidance_scale=7.5,
                  width=64, height=48, scheduler="default")
    return Row(**{**values, **changes})


def test_every_family_is_a_complete_adapter_keyed_by_its_class():
    for class_name, family in FAMILIES.items():
        assert family.class_name == class_name and family.samplers and family.name
    assert {f.runtime for f in FAMILIES.values()} == {"diffusers", "numpy"}


def test_builtin_traits_read_the_text_encoder_depth():
    shapes = local_traits(local_model_dir("builtin:shapes"))
    assert (shapes.native_width, shapes.native_height, shapes.text_encoder_layers) == (64, 64, 2)
    [rule] = shapes.row_rules()
    assert rule.column == "clip_skip" and not rule.refuses_value(3) and rule.refuses_value(4)
    assert local_traits(local_model_dir("builtin:null")).row_rules() == ()


def test_pipeline_kwargs_follow_the_guidance_kind_and_size_conditioning():
    rows = [a_row(), a_row(id="r1", negative_prompt="", clip_skip=2)]
    kwargs = StableDiffusionXL().pipeline_kwargs(rows)
    assert kwargs["negative_prompt"] == ["blurry", ""] and kwargs["guidance_scale"] == 7.5
    assert kwargs["clip_skip"] is None  # the first row's: a batch shares clip_skip
    assert kwargs["original_size"] == kwargs["target_size"] == (48, 64) and kwargs["crops_coords_top_left"] == (0, 0)

    class Distilled(DiffusersFamily):
        name, class_name, samplers, guidance = "distilled", "DistilledPipeline", ("default",), "distilled"

    kwargs = Distilled().pipeline_kwargs(rows)
    assert "negative_prompt" not in kwargs and kwargs["guidance_scale"] == 7.5 and "original_size" not in kwargs


def test_a_new_family_declares_what_rows_may_set(tmp_path):
    """A FLUX-like family (no unconditional branch: no negative prompt) is one class; validation
    refuses a row that sets a column it does not honour, naming row and column."""

    class NoNegative(DiffusersFamily):
        name, class_name, samplers = "no-negative", "NoNegativePipeline", ("default",)
        honours = ALL_COLUMNS - {"negative_prompt"}
        guidance = "distilled"

    traits = ModelTraits(NoNegative(), 64, 64)
    path = write_manifest(tmp_path / "m.parquet", [{"id": "a", "prompt": "x", "negative_prompt": None},
                                                   {"id": "b", "prompt": "y", "negative_prompt": "blurry"}])
    spec = JobSpec().with_native_size(traits)
    report = validate_manifest(open_manifest(str(path)), spec, model=traits)
    [issue] = report.issues
    assert (issue.row, issue.id, issue.column, issue.value) == (1, "b", "negative_prompt", "'blurry'")
    assert "not used by no-negative models (NoNegativePipeline)" in issue.rule and "leave negative_prompt null" in issue.fix
