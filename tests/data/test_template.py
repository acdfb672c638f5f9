"""Tests of the chat templates: exact ids and label masks, truncation, prompts, per-image counts.

vicuna_v1 and plain against LLaVA's text, chatml and qwen2vl against Qwen's.
"""

import functools

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

QWEN_TOKENS = (template.IM_START, template.IM_END, template.VISION_START, template.IMAGE_PAD,
               template.VISION_END)


@pytest.fixture(scope="module")
def chatml_tok():
  tok = tk.train_tokenizer(CORPUS, vocab_size=320, save_dir=None)
  tok.add_tokens([template.IM_START, template.IM_END], special_tokens=True)
  return tok


@pytest.fixture(scope="module")
def qwen_tok():
  """chatml_tok plus Qwen2-VL's vision tokens (``<image>`` is still id 4)."""
  tok = tk.train_tokenizer(CORPUS, vocab_size=320, save_dir=None)
  tok.add_tokens(list(QWEN_TOKENS), special_tokens=True)
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


@settings(max_examples=80, deadline=None)
@given(name=st.sampled_from(["vicuna_v1", "plain", "chatml", "qwen2vl"]),
       rounds=st.lists(st.tuples(_WORDS, _WORDS, st.lists(st.integers(1, 4), max_size=2)),
                       min_size=1, max_size=3),
       per_image=st.booleans())
@example(name="plain", rounds=[("q", "a", [1]), ("b", "c", [])], per_image=False)
@example(name="chatml", rounds=[("q", "a", [1]), ("b", "c", [1])], per_image=False)
@example(name="qwen2vl", rounds=[("q", "a", [2, 3]), ("b", "c", [1])], per_image=True)
def test_every_template_labels_exactly_the_answers(qwen_tok, name, rounds, per_image):
  """Each round has images with the given counts (per_image), or N_IMG tokens each (the int)."""
  tok = qwen_tok
  values, counts = [], []
  for question, answer, images in rounds:
    values += ["<image>\n" * len(images) + question, answer]
    counts += images if per_image else [N_IMG] * len(images)
  conv = _conv(*values)
  num_image_tokens = counts if per_image else N_IMG
  enc = template.encode_conversation(conv, tok, num_image_tokens=num_image_tokens, max_len=10**6,
                                     template=name)
  end = {"vicuna_v1": "</s>", "plain": "", "chatml": "<|im_end|>", "qwen2vl": "<|im_end|>"}[name]
  answers = [(" " if name == "vicuna_v1" else "") + a + ("\n" if name == "plain" else "") + end
             for _, a, _ in rounds]
  assert tok.decode(enc.input_ids[enc.label_mask]) == "".join(answers)
  assert enc.num_images == len(counts)
  image_id = template.image_token_id(tok, name)
  assert int((enc.input_ids == image_id).sum()) == sum(counts)
  if name == "qwen2vl":
    _assert_blocks_whole(tok, enc.input_ids, counts)
    assert 4 not in enc.input_ids
  image_ids = _ids(tok, template.VISION_START, template.IMAGE_PAD, template.VISION_END, "<image>")
  assert not enc.label_mask[np.isin(enc.input_ids, image_ids)].any()
  prompt, reference = template.encode_prompt(conv, tok, num_image_tokens=num_image_tokens,
                                             template=name)
  assert reference == rounds[-1][1]
  np.testing.assert_array_equal(prompt, enc.input_ids[:len(prompt)])
  assert enc.label_mask[len(prompt)]
  if name != "plain":  # plain has no prompt text when a later round has no image
    assert not enc.label_mask[len(prompt) - 1]


# --- per-image counts and qwen2vl ----------------------------------------------------------------

# Two rounds with an image in each, for per-image counts.
TWO_IMAGES = _conv("<image>\nWhat color is it?", "red", "and <image> the shape?", "a circle")


def _ids(tok, *tokens):
  return [tok.convert_tokens_to_ids(t) for t in tokens]


def _pieces(pieces):
  """Concatenated ids and labels of ``[(ids, label), ...]``."""
  ids = np.concatenate([np.asarray(p, np.int32) for p, _ in pieces])
  labels = np.concatenate([np.full(len(p), bool(m)) for p, m in pieces])
  return ids, labels


def test_per_image_counts(tok):
  conv = _conv("<image> or <image>?", "left")
  enc = template.encode_conversation(conv, tok, num_image_tokens=[2, 5], max_len=512)
  ids, labels = _pieces([
      ([1], 0), (_enc(tok, template.SYSTEM_PROMPT), 0), (_enc(tok, " USER: "), 0), ([4] * 2, 0),
      (_enc(tok, " or "), 0), ([4] * 5, 0), (_enc(tok, "? ASSISTANT:"), 0), (_enc(tok, " left"), 1),
      ([2], 1)])
  np.testing.assert_array_equal(enc.input_ids, ids)
  np.testing.assert_array_equal(enc.label_mask, labels)
  assert enc.num_images == 2
  # The int form is every image that many; a sequence of equal counts (any iterable) is the same.
  same = template.encode_conversation(conv, tok, num_image_tokens=N_IMG, max_len=512)
  for counts in ([N_IMG, N_IMG], (N_IMG, N_IMG), np.array([N_IMG, N_IMG]), np.int64(N_IMG)):
    other = template.encode_conversation(conv, tok, num_image_tokens=counts, max_len=512)
    np.testing.assert_array_equal(other.input_ids, same.input_ids)
  assert int((same.input_ids == 4).sum()) == 2 * N_IMG
  # Counts run over the whole conversation: round 0's image, then round 1's.
  enc = template.encode_conversation(TWO_IMAGES, tok, num_image_tokens=[3, 1], max_len=512)
  assert tok.decode(enc.input_ids).endswith(
      " USER: " + "<image>" * 3 + "\nWhat color is it? ASSISTANT: red</s>"
      "USER: and " + "<image>" + " the shape? ASSISTANT: a circle</s>")
  prompt, _ = template.encode_prompt(TWO_IMAGES, tok, num_image_tokens=[3, 1])
  np.testing.assert_array_equal(prompt, enc.input_ids[:len(prompt)])
  # A text-only sample takes no counts (and any int, as before).
  text = _conv("hi", "hello")
  np.testing.assert_array_equal(
      template.encode_conversation(text, tok, num_image_tokens=[], max_len=512).input_ids,
      template.encode_conversation(text, tok, num_image_tokens=0, max_len=512).input_ids)


def test_per_image_counts_errors(tok):
  conv = _conv("<image> or <image>?", "left")
  for counts, n in (([2], 1), ([2, 5, 1], 3), ([], 0)):
    with pytest.raises(ValueError, match=f"has {n} counts but the conversation has 2 <image>"):
      template.encode_conversation(conv, tok, num_image_tokens=counts, max_len=512)
  # The trailing question is not part of the conversation: its image takes no count.
  with pytest.raises(ValueError, match="has 3 counts but the conversation has 2"):
    template.encode_prompt(TWO_IMAGES + [{"from": "human", "value": "<image>"}], tok,
                           num_image_tokens=[1, 1, 1])
  with pytest.raises(ValueError, match="has 1 counts but the conversation has 0"):
    template.encode_conversation(_conv("hi", "hello"), tok, num_image_tokens=[1], max_len=512)
  with pytest.raises(ValueError, match=r"num_image_tokens\[1\] = 0 must be >= 1"):
    template.encode_conversation(conv, tok, num_image_tokens=[2, 0], max_len=512)
  with pytest.raises(ValueError, match="num_image_tokens must be >= 1"):
    template.encode_conversation(conv, tok, num_image_tokens=0, max_len=512)


def _qwen_expected(tok, counts):
  """Hand-built ids and labels of TWO_IMAGES under qwen2vl, and the index of its final round."""
  start, end, vstart, pad, vend = _ids(tok, *QWEN_TOKENS)
  nl = _enc(tok, "\n")
  first = [
      ([start], 0), (_enc(tok, "system\nYou are a helpful assistant."), 0), ([end], 0), (nl, 0),
      ([start], 0), (_enc(tok, "user\n"), 0), ([vstart] + [pad] * counts[0] + [vend], 0),
      (_enc(tok, "\nWhat color is it?"), 0), ([end], 0), (nl, 0), ([start], 0),
      (_enc(tok, "assistant\n"), 0), (_enc(tok, "red"), 1), ([end], 1), (nl, 0)]
  final = [
      ([start], 0), (_enc(tok, "user\nand "), 0), ([vstart] + [pad] * counts[1] + [vend], 0),
      (_enc(tok, " the shape?"), 0), ([end], 0), (nl, 0), ([start], 0),
      (_enc(tok, "assistant\n"), 0), (_enc(tok, "a circle"), 1), ([end], 1), (nl, 0)]
  ids, labels = _pieces(first + final)
  return ids, labels, len(_pieces(first)[0])


def test_qwen2vl_one_image_is_exact(qwen_tok):
  tok = qwen_tok
  start, end, vstart, pad, vend = _ids(tok, *QWEN_TOKENS)
  enc = template.encode_conversation(_conv("<image>\nWhat color is it?", "red"), tok,
                                     num_image_tokens=3, max_len=512, template="qwen2vl")
  ids, labels = _pieces([
      ([start], 0), (_enc(tok, "system\nYou are a helpful assistant."), 0), ([end], 0),
      (_enc(tok, "\n"), 0), ([start], 0), (_enc(tok, "user\n"), 0),
      ([vstart, pad, pad, pad, vend], 0), (_enc(tok, "\nWhat color is it?"), 0), ([end], 0),
      (_enc(tok, "\n"), 0), ([start], 0), (_enc(tok, "assistant\n"), 0), (_enc(tok, "red"), 1),
      ([end], 1), (_enc(tok, "\n"), 0)])
  np.testing.assert_array_equal(enc.input_ids, ids)
  np.testing.assert_array_equal(enc.label_mask, labels)
  assert enc.num_images == 1 and not enc.truncated and 4 not in enc.input_ids
  assert tok.decode(enc.input_ids) == (
      "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
      "<|vision_start|>" + "<|image_pad|>" * 3 + "<|vision_end|>\nWhat color is it?<|im_end|>\n"
      "<|im_start|>assistant\nred<|im_end|>\n")


def test_qwen2vl_two_rounds_are_exact(qwen_tok):
  tok = qwen_tok
  enc = template.encode_conversation(TWO_IMAGES, tok, num_image_tokens=[2, 5], max_len=512,
                                     template="qwen2vl")
  ids, labels, _ = _qwen_expected(tok, [2, 5])
  np.testing.assert_array_equal(enc.input_ids, ids)
  np.testing.assert_array_equal(enc.label_mask, labels)
  assert enc.num_images == 2
  assert _masked_runs(tok, enc) == ["red<|im_end|>", "a circle<|im_end|>"]
  # Same text, roles, loss and stop token as chatml; only the image blocks differ.
  chatml = template.encode_conversation(TWO_IMAGES, tok, num_image_tokens=[2, 5], max_len=512,
                                        template="chatml")
  vision = _ids(tok, template.VISION_START, template.VISION_END)
  pad = template.image_token_id(tok, "qwen2vl")
  qwen_ids = np.where(enc.input_ids == pad, 4, enc.input_ids)
  np.testing.assert_array_equal(qwen_ids[~np.isin(enc.input_ids, vision)], chatml.input_ids)
  assert template.stop_token_id(tok, "qwen2vl") == template.stop_token_id(tok, "chatml")


def test_qwen2vl_prompt_is_a_prefix(qwen_tok):
  tok = qwen_tok
  for counts in ([2, 5], 4):
    enc = template.encode_conversation(TWO_IMAGES, tok, num_image_tokens=counts, max_len=512,
                                       template="qwen2vl")
    prompt, reference = template.encode_prompt(TWO_IMAGES, tok, num_image_tokens=counts,
                                               template="qwen2vl")
    assert reference == "a circle"
    np.testing.assert_array_equal(prompt, enc.input_ids[:len(prompt)])
    assert tok.decode(prompt).endswith("<|vision_end|> the shape?<|im_end|>\n"
                                       "<|im_start|>assistant\n")
    assert enc.label_mask[len(prompt)] and not enc.label_mask[len(prompt) - 1]


def _assert_blocks_whole(tok, ids, counts):
  """Each image is ``<|vision_start|>``, its count of ``<|image_pad|>``, ``<|vision_end|>``."""
  vstart, pad, vend = _ids(tok, template.VISION_START, template.IMAGE_PAD, template.VISION_END)
  starts = np.flatnonzero(ids == vstart)
  assert len(starts) == len(counts) and int((ids == pad).sum()) == sum(counts)
  for s, n in zip(starts, counts):
    np.testing.assert_array_equal(ids[s:s + n + 2], [vstart] + [pad] * n + [vend])


def test_qwen2vl_truncation_keeps_wrapped_blocks_whole(qwen_tok):
  tok = qwen_tok
  counts = [2, 5]
  full_ids, _, final_start = _qwen_expected(tok, counts)
  block = _ids(tok, template.VISION_START) + _ids(tok, template.IMAGE_PAD) * 2 + _ids(
      tok, template.VISION_END)
  mandatory = len(block) + len(full_ids) - final_start
  for max_len in range(mandatory, len(full_ids) + 1):
    enc = template.encode_conversation(TWO_IMAGES, tok, num_image_tokens=counts, max_len=max_len,
                                       template="qwen2vl")
    assert len(enc.input_ids) == max_len and enc.truncated == (max_len < len(full_ids))
    _assert_blocks_whole(tok, enc.input_ids, counts)
    np.testing.assert_array_equal(enc.input_ids[-(len(full_ids) - final_start):],
                                  full_ids[final_start:])
  # At the limit only round 0's whole block and the final round are left.
  enc = template.encode_conversation(TWO_IMAGES, tok, num_image_tokens=counts, max_len=mandatory,
                                     template="qwen2vl")
  np.testing.assert_array_equal(enc.input_ids, block + list(full_ids[final_start:]))
  assert _masked_runs(tok, enc) == ["a circle<|im_end|>"]
  assert template.encode_conversation(TWO_IMAGES, tok, num_image_tokens=counts,
                                      max_len=mandatory - 1, template="qwen2vl") is None
  prompt, _ = template.encode_prompt(TWO_IMAGES, tok, num_image_tokens=counts,
                                     template="qwen2vl", max_len=mandatory - 2)
  _assert_blocks_whole(tok, prompt, counts)


def test_image_token_id_per_template(tok, qwen_tok):
  pad = qwen_tok.convert_tokens_to_ids(template.IMAGE_PAD)
  assert pad != 4
  assert template.image_token_id(qwen_tok, "qwen2vl") == pad
  for name in ("vicuna_v1", "plain", "chatml"):
    assert template.image_token_id(qwen_tok, name) == 4
  assert template.image_token_id(tok) == 4
  with pytest.raises(ValueError, match="unknown chat template"):
    template.image_token_id(tok, "alpaca")


def test_qwen2vl_missing_tokens_raise(chatml_tok):
  # chatml_tok has <|im_start|> and <|im_end|> but no vision tokens; even a text-only sample
  # fails, so a misconfigured tokenizer is caught on the first sample.
  for conv in (TWO_IMAGES, _conv("hi", "hello")):
    with pytest.raises(ValueError, match=r"qwen2vl.*<\|vision_start\|> as a single token"):
      template.encode_conversation(conv, chatml_tok, num_image_tokens=2, max_len=512,
                                   template="qwen2vl")
  with pytest.raises(ValueError, match=r"qwen2vl.*<\|vision_start\|>"):
    template.encode_prompt(TWO_IMAGES, chatml_tok, num_image_tokens=2, template="qwen2vl")
  with pytest.raises(ValueError, match=r"qwen2vl.*<\|image_pad\|> as a single token"):
    template.image_token_id(chatml_tok, "qwen2vl")
  partial = tk.train_tokenizer(CORPUS, vocab_size=320, save_dir=None)
  partial.add_tokens(list(QWEN_TOKENS[:-1]), special_tokens=True)
  with pytest.raises(ValueError, match=r"qwen2vl.*<\|vision_end\|> as a single token"):
    template.encode_conversation(TWO_IMAGES, partial, num_image_tokens=2, max_len=512,
                                 template="qwen2vl")


# Qwen2-VL-Instruct's own chat template (its chat_template.json): each image is one
# <|vision_start|><|image_pad|><|vision_end|>, which Qwen2VLProcessor then expands to the image's
# number of <|image_pad|> tokens.
QWEN2VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _qwen_messages(conv):
  """LLaVA turns as Qwen2-VL messages: each ``<image>`` an image item between text items."""
  messages = []
  for turn in conv:
    role = "user" if turn["from"] in template.HUMAN_ROLES else "assistant"
    content = []
    for k, part in enumerate(turn["value"].split(template.IMAGE_PLACEHOLDER)):
      if k:
        content.append({"type": "image"})
      if part:
        content.append({"type": "text", "text": part})
    messages.append({"role": role, "content": content})
  return messages


def _expand_pads(text, counts):
  """What Qwen2VLProcessor does to the rendered text: image k's pad repeated counts[k] times."""
  parts = text.split(template.IMAGE_PAD)
  assert len(parts) == len(counts) + 1
  return parts[0] + "".join(template.IMAGE_PAD * n + p for n, p in zip(counts, parts[1:]))


def test_qwen2vl_matches_qwen2vl_chat_template(qwen_tok):
  pytest.importorskip("jinja2")  # apply_chat_template renders with jinja2
  tok = qwen_tok
  render = functools.partial(tok.apply_chat_template, chat_template=QWEN2VL_CHAT_TEMPLATE,
                             tokenize=False)
  conv = TWO_IMAGES + _conv("<image><image>\nCompare.", "same")
  counts = [2, 5, 1, 3]
  enc = template.encode_conversation(conv, tok, num_image_tokens=counts, max_len=512,
                                     template="qwen2vl")
  messages = _qwen_messages(conv)
  text = render(messages)
  assert text.count("<|vision_start|><|image_pad|><|vision_end|>") == len(counts)
  assert tok.decode(enc.input_ids) == _expand_pads(text, counts)
  prompt, _ = template.encode_prompt(conv, tok, num_image_tokens=counts, template="qwen2vl")
  text = render(messages[:-1], add_generation_prompt=True)
  assert tok.decode(prompt) == _expand_pads(text, counts)
