"""Pre-quantized folders read from their configs alone (models.quantized): what each component's
``quantization_config`` says in words, what an image records, and the refusals with their fix;
and the spec's ``model.text_encoder_device`` against ``model.offload``."""

from __future__ import annotations

import json
from importlib.util import find_spec

import pytest

from sdbatch.models.configs import folder_json_reader
from sdbatch.models.errors import ModelError
from sdbatch.models.quantized import check_loadable, describe, read_quantizations, recorded

BNB_4BIT = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
TORCHAO = {"quant_method": "torchao", "quant_type": {"default": {"_type": "Int8WeightOnlyConfig", "_data": {}}}}


def write_folder(root, **quantization):
    """A model_index.json naming a transformer, a text encoder and a VAE, each with a config.json;
    ``quantization``: component -> its quantization_config."""
    (root / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "FluxPipeline",
                "transformer": ["diffusers", "FluxTransformer2DModel"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "scheduler": [None, None],
            }
        )
    )
    for name in ("transformer", "text_encoder", "vae"):
        (root / name).mkdir()
        config = {"_class_name": name, **({"quantization_config": quantization[name]} if name in quantization else {})}
        (root / name / "config.json").write_text(json.dumps(config))
    return folder_json_reader(root)


@pytest.mark.parametrize(
    ("config", "words"),
    [
        (BNB_4BIT, "transformer: bitsandbytes 4-bit nf4"),
        ({"quant_method": "bitsandbytes", "load_in_8bit": True}, "transformer: bitsandbytes 8-bit"),
        (TORCHAO, "transformer: torchao Int8WeightOnlyConfig (8-bit)"),
        ({"quant_method": "torchao", "quant_type": "int4wo"}, "transformer: torchao int4wo (4-bit)"),
        ({"quant_method": "gguf", "compute_dtype": "bfloat16"}, "transformer: gguf"),
    ],
)
def test_a_quantization_config_in_words(config, words):
    assert str(describe("transformer", config)) == words


def test_the_quantized_components_of_a_folder_and_their_record(tmp_path):
    read = write_folder(tmp_path, transformer=TORCHAO, text_encoder=BNB_4BIT)
    found = read_quantizations(read)
    assert [q.component for q in found] == ["transformer", "text_encoder"]
    record = recorded(found)
    assert record["quantized"] == "text_encoder: bitsandbytes 4-bit nf4, transformer: torchao Int8WeightOnlyConfig (8-bit)"
    assert set(record) - {"quantized"} == {p for p in ("torchao", "bitsandbytes") if find_spec(p)}
    (tmp_path / "plain").mkdir()
    assert read_quantizations(write_folder(tmp_path / "plain")) == ()
    assert recorded(()) == {}


def test_refusals_name_the_folder_the_method_and_the_fix(tmp_path):
    read = write_folder(tmp_path, transformer={"quant_method": "quanto", "weights_dtype": "int8"})
    with pytest.raises(ModelError, match=r"model '/m': its transformer is saved quantized by 'quanto'.*bitsandbytes and torchao"):
        check_loadable("/m", read_quantizations(read), None)
    bnb = (describe("transformer", BNB_4BIT),)
    with pytest.raises(ModelError, match=r"transformer \(bitsandbytes 4-bit nf4\) loads on a CUDA GPU only.*--gpus-per-worker 1"):
        check_loadable("/m", bnb, "this worker runs on cpu")
    if find_spec("torchao") is not None:
        check_loadable("/m", (describe("transformer", TORCHAO),), "this worker runs on cpu")  # torchao loads on a CPU
    if find_spec("bitsandbytes") is None:
        with pytest.raises(ModelError, match=r"needs the bitsandbytes package >= 0.43.3.*not installed: pip install 'sdbatch\[quantized\]'"):
            check_loadable("/m", bnb, None)  # a GPU worker: the package is what is missing


def test_the_text_encoder_device_is_refused_with_offload_and_fingerprinted():
    from sdbatch.spec import load_spec

    with pytest.raises(Exception, match=r"model.offload=model already moves the text encoders.*model.text_encoder_device=same"):
        load_spec(None, ["model.offload=model", "model.text_encoder_device=cpu", "model.device=cuda"], {})
    same, cpu = (load_spec(None, [f"model.text_encoder_device={d}"], {}) for d in ("same", "cpu"))
    assert "text_encoder_device" not in same.fingerprint_fields()  # jobs from before it keep their fingerprint
    assert cpu.fingerprint_fields()["text_encoder_device"] == "cpu"
