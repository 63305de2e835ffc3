"""AUTOMATIC1111 prompt syntax read through compel: emphasis ``(word:1.3)`` / ``(word)`` /
``[word]``, ``BREAK`` and prompts longer than one 75-token chunk, for the families whose CLIP
text encoders the adapter declares (``FamilyAdapter.weighted_prompts``: SD 1.x/2.x, SDXL and its
refiner, SD3's CLIP pair).

``data.prompt_syntax.weighted_segments`` reads a prompt by A1111's rules into weighted text
fragments per ``BREAK`` segment; compel builds the conditioning from them (its ``Conjunction`` of
``FlattenedPrompt`` s: each fragment's tokens weighted against the empty prompt, a weight below 1
blended towards the prompt without it, each segment its own 77-token chunks, a long segment in
several, padded with compel's empty-prompt chunk), so the arithmetic is compel's own.

``PromptReader.install`` wraps a pipeline's ``encode_prompt`` (under ``PromptCache``, which
then caches the weighted embeddings like any other): the call is made with each prompt's plain
text (so a prompt whose reading weights nothing, ``(red:1.0)``, renders exactly as ``red``, and
the pooled embeddings and SD3's T5 tokens come from the text without its brackets), and the
token embeddings of every row that needs compel — weighted, broken or longer than a chunk — are
replaced by compel's, encoded row by row. All rows of one call must have as many chunks:
``DiffusersModel.generate`` runs a canonical batch in groups of equal chunk count
(``PromptReader.groups``), so a row's conditioning is never padded by another row's length and
its image does not depend on its batch-mates.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
from compel import Compel, DiffusersTextualInversionManager, EmbeddingsProvider
from compel.prompt_parser import Conjunction, FlattenedPrompt

from sdbatch.data.prompt_syntax import Segments, plain_text, weighted_segments
from sdbatch.data.row import Row
from sdbatch.models.families.base import PromptWeighting

#: the (tokenizer, text encoder) pairs a pipeline may hold, in the order its encode_prompt joins them
CLIP_ENCODERS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))


class HiddenLayer(EmbeddingsProvider):
    """compel's embeddings provider reading the hidden state the family's pipeline reads:
    ``back`` layers from the end, through the final layer norm or not (compel's own choices
    cover clip_skip 0 and 1 only)."""

    def __init__(self, *args: Any, back: int, normalized: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.back = back
        self.normalized = normalized

    def _encode_token_ids_to_embeddings(self, token_ids: torch.Tensor,
                                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        output = self.text_encoder(token_ids, attention_mask, output_hidden_states=True, return_dict=True)
        hidden = output.hidden_states[-self.back]
        return self.text_encoder.text_model.final_layer_norm(hidden) if self.normalized else hidden


class _Inversions(DiffusersTextualInversionManager):
    """compel's textual-inversion expansion over the tokenizer it serves: compel's own reads
    ``pipe.tokenizer``, which an SDXL refiner (only ``tokenizer_2``) does not have."""

    def __init__(self, pipe: Any, tokenizer: Any) -> None:
        super().__init__(pipe)
        self.tokenizer = tokenizer

    def expand_textual_inversion_token_ids_if_necessary(self, token_ids: list[int]) -> list[int]:
        if not token_ids:
            return token_ids
        prompt = self.pipe.maybe_convert_prompt(self.tokenizer.decode(token_ids), self.tokenizer)
        return list(self.tokenizer.encode(prompt, add_special_tokens=False))


def clip_compel(pipe: Any, tokenizer: Any, encoder: Any, weighting: PromptWeighting, clip_skip: int | None) -> Compel:
    """A compel over one CLIP encoder of ``pipe``, reading the layer its pipeline reads for
    ``clip_skip`` (diffusers' count: layers skipped), long prompts in chunks, multi-vector
    textual-inversion tokens expanded as the pipeline expands them."""
    # a pipeline that loads textual inversions (SD, SDXL) expands their multi-vector tokens
    inversions = _Inversions(pipe, tokenizer) if hasattr(pipe, "maybe_convert_prompt") else None
    compel = Compel(tokenizer=tokenizer, text_encoder=encoder, truncate_long_prompts=False,
                    textual_inversion_manager=inversions)
    # SD: the layer clip_skip picks, normalised; SDXL / SD3: the penultimate (or deeper), not
    back = (clip_skip or 0) + (1 if weighting == "normalized" else 2)
    own = compel.conditioning_provider  # its settings kept (compel's own long-text splitting)
    compel.conditioning_provider = HiddenLayer(
        tokenizer=tokenizer, text_encoder=encoder, truncate=False, back=back, normalized=weighting == "normalized",
        textual_inversion_manager=own.textual_inversion_manager, split_long_text_mode=own.split_long_text_mode)
    return compel


def conjunction(segments: Segments) -> Conjunction:
    """compel's structure for a reading: each BREAK segment a prompt of its weighted fragments."""
    return Conjunction([FlattenedPrompt(list(fragments)) for fragments in segments])


class PromptReader:
    """How one model reads its prompts: A1111 syntax through compel (``weighting`` set) or as
    written (None: ``--literal-prompts``, or a family without CLIP encoders). ``prepare`` is what
    the runtime does to a row's prompt before the pipeline sees it (``embedding:NAME`` → its
    token), so chunks are counted on what is encoded."""

    def __init__(self, weighting: PromptWeighting | None, pipe: Any, prepare: Callable[[str], str] = str) -> None:
        encoders = [(getattr(pipe, t), getattr(pipe, e)) for t, e in CLIP_ENCODERS if getattr(pipe, e, None) is not None]
        self.weighting = weighting if encoders else None
        self._prepare = prepare
        self._read = functools.lru_cache(maxsize=4096)(weighted_segments)
        self._chunks = functools.lru_cache(maxsize=4096)(self._count_chunks)
        # compel's tokenising (chunking, textual-inversion vectors) of the first CLIP encoder
        self._tokens = clip_compel(pipe, *encoders[0], weighting or "normalized", None).conditioning_provider if encoders else None
        self._chunk = int(encoders[0][0].model_max_length) if encoders else 0

    @property
    def active(self) -> bool:
        return self.weighting is not None

    def plain(self, text: str | None) -> str | None:
        """The text the model's own encoding is given for ``text``: its reading's text."""
        if text is None or not self.active:
            return text
        return "".join(fragment for segment in self._read(text) for fragment, _ in segment)

    def needs_compel(self, text: str | None) -> bool:
        """Whether ``text`` reads as something its plain text does not say (a weight, a BREAK)
        or is longer than one chunk."""
        if text is None or not self.active:
            return False
        plain = plain_text(self._read(text))
        return plain is None or self._chunks(text) > 1

    def interpreted(self, row: Row) -> bool:
        """Whether ``row``'s prompts go through compel (recorded as ``prompt_syntax``)."""
        return any(self.needs_compel(self._prepare(text)) for text in (row.prompt, row.negative_prompt or ""))

    def chunk_count(self, row: Row) -> int:
        """How many 77-token chunks ``row``'s conditioning has (its prompt's or its negative's, the longer)."""
        if not self.interpreted(row):
            return 1
        return max(self._chunks(self._prepare(row.prompt)), self._chunks(self._prepare(row.negative_prompt or "")))

    def groups(self, rows: list[Row]) -> list[list[int]]:
        """``rows``' positions in groups of equal chunk count, each in row order."""
        groups: dict[int, list[int]] = {}
        for i, row in enumerate(rows):
            groups.setdefault(self.chunk_count(row), []).append(i)
        return list(groups.values())

    def _count_chunks(self, text: str) -> int:
        """compel's chunk count for ``text``: its chunking (splits at sentence ends) decides it."""
        assert self._tokens is not None
        return sum(len(self._tokens.get_token_ids_and_expand_weights([t for t, _ in fragments], [w for _, w in fragments],
                                                                     device="cpu")[0]) // self._chunk
                   for fragments in self._read(text))

    def install(self, pipe: Any) -> None:
        """Read ``pipe.encode_prompt``'s prompts by A1111's rules (an instance attribute shadows the method)."""
        if not self.active:
            return
        original = pipe.encode_prompt
        signature = inspect.signature(original)
        encoders = [(getattr(pipe, t), getattr(pipe, e)) for t, e in CLIP_ENCODERS if getattr(pipe, e, None) is not None]
        weighting = self.weighting
        assert weighting is not None
        compels: dict[int | None, list[Compel]] = {}

        @functools.wraps(original)  # its signature, which PromptCache binds the call to
        def encode_prompt(*args: Any, **kwargs: Any) -> Any:
            call = signature.bind(*args, **kwargs)
            call.apply_defaults()
            arguments = dict(call.arguments)
            prompts, negatives = arguments.get("prompt"), arguments.get("negative_prompt")
            if not isinstance(prompts, list) or arguments.get("prompt_embeds") is not None:
                return original(**arguments)
            negatives = negatives if isinstance(negatives, list) else [negatives] * len(prompts)
            rows = [i for i, texts in enumerate(zip(prompts, negatives)) if any(map(self.needs_compel, texts))]
            output = original(**{**arguments, "prompt": [self.plain(p) for p in prompts],
                                 "negative_prompt": [self.plain(n) for n in negatives]
                                 if arguments.get("negative_prompt") is not None else None})
            if not rows:
                return output
            clip_skip = arguments.get("clip_skip")
            if clip_skip not in compels:
                compels[clip_skip] = [clip_compel(pipe, t, e, weighting, clip_skip) for t, e in encoders]
            weighted = {i: self._weighted(compels[clip_skip], prompts[i], negatives[i]) for i in rows}
            return _replace_rows(output, weighted, self._chunk)

        pipe.encode_prompt = encode_prompt

    def _weighted(self, compels: list[Compel], prompt: str, negative: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One row's token embeddings (prompt, negative) from compel: each encoder's, the
        prompt's and the negative's padded to the same chunks, joined along the features as the
        pipeline joins its encoders'."""
        per_encoder = []
        for compel in compels:
            pair = [compel.build_conditioning_tensor_for_conjunction(conjunction(self._read(text)))[0]
                    for text in (prompt, negative or "")]
            per_encoder.append(compel.pad_conditioning_tensors_to_same_length(pair))
        return (torch.cat([p for p, _ in per_encoder], dim=-1), torch.cat([n for _, n in per_encoder], dim=-1))


def _replace_rows(output: tuple, weighted: dict[int, tuple[torch.Tensor, torch.Tensor]], chunk: int) -> tuple:
    """``encode_prompt``'s ``output`` (prompt embeddings first, the negative's second) with the
    rows of ``weighted`` replaced: compel's CLIP tokens in place of the first ``chunk`` tokens,
    zero-padded to the output's width and followed by the row's own tokens after them (SD3's T5
    tokens; none for SD and SDXL)."""

    def rows_of(embeds: torch.Tensor, pick: Callable[[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]) -> torch.Tensor:
        parts = []
        for i in range(embeds.shape[0]):
            if i not in weighted:
                parts.append(embeds[i:i + 1])
                continue
            clip = pick(weighted[i]).to(embeds.device, embeds.dtype)
            clip = torch.nn.functional.pad(clip, (0, embeds.shape[-1] - clip.shape[-1]))
            parts.append(torch.cat([clip, embeds[i:i + 1, chunk:]], dim=1))
        return torch.cat(parts)

    prompt_embeds, negative_embeds, *rest = output
    return (rows_of(prompt_embeds, lambda pair: pair[0]),
            None if negative_embeds is None else rows_of(negative_embeds, lambda pair: pair[1]), *rest)
