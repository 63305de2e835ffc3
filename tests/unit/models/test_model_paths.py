"""What a model name that is no diffusers folder is told (issue 26): a missing path, a Hugging
Face Hub id, a pickle checkpoint (with the conversion recipe), a single .safetensors or .gguf
file without its configuration, another kind of file and a folder of another kind each get their
own message and fix, as a ``BadInput`` (exit 2)."""

from __future__ import annotations

import pytest

from sdbatch.errors import EXIT_BAD_INPUT
from sdbatch.models.builtin import local_model_dir
from sdbatch.models.errors import ModelError
from sdbatch.spec import JobSpec


@pytest.mark.parametrize(("make", "name", "says"), [
    (None, "missing/deeper/model", "no such file or folder"),
    (None, "stabilityai/sdxl-turbo", "looks like a Hugging Face Hub repo id"),
    ("file", "model.onnx", "a file of a kind sdbatch does not load"),
    ("file", "model.gguf", "give the diffusers folder of its architecture as --model-config"),
    ("file", "model.safetensors", "give the diffusers folder of its architecture as --model-config"),
    ("file", "model.ckpt", "torch.load('"),
    ("dir", "checkpoints", "a folder with no model_index.json"),
])
def test_each_kind_of_wrong_model_path_gets_its_own_message(tmp_path, monkeypatch, make, name, says):
    monkeypatch.chdir(tmp_path)
    if make == "file":
        (tmp_path / name).write_bytes(b"\x80\x04 not a model")
    elif make == "dir":
        (tmp_path / name).mkdir()
    with pytest.raises(ModelError) as caught:
        local_model_dir(name)
    assert caught.value.exit_code == EXIT_BAD_INPUT
    assert f"model {name!r}: " in str(caught.value) and says in str(caught.value), str(caught.value)


def test_a_hub_id_is_told_how_to_download_it_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match=r"hf download black-forest-labs/FLUX.1-dev --local-dir models/FLUX.1-dev"):
        local_model_dir("black-forest-labs/FLUX.1-dev")


def test_a_pickle_checkpoint_is_refused_by_the_spec_with_the_conversion_recipe():
    with pytest.raises(ValueError) as caught:
        JobSpec.model_validate({"model": {"name": "/models/v1-5-pruned.ckpt"}})
    text = str(caught.value)
    assert "never loads (unpickling runs code)" in text
    assert "weights_only=True" in text and "'v1-5-pruned.safetensors'" in text and "--model-config" in text


def test_a_hub_id_as_model_config_is_told_it_is_the_configuration(tmp_path, monkeypatch):
    from sdbatch.models.resolve import preflight

    monkeypatch.chdir(tmp_path)
    (tmp_path / "flux1-dev.safetensors").write_bytes(b"{}")
    with pytest.raises(ModelError, match=r"model.config \(--model-config\) of 'flux1-dev.safetensors': model "
                                         r"'black-forest-labs/FLUX.1-dev': no such folder .* looks like a Hugging Face "
                                         r"Hub repo id, and sdbatch never downloads models: fetch it once \(hf download"):
        preflight("flux1-dev.safetensors", config="black-forest-labs/FLUX.1-dev")
