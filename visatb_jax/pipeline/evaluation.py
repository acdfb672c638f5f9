"""Generation-based evaluation: greedy answers for every task of a split, scored by its metric.

Prompts are encoded and images loaded once per split (`build_eval_sets`); the same arrays then
serve every model that is evaluated, so a pipeline with many models pays for that only once.

`evaluate_samples` also keeps every sample's own score, keyed by the sample's id, so that the
uncertainty of a score can be bootstrapped; a task's score is `metrics.mean_score` of its
per-sample scores, to the bit.

References follow one convention (`sources.scoring_references`): a sample's `"answers"` list when
it has one, else its last assistant turn. Metrics that take several references get them all
(`MULTI_REFERENCE_METRICS`); the others (one yes/no label) get the first.

A sample is answered with all of its images: each row carries as many image slots as the task's
sample with the most images, and the k-th `<image>` block of a prompt reads slot k, exactly as in
training (`model.llava.splice_image_features`, `model.qwen2vl.splice_row_features`). With an
image format (data/image_format.py) an eval set keeps each sample's images as the model sees them
(Qwen2-VL: native size, so each image has its own token count) and a batch's image arrays and
positions are made by that format, as the training batches are.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from visatb_jax.core import metrics
from visatb_jax.runtime import progress as progress_lib
from visatb_jax.runtime import sharding
from visatb_jax.data import images as images_lib
from visatb_jax.data import sources, template
from visatb_jax.model import generate

# Metrics whose per-sample reference may be a list of several answers, each used: a hit on any
# (exact_match, accuracy, iou_accuracy, multiple_choice), soft accuracy over the human answers
# (vqa_accuracy), or multi-reference CIDEr-D. pope and mme score against one yes/no label.
MULTI_REFERENCE_METRICS = frozenset(
    {"exact_match", "accuracy", "iou_accuracy", "multiple_choice", "vqa_accuracy", "cider"})

Reference = str | list[str]


@dataclasses.dataclass
class EvalSet:
  """One task's prompts, left-padded to a common length, with their images and references.

  `ids` names each row's sample (unique within the task); left empty, it is filled with
  f"{task}-{row}". A reference is one string (the last assistant turn) or the list of a sample's
  `"answers"`. `options` are the metric's keyword options (`metrics.metric_options`);
  `sample_arguments` the scorer's arguments read from the samples' own fields, one value per
  row (`metrics.SAMPLE_ARGUMENTS`: MMBench's question ids and shifts).
  """
  task: str
  metric: str
  prompt_ids: np.ndarray    # int32 [n, P], left-padded
  prompt_mask: np.ndarray   # int32 [n, P]
  # uint8 [n, M, H, W, 3] (M = the most images of one sample, >= 1) without `image_format`; with
  # it, each sample's list of uint8 [h, w, 3] images as `image_format.load` gives them.
  images: np.ndarray | list[list[np.ndarray]]
  references: list[Reference]
  stop_id: int | None = None  # the token that ends an answer (None: the tokenizer's eos)
  ids: list[str] = dataclasses.field(default_factory=list)
  options: Mapping[str, object] = dataclasses.field(default_factory=dict)
  image_format: Any = None  # data/image_format.py; None: LLaVA's square images, as `images`
  sample_arguments: Mapping[str, list] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if not self.ids:
      self.ids = [_fallback_id(self.task, row) for row in range(len(self.references))]
    if len(self.ids) != len(self.references):
      raise ValueError(f"task {self.task!r}: {len(self.ids)} ids for {len(self.references)} "
                       "references")
    _check_unique_ids(self.task, self.ids)

  def __len__(self) -> int:
    return len(self.references)


@dataclasses.dataclass(frozen=True)
class EvalResult:
  """What `evaluate_samples` returns, per task.

  scores: {task: score}, each `metrics.mean_score` of the task's per-sample scores.
  samples: {task: {sample id: that sample's score}}, in eval-set order.
  predictions: {task: the generated answers}, in eval-set order.
  """
  scores: dict[str, float]
  samples: dict[str, dict[str, float]]
  predictions: dict[str, list[str]]


def _fallback_id(task: str, row: int) -> str:
  """The id of a sample that has none: its task and its row in the task's eval set."""
  return f"{task}-{row}"


def _check_unique_ids(task: str, ids: Sequence[str]) -> None:
  seen = set()
  for sample_id in ids:
    if sample_id in seen:
      raise ValueError(f"task {task!r}: sample id {sample_id!r} appears more than once")
    seen.add(sample_id)


def sample_ids(task: str, task_samples: Sequence[Mapping]) -> list[str]:
  """Each sample's `id` as a string (f"{task}-{row}" where it has none or an empty one).

  Raises:
    ValueError (naming the task and the id): an id that appears twice.
  """
  ids = []
  for row, s in enumerate(task_samples):
    raw = s.get("id")
    ids.append(_fallback_id(task, row) if raw is None or raw == "" else str(raw))
  _check_unique_ids(task, ids)
  return ids


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def image_paths(sample: Mapping) -> list[str]:
  """Every image of a sample, in prompt order (`image_paths`, else the single `image_path`)."""
  paths = sample.get("image_paths")
  if paths:
    return list(paths)
  return [sample["image_path"]] if sample.get("image_path") else []


def load_sample_images(task_samples: Sequence[Mapping], image_size: int) -> np.ndarray:
  """uint8 [n, M, H, W, 3]: every sample's images in its first slots, zeros elsewhere.

  M is the largest image count (at least 1, so text-only tasks keep the model's input shape);
  an unused slot is never read, since a prompt has one image block per image it carries.
  """
  paths = [image_paths(s) for s in task_samples]
  slots = max([1] + [len(p) for p in paths])
  imgs = np.zeros((len(paths), slots, image_size, image_size, 3), np.uint8)
  for r, row in enumerate(paths):
    for k, path in enumerate(row):
      imgs[r, k] = images_lib.load_image(path, image_size)
  return imgs


def _reference(sample: Mapping) -> Reference:
  """A sample's reference: its `"answers"` as a list, else its last assistant turn as a string
  (a plain string keeps the single-reference case as it always was)."""
  refs = sources.scoring_references(dict(sample))
  return refs if sources.answer_list(dict(sample)) is not None else refs[0]


def build_eval_sets(
    samples: Sequence[Mapping],
    *,
    tokenizer,
    task_metrics: Mapping[str, str],
    num_image_tokens: int = 0,
    image_size: int = 0,
    system: str | None = None,
    pad_to: int = 32,
    template_name: str = template.DEFAULT_TEMPLATE,
    task_options: Mapping[str, Mapping[str, object]] | None = None,
    image_format: Any = None,
) -> dict[str, EvalSet]:
  """Encodes every sample's prompt and loads its images, grouped by task (in `task_metrics` order).

  `task_options`: {task: the metric's keyword options}, for the tasks that have any.
  `image_format`: how the model sees images (data/image_format.py); None: square `image_size`
  images of `num_image_tokens` tokens each.

  Raises:
    ValueError: a sample of an unknown task, a task without samples, a duplicate id or a sample
      whose `"answers"` field is malformed (naming the sample).
  """
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
    ids = sample_ids(task, task_samples)  # before the encoding work, so a duplicate fails fast
    if image_format is None:
      task_images = load_sample_images(task_samples, image_size)
      counts = [num_image_tokens] * len(task_samples)
    else:
      task_images = [[image_format.load(p) for p in image_paths(s)] for s in task_samples]
      counts = [[image_format.num_tokens(im) for im in row] for row in task_images]
    encoded = []
    for sample_id, s, n in zip(ids, task_samples, counts):
      try:
        encoded.append(template.encode_prompt(s["conversations"], tokenizer, num_image_tokens=n,
                                              system=system, template=template_name))
      except ValueError as e:
        raise ValueError(f"task {task!r}, sample {sample_id!r}: {e}") from e
    length = _round_up(max(len(ids) for ids, _ in encoded), pad_to)
    prompt_ids = np.full((len(encoded), length), pad_id, np.int32)
    mask = np.zeros((len(encoded), length), np.int32)
    for r, (p, _) in enumerate(encoded):
      prompt_ids[r, length - len(p):] = p
      mask[r, length - len(p):] = 1
    references = []
    for sample_id, s in zip(ids, task_samples):
      try:
        references.append(_reference(s))
      except ValueError as e:
        raise ValueError(f"task {task!r}, sample {sample_id!r}: {e}") from e
    out[task] = EvalSet(task, task_metrics[task], prompt_ids, mask, task_images, references,
                        stop_id=template.stop_token_id(tokenizer, template_name), ids=ids,
                        options=dict((task_options or {}).get(task) or {}),
                        image_format=image_format,
                        sample_arguments=scorer_sample_arguments(task, task_metrics[task],
                                                                 task_samples, ids))
  return out


def _with_ids(task_samples: Sequence[Mapping], ids: Sequence[str]) -> list[dict]:
  """The samples with the ids the eval set gives them (so that an error names the right one)."""
  return [{**s, "id": sample_id} for s, sample_id in zip(task_samples, ids)]


def scorer_sample_arguments(task: str, metric: str, task_samples: Sequence[Mapping],
                            ids: Sequence[str] | None = None) -> dict[str, list]:
  """{argument: one value per sample} that `metric`'s scorer reads from the samples' own fields
  (`metrics.SAMPLE_ARGUMENTS`); {} for the metrics that read none.

  Raises:
    ValueError: naming the task and the sample that lacks a field the metric needs.
  """
  entry = metrics.SAMPLE_ARGUMENTS.get(metric)
  if entry is None:
    return {}
  ids = list(ids) if ids is not None else sample_ids(task, task_samples)
  try:
    return metrics.gather_sample_arguments(entry[1], _with_ids(task_samples, ids))
  except ValueError as e:
    raise ValueError(f"task {task!r} ({metric}): {e}") from None


def _batch_size(batch_size: int, mesh) -> int:
  return batch_size if mesh is None else _round_up(batch_size, sharding.batch_shards(mesh))


def num_batches(eval_set: EvalSet, batch_size: int, mesh=None) -> int:
  """How many batches `generate_answers` decodes for `eval_set`."""
  return -(-len(eval_set) // _batch_size(batch_size, mesh))


def generate_answers(model, eval_set: EvalSet, *, tokenizer, batch_size: int,
                     max_new_tokens: int, mesh=None,
                     on_batch: Callable[[], None] | None = None) -> list[str]:
  """Greedy answers for one task; the last batch is padded so that no new shape compiles.

  With `mesh`, each batch's rows are split over its batch axes (all devices of all hosts decode
  their share; `batch_size` is rounded up to a multiple of the shards) and every process gets
  every answer. `on_batch` is called after each batch (`num_batches` of them).
  """
  n = len(eval_set)
  batch_size = _batch_size(batch_size, mesh)
  stop = tokenizer.eos_token_id if eval_set.stop_id is None else eval_set.stop_id
  answers = []
  for start in range(0, n, batch_size):
    idx = np.arange(start, start + batch_size) % n  # wrap-around rows are dropped below
    images, positions = _batch_inputs(model, eval_set, idx)
    tokens = generate.greedy_generate(
        model, eval_set.prompt_ids[idx], eval_set.prompt_mask[idx], images,
        positions=positions, max_new_tokens=max_new_tokens, eos_id=stop,
        pad_id=tokenizer.pad_token_id, mesh=mesh)
    tokens = np.asarray(tokens)[: min(batch_size, n - start)]
    for row in tokens:
      row = row[row != tokenizer.pad_token_id]
      row = row[row != stop]
      answers.append(tokenizer.decode(row.tolist(), skip_special_tokens=True).strip())
    if on_batch is not None:
      on_batch()
  return answers


def _batch_inputs(model, eval_set: EvalSet, idx: np.ndarray) -> tuple[Any, np.ndarray | None]:
  """(the model's image input, the prompts' positions or None) of the rows `idx`.

  With an image format the slots and positions are made as for a training batch (each prompt's
  positions start at its first real token; left padding gets 0), and the model reads the arrays
  as it reads a Batch (`train.step.model_inputs`).
  """
  fmt = eval_set.image_format
  if fmt is None:
    return images_lib.normalize(eval_set.images[idx]), None
  rows = [eval_set.images[i] for i in idx]
  slots = max([1] + [len(r) for r in rows])
  arrays = {k: np.zeros(shape, dtype) for k, (shape, dtype) in
            fmt.batch_shapes(len(idx), slots).items()}
  ids, mask = eval_set.prompt_ids[idx], eval_set.prompt_mask[idx]
  positions = np.zeros(fmt.positions_shape(len(idx), ids.shape[1]), np.int32)
  for r, row in enumerate(rows):
    for slot, image in enumerate(row):
      fmt.fill(arrays, r, slot, image)
    real = int(mask[r].sum())
    positions[r, ..., ids.shape[1] - real:] = fmt.positions(ids[r, ids.shape[1] - real:], row)
  from visatb_jax.train import step  # pylint: disable=g-import-not-at-top
  return step.model_inputs(model, arrays)["images"], positions


def score_predictions(eval_set: EvalSet, predictions: Sequence[str]) -> dict[str, float]:
  """{sample id: score} of one task's predictions (in eval-set order), by the task's metric.

  `metrics.mean_score(list(result.values()))` is the task's score.
  """
  refs = scoring_references(eval_set.metric, eval_set.references)
  per_sample = metrics.sample_scores(eval_set.metric, list(predictions), refs,
                                     **dict(eval_set.options), **dict(eval_set.sample_arguments))
  return dict(zip(eval_set.ids, per_sample.tolist()))


def task_report(task: str, metric: str, task_samples: Sequence[Mapping],
                per_sample: Mapping[str, float]) -> dict[str, Any] | None:
  """The corpus report of one task's scores (`metrics.CORPUS_REPORTS`: POPE's F1 / accuracy /
  yes-ratio per split, MME's perception and cognition totals), from its per-sample scores and its
  samples' fields; None for a metric without one.

  The report reads the answers back from their per-sample scores (`metrics.yes_no_answers`), so
  it needs no predictions and is the same from a model's cached scores. A sample the report
  cannot read (an MME sample without its subtask) gives {"error": why}, not an exception: the
  headline score stands without it.
  """
  entry = metrics.CORPUS_REPORTS.get(metric)
  if entry is None:
    return None
  report, extract = entry
  ids = sample_ids(task, task_samples)
  if set(ids) != set(per_sample):
    return {"error": f"task {task!r}: the scored samples are not the {len(ids)} samples of its "
                     "file (scores of another version of it)"}
  try:
    refs = scoring_references(metric, [_reference(s) for s in task_samples])
    arguments = metrics.gather_sample_arguments(extract, _with_ids(task_samples, ids))
    return report([per_sample[i] for i in ids], refs, **arguments)
  except ValueError as e:
    return {"error": f"task {task!r}: {e}"}


def corpus_reports(samples: Mapping[str, Mapping[str, Mapping[str, float]]],
                   task_metrics: Mapping[str, str | None],
                   task_samples: Callable[[Sequence[str]], Mapping[str, Sequence[Mapping]]]
                   ) -> dict[str, dict[str, dict]]:
  """{model: {task: `task_report`}} of the tasks whose metric has a corpus report.

  Args:
    samples: scores/test_samples.json, {model: {task: {sample id: score}}}.
    task_metrics: {task: metric} of the scored and zero-shot tasks.
    task_samples: given the tasks that need them, {task: its samples}, read only when some model
      scored such a task.
  """
  wanted = [t for t, m in task_metrics.items() if m in metrics.CORPUS_REPORTS
            and any(t in per_task for per_task in samples.values())]
  if not wanted:
    return {}
  by_task = task_samples(wanted)
  out: dict[str, dict[str, dict]] = {}
  for model, per_task in samples.items():
    for task in wanted:
      if task in per_task:
        out.setdefault(model, {})[task] = task_report(task, task_metrics[task], by_task[task],
                                                      per_task[task])
  return out


def scoring_references(metric: str, references: Sequence[Reference]) -> list[Reference]:
  """What `metric` is given per sample: every reference, or the first for a one-label metric."""
  if metric in MULTI_REFERENCE_METRICS:
    return list(references)
  return [r if isinstance(r, str) else r[0] for r in references]


def task_budgets(eval_section: Mapping[str, Any],
                 zero_shot_section: Mapping[str, Any] | None = None) -> dict[str, int]:
  """{task: max_new_tokens} of the tasks that set their own: the trained tasks' from the checked
  config's eval section (`task_max_new_tokens`, pipeline/config.py), the zero-shot tasks' from
  their entries. Every other task generates up to `eval.max_new_tokens`."""
  budgets = {t: int(n) for t, n in (eval_section.get("task_max_new_tokens") or {}).items()}
  for name, entry in (zero_shot_section or {}).items():
    if entry.get("max_new_tokens") is not None:
      budgets[name] = int(entry["max_new_tokens"])
  return budgets


def evaluate_samples(model, eval_sets: Mapping[str, EvalSet], *, tokenizer, batch_size: int,
                     max_new_tokens: int, tasks: Sequence[str] | None = None,
                     desc: str = "eval", mesh=None,
                     task_max_new_tokens: Mapping[str, int] | None = None) -> EvalResult:
  """Scores `model` on each task (all of `eval_sets`, or `tasks`), keeping per-sample scores.

  A task generates up to its own `task_max_new_tokens[task]` tokens (`task_budgets`), else up to
  `max_new_tokens`. `mesh`: see `generate_answers`. Progress is counted in batches over all the
  tasks (`runtime/progress.py`): a bar on a terminal; in a log, a line every 10 % of the batches
  (at most 100) naming the task being decoded, e.g.
  `  untrained on validation batch 4/40 (10 %): task chat, 0.8 batches/s, ETA 0:45`.
  """
  tasks = list(tasks or eval_sets)
  total = sum(num_batches(eval_sets[t], batch_size, mesh) for t in tasks)
  scores, samples, predictions = {}, {}, {}
  with progress_lib.Progress(total, desc=desc, unit="batch", leave=False,
                             lines=jax.process_index() == 0) as bar:
    for task in tasks:
      es = eval_sets[task]
      bar.set_fields(task=task)
      budget = int((task_max_new_tokens or {}).get(task, max_new_tokens))
      preds = generate_answers(model, es, tokenizer=tokenizer, batch_size=batch_size,
                               max_new_tokens=budget, mesh=mesh, on_batch=bar.update)
      samples[task] = score_predictions(es, preds)
      scores[task] = metrics.mean_score(list(samples[task].values()))
      predictions[task] = preds
  return EvalResult(scores=scores, samples=samples, predictions=predictions)


def evaluate(model, eval_sets: Mapping[str, EvalSet], *, tokenizer, batch_size: int,
             max_new_tokens: int, tasks: Sequence[str] | None = None,
             desc: str = "eval", mesh=None, task_max_new_tokens: Mapping[str, int] | None = None
             ) -> tuple[dict[str, float], dict[str, list[str]]]:
  """Scores `model` on each task → ({task: score}, {task: predictions}); `mesh` and
  `task_max_new_tokens`: see `evaluate_samples`, which also gives the per-sample scores."""
  result = evaluate_samples(model, eval_sets, tokenizer=tokenizer, batch_size=batch_size,
                            max_new_tokens=max_new_tokens, tasks=tasks, desc=desc, mesh=mesh,
                            task_max_new_tokens=task_max_new_tokens)
  return result.scores, result.predictions
