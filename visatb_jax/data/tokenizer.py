"""A small byte-level BPE tokenizer trained offline, saved/loaded as ``PreTrainedTokenizerFast``.

Byte-level (GPT-2 style) without a prefix space, so ``decode(encode(s)) == s`` for every string.
The special tokens have fixed ids: ``<unk>`` 0, ``<s>`` 1 (bos), ``</s>`` 2 (eos), ``<pad>`` 3,
``<image>`` 4. ``encode`` adds no special tokens (there is no post-processor): the chat template
in ``template.py`` places bos/eos itself.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Iterable

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast


UNK, BOS, EOS, PAD, IMAGE = "<unk>", "<s>", "</s>", "<pad>", "<image>"
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD, IMAGE)


def build_backend(texts: Iterable[str], *, vocab_size: int) -> tokenizers.Tokenizer:
  """Trains the raw ``tokenizers`` byte-level BPE on ``texts``."""
  backend = tokenizers.Tokenizer(models.BPE(unk_token=None))
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  backend.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  # A list (not a generator) keeps training independent of how the caller built the iterable.
  backend.train_from_iterator(list(texts), trainer=trainer)
  return backend


def wrap(backend: tokenizers.Tokenizer) -> PreTrainedTokenizerFast:
  """The transformers wrapper with the special tokens named and no space clean-up."""
  return PreTrainedTokenizerFast(
      tokenizer_object=backend, unk_token=UNK, bos_token=BOS, eos_token=EOS, pad_token=PAD,
      extra_special_tokens=[IMAGE], clean_up_tokenization_spaces=False,
      model_max_length=1 << 30)


def train_tokenizer(texts: Iterable[str], *, vocab_size: int,
                    save_dir: str | os.PathLike | None) -> PreTrainedTokenizerFast:
  """Trains a byte-level BPE tokenizer (deterministic given ``texts``) and saves it.

  Args:
    texts: training corpus.
    vocab_size: target size including the 5 specials and the 256 byte symbols (it may end smaller
      when the corpus has fewer merges to learn).
    save_dir: where ``save_pretrained`` writes it (None: not saved).
  """
  if vocab_size < len(SPECIAL_TOKENS) + 256:
    raise ValueError(f"vocab_size={vocab_size} is below the {len(SPECIAL_TOKENS) + 256} "
                     "special and byte tokens")
  tok = wrap(build_backend(texts, vocab_size=vocab_size))
  check_special_ids(tok)
  if save_dir is not None:
    save_tokenizer(tok, save_dir)
  return tok


def save_tokenizer(tok: PreTrainedTokenizerBase, save_dir: str | os.PathLike) -> None:
  """``save_pretrained`` into a sibling scratch directory, then renamed into place.

  ``save_pretrained`` writes several files; renaming the whole directory means a reader (or a
  resumed run) sees all of them or none, never a tokenizer.json without its config.
  """
  save_dir = os.path.abspath(os.fspath(save_dir))
  os.makedirs(os.path.dirname(save_dir), exist_ok=True)
  scratch = tempfile.mkdtemp(dir=os.path.dirname(save_dir), prefix=".tmp-tokenizer-")
  try:
    tok.save_pretrained(scratch)
    if os.path.exists(save_dir):
      shutil.rmtree(save_dir)
    os.replace(scratch, save_dir)
  finally:
    if os.path.exists(scratch):
      shutil.rmtree(scratch)


def load_tokenizer(save_dir: str | os.PathLike) -> PreTrainedTokenizerFast:
  """Loads a tokenizer saved by :func:`train_tokenizer`."""
  tok = PreTrainedTokenizerFast.from_pretrained(os.fspath(save_dir))
  check_special_ids(tok)
  return tok


def check_special_ids(tok: PreTrainedTokenizerFast) -> None:
  """Raises ``ValueError`` unless the specials have ids 0..4 in ``SPECIAL_TOKENS`` order."""
  ids = [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
  if ids != list(range(len(SPECIAL_TOKENS))):
    raise ValueError(f"special tokens {SPECIAL_TOKENS} have ids {ids}, expected 0..4")


def image_token_id(tok: PreTrainedTokenizerBase, token: str = IMAGE) -> int:
  """Id of the image token (``<image>``, or the chat template's, e.g. Qwen2-VL's
  ``<|image_pad|>``)."""
  token_id = tok.convert_tokens_to_ids(token)
  if token_id is None or token_id == tok.unk_token_id:
    raise ValueError(f"tokenizer has no {token} token")
  return int(token_id)


def load_pretrained_tokenizer(path: str | os.PathLike, *,
                              image_token: str = IMAGE) -> PreTrainedTokenizerBase:
  """A checkpoint's own tokenizer from a local directory (never the network).

  A tokenizer without a pad token (Llama's) gets its unk token as padding: padding never carries
  loss or attention, so any id that is not eos works, and the vocabulary stays the checkpoint's.
  `image_token`: the token the chat template's image blocks carry, which the tokenizer must have.
  """
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
  path = os.fspath(path)
  try:
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
  except (OSError, ValueError) as e:
    raise ValueError(f"cannot load a tokenizer from {path}: {e}") from e
  if tok.pad_token_id is None:
    fallback = tok.unk_token or tok.eos_token
    if fallback is None:
      raise ValueError(f"the tokenizer in {path} has no pad, unk or eos token")
    tok.pad_token = fallback
  if tok.eos_token_id is None:
    raise ValueError(f"the tokenizer in {path} has no eos token")
  image_token_id(tok, image_token)
  return tok


def copy_pretrained_tokenizer(src: str | os.PathLike, dst: str | os.PathLike, *,
                              image_token: str = IMAGE) -> None:
  """Saves the tokenizer of checkpoint directory `src` into `dst` (atomically, see
  save_tokenizer); `image_token` as `load_pretrained_tokenizer`."""
  save_tokenizer(load_pretrained_tokenizer(src, image_token=image_token), dst)
