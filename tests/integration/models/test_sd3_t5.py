"""SD3 with its T5 encoder present (issue 14; tests/test_model_families.py runs SD3 without it
through the CLI): a tiny random-weight folder with a T5EncoderModel and a T5 tokenizer built
from configs, loaded in process: the encoder is loaded, used, deterministic, and pinned."""

from __future__ import annotations

import json
import shutil

import numpy as np


def test_sd3_with_t5_renders_uses_and_pins_the_encoder(tmp_path):
    from integration.model_families import NATIVE, build_sd3
    from sdbatch.data.row import Row
    from sdbatch.models.pins import fingerprint_model_dir
    from sdbatch.models.resolve import preflight
    from sdbatch.models.runtime import load_model

    model = build_sd3(tmp_path / "sd3", t5=True)
    ref = preflight(str(model))
    assert ref.traits.family.class_name == "StableDiffusion3Pipeline" and ref.traits.native_width == NATIVE["sd3"]
    gen = load_model(str(model), device="cpu")
    assert type(gen.txt2img.text_encoder_3).__name__ == "T5EncoderModel"
    native = Row(0, "x", "a red circle", "", 1, 2, 5.0, NATIVE["sd3"], NATIVE["sd3"], "default")
    explicit = Row(1, "y", "a blue square", "", 2, 2, 5.0, 80, 64, "default")
    with_t5 = gen.generate([native]).pixels[0]
    assert with_t5.shape == (NATIVE["sd3"], NATIVE["sd3"], 3) and gen.generate([explicit]).pixels[0].shape == (64, 80, 3)
    assert np.array_equal(gen.generate([native]).pixels[0], with_t5)  # deterministic: reproduce holds
    gen.txt2img.text_encoder_3 = None  # diffusers then gives the transformer zeros for the T5 tokens
    assert np.abs(with_t5.astype(int) - gen.generate([native]).pixels[0]).max() > 0
    copy = shutil.copytree(model, tmp_path / "sd3-copy")
    config = copy / "tokenizer_3" / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "model_max_length": 64}))
    assert ref.pin == fingerprint_model_dir(model) != fingerprint_model_dir(copy)  # the T5 files are pinned
