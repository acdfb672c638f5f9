"""What every benchmark script does at its end: write its figures as JSON."""

from __future__ import annotations

import json
import os
from typing import Any


def write_json(path: str, results: Any) -> None:
  """Writes `results` to `path` (creating its directory), indented for reading."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(results, f, indent=2)


def demo_llava(vocab: int = 512):
  """A LLaVA of configs/demo.py's sizes (seed 0) with the given vocabulary, image token id 4."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from visatb_jax.model import config as model_config  # pylint: disable=g-import-not-at-top
  from visatb_jax.model import llava  # pylint: disable=g-import-not-at-top
  cfg = model_config.LlavaConfig.from_dict({
      "vision": {"image_size": 48, "patch_size": 16, "hidden_size": 64, "intermediate_size": 128,
                 "num_hidden_layers": 3, "num_attention_heads": 4},
      "text": {"vocab_size": vocab, "hidden_size": 96, "intermediate_size": 256,
               "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
               "max_position_embeddings": 512},
      "image_token_id": 4})
  return llava.LlavaForConditionalGeneration(cfg, rngs=nnx.Rngs(0))
