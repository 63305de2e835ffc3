"""sdbatch.output.encode: image bytes with A1111 infotext + JSON record, per format."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from sdbatch.output.encode import A1111_SAMPLER_NAMES, encode_image, extension, infotext, parse_infotext, read_embedded

# Lossy tolerances on a smooth 64x64 test image (measured: jpeg q95 mean abs ~0.6, jpeg q75 ~1.25, webp q90 ~1.3).
LOSSY_MEAN_ABS_TOL = 4.0


def _record(**kw) -> dict:
    r = {
        "id": "row-1",
        "prompt": "a red circle",
        "negative_prompt": "blurry",
        "steps": 20,
        "scheduler": "ddim",
        "guidance_scale": 7.5,
        "seed": 123,
        "width": 64,
        "height": 64,
        "model_hash": "abcd1234",
        "model_name": "shapes",
        "sdbatch_version": "0.1.0",
        "init_image": None,
        "strength": None,
        "label": {"shape": "circle", "tags": [1, 2.5, None, True]},
    }
    r.update(kw)
    return r


def _smooth(w=64, h=64) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) * 255 // (w + h - 2)], -1)
    return Image.fromarray(a.astype(np.uint8), "RGB")


def _noise(w=64, h=64, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def _pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


# --- infotext ------------------------------------------------------------------------------------


def test_infotext_exact_format():
    assert infotext(_record()) == (
        "a red circle\nNegative prompt: blurry\n"
        "Steps: 20, Sampler: DDIM, CFG scale: 7.5, Seed: 123, Size: 64x64, "
        "Model hash: abcd1234, Model: shapes, Version: sdbatch 0.1.0"
    )


def test_infotext_float_formatting_and_empty_negative():
    t = infotext(_record(guidance_scale=7.0, negative_prompt=""))
    assert "CFG scale: 7.0," in t
    assert "Negative prompt" not in t
    assert t.split("\n") == ["a red circle", t.split("\n")[1]] and t.split("\n")[1].startswith("Steps: 20,")
    assert "CFG scale: 7.0," in infotext(_record(guidance_scale=7))  # int guidance prints as A1111's float


def test_infotext_names_guidance_by_what_it_means_for_the_model():
    """FLUX.1 [dev]'s guidance embedding is Forge's "Distilled CFG Scale" (no "CFG scale"); a model
    that uses no guidance ([schnell]) writes none; true CFG (Qwen-Image) stays "CFG scale"."""
    dev = infotext(_record(guidance_scale=3.5, negative_prompt="", model_parameters={"guidance": "distilled"}))
    assert dev.split("\n")[1].startswith("Steps: 20, Sampler: DDIM, Distilled CFG Scale: 3.5, Seed: 123,")
    assert "CFG scale" not in dev and parse_infotext(dev)["guidance_scale"] == 3.5
    schnell = infotext(_record(guidance_scale=0.0, negative_prompt="", model_parameters={"guidance": "none"}))
    assert "CFG" not in schnell and "guidance_scale" not in parse_infotext(schnell)
    assert "CFG scale: 4.0," in infotext(_record(guidance_scale=4.0, model_parameters={"guidance": "true_cfg"}))
    forge = parse_infotext("a cat\nSteps: 20, Sampler: Euler, CFG scale: 1, Distilled CFG Scale: 3.5, Seed: 1")
    assert (forge["guidance_scale"], forge["Distilled CFG Scale"]) == (1.0, "3.5")  # Forge's own: both kept


def test_strength_only_with_init_image():
    assert "Denoising strength" not in infotext(_record(strength=0.6))
    t = infotext(_record(init_image="init/a.png", strength=0.6))
    assert "Denoising strength: 0.6" in t
    assert parse_infotext(t)["strength"] == 0.6


@pytest.mark.parametrize("sched", sorted(A1111_SAMPLER_NAMES))
def test_sampler_names_round_trip(sched):
    t = infotext(_record(scheduler=sched))
    assert f"Sampler: {A1111_SAMPLER_NAMES[sched]}," in t
    assert parse_infotext(t)["scheduler"] == sched


def test_a1111_sampler_names():
    assert A1111_SAMPLER_NAMES == {
        "ddim": "DDIM", "pndm": "PLMS", "lms": "LMS", "euler": "Euler", "euler_a": "Euler a",
        "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_karras": "DPM++ 2M Karras", "unipc": "UniPC",
    }


PROMPTS = [
    ("a red circle", "blurry"),
    ("a, b, c: d", 'no "quotes", please: ok'),
    ('say "hi"', ""),
    ("line one\nline two\n\nline four", "neg one\nneg two"),
    ("Steps: 5 is in the prompt\nand more", "Steps: 7, Sampler: x, Seed: 1"),
    ("猫が好き, 日本語: テスト", "负面提示"),
    ("emoji 🎉🐱‍👤 party", "😡"),
    ("  leading and trailing spaces  ", " x "),
    ("", ""),
    ("trailing newline\n", ""),
]


@pytest.mark.parametrize("prompt,neg", PROMPTS)
def test_parse_infotext_round_trip(prompt, neg):
    r = _record(prompt=prompt, negative_prompt=neg, init_image="i.png", strength=0.35,
                model_name='shapes, "v1": tiny', model_hash="")
    p = parse_infotext(infotext(r))
    assert p["prompt"] == prompt
    assert p["negative_prompt"] == neg
    for k in ("steps", "scheduler", "guidance_scale", "seed", "width", "height", "model_name",
              "strength", "sdbatch_version"):
        assert p[k] == r[k], k
    assert type(p["steps"]) is int and type(p["seed"]) is int and type(p["guidance_scale"]) is float
    assert "model_hash" not in p  # empty values are omitted, as A1111 omits None


def test_parse_hand_written_a1111_sample():
    text = (
        "masterpiece, best quality, (a cat:1.2) sitting on a chair,\n"
        "<lora:foo:0.8>\n"
        "Negative prompt: lowres, bad anatomy,\n"
        "watermark\n"
        "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 3456789012, "
        'Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.45, '
        'Clip skip: 2, Lora hashes: "foo: 0123456789ab", '
        'TI hashes: "bad_embed: abcdef, other: 1234", Version: v1.10.1'
    )
    p = parse_infotext(text)
    assert p["prompt"] == "masterpiece, best quality, (a cat:1.2) sitting on a chair,\n<lora:foo:0.8>"
    assert p["negative_prompt"] == "lowres, bad anatomy,\nwatermark"
    assert p["steps"] == 28
    assert p["scheduler"] == "dpmpp_2m_karras"
    assert p["guidance_scale"] == 7.0
    assert p["seed"] == 3456789012
    assert (p["width"], p["height"]) == (512, 768)
    assert p["model_hash"] == "6ce0161689"
    assert p["model_name"] == "v1-5-pruned-emaonly"
    assert p["strength"] == 0.45
    assert p["clip_skip"] == 2  # a column since clip_skip exists (columns.py)
    assert p["Lora hashes"] == "foo: 0123456789ab"
    assert p["TI hashes"] == "bad_embed: abcdef, other: 1234"
    assert p["Version"] == "v1.10.1"
    assert "sdbatch_version" not in p


def test_parse_a1111_legacy_and_automatic_schedule():
    p = parse_infotext("cat\nSteps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 1, Size: 64x64")
    assert p["scheduler"] == "euler_a" and p["negative_prompt"] == ""
    p = parse_infotext("cat\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1, Size: 64x64\n")
    assert p["scheduler"] == "dpmpp_2m_karras" and p["prompt"] == "cat"
    p = parse_infotext("cat\nSteps: 20, Sampler: Heun, CFG scale: 7, Seed: 1, Size: 64x64")
    assert "scheduler" not in p and p["Sampler"] == "Heun"
    p = parse_infotext("cat\nSteps: 20, Sampler: LMS, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 64x64")
    assert "scheduler" not in p and (p["Sampler"], p["Schedule type"]) == ("LMS", "Karras")


def test_parse_prompt_only():
    assert parse_infotext("just a prompt") == {"prompt": "just a prompt", "negative_prompt": ""}


# --- encode / read_embedded ----------------------------------------------------------------------


def test_extension():
    assert [extension(f) for f in ("png", "webp", "jpeg", "jpg", "PNG")] == ["png", "webp", "jpg", "jpg", "png"]
    with pytest.raises(ValueError):
        extension("gif")
    with pytest.raises(ValueError):
        encode_image(_smooth(), _record(), fmt="bmp")


UNICODE_RECORD = dict(prompt='猫, "cat": 🎉\nline 2', negative_prompt="😡, bad", init_image="x.png", strength=0.7)


@pytest.mark.parametrize("extra", [{}, UNICODE_RECORD], ids=["ascii", "unicode"])
def test_png_round_trip(extra):
    r = _record(**extra)
    im = _noise()
    data = encode_image(im, r)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.array_equal(_pixels(data), np.asarray(im, dtype=np.int16))
    params, rec = read_embedded(data)
    assert params == infotext(r)
    assert rec == r
    with Image.open(io.BytesIO(data)) as png:
        assert png.info["parameters"] == infotext(r)  # what A1111/viewers read
        assert json.loads(png.info["sdbatch"]) == r
    # Latin-1 text -> tEXt; non-Latin-1 -> iTXt (as A1111 via pillow's add_text).
    assert (b"tEXt" + b"parameters\x00" in data) == (not extra)
    assert (b"iTXt" + b"parameters\x00" in data) == bool(extra)


@pytest.mark.parametrize("fmt,quality", [("webp", 90), ("jpeg", 95), ("jpeg", 75)])
@pytest.mark.parametrize("extra", [{}, UNICODE_RECORD], ids=["ascii", "unicode"])
def test_lossy_round_trip(fmt, quality, extra):
    r = _record(**extra)
    im = _smooth()
    data = encode_image(im, r, fmt=fmt, quality=quality)
    with Image.open(io.BytesIO(data)) as dec:
        assert dec.format == {"webp": "WEBP", "jpeg": "JPEG"}[fmt]
        assert dec.size == im.size
        # A1111 layout: EXIF UserComment (Exif IFD), "UNICODE\0" + UTF-16BE.
        uc = dec.getexif().get_ifd(0x8769)[0x9286]
        assert uc == b"UNICODE\x00" + infotext(r).encode("utf-16-be")
        assert json.loads(dec.getexif()[0x010E]) == r
    diff = np.abs(_pixels(data) - np.asarray(im, dtype=np.int16))
    assert diff.mean() < LOSSY_MEAN_ABS_TOL
    params, rec = read_embedded(data)
    assert params == infotext(r)
    assert rec == r


def test_webp_quality_100_is_lossless():
    im = _noise()
    data = encode_image(im, _record(), fmt="webp", quality=100)
    assert np.array_equal(_pixels(data), np.asarray(im, dtype=np.int16))
    assert read_embedded(data)[1] == _record()


def test_jpeg_converts_rgba_and_l():
    for mode in ("RGBA", "L"):
        data = encode_image(_smooth().convert(mode), _record(), fmt="jpeg")
        with Image.open(io.BytesIO(data)) as dec:
            assert dec.mode == "RGB"


@pytest.mark.parametrize("fmt", ["png", "webp", "jpeg"])
def test_deterministic_bytes(fmt):
    r = _record(**UNICODE_RECORD)
    a = encode_image(_noise(), r, fmt=fmt)
    b = encode_image(_noise(), dict(reversed(list(r.items()))), fmt=fmt)  # key order irrelevant
    assert a == b
    assert a != encode_image(_noise(), _record(seed=124), fmt=fmt)


def test_png_compress_levels_both_decode():
    im = _noise(512, 512, seed=1)
    fast = encode_image(im, _record(), png_compress_level=1)
    small = encode_image(im, _record(), png_compress_level=9)
    expect = np.asarray(im, dtype=np.int16)
    assert np.array_equal(_pixels(fast), expect) and np.array_equal(_pixels(small), expect)
    with pytest.raises(ValueError):
        encode_image(im, _record(), png_compress_level=10)


def test_read_a1111_png_parameters_only():
    text = "a cat\nNegative prompt: dog\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 64x64, Model hash: 6ce0161689"
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    buf = io.BytesIO()
    _smooth().save(buf, format="PNG", pnginfo=info)
    assert read_embedded(buf.getvalue()) == (text, None)


def test_read_plain_images_have_nothing():
    for fmt in ("PNG", "JPEG", "WEBP"):
        buf = io.BytesIO()
        _smooth().save(buf, format=fmt)
        assert read_embedded(buf.getvalue()) == (None, None)


def test_jpeg_too_large_metadata_is_a_clear_error():
    r = _record(prompt="🎉" * 4000, negative_prompt="😡" * 4000)
    with pytest.raises(ValueError, match="too large for a JPEG"):
        encode_image(_smooth(), r, fmt="jpeg")
    assert read_embedded(encode_image(_smooth(), r, fmt="webp"))[1] == r  # WebP has no such limit
