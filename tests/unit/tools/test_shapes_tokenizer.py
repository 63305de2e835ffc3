"""The project's word-level CLIP tokenizer: built with no files, every dataset word one token."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sdbatch.models.builtin import MODELS_DIR
from tools.shapes import data as shapes_data
from tools.shapes.tokenizer import MODEL_MAX_LENGTH, build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_every_vocabulary_word_is_one_known_token(tok):
    unk = tok.unk_token_id
    for word in shapes_data.VOCAB_WORDS:
        ids = tok(word, add_special_tokens=False).input_ids
        assert len(ids) == 1, (word, tok.convert_ids_to_tokens(ids))
        assert ids[0] != unk
        assert tok.convert_ids_to_tokens(ids)[0] == word + "</w>"


def test_distinct_words_get_distinct_ids(tok):
    ids = [tok(w, add_special_tokens=False).input_ids[0] for w in shapes_data.VOCAB_WORDS]
    assert len(set(ids)) == len(ids)


def test_captions_tokenize_word_by_word(tok):
    rng = np.random.default_rng(0)
    for _ in range(300):
        scene = shapes_data.random_scene(rng)
        cap = shapes_data.caption(scene, rng)
        n_words = len(cap.replace(",", " , ").split())
        ids = tok(cap).input_ids
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert len(ids) == n_words + 2, cap
        assert tok.unk_token_id not in ids[1:-1], cap


def test_case_and_spacing_are_normalised(tok):
    a = tok("a small red circle").input_ids
    assert tok("A  SMALL Red   circle").input_ids == a


def test_unknown_words_fall_back_to_pieces_without_crashing(tok):
    ids = tok("a zebra-striped hexagon, ümlaut 🙂 on the left").input_ids
    toks = tok.convert_ids_to_tokens(ids)
    assert len(ids) > 8
    assert "zebra</w>" not in toks
    assert all(t is not None for t in toks)
    assert "left</w>" in toks


def test_padding_and_truncation_to_model_max_length(tok):
    assert tok.model_max_length == MODEL_MAX_LENGTH == 77
    enc = tok(["red circle", "blue " * 200], padding="max_length", max_length=77,
              truncation=True, return_tensors="pt")
    assert tuple(enc.input_ids.shape) == (2, 77)
    assert enc.input_ids[1, -1].item() == tok.eos_token_id
    assert enc.input_ids[0, 3].item() == tok.pad_token_id


def test_save_and_load_roundtrip(tok, tmp_path: Path):
    from transformers import CLIPTokenizer

    tok.save_pretrained(tmp_path / "tokenizer")
    again = CLIPTokenizer.from_pretrained(tmp_path / "tokenizer")
    text = "an orange triangle at the bottom, purple gradient background"
    assert again(text).input_ids == tok(text).input_ids
    assert again.model_max_length == 77
    assert len(again) == len(tok)


@pytest.mark.parametrize("name", ["tiny", "shapes"])
def test_shipped_tokenizers_match_the_builder(tok, name):
    from transformers import CLIPTokenizer

    folder = MODELS_DIR / name / "tokenizer"
    if not folder.is_dir():
        pytest.skip(f"builtin:{name} not present")
    shipped = CLIPTokenizer.from_pretrained(folder)
    assert shipped.get_vocab() == tok.get_vocab()
    text = "a large white diamond in the middle with a black background"
    assert shipped(text).input_ids == tok(text).input_ids
    # the text encoder's vocabulary covers the tokenizer
    cfg = json.loads((MODELS_DIR / name / "text_encoder" / "config.json").read_text())
    assert cfg["vocab_size"] == len(tok)
