"""Tests of the vicuna_v1 template: LLaVA's exact text, label masks, truncation, prompts."""

import numpy as np
import pytest
from hypothesis import example, given, settings
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


# --- plain and chatml ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chatml_tok():
  tok = tk.train_tokenizer(CORPUS, vocab_size=320, save_dir=None)
  tok.add_tokens([template.IM_START, template.IM_END], special_tokens=True)
  return tok


def _masked_runs(tok, enc):
  """The decoded text of every maximal run of labelled tokens, in order."""
  edges = np.diff(np.concatenate([[0], enc.label_mask.astype(int), [0]]))
  starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
  return [tok.decode(enc.input_ids[s:e]) for s, e in zip(starts, ends)]


def test_default_template_is_vicuna_v1(tok):
  a = template.encode_conversation(TWO_ROUNDS, tok, num_image_tokens=N_IMG, max_len=512)
  b = template.encode_conversation(TWO_ROUNDS, tok, num_image_tokens=N_IMG, max_len=512,
                                   template="vicuna_v1", system=template.SYSTEM_PROMPT)
  np.testing.assert_array_equal(a.input_ids, b.input_ids)
  np.testing.assert_array_equal(a.label_mask, b.label_mask)
  assert _masked_runs(tok, a) == [" red</s>", " a circle</s>"]
  assert template.stop_token_id(tok) == tok.eos_token_id
  with pytest.raises(ValueError, match="unknown chat template 'alpaca'"):
    template.encode_conversation(TWO_ROUNDS, tok, num_image_tokens=N_IMG, max_len=512,
                                 template="alpaca")


def test_plain_is_image_then_answer(tok):
  enc = template.encode_conversation(TWO_ROUNDS, tok, num_image_tokens=N_IMG, max_len=512,
                                     template="plain", system="ignored")
  # LLaVA's conv_llava_plain: the question text and roles are dropped, sep "\n" is learnt.
  assert tok.decode(enc.input_ids) == "<s>" + "<image>" * N_IMG + "red\na circle\n"
  expected = np.concatenate([[1], [4] * N_IMG, _enc(tok, "red\n"), _enc(tok, "a circle\n")])
  np.testing.assert_array_equal(enc.input_ids, expected)
  assert tok.decode(enc.input_ids[enc.label_mask]) == "red\na circle\n"
  assert not enc.label_mask[:1 + N_IMG].any() and enc.label_mask[1 + N_IMG:].all()
  prompt, reference = template.encode_prompt(TWO_ROUNDS, tok, num_image_tokens=N_IMG,
                                             template="plain")
  assert reference == "a circle"
  np.testing.assert_array_equal(prompt, expected[:len(prompt)])
  assert tok.decode(prompt) == "<s>" + "<image>" * N_IMG + "red\n"
  two = template.encode_conversation(_conv("<image> vs <image>", "left"), tok,
                                     num_image_tokens=N_IMG, max_len=512, template="plain")
  assert two.num_images == 2 and tok.decode(two.input_ids) == "<s>" + "<image>" * 2 * N_IMG + "left\n"


def test_chatml_text_and_loss(chatml_tok):
  tok = chatml_tok
  enc = template.encode_conversation(TWO_ROUNDS, tok, num_image_tokens=N_IMG, max_len=512,
                                     template="chatml")
  assert tok.decode(enc.input_ids) == (
      "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
      "<|im_start|>user\n" + "<image>" * N_IMG + "\nWhat color is it?<|im_end|>\n"
      "<|im_start|>assistant\nred<|im_end|>\n"
      "<|im_start|>user\nand the shape?<|im_end|>\n<|im_start|>assistant\na circle<|im_end|>\n")
  assert tok.bos_token_id not in enc.input_ids and enc.num_images == 1
  # Loss on each answer and its <|im_end|>, never on the "\n" after it or on a role tag.
  assert _masked_runs(tok, enc) == ["red<|im_end|>", "a circle<|im_end|>"]
  im_end = tok.convert_tokens_to_ids(template.IM_END)
  assert int((enc.input_ids == im_end).sum()) == 5 and enc.input_ids[-1] != im_end
  assert template.stop_token_id(tok, "chatml") == im_end
  prompt, reference = template.encode_prompt(TWO_ROUNDS, tok, num_image_tokens=N_IMG,
                                             template="chatml")
  assert reference == "a circle"
  np.testing.assert_array_equal(prompt, enc.input_ids[:len(prompt)])
  assert tok.decode(prompt).endswith("<|im_end|>\n<|im_start|>assistant\n")
  assert enc.label_mask[len(prompt)] and not enc.label_mask[len(prompt) - 1]


def test_chatml_empty_system_and_missing_tokens(tok, chatml_tok):
  enc = template.encode_conversation(_conv("hi", "hello"), chatml_tok, num_image_tokens=N_IMG,
                                     max_len=512, template="chatml", system="")
  assert chatml_tok.decode(enc.input_ids) == (
      "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n")
  with pytest.raises(ValueError, match=r"chatml.*<\|im_start\|> as a single token"):
    template.encode_conversation(_conv("hi", "hello"), tok, num_image_tokens=N_IMG, max_len=512,
                                 template="chatml")


def test_chatml_truncation_keeps_the_final_round(chatml_tok):
  tok = chatml_tok
  full = template.encode_conversation(TWO_ROUNDS, tok, num_image_tokens=N_IMG, max_len=512,
                                      template="chatml")
  enc = template.encode_conversation(TWO_ROUNDS, tok, num_image_tokens=N_IMG,
                                     max_len=len(full.input_ids) - 4, template="chatml")
  # No bos to keep: the first four tokens (the start of the system block) go.
  np.testing.assert_array_equal(enc.input_ids, full.input_ids[4:])
  assert enc.truncated and _masked_runs(tok, enc) == ["red<|im_end|>", "a circle<|im_end|>"]


_WORDS = st.lists(st.sampled_from(["red", "a", "circle", "shape", "?", "\n", "blue", " "]),
                  min_size=1, max_size=5).map("".join)


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(["vicuna_v1", "plain", "chatml"]),
       rounds=st.lists(st.tuples(_WORDS, _WORDS, st.booleans()), min_size=1, max_size=3))
@example(name="plain", rounds=[("q", "a", True), ("b", "c", False)])
@example(name="chatml", rounds=[("q", "a", True), ("b", "c", True)])
def test_every_template_labels_exactly_the_answers(chatml_tok, name, rounds):
  tok = chatml_tok
  values = []
  for question, answer, image in rounds:
    values += [("<image>\n" if image else "") + question, answer]
  conv = _conv(*values)
  enc = template.encode_conversation(conv, tok, num_image_tokens=N_IMG, max_len=10**6,
                                     template=name)
  end = {"vicuna_v1": "</s>", "plain": "", "chatml": "<|im_end|>"}[name]
  answers = [(" " if name == "vicuna_v1" else "") + a + ("\n" if name == "plain" else "") + end
             for _, a, _ in rounds]
  assert tok.decode(enc.input_ids[enc.label_mask]) == "".join(answers)
  assert enc.num_images == sum(image for *_, image in rounds)
  assert int((enc.input_ids == 4).sum()) == N_IMG * enc.num_images
  assert not enc.label_mask[enc.input_ids == 4].any()
  prompt, reference = template.encode_prompt(conv, tok, num_image_tokens=N_IMG, template=name)
  assert reference == rounds[-1][1]
  np.testing.assert_array_equal(prompt, enc.input_ids[:len(prompt)])
  assert enc.label_mask[len(prompt)]
  if name != "plain":  # plain has no prompt text when a later round has no image
    assert not enc.label_mask[len(prompt) - 1]
