"""Chat templates: token ids, exact label masks, generation prompts.

Four templates, chosen by name (``template=`` in :func:`encode_conversation` and
:func:`encode_prompt`):

* ``vicuna_v1`` (default): LLaVA-1.5's instruction-tuning template, described below.
* ``plain``: LLaVA's pretraining template (``conv_llava_plain``): ``<s><image>answer\n`` per round.
  The human turn contributes only its image blocks (its text is dropped, as LLaVA's
  ``preprocess_plain`` replaces it by ``<image>``); there are no roles and no system prompt; the
  loss is on ``answer + "\n"``. There is no eos, so a model trained with it alone stops generating
  only at ``max_new_tokens`` (it is meant for projector pretraining, not for scoring).
* ``chatml`` (Qwen)::

      <|im_start|>system\nSYSTEM<|im_end|>\n<|im_start|>user\nq1<|im_end|>\n<|im_start|>assistant\n
      a1<|im_end|>\n<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\na2<|im_end|>\n

  without bos (Qwen has none); the loss is on each answer and its ``<|im_end|>`` (not on the
  ``"\n"`` after it); an empty system prompt drops the system block. ``<|im_start|>`` and
  ``<|im_end|>`` must be single tokens of the tokenizer (Qwen's are), and ``<|im_end|>`` is the
  token that ends generation (:func:`stop_token_id`).
* ``qwen2vl`` (Qwen2-VL): ``chatml`` exactly (system prompt, no bos, loss, stop token), except
  that an image block is ``<|vision_start|>`` + n x ``<|image_pad|>`` + ``<|vision_end|>``, as
  Qwen2-VL's own chat template and processor render an image. The three must be single tokens of
  the tokenizer; the block's image token is ``<|image_pad|>``, not ``<image>``.

The other templates' image block is n copies of the tokenizer's ``<image>`` token. Which id a
template's image blocks carry (the model's ``image_token_id`` must equal it) is
:func:`image_token_id`.

Image token counts: ``num_image_tokens`` is either an int, the length n of every image's block,
or a sequence of ints, one per ``<image>`` placeholder in order of appearance in the conversation
(all rounds, the final question included), for models whose images each have their own number
of tokens (Qwen2-VL at native resolution). A sequence whose length differs from the number of
placeholders is a ``ValueError``.

Every template is built from the same pieces (a prefix, per round a prompt with label 0 and an
answer with label 1, an unlabelled round end), so the truncation rule below and the prefix
property of :func:`encode_prompt` hold for all of them.

vicuna_v1: LLaVA's ``conv_vicuna_v1`` (sep=" ", sep2="</s>") renders a conversation as::

    <s>SYSTEM USER: q1 ASSISTANT: a1</s>USER: q2 ASSISTANT: a2</s>

(there is no space between ``</s>`` and the next ``USER:``, exactly as LLaVA's ``get_prompt``).
Pieces are tokenised separately so the label mask is exact, and every function here uses the same
pieces, so a generation prompt is always a prefix of the training sequence:

* bos id (label 0);
* the system prompt (label 0);
* per round, the prompt piece ``" USER: " + q + " ASSISTANT:"`` (no leading space after the first
  round) with label 0; each ``<image>`` placeholder in ``q`` becomes its image block (its
  ``num_image_tokens`` copies of the image token id), and the text around it is tokenised on its
  own (the ``"\\n"`` after ``<image>`` is kept, as LLaVA-1.5 keeps it);
* the answer piece ``" " + a`` (label 1) and the eos id (label 1).

A trailing human turn without an answer is ignored.

Truncation rule, all templates (for a sequence longer than ``max_len``): the bos token, every
image block (with its ``<|vision_start|>`` / ``<|vision_end|>`` under ``qwen2vl``) and the whole
final round (its question, role tags, answer and end token) are kept; the other tokens
are dropped from the front, i.e. first the system prompt, then the earliest text, until the
sequence fits (so images are never cut or dropped, and earlier answers may lose their first
tokens). If the kept tokens alone exceed ``max_len``, the sample cannot be used:
``encode_conversation`` returns None.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from visatb_jax.data import tokenizer as tokenizer_lib

SYSTEM_PROMPT = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's "
                 "questions.")
CHATML_SYSTEM_PROMPT = "You are a helpful assistant."
USER, ASSISTANT = "USER", "ASSISTANT"
IMAGE_PLACEHOLDER = "<image>"
HUMAN_ROLES = ("human", "user")
GPT_ROLES = ("gpt", "assistant")
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, IMAGE_PAD, VISION_END = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"
DEFAULT_TEMPLATE = "vicuna_v1"

# Token kinds; only TEXT tokens may be dropped by truncation. A whole image block (vision
# start/end tokens included) is IMAGE.
_TEXT, _IMAGE, _BOS = 0, 1, 2

# A piece of a rendered conversation: text (tokenised on its own; ``<image>`` expanded in prompt
# pieces) or one token id.
Piece = str | int


@dataclasses.dataclass(frozen=True)
class Encoded:
  """A tokenised training sample."""
  input_ids: np.ndarray  # int32 [n]
  label_mask: np.ndarray  # bool [n], True on assistant answer tokens and their closing token
  num_images: int
  truncated: bool


@dataclasses.dataclass
class _Builder:
  """Token ids with their label and kind, appended piece by piece."""
  ids: list[int] = dataclasses.field(default_factory=list)
  labels: list[bool] = dataclasses.field(default_factory=list)
  kinds: list[int] = dataclasses.field(default_factory=list)
  num_images: int = 0

  def add(self, ids: Sequence[int], label: bool, kind: int = _TEXT) -> None:
    self.ids.extend(ids)
    self.labels.extend([label] * len(ids))
    self.kinds.extend([kind] * len(ids))


def split_rounds(conversations: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
  """``[(question, answer), ...]`` from alternating human/gpt turns; a trailing question is dropped.

  Raises:
    ValueError: roles that do not alternate human/gpt starting with human, or no answer at all.
  """
  rounds = []
  for i in range(0, len(conversations) - 1, 2):
    human, gpt = conversations[i], conversations[i + 1]
    if human["from"] not in HUMAN_ROLES or gpt["from"] not in GPT_ROLES:
      raise ValueError(f"turns {i}, {i + 1} have roles {human['from']!r}, {gpt['from']!r}; "
                       "expected human then gpt")
    rounds.append((human["value"], gpt["value"]))
  if len(conversations) % 2 and conversations[-1]["from"] not in HUMAN_ROLES:
    raise ValueError(f"turn {len(conversations) - 1} should be a human turn")
  if not rounds:
    raise ValueError("conversation has no assistant answer")
  return rounds


def _encode_text(tok: Any, text: str) -> list[int]:
  return tok.encode(text, add_special_tokens=False) if text else []


def _single_token_id(tok: Any, token: str, template: str) -> int:
  token_id = tok.convert_tokens_to_ids(token)
  if token_id is None or token_id == tok.unk_token_id:
    raise ValueError(f"template {template!r} needs {token} as a single token of the tokenizer "
                     "(add it as a special token)")
  return int(token_id)


def round_prompt(index: int, question: str) -> str:
  """vicuna_v1 text of a round before its answer: ``" USER: q ASSISTANT:"`` (no space after round 0)."""
  return f"{' ' if index == 0 else ''}{USER}: {question} {ASSISTANT}:"


class ChatTemplate:
  """How a conversation is rendered into pieces; see the module docstring for each template."""

  name: str = ""
  default_system: str = ""
  add_bos: bool = True

  def prefix(self, tok: Any, system: str) -> list[Piece]:
    """Pieces after bos and before the first round (label 0)."""
    del tok
    return [system] if system else []

  def prompt(self, tok: Any, index: int, question: str) -> list[Piece]:
    """Pieces of round ``index`` before its answer (label 0)."""
    raise NotImplementedError

  def answer(self, tok: Any, answer: str) -> list[Piece]:
    """Pieces of an answer, its end token included (label 1)."""
    raise NotImplementedError

  def round_end(self, tok: Any) -> list[Piece]:
    """Pieces after an answer's end token (label 0)."""
    del tok
    return []

  def stop_token_id(self, tok: Any) -> int:
    """The token that ends a generated answer."""
    return int(tok.eos_token_id)

  image_token: str = tokenizer_lib.IMAGE  # The token an image block repeats.

  def image_token_id(self, tok: Any) -> int:
    """The id that an image block repeats once per image feature (the model's image_token_id)."""
    return tokenizer_lib.image_token_id(tok)

  def image_block(self, tok: Any, n: int) -> list[int]:
    """The ids that one ``<image>`` placeholder with ``n`` image tokens becomes (label 0)."""
    return [self.image_token_id(tok)] * n


class VicunaV1(ChatTemplate):
  name, default_system = "vicuna_v1", SYSTEM_PROMPT

  def prompt(self, tok, index, question):
    return [round_prompt(index, question)]

  def answer(self, tok, answer):
    return [" " + answer, int(tok.eos_token_id)]


class Plain(ChatTemplate):
  name = "plain"

  def prefix(self, tok, system):
    return []

  def prompt(self, tok, index, question):
    return [IMAGE_PLACEHOLDER * question.count(IMAGE_PLACEHOLDER)]

  def answer(self, tok, answer):
    return [answer + "\n"]


class ChatML(ChatTemplate):
  name, default_system, add_bos = "chatml", CHATML_SYSTEM_PROMPT, False

  def _ids(self, tok):
    return _single_token_id(tok, IM_START, self.name), _single_token_id(tok, IM_END, self.name)

  def prefix(self, tok, system):
    start, end = self._ids(tok)
    return [start, "system\n" + system, end, "\n"] if system else []

  def prompt(self, tok, index, question):
    start, end = self._ids(tok)
    return [start, "user\n" + question, end, "\n", start, "assistant\n"]

  def answer(self, tok, answer):
    return [answer, self._ids(tok)[1]]

  def round_end(self, tok):
    return ["\n"]

  def stop_token_id(self, tok):
    return self._ids(tok)[1]


class Qwen2VL(ChatML):
  """ChatML whose image blocks are Qwen2-VL's ``<|vision_start|><|image_pad|>...<|vision_end|>``."""
  name, image_token = "qwen2vl", IMAGE_PAD

  def image_token_id(self, tok):
    return _single_token_id(tok, IMAGE_PAD, self.name)

  def image_block(self, tok, n):
    start, end = (_single_token_id(tok, t, self.name) for t in (VISION_START, VISION_END))
    return [start] + [self.image_token_id(tok)] * n + [end]


TEMPLATES: dict[str, ChatTemplate] = {
    t.name: t for t in (VicunaV1(), Plain(), ChatML(), Qwen2VL())}


def get_template(name: str) -> ChatTemplate:
  """The template called ``name`` (one of :data:`TEMPLATES`)."""
  if name not in TEMPLATES:
    raise ValueError(f"unknown chat template {name!r}; expected one of {sorted(TEMPLATES)}")
  return TEMPLATES[name]


def stop_token_id(tok: Any, template: str = DEFAULT_TEMPLATE) -> int:
  """The token id that ends a generated answer under ``template`` (eos, or ``<|im_end|>``)."""
  return get_template(template).stop_token_id(tok)


def image_token_id(tok: Any, template_name: str = DEFAULT_TEMPLATE) -> int:
  """The token id that the image blocks of ``template_name`` carry, one per image feature.

  The model's ``image_token_id`` must equal it: ``<image>`` for the LLaVA templates and ``chatml``,
  ``<|image_pad|>`` for ``qwen2vl``.
  """
  return get_template(template_name).image_token_id(tok)


class _ImageCounts:
  """The block length of each image in order: one int for all, or one int per placeholder.

  A sequence that runs out still answers (1) so that the whole conversation is counted and
  :meth:`check` can report both numbers.
  """

  def __init__(self, num_image_tokens: int | Iterable[int]):
    self.every = None
    self.counts: tuple[int, ...] = ()
    if isinstance(num_image_tokens, numbers.Integral):
      self.every = int(num_image_tokens)
    else:
      self.counts = tuple(int(n) for n in num_image_tokens)

  def __call__(self, index: int) -> int:
    """The number of image tokens of image ``index`` (0-based, whole conversation)."""
    if self.every is not None:
      n = self.every
    elif index < len(self.counts):
      n = self.counts[index]
    else:
      return 1
    if n < 1:
      which = "" if self.every is not None else f"[{index}] = {n}"
      raise ValueError(f"num_image_tokens{which} must be >= 1 for a sample with "
                       f"{IMAGE_PLACEHOLDER}")
    return n

  def check(self, num_images: int) -> None:
    if self.every is None and len(self.counts) != num_images:
      raise ValueError(f"num_image_tokens has {len(self.counts)} counts but the conversation has "
                       f"{num_images} {IMAGE_PLACEHOLDER} placeholders")


def _add_prompt(builder: _Builder, tok: Any, text: str, *, chat: ChatTemplate,
                counts: _ImageCounts) -> None:
  """Appends a prompt piece (label 0), each ``<image>`` expanded into the template's image block."""
  parts = text.split(IMAGE_PLACEHOLDER)
  for k, part in enumerate(parts):
    if k:
      builder.add(chat.image_block(tok, counts(builder.num_images)), False, _IMAGE)
      builder.num_images += 1
    builder.add(_encode_text(tok, part), False)


def _add_pieces(builder: _Builder, tok: Any, pieces: Sequence[Piece], *, label: bool,
                chat: ChatTemplate, counts: _ImageCounts) -> None:
  for piece in pieces:
    if isinstance(piece, int):
      builder.add([piece], label)
    elif label:
      builder.add(_encode_text(tok, piece), True)
    else:
      _add_prompt(builder, tok, piece, chat=chat, counts=counts)


def _build(rounds: Sequence[tuple[str, str]], tok: Any, *,
           num_image_tokens: int | Sequence[int], system: str | None, answer_last: bool,
           template: str) -> tuple[_Builder, int]:
  """Builds the token stream; returns it and the index where the final round starts."""
  chat = get_template(template)
  system = chat.default_system if system is None else system
  builder = _Builder()
  # Resolved on every sample, not only on those with images, so that a tokenizer lacking the
  # template's image tokens fails at once.
  chat.image_block(tok, 1)
  counts = _ImageCounts(num_image_tokens)
  add = functools.partial(_add_pieces, builder, tok, chat=chat, counts=counts)
  if chat.add_bos:
    builder.add([tok.bos_token_id], False, _BOS)
  add(chat.prefix(tok, system), label=False)
  final_start = 0
  for r, (question, answer) in enumerate(rounds):
    last = r == len(rounds) - 1
    if last:
      final_start = len(builder.ids)
    add(chat.prompt(tok, r, question), label=False)
    if last and not answer_last:
      break
    add(chat.answer(tok, answer), label=True)
    add(chat.round_end(tok), label=False)
  counts.check(builder.num_images)
  return builder, final_start


def _truncation_keep(kinds: np.ndarray, final_start: int, max_len: int) -> np.ndarray | None:
  """Boolean keep-mask implementing the truncation rule; None if the mandatory part is too long."""
  n = len(kinds)
  if n <= max_len:
    return np.ones(n, bool)
  droppable = np.flatnonzero((kinds == _TEXT) & (np.arange(n) < final_start))
  excess = n - max_len
  if excess > len(droppable):
    return None
  keep = np.ones(n, bool)
  keep[droppable[:excess]] = False
  return keep


def encode_conversation(conversations: Sequence[dict[str, Any]], tok: Any, *,
                        num_image_tokens: int | Sequence[int], max_len: int,
                        system: str | None = None,
                        template: str = DEFAULT_TEMPLATE) -> Encoded | None:
  """Token ids and label mask of a whole conversation (see the module docstring for the rule).

  Args:
    conversations: ``[{"from": "human"|"gpt", "value": str}, ...]`` (user/assistant accepted).
    tok: a tokenizer from ``tokenizer.py`` (bos, eos and ``<image>`` tokens), or one with the
      template's special tokens.
    num_image_tokens: number of image tokens of each ``<image>`` placeholder: one int for every
      image, or one int per placeholder in order of appearance (all rounds).
    max_len: maximum number of tokens.
    system: system prompt (None: the template's default; ignored by ``plain``).
    template: ``"vicuna_v1"``, ``"plain"``, ``"chatml"`` or ``"qwen2vl"``.

  Returns:
    :class:`Encoded`, or None when bos + image blocks + the final round exceed ``max_len``.

  Raises:
    ValueError: bad roles, no answer, an image count < 1, a sequence of counts whose length is
      not the number of placeholders, or a tokenizer lacking the template's special tokens.
  """
  builder, final_start = _build(split_rounds(conversations), tok,
                                num_image_tokens=num_image_tokens, system=system, answer_last=True,
                                template=template)
  kinds = np.asarray(builder.kinds, np.int8)
  keep = _truncation_keep(kinds, final_start, max_len)
  if keep is None:
    return None
  return Encoded(
      input_ids=np.asarray(builder.ids, np.int32)[keep],
      label_mask=np.asarray(builder.labels, np.bool_)[keep],
      num_images=builder.num_images,
      truncated=not keep.all())


def encode_prompt(conversations: Sequence[dict[str, Any]], tok: Any, *,
                  num_image_tokens: int | Sequence[int], max_len: int | None = None,
                  system: str | None = None,
                  template: str = DEFAULT_TEMPLATE) -> tuple[np.ndarray, str]:
  """Generation prompt up to the final answer (e.g. ``" ASSISTANT:"``) and that answer's text.

  The earlier rounds are included with their answers. The prompt ids are exactly a prefix of
  ``encode_conversation(...).input_ids`` (without truncation). With ``max_len``, the prompt is
  truncated by the same rule (the final question and all images are kept). ``num_image_tokens``
  is as in :func:`encode_conversation` (per-image counts cover the final question's images too).

  Raises:
    ValueError: as :func:`encode_conversation`, or the final question and images exceed
      ``max_len``.
  """
  rounds = split_rounds(conversations)
  builder, final_start = _build(rounds, tok, num_image_tokens=num_image_tokens, system=system,
                                answer_last=False, template=template)
  ids = np.asarray(builder.ids, np.int32)
  if max_len is not None:
    keep = _truncation_keep(np.asarray(builder.kinds, np.int8), final_start, max_len)
    if keep is None:
      raise ValueError(f"prompt needs {len(ids)} tokens; its final question and images alone "
                       f"exceed max_len={max_len}")
    ids = ids[keep]
  return ids, rounds[-1][1]
