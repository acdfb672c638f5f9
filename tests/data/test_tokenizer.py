"""Tests of the byte-level BPE tokenizer: exact round trips, special ids, determinism, save/load."""

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from visatb_jax.data import tokenizer as tk

CORPUS = [
    "A chat between a curious human and an artificial intelligence assistant.",
    "USER: <image>\nWhat color is the shape at the top left? ASSISTANT: red</s>",
    "a red circle at the top left and a blue square in the center.",
    "What is the bounding box of the blue square? [0.35, 0.02, 0.64, 0.31]",
] * 20


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return tk.train_tokenizer(CORPUS, vocab_size=400, save_dir=tmp_path_factory.mktemp("tok"))


def test_special_token_ids(tok):
  assert [tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id] == [0, 1, 2, 3]
  assert tk.image_token_id(tok) == 4
  assert tok.convert_ids_to_tokens([0, 1, 2, 3, 4]) == list(tk.SPECIAL_TOKENS)
  # Specials in text are single tokens; encode adds none by itself.
  assert tok.encode("<image></s>", add_special_tokens=False) == [4, 2]
  assert tok.encode("red", add_special_tokens=True) == tok.encode("red", add_special_tokens=False)
  assert 261 < len(tok) <= 400


@pytest.mark.parametrize("text", [
    "", " ", "  leading and trailing  ", "a red circle.", "tab\tnew\nline\r\n", "héllo wörld",
    "日本語 🙂 emoji", " USER: q ASSISTANT:", "[0.35, 0.02, 0.64, 0.31]", "x<image>y</s> z"])
def test_exact_round_trip(tok, text):
  ids = tok.encode(text, add_special_tokens=False)
  assert tok.decode(ids) == text


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=40))
def test_round_trip_of_any_text(tok, text):
  assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_learned_merges_compress_the_corpus(tok):
  text = CORPUS[1]
  assert len(tok.encode(text, add_special_tokens=False)) < len(text.encode()) / 2


def test_deterministic_given_the_texts(tmp_path):
  a = tk.train_tokenizer(CORPUS, vocab_size=350, save_dir=tmp_path / "a")
  b = tk.train_tokenizer(iter(CORPUS), vocab_size=350, save_dir=tmp_path / "b")
  assert a.get_vocab() == b.get_vocab()
  saved = [(tmp_path / d / "tokenizer.json").read_bytes() for d in ("a", "b")]
  assert saved[0] == saved[1]


def test_save_and_load(tok, tmp_path):
  tk.save_tokenizer(tok, tmp_path)
  assert "tokenizer.json" in os.listdir(tmp_path)
  loaded = tk.load_tokenizer(tmp_path)
  text = "What color is the shape at the top left? 🙂 <image>"
  assert loaded.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
  assert loaded.get_vocab() == tok.get_vocab()
  assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == ("<s>", "</s>", "<pad>")
  assert tk.image_token_id(loaded) == 4


def test_too_small_vocab_is_rejected():
  with pytest.raises(ValueError, match="vocab_size"):
    tk.train_tokenizer(CORPUS, vocab_size=100, save_dir=None)
