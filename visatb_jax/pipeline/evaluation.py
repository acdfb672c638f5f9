"""Generation-based evaluation: greedy answers for every task of a split, scored by its metric.

Prompts are encoded and images loaded once per split (`build_eval_sets`); the same arrays then
serve every model that is evaluated, so a pipeline with many models pays for that only once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import tqdm

from visatb_jax.core import metrics
from visatb_jax.runtime import sharding
from visatb_jax.data import images as images_lib
from visatb_jax.data import template
from visatb_jax.model import generate


@dataclasses.dataclass
class EvalSet:
  """One task's prompts, left-padded to a common length, with their images and references."""
  task: str
  metric: str
  prompt_ids: np.ndarray    # int32 [n, P], left-padded
  prompt_mask: np.ndarray   # int32 [n, P]
  images: np.ndarray        # uint8 [n, 1, H, W, 3]
  references: list[str]
  stop_id: int | None = None  # the token that ends an answer (None: the tokenizer's eos)

  def __len__(self) -> int:
    return len(self.references)


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def build_eval_sets(
    samples: Sequence[Mapping],
    *,
    tokenizer,
    task_metrics: Mapping[str, str],
    num_image_tokens: int,
    image_size: int,
    system: str | None = None,
    pad_to: int = 32,
    template_name: str = template.DEFAULT_TEMPLATE,
) -> dict[str, EvalSet]:
  """Encodes every sample's prompt and loads its image, grouped by task (in `task_metrics` order)."""
  by_task: dict[str, list[Mapping]] = {t: [] for t in task_metrics}
  for s in samples:
    if s["task"] not in by_task:
      raise ValueError(f"sample {s.get('id')!r} has task {s['task']!r}, which is not in the config's "
                       f"tasks {sorted(task_metrics)}")
    by_task[s["task"]].append(s)
  pad_id = tokenizer.pad_token_id
  out = {}
  for task, task_samples in by_task.items():
    if not task_samples:
      raise ValueError(f"task {task!r} has no samples in this split")
    encoded = [template.encode_prompt(s["conversations"], tokenizer, num_image_tokens=num_image_tokens,
                                      system=system, template=template_name)
               for s in task_samples]
    length = _round_up(max(len(ids) for ids, _ in encoded), pad_to)
    ids = np.full((len(encoded), length), pad_id, np.int32)
    mask = np.zeros((len(encoded), length), np.int32)
    for r, (p, _) in enumerate(encoded):
      ids[r, length - len(p):] = p
      mask[r, length - len(p):] = 1
    imgs = np.zeros((len(encoded), 1, image_size, image_size, 3), np.uint8)
    for r, s in enumerate(task_samples):
      if s.get("image_path"):
        imgs[r, 0] = images_lib.load_image(s["image_path"], image_size)
    out[task] = EvalSet(task, task_metrics[task], ids, mask, imgs, [ref for _, ref in encoded],
                        stop_id=template.stop_token_id(tokenizer, template_name))
  return out


def generate_answers(model, eval_set: EvalSet, *, tokenizer, batch_size: int,
                     max_new_tokens: int, mesh=None) -> list[str]:
  """Greedy answers for one task; the last batch is padded so that no new shape compiles.

  With `mesh`, each batch's rows are split over its batch axes (all devices of all hosts decode
  their share; `batch_size` is rounded up to a multiple of the shards) and every process gets
  every answer.
  """
  n = len(eval_set)
  if mesh is not None:
    batch_size = _round_up(batch_size, sharding.batch_shards(mesh))
  stop = tokenizer.eos_token_id if eval_set.stop_id is None else eval_set.stop_id
  answers = []
  for start in range(0, n, batch_size):
    idx = np.arange(start, start + batch_size) % n  # wrap-around rows are dropped below
    tokens = generate.greedy_generate(
        model, eval_set.prompt_ids[idx], eval_set.prompt_mask[idx],
        images_lib.normalize(eval_set.images[idx]),
        max_new_tokens=max_new_tokens, eos_id=stop, pad_id=tokenizer.pad_token_id, mesh=mesh)
    tokens = np.asarray(tokens)[: min(batch_size, n - start)]
    for row in tokens:
      row = row[row != tokenizer.pad_token_id]
      row = row[row != stop]
      answers.append(tokenizer.decode(row.tolist(), skip_special_tokens=True).strip())
  return answers


def evaluate(model, eval_sets: Mapping[str, EvalSet], *, tokenizer, batch_size: int,
             max_new_tokens: int, tasks: Sequence[str] | None = None,
             desc: str = "eval", mesh=None) -> tuple[dict[str, float], dict[str, list[str]]]:
  """Scores `model` on each task → ({task: score}, {task: predictions}); `mesh`: see
  `generate_answers`."""
  scores, predictions = {}, {}
  for task in tqdm.tqdm(tasks or list(eval_sets), desc=desc, leave=False, disable=None):
    es = eval_sets[task]
    preds = generate_answers(model, es, tokenizer=tokenizer, batch_size=batch_size,
                             max_new_tokens=max_new_tokens, mesh=mesh)
    refs = [[r] for r in es.references] if es.metric == "cider" else es.references
    scores[task] = float(metrics.score(es.metric, preds, refs))
    predictions[task] = preds
  return scores, predictions
