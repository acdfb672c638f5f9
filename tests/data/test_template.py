"""Tests of the vicuna_v1 template: LLaVA's exact text, label masks, truncation, prompts."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from visatb_jax.data import template
from visatb_jax.data import tokenizer as tk

N_IMG = 5
CORPUS = [template.SYSTEM_PROMPT, " USER: <image>\nWhat color is it? ASSISTANT: red</s>",
          "USER: and the shape? ASSISTANT: a circle</s>"] * 10


@pytest.fixture(scope="module")
def tok():
  return tk.train_tokenizer(CORPUS, vocab_size=320, save_dir=None)


def _conv(*values):
  return [{"from": ("human", "gpt")[i % 2], "value": v} for i, v in enumerate(values)]


def _enc(tok, text):
  return tok.encode(text, add_special_tokens=False)


TWO_ROUNDS = _conv("<image>\nWhat color is it?", "red", "and the shape?", "a circle")


def _expected(tok):
  """Hand-built ids and labels of TWO_ROUNDS, piece by piece."""
  pieces = [
      ([1], 0), (_enc(tok, template.SYSTEM_PROMPT), 0), (_enc(tok, " USER: "), 0),
      ([4] * N_IMG, 0), (_enc(tok, "\nWhat color is it? ASSISTANT:"), 0),
      (_enc(tok, " red"), 1), ([2], 1),
      (_enc(tok, "USER: and the shape? ASSISTANT:"), 0), (_enc(tok, " a circle"), 1), ([2], 1)]
  ids = np.concatenate([np.asarray(p, np.int32) for p, _ in pieces])
  labels = np.concatenate([np.full(len(p), bool(m)) for p, m in pieces])
  return ids, labels


def test_ids_and_label_mask_are_exact(tok):
  enc = template.encode_conversation(TWO_ROUNDS, tok, num_image_tokens=N_IMG, max_len=512)
  ids, labels = _expected(tok)
  assert enc.input_ids.dtype == np.int32 and enc.label_mask.dtype == np.bool_
  np.testing.assert_array_equal(enc.input_ids, ids)
  np.testing.assert_array_equal(enc.label_mask, labels)
  assert enc.num_images == 1 and not enc.truncated
  # Labelled tokens are exactly the answers and their closing eos.
  assert tok.decode(enc.input_ids[enc.label_mask]) == " red</s> a circle</s>"


def test_text_is_llava_vicuna_v1(tok):
  enc = template.encode_conversation(TWO_ROUNDS, tok, num_image_tokens=N_IMG, max_len=512)
  llava = ("<s>" + template.SYSTEM_PROMPT + " USER: " + "<image>" * N_IMG
           + "\nWhat color is it? ASSISTANT: red</s>USER: and the shape? ASSISTANT: a circle</s>")
  assert tok.decode(enc.input_ids) == llava


def test_text_only_and_two_images(tok):
  enc = template.encode_conversation(_conv("hi", "hello"), tok, num_image_tokens=N_IMG,
                                     max_len=512)
  assert enc.num_images == 0 and 4 not in enc.input_ids
  enc = template.encode_conversation(_conv("<image> or <image>?", "left"), tok,
                                     num_image_tokens=N_IMG, max_len=512)
  assert enc.num_images == 2 and int((enc.input_ids == 4).sum()) == 2 * N_IMG


def test_prompt_is_a_prefix_and_reference_is_the_last_answer(tok):
  enc = template.encode_conversation(TWO_ROUNDS, tok, num_image_tokens=N_IMG, max_len=512)
  prompt, reference = template.encode_prompt(TWO_ROUNDS, tok, num_image_tokens=N_IMG)
  assert reference == "a circle" and prompt.dtype == np.int32
  np.testing.assert_array_equal(enc.input_ids[:len(prompt)], prompt)
  assert tok.decode(prompt).endswith("USER: and the shape? ASSISTANT:")
  # The first labelled token after the prompt is the start of the final answer.
  assert enc.label_mask[len(prompt)] and not enc.label_mask[len(prompt) - 1]


def test_trailing_question_is_ignored_and_bad_roles_raise(tok):
  with_tail = TWO_ROUNDS + [{"from": "human", "value": "thanks"}]
  a = template.encode_conversation(with_tail, tok, num_image_tokens=N_IMG, max_len=512)
  b = template.encode_conversation(TWO_ROUNDS, tok, num_image_tokens=N_IMG, max_len=512)
  np.testing.assert_array_equal(a.input_ids, b.input_ids)
  with pytest.raises(ValueError, match="no assistant answer"):
    template.encode_conversation(_conv("q"), tok, num_image_tokens=N_IMG, max_len=512)
  with pytest.raises(ValueError, match="expected human then gpt"):
    template.encode_conversation([{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}],
                                 tok, num_image_tokens=N_IMG, max_len=512)
  renamed = [{"from": "user", "value": "hi"}, {"from": "assistant", "value": "hello"}]
  assert template.encode_conversation(renamed, tok, num_image_tokens=N_IMG, max_len=512)


def test_truncation_drops_the_system_prompt_first(tok):
  full = template.encode_conversation(TWO_ROUNDS, tok, num_image_tokens=N_IMG, max_len=512)
  enc = template.encode_conversation(TWO_ROUNDS, tok, num_image_tokens=N_IMG,
                                     max_len=len(full.input_ids) - 3)
  assert enc.truncated and len(enc.input_ids) == len(full.input_ids) - 3
  # bos kept, then the first three system tokens are gone, everything else is identical.
  expected_keep = np.ones(len(full.input_ids), bool)
  expected_keep[1:4] = False
  np.testing.assert_array_equal(enc.input_ids, full.input_ids[expected_keep])
  np.testing.assert_array_equal(enc.label_mask, full.label_mask[expected_keep])
  assert enc.num_images == 1


def test_truncation_keeps_images_and_the_final_round(tok):
  full = template.encode_conversation(TWO_ROUNDS, tok, num_image_tokens=N_IMG, max_len=512)
  final_round = _enc(tok, "USER: and the shape? ASSISTANT:") + _enc(tok, " a circle") + [2]
  mandatory = 1 + N_IMG + len(final_round)
  enc = template.encode_conversation(TWO_ROUNDS, tok, num_image_tokens=N_IMG, max_len=mandatory)
  # Only bos, the image block and the final round survive; the first answer's text is gone.
  np.testing.assert_array_equal(enc.input_ids, [1] + [4] * N_IMG + final_round)
  assert enc.label_mask.sum() == len(_enc(tok, " a circle")) + 1
  assert template.encode_conversation(TWO_ROUNDS, tok, num_image_tokens=N_IMG,
                                      max_len=mandatory - 1) is None
  assert len(full.input_ids) > mandatory


@settings(max_examples=60, deadline=None)
@given(max_len=st.integers(1, 120), rounds=st.integers(1, 3))
def test_truncation_invariants(tok, max_len, rounds):
  values = ["<image>\nWhat color is it?", "red"] + ["and the shape?", "a circle"] * (rounds - 1)
  conv = _conv(*values)
  full = template.encode_conversation(conv, tok, num_image_tokens=N_IMG, max_len=10**6)
  enc = template.encode_conversation(conv, tok, num_image_tokens=N_IMG, max_len=max_len)
  prompt, _ = template.encode_prompt(conv, tok, num_image_tokens=N_IMG)
  final_answer = len(full.input_ids) - len(prompt)
  if rounds == 1:  # The final round is the first one: it holds the image block.
    final_start = 1 + len(_enc(tok, template.SYSTEM_PROMPT))
    mandatory = 1 + len(full.input_ids) - final_start
  else:
    final_start = len(prompt) - len(_enc(tok, template.round_prompt(rounds - 1, values[-2])))
    mandatory = 1 + N_IMG + len(full.input_ids) - final_start
  if mandatory > max_len:
    assert enc is None
    return
  assert len(enc.input_ids) == min(max_len, len(full.input_ids))
  assert enc.truncated == (len(full.input_ids) > max_len)
  assert enc.input_ids[0] == 1 and int((enc.input_ids == 4).sum()) == N_IMG
  # The image block stays contiguous and the final question + answer + eos is intact.
  image_pos = np.flatnonzero(enc.input_ids == 4)
  assert image_pos[-1] - image_pos[0] == N_IMG - 1
  np.testing.assert_array_equal(enc.input_ids[-final_answer:], full.input_ids[-final_answer:])
  assert enc.label_mask[-final_answer:].all()


def test_prompt_truncation(tok):
  prompt, _ = template.encode_prompt(TWO_ROUNDS, tok, num_image_tokens=N_IMG)
  short, _ = template.encode_prompt(TWO_ROUNDS, tok, num_image_tokens=N_IMG,
                                    max_len=len(prompt) - 2)
  np.testing.assert_array_equal(short, np.concatenate([prompt[:1], prompt[3:]]))
  with pytest.raises(ValueError, match="exceed max_len"):
    template.encode_prompt(TWO_ROUNDS, tok, num_image_tokens=N_IMG, max_len=N_IMG)
