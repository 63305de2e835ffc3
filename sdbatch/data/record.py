"""The image record: everything needed to regenerate one image, in one type.

An ``ImageRecord`` is made by the worker for every generated image (``from_row``), embedded
in the image as JSON (``to_embedded``; ``encode`` writes it), flattened into the row's entry
of the shard index (``to_index_row``), and read back by ``verify``/``reproduce`` from either
(``from_embedded``, ``from_index_row``). The row's own parameters are the column table's
(``columns.COLUMNS``, through ``manifest.Row``); the generation facts the index stores are
``INDEXED`` (a part of ``columns.RESULT_COLUMNS``); the rest of the record (model name and
family, sampler config, size conditioning, sdbatch version) follows from the model and the
job, so the index leaves it out and ``from_index_row`` takes it from the loaded model's
``GenerationFacts`` (a plain value: ``LoadedModel.facts(row)``).

Nothing that varies between attempts (times, worker, attempt number) or with other rows of
the job goes in, so the bytes are reproducible and a row's image depends on that row (and its
batch) alone. The embedded JSON keeps the keys images have always carried. Pure: no torch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import sdbatch
from sdbatch.data.columns import BATCH_KEY, COLUMN, COLUMNS, KNOWN_COLUMNS, record_parameters
from sdbatch.data.index import INDEX_RESULT_COLUMNS, INDEXED, RESERVED_COLUMNS
from sdbatch.data.row import Row


@dataclass(frozen=True)
class GenerationFacts:
    """What the loaded model says about how one row's image is generated: the record's fields
    that follow from the model, not from the row or its batch."""

    model_name: str
    model_family: str  # model_index.json _class_name
    model_fingerprint: str
    device: str
    dtype: str
    versions: dict[str, str]
    torch_threads: int | None
    scheduler_config: dict[str, Any]  # the sampler's full config as used
    size_conditioning: dict[str, list]  # SDXL's micro-conditioning; empty for other families
    loras: tuple[dict[str, Any], ...]  # the row's adapters: name, scale, sha256 of the file loaded
    prompt_truncated_at: int | None  # the prompt character where the text encoder stopped reading
    refiner_name: str | None = None  # model.refiner, for a row it refined
    refiner_fingerprint: str | None = None
    #: what the parameters mean for the model (``ModelTraits.recorded``: guidance kind,
    #: max_sequence_length, variant); empty for the SD families
    model_parameters: dict[str, Any] = field(default_factory=dict)
    speed: dict[str, Any] | None = None  # the speed profile as applied (models.speed.AppliedSpeed); None: exact
    #: "a1111" where the row's prompt or negative was read by AUTOMATIC1111's rules as more than
    #: its text (emphasis, BREAK, 75-token chunks: models.prompt_weights); None: read as written
    prompt_syntax: str | None = None
    controlnets: tuple[dict[str, Any], ...] = ()  # the row's ControlNets: name, scale, sha256 (folder fingerprint)

    def as_fields(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def row_from_stored(stored: dict[str, Any], extra: dict[str, Any] | None = None) -> Row:
    """The Row of a record or an index row (a column missing there — older jobs — is its default)."""
    return Row(index=int(stored["row"]), extra=dict(extra or {}), **{c.name: c.coerce(stored.get(c.name)) for c in COLUMNS})


def passthrough_of(entry: dict[str, Any]) -> dict[str, Any]:
    """An index row's passthrough columns: every column that is neither per-row nor the index's own."""
    return {k: v for k, v in entry.items() if k not in KNOWN_COLUMNS and k not in RESERVED_COLUMNS}


def image_sha256_fields(loaded: dict[str, list[tuple[Any, str]]]) -> dict[str, Any]:
    """The record fields (``ImageRecord.from_row``'s ``COLUMN_sha256``) of a row's conditioning
    images as read: column → (image, sha256 hex) of each image it names; a column of several
    images (control_image) records the tuple of their hashes."""
    return {f"{column}_sha256": tuple(sha for _, sha in images) if COLUMN[column].several_images else images[0][1]
            for column, images in loaded.items()}


@dataclass(frozen=True)
class ConditioningInputs:
    """A batch's conditioning images as ``generate`` takes them: per row, in the batch's order,
    its init image, mask, control images (one per ControlNet, or one for all) and IP-Adapter
    reference image. A kind the batch does not take is None (a text-to-image batch: all four)."""

    init_images: tuple[Any, ...] | None = None
    masks: tuple[Any, ...] | None = None
    control_images: tuple[tuple[Any, ...], ...] | None = None
    ip_adapter_images: tuple[Any, ...] | None = None

    def pick(self, positions: Sequence[int]) -> ConditioningInputs:
        """The conditioning of the rows at ``positions`` of the batch, in that order: a group or
        a part of the batch, or its rows repeated."""
        return ConditioningInputs(**{f.name: None if (per_row := getattr(self, f.name)) is None
                                     else tuple(per_row[i] for i in positions) for f in fields(self)})


#: the conditioning of a text-to-image batch: no image of any kind
NO_CONDITIONING = ConditioningInputs()


def conditioning_inputs(rows: Sequence[Row], loaded: Sequence[dict[str, list[tuple[Any, str]]]]) -> ConditioningInputs:
    """The conditioning of a canonical batch's ``rows`` from each row's images as read (column →
    (image, sha256 hex) of each image it names); a kind is given where the batch's rows take it."""
    if not rows:
        return NO_CONDITIONING
    first = rows[0]  # a canonical batch's rows share the columns that decide each kind

    def firsts(column: str) -> tuple[Any, ...]:
        return tuple(images[0][0] if (images := row_images.get(column)) else None for row_images in loaded)

    return ConditioningInputs(
        init_images=firsts("init_image") if first.is_img2img else None,
        masks=firsts("mask_image") if first.is_inpaint else None,
        control_images=tuple(tuple(image for image, _ in row_images.get("control_image", ())) for row_images in loaded)
        if first.controlnet is not None else None,
        ip_adapter_images=firsts("ip_adapter_image") if first.ip_adapter_scale is not None else None,
    )


def index_row(row: Row, shard_name: str, record: ImageRecord | None = None, **result: Any) -> dict[str, Any]:
    """One row of the shard index: the row's parameters, the record's indexed facts (none for a
    row that failed before it had a record), the ``result`` columns, the passthrough columns.
    Every row has every column (None where it does not apply), so ok and failed rows share one
    schema whichever comes first."""
    entry: dict[str, Any] = {**row.parameters(), **dict.fromkeys(INDEX_RESULT_COLUMNS), "shard": shard_name}
    if record is not None:
        entry.update(
            {name: getattr(record, name) for name in INDEXED},
            batch_rows=list(record.batch_rows),
            versions=json.dumps(record.versions, sort_keys=True),
            loras=[dict(a) for a in record.loras],
            controlnets=[dict(c) for c in record.controlnets],
            control_image_sha256=list(record.control_image_sha256),
        )
    entry.update(result)
    entry.update(row.extra)
    return entry


@dataclass(frozen=True)
class ImageRecord:
    row: Row  # the row's parameters (``id``, ``row``, every column) and passthrough columns (``extra``)
    shard: str
    batch_id: str
    batch_rows: tuple[str, ...]  # the ids of the batch the image was generated in, in batch order
    loras: tuple[dict[str, Any], ...]  # the row's adapters: name, scale, sha256 of the file loaded
    prompt_truncated_at: int | None  # the prompt character where the text encoder stopped reading
    init_image_sha256: str | None  # img2img: of the init image's bytes as read
    model_fingerprint: str
    device: str
    dtype: str
    versions: dict[str, str]
    torch_threads: int | None
    # not in the index: these follow from the model and the job
    model_name: str
    model_family: str
    scheduler_config: dict[str, Any]
    size_conditioning: dict[str, list] = field(default_factory=dict)  # SDXL's; empty for other families
    sdbatch_version: str | None = sdbatch.__version__
    # model.refiner, for a row it refined (``refiner_switch`` set); the name follows from the job
    refiner_name: str | None = None
    refiner_fingerprint: str | None = None
    model_parameters: dict[str, Any] = field(default_factory=dict)  # GenerationFacts.model_parameters
    # the job's speed profile as this worker applied it (one per job, so the index leaves it out);
    # None for exact, whose images carry no such key
    speed: dict[str, Any] | None = None
    prompt_syntax: str | None = None  # GenerationFacts.prompt_syntax; images read literally carry no such key
    mask_image_sha256: str | None = None  # inpainting: of the mask's bytes as read (images without one lack the key)
    # a ControlNet row's ControlNets (name, scale, folder fingerprint) and control images' sha256 as
    # read, in order; empty otherwise (and then left out of the embedded record)
    controlnets: tuple[dict[str, Any], ...] = ()
    control_image_sha256: tuple[str, ...] = ()
    # an IP-Adapter row's reference image's sha256 as read (images without one lack the key)
    ip_adapter_image_sha256: str | None = None

    @property
    def model_hash(self) -> str:
        """A1111-style 10-hex model hash."""
        return self.model_fingerprint[:10]

    @classmethod
    def from_row(cls, row: Row, shard_name: str, batch: str, batch_rows: list[str], facts: GenerationFacts,
                 init_image_sha256: str | None = None, mask_image_sha256: str | None = None,
                 control_image_sha256: tuple[str, ...] = (), ip_adapter_image_sha256: str | None = None) -> ImageRecord:
        """The record of ``row``'s image, generated in batch ``batch`` (``batch_rows``, in order)
        of shard ``shard_name`` by the model whose ``facts`` for the row these are."""
        return cls(row=row, shard=shard_name, batch_id=batch, batch_rows=tuple(batch_rows),
                   init_image_sha256=init_image_sha256, mask_image_sha256=mask_image_sha256,
                   control_image_sha256=tuple(control_image_sha256), ip_adapter_image_sha256=ip_adapter_image_sha256,
                   **facts.as_fields())

    @classmethod
    def from_index_row(cls, entry: dict[str, Any], facts: GenerationFacts, *, model_name: str,
                       sdbatch_version: str | None, refiner_name: str | None = None) -> ImageRecord:
        """The record as the worker made it, rebuilt from its index row and, for what the
        index leaves out, the ``facts`` of the model loaded to regenerate it (for the row as
        the index stores it), the job's ``model_name``, ``refiner_name`` and
        ``sdbatch_version`` (job.json)."""
        row = row_from_stored(entry, passthrough_of(entry))
        return cls(
            row=row, shard=entry["shard"], batch_id=entry["batch_id"], batch_rows=tuple(entry["batch_rows"] or ()),
            loras=tuple(dict(a) for a in entry.get("loras") or ()),
            prompt_truncated_at=entry.get("prompt_truncated_at"),
            init_image_sha256=entry.get("init_image_sha256"), mask_image_sha256=entry.get("mask_image_sha256"),
            model_fingerprint=entry.get("model_fingerprint") or facts.model_fingerprint,
            device=entry.get("device") or facts.device, dtype=entry.get("dtype") or facts.dtype,
            versions=json.loads(entry["versions"]) if entry.get("versions") else dict(facts.versions),
            torch_threads=entry.get("torch_threads"),
            model_name=model_name, model_family=facts.model_family, scheduler_config=facts.scheduler_config,
            size_conditioning=facts.size_conditioning, sdbatch_version=sdbatch_version,
            model_parameters=dict(facts.model_parameters),
            **({"refiner_name": refiner_name, "refiner_fingerprint": entry.get("refiner_fingerprint")}
               if row.refiner_switch is not None else {}),
            speed=facts.speed, prompt_syntax=facts.prompt_syntax,
            controlnets=tuple(dict(c) for c in entry.get("controlnets") or ()),
            control_image_sha256=tuple(entry.get("control_image_sha256") or ()),
            ip_adapter_image_sha256=entry.get("ip_adapter_image_sha256"),
        )

    def to_index_row(self, **result: Any) -> dict[str, Any]:
        """The row's entry of the shard index, with the ``result`` columns (status, key, …)."""
        return index_row(self.row, self.shard, self, **result)

    def to_embedded(self) -> dict[str, Any]:
        """The JSON record embedded in the image (the keys every sdbatch image carries)."""
        return {
            **record_parameters(self.row.parameters()),
            "loras": [dict(a) for a in self.loras],
            "prompt_truncated_at": self.prompt_truncated_at,
            **({"size_conditioning": {k: list(v) for k, v in self.size_conditioning.items()}}
               if self.size_conditioning else {}),
            **({"refiner_name": self.refiner_name, "refiner_fingerprint": self.refiner_fingerprint}
               if self.row.refiner_switch is not None else {}),
            **({"model_parameters": dict(self.model_parameters)} if self.model_parameters else {}),
            "init_image_sha256": self.init_image_sha256,
            **({"mask_image_sha256": self.mask_image_sha256} if self.mask_image_sha256 else {}),
            "shard": self.shard,
            "batch_id": self.batch_id,
            "batch_rows": list(self.batch_rows),
            "scheduler_config": self.scheduler_config,
            "extra": self.row.extra,
            "model_name": self.model_name,
            "model_family": self.model_family,
            "model_fingerprint": self.model_fingerprint,
            "model_hash": self.model_hash,
            "device": self.device,
            "dtype": self.dtype,
            "versions": self.versions,
            "torch_threads": self.torch_threads,
            "sdbatch_version": self.sdbatch_version,
            **({"speed": self.speed} if self.speed else {}),
            **({"prompt_syntax": self.prompt_syntax} if self.prompt_syntax else {}),
            **({"controlnets": [dict(c) for c in self.controlnets],
                "control_image_sha256": list(self.control_image_sha256)} if self.controlnets else {}),
            **({"ip_adapter_image_sha256": self.ip_adapter_image_sha256} if self.ip_adapter_image_sha256 else {}),
        }

    @classmethod
    def from_embedded(cls, embedded: dict[str, Any]) -> ImageRecord:
        """The record embedded in an image (a key an older image lacks is its default).
        KeyError/TypeError/ValueError for a JSON document that is not an sdbatch record."""
        get = embedded.get
        return cls(
            row=row_from_stored(embedded, get("extra")), shard=str(get("shard") or ""), batch_id=str(get("batch_id") or ""),
            batch_rows=tuple(get("batch_rows") or ()), loras=tuple(dict(a) for a in get("loras") or ()),
            prompt_truncated_at=get("prompt_truncated_at"), init_image_sha256=get("init_image_sha256"),
            model_fingerprint=str(get("model_fingerprint") or ""), device=str(get("device") or "cpu"),
            dtype=str(get("dtype") or "float32"), versions=dict(get("versions") or {}),
            torch_threads=get("torch_threads"), model_name=str(get("model_name") or ""),
            model_family=str(get("model_family") or ""), scheduler_config=dict(get("scheduler_config") or {}),
            size_conditioning=dict(get("size_conditioning") or {}), sdbatch_version=get("sdbatch_version"),
            refiner_name=get("refiner_name"), refiner_fingerprint=get("refiner_fingerprint"),
            model_parameters=dict(get("model_parameters") or {}), speed=get("speed"),
            prompt_syntax=get("prompt_syntax"),
            mask_image_sha256=get("mask_image_sha256"),
            controlnets=tuple(dict(c) for c in get("controlnets") or ()),
            control_image_sha256=tuple(get("control_image_sha256") or ()),
            ip_adapter_image_sha256=get("ip_adapter_image_sha256"),
        )

    def describes(self, entry: dict[str, Any]) -> bool:
        """This record is the one of index row ``entry``: same batch, id, seed, prompt and every
        batch-key parameter (a column either leaves out holds its default)."""
        try:
            return self.batch_id == entry.get("batch_id") and all(
                getattr(self.row, k) == COLUMN[k].coerce(entry.get(k)) for k in ("id", "seed", "prompt", *BATCH_KEY))
        except (TypeError, ValueError):  # an index row that is not ours (or mangled)
            return False


def embedded_record(embedded: dict[str, Any] | None, entry: dict[str, Any]) -> ImageRecord | None:
    """The record an image embeds (``encode.read_embedded``), if it is the one of index row
    ``entry``; None for an image without one, another tool's JSON, or a mangled record."""
    if not isinstance(embedded, dict):
        return None
    try:
        record = ImageRecord.from_embedded(embedded)
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    return record if record.describes(entry) else None

