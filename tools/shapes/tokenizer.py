"""A word-level ``CLIPTokenizer`` built from a vocabulary the project defines (no downloads).

The vocabulary is CLIP's byte-level base (256 byte symbols, alone and with the end-of-word
marker ``</w>``) plus generated BPE merges that assemble every word of the shapes dataset
into a single token. Unknown words still tokenize: they fall back to smaller pieces, down to
single characters, exactly as CLIP's own BPE does.
"""

from __future__ import annotations

from collections.abc import Iterable

BOS = "<|startoftext|>"


EOS = "<|endoftext|>"


MODEL_MAX_LENGTH = 77


END = "</w>"


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> tuple[str, ...]:
    """CLIP's BPE of one (already byte-encoded) word."""
    parts: tuple[str, ...] = tuple(word[:-1]) + (word[-1] + END,)
    while len(parts) > 1:
        pairs = {(parts[i], parts[i + 1]) for i in range(len(parts) - 1)}
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(parts):
            if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = tuple(merged)
    return parts


def build_vocab(words: Iterable[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges so that every word in ``words`` is one token.

    Merges are appended one at a time at the lowest priority, joining the first two pieces
    of a word's current BPE; a merge of lower priority than all existing ones never changes
    how an already-complete word is tokenized, so each word ends as exactly one token.
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    base = list(bytes_to_unicode().values())
    tokens = base + [b + END for b in base]
    ranks: dict[tuple[str, str], int] = {}
    merges: list[tuple[str, str]] = []
    seen = set(tokens)
    for w in dict.fromkeys(w.lower() for w in words):
        while True:
            parts = _bpe(w, ranks)
            if len(parts) == 1:
                break
            a, b = parts[0], parts[1]
            ranks[(a, b)] = len(merges)
            merges.append((a, b))
            if a + b not in seen:
                seen.add(a + b)
                tokens.append(a + b)
    tokens += [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def build_tokenizer(words: Iterable[str] | None = None):
    """The project's CLIPTokenizer (word-level for the shapes vocabulary)."""
    from transformers import CLIPTokenizer

    if words is None:
        from tools.shapes.data import VOCAB_WORDS

        words = VOCAB_WORDS
    vocab, merges = build_vocab(words)
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=MODEL_MAX_LENGTH,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=EOS,
    )
