"""Image -> bytes (PNG / WebP / JPEG) with embedded generation metadata.

Pure pillow; no torch, no Ray.  Two pieces of metadata travel inside every image:

* the AUTOMATIC1111 ``parameters`` text ("infotext"), so existing viewers, civitai and
  A1111's own "PNG Info" tab read the prompt and settings::

      a red circle
      Negative prompt: blurry
      Steps: 20, Sampler: DDIM, CFG scale: 7.5, Seed: 123, Size: 64x64, Model hash: abcd1234, Model: shapes, Version: sdbatch 0.1.0

* the full sdbatch record as JSON (``json.dumps(record, sort_keys=True)``), which is the
  authoritative copy (it also holds passthrough columns and everything infotext cannot say).

Where each lives:

======  =====================================================  ===========================================
format  ``parameters`` text                                    JSON record
======  =====================================================  ===========================================
png     ``tEXt`` chunk ``parameters`` (``iTXt`` when the text   ``tEXt``/``iTXt`` chunk ``sdbatch``
        is not Latin-1, exactly as A1111 / pillow do)           (``ensure_ascii=False``; iTXt if non-Latin-1)
webp    EXIF ``UserComment`` (0x9286, Exif IFD):               EXIF ``ImageDescription`` (0x010E, IFD0),
jpeg    ``b"UNICODE\\0"`` + UTF-16BE (piexif's "unicode"        ASCII JSON (``ensure_ascii=True``, so the
        encoding, which is what A1111 writes)                  EXIF ASCII type holds it losslessly)
======  =====================================================  ===========================================

Sampler names: sdbatch scheduler names map to A1111 sampler names
(:data:`A1111_SAMPLER_NAMES`).  For ``dpmpp_2m_karras`` we write the *legacy* single name
``"DPM++ 2M Karras"`` (what A1111 < 1.9 wrote, and what A1111 >= 1.9 still parses through
its back-compat table), because every third-party parser understands it.
:func:`parse_infotext` also reads the newer split form ``Sampler: DPM++ 2M, Schedule type: Karras``.

Infotext ambiguity (inherent to the A1111 format, same as A1111): a prompt containing a line
that starts with ``Negative prompt:`` is read back as the start of the negative prompt.
The JSON record is exact in every case.

JPEG limit: a JPEG APP1 (EXIF) segment holds at most 65,533 bytes; a record too large for it
raises ``ValueError`` (WebP and PNG have no such limit).
"""

from __future__ import annotations

import io
import json
import re
import struct
from typing import Any

import numpy as np
from PIL import Image, PngImagePlugin

from sdbatch.data.columns import COLUMNS, Column
from sdbatch.data.hires import HIRES_UPSCALER
from sdbatch.data.samplers import SAMPLERS
from sdbatch.models.speed import infotext_value as speed_infotext

#: sdbatch scheduler name -> AUTOMATIC1111 sampler name (as written in infotext).
#: (The flow samplers share the diffusion ones' A1111 names, so only those are read back.)
A1111_SAMPLER_NAMES: dict[str, str] = {s.name: s.a1111 for s in SAMPLERS.values() if not s.flow}

# A1111 sampler name (lower-cased) -> sdbatch name; plus the "<name> Karras" legacy spellings.
_FROM_A1111: dict[str, str] = {v.lower(): k for k, v in A1111_SAMPLER_NAMES.items()}

_FMT_ALIASES = {"png": "png", "webp": "webp", "jpeg": "jpeg", "jpg": "jpeg"}
_EXTENSIONS = {"png": "png", "webp": "webp", "jpeg": "jpg"}

_PNG_PARAMS_KEY = "parameters"
_PNG_RECORD_KEY = "sdbatch"

_EXIF_IFD = 0x8769
_TAG_USER_COMMENT = 0x9286
_TAG_IMAGE_DESCRIPTION = 0x010E
_UC_UNICODE = b"UNICODE\x00"
_UC_ASCII = b"ASCII\x00\x00\x00"
_UC_JIS = b"JIS\x00\x00\x00\x00\x00"
_UC_UNDEFINED = b"\x00" * 8
_JPEG_MAX_EXIF = 65533


class MetadataTooLarge(ValueError):
    """A record that the image format's metadata segment cannot hold."""

# A1111's params regex (modules/infotext_utils.py): key, then a quoted or unquoted value.
_RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_RE_SIZE = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*$")
# Where the parameters that are not manifest columns go, in A1111's order (columns: columns.py).
_RANK_MODEL_HASH, _RANK_MODEL, _RANK_LORA_HASHES, _RANK_REFINER, _RANK_SPEED, _RANK_VERSION = 60, 61, 90, 91, 95, 100
_RANK_HIRES_UPSCALER = 73  # after "Hires upscale" and "Hires steps", as A1111 writes them
_RANK_CONTROLNET = 85
# A1111 label -> column, for the columns parse_infotext reads back as plain numbers.
_NUMERIC_LABELS = {c.a1111: c for c in COLUMNS if c.a1111 and c.name not in ("width", "scheduler")}
# guidance_scale's label by what it means for the model (the record's model_parameters.guidance):
# Forge's "Distilled CFG Scale" for a distilled guidance embedding (FLUX.1 [dev]), none for a
# model that uses no guidance ([schnell], [klein] distilled); "CFG scale" (the column's) otherwise.
DISTILLED_CFG_LABEL = "Distilled CFG Scale"
_GUIDANCE_LABEL: dict[str, str | None] = {"distilled": DISTILLED_CFG_LABEL, "none": None}


def _quote(v: Any) -> str:
    """A1111's ``quote``: json.dumps the value when it would not parse back bare.

    A1111 quotes on ',', ':' and newline; we also quote on '"', empty strings and
    leading/trailing whitespace (A1111's ``unquote`` reads all of these back).
    """
    s = str(v)  # a float's str round-trips exactly: 7.5 -> "7.5", 7.0 -> "7.0"
    if s == "" or s != s.strip() or any(c in s for c in ',:"\n\r'):
        return json.dumps(s, ensure_ascii=False)
    return s


def _unquote(s: str) -> str:
    if len(s) >= 2 and s[0] == '"' and s[-1] == '"':
        try:
            out = json.loads(s)
        except ValueError:
            return s
        return out if isinstance(out, str) else s
    return s


def _present(v: Any) -> bool:
    return v is not None and v != ""


def infotext(record: dict) -> str:
    """Format ``record`` as an AUTOMATIC1111 ``parameters`` string.

    Keys used: prompt (followed by the ``<lora:NAME:SCALE>`` tags of ``loras``, as A1111 writes
    them), negative_prompt, every column with an A1111 label in the column table (steps,
    scheduler — ``default``: the A1111 name of ``scheduler_config``'s class —, guidance_scale,
    seed, width/height, strength only when ``init_image`` is set, clip_skip only above 1; guidance_scale
    is Forge's ``Distilled CFG Scale`` for a distilled guidance embedding and left out where the
    model uses none, by ``model_parameters.guidance``),
    model_hash, model_name, the loras' ``Lora hashes``, the hires-fix pass (``Hires upscale``,
    ``Hires steps``, ``Hires upscaler``; ``Denoising strength`` is its strength), each ControlNet's
    ``ControlNet N`` (``Module: none, Model: NAME [HASH8], Weight: SCALE``, as A1111's ControlNet
    extension writes it), the refiner (``Refiner: NAME [HASH10]``;
    ``Refiner switch at`` is a column's label), the speed profile (``Speed profile: fast
    (fuse_qkv regional_compile)``, only when not exact), sdbatch_version.  Missing/None values are
    left out, as A1111 leaves out None.
    """
    loras = record.get("loras") or []
    prompt = " ".join([record.get("prompt") or "", *(f"<lora:{a['name']}:{a['scale']:g}>" for a in loras)])
    neg = record.get("negative_prompt") or ""

    guidance = (record.get("model_parameters") or {}).get("guidance")
    params = [(c.a1111_rank, label, c.a1111_value(record)) for c in COLUMNS
              if c.a1111 and c.a1111_value and (label := _a1111_label(c, guidance))]
    if _present(record.get("model_hash")):
        params.append((_RANK_MODEL_HASH, "Model hash", record["model_hash"]))
    if _present(record.get("model_name")):
        params.append((_RANK_MODEL, "Model", record["model_name"]))
    if loras:
        params.append((_RANK_LORA_HASHES, "Lora hashes",
                       ", ".join(f"{a['name']}: {str(a.get('sha256') or '')[:10]}" for a in loras)))
    for number, control in enumerate(record.get("controlnets") or []):  # as A1111's ControlNet extension writes it
        params.append((_RANK_CONTROLNET, f"ControlNet {number}", f"Module: none, Model: {control['name']} "
                       f"[{str(control.get('sha256') or '')[:8]}], Weight: {control['scale']:g}"))
    if _present(record.get("refiner_name")):  # A1111: "Refiner: NAME [HASH10]", then "Refiner switch at"
        params.append((_RANK_REFINER, "Refiner", f"{record['refiner_name']} [{str(record.get('refiner_fingerprint'))[:10]}]"))
    if record.get("hires_scale") is not None:  # the hires-fix pass's upscaler (data.hires)
        params.append((_RANK_HIRES_UPSCALER, "Hires upscaler", HIRES_UPSCALER))
    if record.get("speed"):  # not A1111's: the speed profile and the switches applied (none for exact)
        params.append((_RANK_SPEED, "Speed profile", speed_infotext(record["speed"])))
    if _present(record.get("sdbatch_version")):
        params.append((_RANK_VERSION, "Version", f"sdbatch {record['sdbatch_version']}"))
    params = sorted((p for p in params if p[2] is not None), key=lambda p: p[0])

    lines = [prompt]
    if neg:
        lines.append(f"Negative prompt: {neg}")
    lines.append(", ".join(f"{k}: {_quote(v)}" for _, k, v in params))
    return "\n".join(lines)


def _a1111_label(column: Column, guidance: str | None) -> str | None:
    if column.name == "guidance_scale" and guidance in _GUIDANCE_LABEL:
        return _GUIDANCE_LABEL[guidance]
    return column.a1111


def _parse_params(line: str) -> dict[str, str]:
    return {k.strip(): _unquote(v.strip()) for k, v in _RE_PARAM.findall(line)}


def parse_infotext(text: str) -> dict:
    """Parse an A1111 ``parameters`` string (ours or A1111's) into a dict.

    Returns ``prompt``, ``negative_prompt`` (``""`` when absent) and the params:
    steps (int), scheduler (sdbatch name; only for known samplers — the raw A1111 name is
    always kept under ``"Sampler"`` when it is unknown), guidance_scale (float; from ``Distilled
    CFG Scale`` where there is no ``CFG scale``), seed (int),
    width/height (int), strength (float), clip_skip (int), model_hash, model_name, sdbatch_version (when
    ``Version: sdbatch X``; other versions kept under ``"Version"``), and every other key
    verbatim (A1111 key name -> string).
    """
    lines = text.split("\n")
    # Drop trailing blank lines (a trailing newline after the params line).
    while len(lines) > 1 and lines[-1].strip() == "":
        lines.pop()
    params_line = ""
    last = lines[-1]
    # A1111: the last line is the params line when it has >= 3 params; ours starts "Steps: ".
    if last.lstrip().startswith("Steps: ") or len(_RE_PARAM.findall(last)) >= 3:
        params_line = last
        lines = lines[:-1]

    prompt_lines: list[str] = []
    neg_lines: list[str] = []
    in_neg = False
    for line in lines:
        if not in_neg and line.startswith("Negative prompt:"):
            in_neg = True
            rest = line[len("Negative prompt:"):]
            neg_lines.append(rest[1:] if rest.startswith(" ") else rest)
        elif in_neg:
            neg_lines.append(line)
        else:
            prompt_lines.append(line)

    out: dict[str, Any] = {"prompt": "\n".join(prompt_lines), "negative_prompt": "\n".join(neg_lines)}
    raw = _parse_params(params_line) if params_line else {}

    schedule_type = raw.pop("Schedule type", None)
    for key, val in raw.items():
        try:
            if key in _NUMERIC_LABELS:
                column = _NUMERIC_LABELS[key]
                out[column.name] = column.python_type(val)
            elif key == "Sampler":
                name = val
                if schedule_type and schedule_type.lower() not in ("automatic", "uniform", ""):
                    name = f"{val} {schedule_type}"
                sd = _FROM_A1111.get(name.lower())  # no fallback: "LMS"+"Karras" is not lms
                if sd is not None:
                    out["scheduler"] = sd
                else:
                    out["Sampler"] = val
            elif key == "Size":
                m = _RE_SIZE.match(val)
                if not m:
                    raise ValueError(val)
                out["width"], out["height"] = int(m.group(1)), int(m.group(2))
            elif key == "Model hash":
                out["model_hash"] = val
            elif key == "Model":
                out["model_name"] = val
            elif key == "Version" and val.startswith("sdbatch "):
                out["sdbatch_version"] = val[len("sdbatch "):]
            else:
                out[key] = val
        except ValueError:
            out[key] = val  # malformed known key: keep it verbatim rather than fail
    if schedule_type is not None and "scheduler" not in out:
        out["Schedule type"] = schedule_type
    if "guidance_scale" not in out and DISTILLED_CFG_LABEL in out:  # ours for FLUX.1 [dev] (Forge adds "CFG scale: 1")
        try:
            out["guidance_scale"] = float(out.pop(DISTILLED_CFG_LABEL))
        except ValueError:
            pass  # kept verbatim, like any malformed known key
    return out


def _norm_fmt(fmt: str) -> str:
    f = _FMT_ALIASES.get(str(fmt).lower())
    if f is None:
        raise ValueError(f"unknown image format {fmt!r}; expected one of png, webp, jpeg")
    return f


def extension(fmt: str) -> str:
    """File extension (no dot) for an image format: png -> png, webp -> webp, jpeg/jpg -> jpg."""
    return _EXTENSIONS[_norm_fmt(fmt)]


def _user_comment(text: str) -> bytes:
    return _UC_UNICODE + text.encode("utf-16-be")


def _exif_bytes(description: str, user_comment: bytes) -> bytes:
    """A minimal big-endian EXIF block: IFD0 {ImageDescription (ASCII), ExifIFD pointer},
    Exif IFD {UserComment (UNDEFINED)}.

    Written by hand because pillow's ``Exif.tobytes`` stores a bytes UserComment as type
    BYTE, which piexif (and so A1111's reader) does not decode; the spec type is UNDEFINED.
    """
    desc = description.encode("ascii") + b"\x00"

    def entry(tag: int, typ: int, count: int, payload: bytes, data_at: int) -> tuple[bytes, bytes]:
        if len(payload) <= 4:
            return struct.pack(">HHI", tag, typ, count) + payload.ljust(4, b"\x00"), b""
        return struct.pack(">HHII", tag, typ, count, data_at), payload + (b"\x00" if len(payload) % 2 else b"")

    ifd0_at = 8
    ifd0_size = 2 + 2 * 12 + 4
    desc_at = ifd0_at + ifd0_size
    e_desc, d_desc = entry(_TAG_IMAGE_DESCRIPTION, 2, len(desc), desc, desc_at)
    exif_ifd_at = desc_at + len(d_desc)
    e_ptr, _ = entry(_EXIF_IFD, 4, 1, struct.pack(">I", exif_ifd_at), 0)
    uc_at = exif_ifd_at + 2 + 12 + 4
    e_uc, d_uc = entry(_TAG_USER_COMMENT, 7, len(user_comment), user_comment, uc_at)
    tiff = (
        b"MM\x00\x2a" + struct.pack(">I", ifd0_at)
        + struct.pack(">H", 2) + e_desc + e_ptr + struct.pack(">I", 0) + d_desc
        + struct.pack(">H", 1) + e_uc + struct.pack(">I", 0) + d_uc
    )
    return b"Exif\x00\x00" + tiff


def _decode_user_comment(raw: Any) -> str | None:
    if raw is None:
        return None
    if isinstance(raw, str):
        return raw
    raw = bytes(raw)
    head, body = raw[:8], raw[8:]
    if head == _UC_UNICODE:
        # piexif (A1111) writes UTF-16BE; tolerate a BOM from other writers.
        if body[:2] == b"\xff\xfe":
            return body[2:].decode("utf-16-le", errors="replace")
        if body[:2] == b"\xfe\xff":
            body = body[2:]
        return body.decode("utf-16-be", errors="replace")
    if head in (_UC_ASCII, _UC_UNDEFINED, _UC_JIS):
        return body.decode("utf-8", errors="replace").rstrip("\x00")
    return raw.decode("utf-8", errors="ignore").rstrip("\x00")


def encode_image(
    image: Image.Image | np.ndarray,
    record: dict,
    *,
    fmt: str = "png",
    png_compress_level: int = 1,
    quality: int = 95,
) -> bytes:
    """Encode ``image`` to bytes in ``fmt`` with ``infotext(record)`` and the JSON record embedded.

    Deterministic: the same image and record give identical bytes. ``image`` may be a PIL image
    or an (h, w, 3) uint8 array (as ``Generator.generate`` returns them).
    png: ``png_compress_level`` 0..9 (1 = fast). jpeg: converted to RGB, ``quality`` 1..100.
    webp: ``quality`` 1..100, lossless when ``quality == 100``.
    """
    f = _norm_fmt(fmt)
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    params = infotext(record)
    buf = io.BytesIO()
    if f == "png":
        if not 0 <= int(png_compress_level) <= 9:
            raise ValueError(f"png_compress_level must be 0..9, got {png_compress_level!r}")
        info = PngImagePlugin.PngInfo()
        # add_text writes tEXt when Latin-1 encodable, else (uncompressed) iTXt — as A1111.
        info.add_text(_PNG_PARAMS_KEY, params)
        info.add_text(_PNG_RECORD_KEY, json.dumps(record, sort_keys=True, ensure_ascii=False))
        image.save(buf, format="PNG", pnginfo=info, compress_level=int(png_compress_level), optimize=False)
        return buf.getvalue()

    if not 1 <= int(quality) <= 100:
        raise ValueError(f"quality must be 1..100, got {quality!r}")
    exif_bytes = _exif_bytes(json.dumps(record, sort_keys=True, ensure_ascii=True), _user_comment(params))

    if f == "jpeg":
        if len(exif_bytes) > _JPEG_MAX_EXIF:
            raise MetadataTooLarge(
                f"metadata too large for a JPEG EXIF segment ({len(exif_bytes)} > {_JPEG_MAX_EXIF} bytes);"
                " use png or webp for this record"
            )
        im = image if image.mode == "RGB" else image.convert("RGB")
        im.save(buf, format="JPEG", quality=int(quality), exif=exif_bytes)
    else:  # webp
        im = image if image.mode in ("RGB", "RGBA") else image.convert("RGB")
        if int(quality) == 100:
            im.save(buf, format="WEBP", lossless=True, quality=100, exif=exif_bytes)
        else:
            im.save(buf, format="WEBP", quality=int(quality), exif=exif_bytes)
    return buf.getvalue()


def _load_record(s: Any) -> dict | None:
    if not isinstance(s, (str, bytes)):
        return None
    try:
        rec = json.loads(s)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


def read_embedded(data: bytes) -> tuple[str | None, dict | None]:
    """Return ``(parameters text, sdbatch JSON record)`` embedded in PNG / WebP / JPEG bytes.

    Either may be None (e.g. an A1111 PNG has ``parameters`` but no record).  Pixels are
    not decoded except, for PNGs whose text chunks follow the image data, to reach them.
    """
    with Image.open(io.BytesIO(data)) as im:
        if im.format == "PNG":
            info = dict(im.info)
            if _PNG_PARAMS_KEY not in info and _PNG_RECORD_KEY not in info:
                info = dict(getattr(im, "text", {}) or {})  # chunks after IDAT
            params = info.get(_PNG_PARAMS_KEY)
            rec = _load_record(info.get(_PNG_RECORD_KEY))
            return (str(params) if params is not None else None), rec
        exif = im.getexif()
        params = _decode_user_comment(exif.get_ifd(_EXIF_IFD).get(_TAG_USER_COMMENT))
        rec = _load_record(exif.get(_TAG_IMAGE_DESCRIPTION))
        if params is None and "parameters" in im.info:  # e.g. a PNG-style comment elsewhere
            params = str(im.info["parameters"])
        return params, rec
