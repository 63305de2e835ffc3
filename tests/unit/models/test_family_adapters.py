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
    rule, negative = shapes.row_rules()
    assert rule.column == "clip_skip" and not rule.refuses_value(3) and rule.refuses_value(4)
    assert (negative.column, negative.paired) == ("negative_prompt", "guidance_scale")
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

    traits = ModelTraits(NoNegative(), 64, 64)
    path = write_manifest(tmp_path / "m.parquet", [{"id": "a", "prompt": "x", "negative_prompt": None},
                                                   {"id": "b", "prompt": "y", "negative_prompt": "blurry"}])
    spec = JobSpec().with_model_defaults(traits)
    report = validate_manifest(open_manifest(str(path)), spec, model=traits)
    [issue] = report.issues
    assert (issue.row, issue.id, issue.column, issue.value) == (1, "b", "negative_prompt", "'blurry'")
    assert "not used by no-negative models (NoNegativePipeline)" in issue.rule and "leave negative_prompt null" in issue.fix


# ---------------------------------------------------------------------------------------------
# per-model meaning of the parameters (issue 24): read from the configs alone, torch-free


def write_configs(folder, files: dict[str, dict]):
    """A model folder of configs alone (no weights: traits read JSON)."""
    import json

    for rel, config in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(json.dumps(config))
    return folder


def flux_configs(folder, *, dev: bool, vae_blocks: int = 4):
    """A FLUX.1 folder's configs as the published ones shape them."""
    return write_configs(folder, {
        "model_index.json": {"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]},
        "transformer/config.json": {"_class_name": "FluxTransformer2DModel", "patch_size": 1, "guidance_embeds": dev},
        "vae/config.json": {"_class_name": "AutoencoderKL", "block_out_channels": [128, 256, 512, 512][:vae_blocks]},
    })


def test_flux_variants_take_their_meaning_and_defaults_from_their_configs(tmp_path):
    dev = local_traits(flux_configs(tmp_path / "dev", dev=True))
    schnell = local_traits(flux_configs(tmp_path / "schnell", dev=False))
    small = local_traits(flux_configs(tmp_path / "small", dev=True, vae_blocks=1))
    # the pipeline's default_sample_size 128 × the VAE factor, not a constant per family
    assert (dev.native_width, dev.native_height, dev.size_multiple) == (1024, 1024, 16)
    assert (small.native_width, small.size_multiple) == (128, 2)
    assert (dev.guidance, dict(dev.defaults), dev.max_sequence_length) == ("distilled", {"steps": 28, "guidance_scale": 3.5}, 512)
    assert (schnell.guidance, dict(schnell.defaults), schnell.max_sequence_length) == ("none", {"steps": 4, "guidance_scale": 0.0}, 256)
    assert schnell.recorded() == {"guidance": "none", "max_sequence_length": 256, "variant": "schnell"}
    text = "\n".join(schnell.describe())
    assert "FLUX.1 [schnell] (FluxPipeline): native size 1024x1024, sizes a multiple of 16; default steps 4" in text
    assert "guidance_scale is unused" in text and "256 tokens" in text and "clip_skip is not used" in text
    shapes = local_traits(local_model_dir("builtin:shapes"))
    assert shapes.recorded() == {} and dict(shapes.defaults) == {"steps": 20, "guidance_scale": 7.5}


def test_a_spec_leaving_steps_and_guidance_null_takes_the_models_own(tmp_path):
    schnell = flux_configs(tmp_path / "schnell", dev=False)
    spec = JobSpec.model_validate({"model": {"name": str(schnell)}})
    assert (spec.defaults.steps, spec.defaults.guidance_scale, spec.defaults.width) == (4, 0.0, 1024)
    spec = JobSpec.model_validate({"model": {"name": str(schnell)}, "defaults": {"steps": 8}})
    assert (spec.defaults.steps, spec.defaults.guidance_scale) == (8, 0.0)  # a value given is kept
    s3 = JobSpec.model_validate({"model": {"name": "s3://bucket/flux"}})
    assert s3.defaults.steps is None  # read at submit
    assert s3.with_model_defaults(local_traits(schnell)).defaults.steps == 4


def test_validation_refuses_what_the_model_would_ignore_naming_the_row(tmp_path):
    schnell, dev = flux_configs(tmp_path / "schnell", dev=False), flux_configs(tmp_path / "dev", dev=True)
    rows = [{"id": "ok", "prompt": "x", "negative_prompt": None, "guidance_scale": None, "clip_skip": None, "width": None},
            {"id": "neg", "prompt": "x", "negative_prompt": "blurry", "guidance_scale": None, "clip_skip": None, "width": None},
            {"id": "cfg", "prompt": "x", "negative_prompt": "", "guidance_scale": 7.0, "clip_skip": None, "width": None},
            {"id": "skip", "prompt": "x", "negative_prompt": None, "guidance_scale": None, "clip_skip": 2, "width": None},
            {"id": "size", "prompt": "x", "negative_prompt": None, "guidance_scale": None, "clip_skip": None, "width": 520}]
    path = write_manifest(tmp_path / "m.parquet", rows)

    def issues(model):
        traits, spec = local_traits(model), JobSpec.model_validate({"model": {"name": str(model)}})
        return {(i.id, i.column): (i.rule, i.fix) for i in validate_manifest(open_manifest(str(path)), spec, model=traits).issues}

    found = issues(schnell)
    assert set(found) == {("neg", "negative_prompt"), ("cfg", "guidance_scale"), ("skip", "clip_skip"), ("size", "width")}
    assert "no unconditional branch" in found["neg", "negative_prompt"][0]
    assert "guidance-distilled and uses no guidance_scale" in found["cfg", "guidance_scale"][0]
    assert "takes no clip_skip" in found["skip", "clip_skip"][0]
    assert "multiple of 16 (patch size × VAE factor)" in found["size", "width"][0]
    # [dev] uses guidance_scale (its distilled embedding): only the rest is refused
    assert set(issues(dev)) == {("neg", "negative_prompt"), ("skip", "clip_skip"), ("size", "width")}


def test_offload_and_single_file_settings_are_checked_in_the_spec(tmp_path):
    import pytest
    from pydantic import ValidationError

    assert JobSpec.model_validate({"model": {"offload": "group", "device": "cuda"}}).model.offload == "group"
    with pytest.raises(ValidationError, match="model.offload=model moves weights .* set model.device=cuda"):
        JobSpec.model_validate({"model": {"offload": "model", "device": "cpu"}})
    folder = flux_configs(tmp_path / "dev", dev=True)
    single = JobSpec.model_validate({"model": {"name": str(tmp_path / "flux1-dev.safetensors"), "config": str(folder)}})
    assert single.model.configs_at == str(folder) and single.defaults.steps == 28  # the config folder's traits
    assert single.fingerprint_fields()["model_config"] == str(folder)
    with pytest.raises(ValidationError, match="pickle checkpoint"):
        JobSpec.model_validate({"model": {"name": "model.ckpt", "config": str(folder)}})
    gguf = JobSpec.model_validate({"model": {"name": str(tmp_path / "flux1-dev-Q8_0.gguf"), "config": str(folder)}})
    assert gguf.model.configs_at == str(folder)  # a GGUF transformer is a single file like a .safetensors one
    with pytest.raises(ValidationError, match="is a single-file checkpoint: set model.config"):
        JobSpec.model_validate({"model": {"name": "flux1-dev-Q8_0.gguf"}})


def cfg_model_configs(folder, class_name: str, *, turbo: bool = False):
    """Configs of a Z-Image, Qwen-Image or Chroma folder, enough for their traits."""
    vae = ({"temperal_downsample": [False, True, True]} if class_name == "QwenImagePipeline"
           else {"block_out_channels": [128, 256, 512, 512]})
    return write_configs(folder, {
        "model_index.json": {"_class_name": class_name},
        "transformer/config.json": {"patch_size": 2 if class_name == "QwenImagePipeline" else 1},
        "vae/config.json": vae,
        "scheduler/scheduler_config.json": {"use_dynamic_shifting": not turbo, "shift": 3.0},
    })


def negative_prompt_issues(model, rows, tmp_path, **defaults):
    path = write_manifest(tmp_path / "neg.parquet", rows)
    spec = JobSpec.model_validate({"model": {"name": str(model)}, "defaults": defaults})
    report = validate_manifest(open_manifest(str(path)), spec, model=local_traits(model))
    return {(i.id, i.column): i for i in report.issues}


def test_a_negative_prompt_at_a_guidance_that_turns_its_branch_off_is_refused(tmp_path):
    """The two-column rule: a negative prompt (the row's, else the job's) while the row's guidance
    (the row's, else the spec's, else the model's own) runs no unconditional branch — each
    pipeline's own do_classifier_free_guidance: Z-Image > 0, SD/Chroma > 1, Qwen-Image's true CFG > 1."""
    rows = [{"id": "own", "prompt": "x", "negative_prompt": "blurry", "guidance_scale": None},
            {"id": "zero", "prompt": "x", "negative_prompt": "blurry", "guidance_scale": 0.0},
            {"id": "one", "prompt": "x", "negative_prompt": "blurry", "guidance_scale": 1.0},
            {"id": "two", "prompt": "x", "negative_prompt": "blurry", "guidance_scale": 2.0},
            {"id": "empty", "prompt": "x", "negative_prompt": "", "guidance_scale": 0.0},
            {"id": "none", "prompt": "x", "negative_prompt": None, "guidance_scale": 0.0}]
    turbo = cfg_model_configs(tmp_path / "turbo", "ZImagePipeline", turbo=True)
    expected = {turbo: {"own", "zero"}, cfg_model_configs(tmp_path / "z", "ZImagePipeline"): {"zero"},
                cfg_model_configs(tmp_path / "qwen", "QwenImagePipeline"): {"zero", "one"},
                cfg_model_configs(tmp_path / "chroma", "ChromaPipeline"): {"zero", "one"},
                local_model_dir("builtin:shapes"): {"zero", "one"}}
    for model, refused in expected.items():
        found = negative_prompt_issues(model, rows, tmp_path)
        assert set(found) == {(row, "negative_prompt") for row in refused}, model
    issue = negative_prompt_issues(turbo, rows, tmp_path)["own", "negative_prompt"]
    assert issue.value == "{'guidance_scale': 0.0, 'negative_prompt': 'blurry'}"  # the model's own 0, shown
    assert "Z-Image [turbo] (ZImagePipeline) runs no unconditional branch at guidance_scale <= 0" in issue.rule
    assert "raise guidance_scale above 0, or leave the negative prompt empty (a row's '' overrides" in issue.fix
    qwen = negative_prompt_issues(tmp_path / "qwen", rows, tmp_path)["one", "negative_prompt"]
    assert "guidance_scale <= 1" in qwen.rule and qwen.value == "{'guidance_scale': 1.0, 'negative_prompt': 'blurry'}"


def test_the_job_negative_prompt_meets_each_rows_guidance(tmp_path):
    """A job-wide negative prompt is checked against every row's guidance (a whole-number guidance
    column included), and against the job's own guidance once, as the spec's error."""
    rows = [{"id": "low", "prompt": "x", "guidance_scale": 1}, {"id": "high", "prompt": "x", "guidance_scale": 7},
            {"id": "default", "prompt": "x", "guidance_scale": None}]
    shapes = local_model_dir("builtin:shapes")
    found = negative_prompt_issues(shapes, rows, tmp_path, negative_prompt="blurry")
    assert set(found) == {("low", "negative_prompt")}
    assert found["low", "negative_prompt"].value == "{'guidance_scale': 1.0, 'negative_prompt': 'blurry'}"
    turbo = cfg_model_configs(tmp_path / "turbo", "ZImagePipeline", turbo=True)
    found = negative_prompt_issues(turbo, rows, tmp_path, negative_prompt="blurry")
    assert set(found) == {(None, "defaults.negative_prompt")}  # rows "low" and "high" run CFG
    assert "--set defaults.guidance_scale=N, or --set defaults.negative_prompt=" in found[None, "defaults.negative_prompt"].fix


def test_the_runtime_checks_every_row_of_a_batch(tmp_path):
    import pytest

    [rule] = [r for r in local_traits(local_model_dir("builtin:shapes")).row_rules() if r.paired]
    rule.check_row(a_row(guidance_scale=1.0, negative_prompt=""))
    with pytest.raises(ValueError, match="row r0: negative_prompt 'blurry' with guidance_scale 1.0: .* at guidance_scale <= 1"):
        rule.check_row(a_row(guidance_scale=1.0))


def test_flux2_dev_is_distilled_guidance_read_from_its_published_layout(tmp_path):
    """FLUX.2 [dev]'s folder (its tokenizer named a PixtralProcessor): the distilled guidance
    embedding with the pipeline's defaults, 512 Mistral tokens, the 2×2-packed grid of a VAE of
    factor 8, and no negative prompt, init image or clip_skip."""
    folder = write_configs(tmp_path / "flux2-dev", {
        "model_index.json": {"_class_name": "Flux2Pipeline", "tokenizer": ["transformers", "PixtralProcessor"],
                             "transformer": ["diffusers", "Flux2Transformer2DModel"]},
        "transformer/config.json": {"_class_name": "Flux2Transformer2DModel", "patch_size": 1, "guidance_embeds": True},
        "vae/config.json": {"_class_name": "AutoencoderKLFlux2", "block_out_channels": [128, 256, 512, 512]},
    })
    traits = local_traits(folder)
    assert (traits.native_width, traits.native_height, traits.size_multiple) == (1024, 1024, 16)
    assert (traits.guidance, dict(traits.defaults)) == ("distilled", {"steps": 50, "guidance_scale": 4.0})
    assert traits.recorded() == {"guidance": "distilled", "max_sequence_length": 512}
    assert traits.family.component_classes == {"tokenizer": "AutoTokenizer"}  # no torchvision-bound processor
    assert not {"negative_prompt", "init_image"} & traits.family.honours and not traits.family.takes_clip_skip
    [negative] = [r for r in traits.row_rules() if r.column == "negative_prompt"]
    assert negative.refuses_value("blurry") and not negative.refuses_value(None)
    assert "FLUX.2 [dev] (Flux2Pipeline): native size 1024x1024" in "\n".join(traits.describe())


def test_an_edit_model_has_no_default_strength_and_refuses_a_set_one(tmp_path):
    """FLUX.1 Kontext (an instruction-edit model) gives no default strength: its rows are read
    with none, where FLUX.1 [dev]'s img2img rows take 0.75. A strength set in a row or as the job
    default (0.75 too) is refused naming where and the fix; a row an older sdbatch recorded with
    0.75 still passes the runtime's rules (reproduce)."""
    from sdbatch.manifest.reader import read_rows

    kontext = write_configs(tmp_path / "kontext", {
        "model_index.json": {"_class_name": "FluxKontextPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]},
        "transformer/config.json": {"patch_size": 1, "guidance_embeds": True},
        "vae/config.json": {"block_out_channels": [128, 256, 512, 512]},
    })
    dev = flux_configs(tmp_path / "dev", dev=True)
    (tmp_path / "a.png").write_bytes(b"")
    path = write_manifest(tmp_path / "m.parquet", [{"id": "own", "prompt": "x", "init_image": "a.png", "strength": None},
                                                   {"id": "set", "prompt": "x", "init_image": "a.png", "strength": 0.75}])
    manifest = open_manifest(str(path))
    edit, img2img = (JobSpec.model_validate({"model": {"name": str(model)}}) for model in (kontext, dev))
    assert (edit.defaults.strength, img2img.defaults.strength) == (None, 0.75)
    assert [r.strength for r in read_rows(manifest, edit, 0, 2)] == [None, 0.75]  # the row's own is refused below
    assert [r.strength for r in read_rows(manifest, img2img, 0, 2)] == [0.75, 0.75]

    def issues(**defaults):
        spec = JobSpec.model_validate({"model": {"name": str(kontext)}, "defaults": defaults})
        return {(i.row, i.id, i.column): i for i in validate_manifest(manifest, spec, model=local_traits(kontext)).issues}

    found = issues()
    assert set(found) == {(1, "set", "strength")}
    assert found[1, "set", "strength"].value == "0.75"
    assert "strength is not used by FLUX.1 Kontext models (FluxKontextPipeline)" in found[1, "set", "strength"].rule
    assert "leave strength null for this model" in found[1, "set", "strength"].fix
    default = issues(strength=0.75)[-1, None, "defaults.strength"]
    assert default.value == "0.75" and "FLUX.1 Kontext [dev] (FluxKontextPipeline) edits take no strength" in default.rule
    assert default.fix == "leave defaults.strength null for this model: remove it from the spec (or --set defaults.strength=null)"
    traits = local_traits(kontext)
    assert "strength" not in {rule.column for rule in traits.rules_for_rows()}
    for rule in traits.rules_for_rows():  # what the runtime checks of each row
        rule.check_row(a_row(negative_prompt="", guidance_scale=3.5, init_image="a.png", strength=0.75))
    assert "strength is not used" in "\n".join(traits.describe())
