"""The run's data: task files or the built-in benchmark, the tokenizer, encoded training samples,
the preparation subsets, and the evaluation sets.

Everything expensive is built lazily and cached for the life of the process. Settings are read
through the workspace's current config view, so each stage reads only what its hash covers.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from visatb_jax.data import images as images_lib
from visatb_jax.data import packing, shapes, sources, subsets, template
from visatb_jax.data import tokenizer as tokenizer_lib
from visatb_jax.pipeline.errors import PipelineError
from visatb_jax.runtime import fileio

if TYPE_CHECKING:
  from visatb_jax.pipeline.workspace import Workspace


def _with_prompt_suffix(sample: dict, suffix: str) -> dict:
  """The sample with `suffix` ending every human turn that does not already end with it."""
  if not suffix:
    return sample
  turns = [dict(t, value=f"{t['value']}\n{suffix}")
           if t["from"] == "human" and not t["value"].rstrip().endswith(suffix) else t
           for t in sample["conversations"]]
  return {**sample, "conversations": turns}


class DataStore:
  """Data of one run directory."""

  def __init__(self, ws: Workspace):
    self._ws = ws
    self._skipped: dict[str, dict[str, dict[str, int]]] = {}  # split -> file -> reason -> count

  @property
  def _data(self) -> dict:
    return self._ws.config.section("data")

  @property
  def _plan(self):
    return self._ws.config.tasks

  @property
  def source(self) -> str:
    return self._data["source"]

  @property
  def loader_kind(self) -> str:
    """`memory` (encoded once, packed once, batch = f(step)) or `grain` (data/loader.py)."""
    return self._data.get("loader") or "memory"

  @property
  def template(self) -> str:
    return self._data.get("template") or template.DEFAULT_TEMPLATE

  @property
  def system_prompt(self) -> str | None:
    """The config's system prompt; None for the template's own (LLaVA-1.5's for vicuna_v1)."""
    return self._data.get("system_prompt")

  @property
  def root(self) -> str:
    """Where the split files are: generated in the run directory, or the user's `data.root`."""
    if self.source == "shapes":
      return self._ws.dir.path("data", "shapes")
    return os.path.expanduser(self._data["root"])

  @property
  def tokenizer_dir(self) -> str:
    return self._ws.dir.path("data", "tokenizer")

  @property
  def prepared_dir(self) -> str:
    return self._ws.dir.path("data", "prepared")

  def split_files(self, split: str) -> dict[str, str]:
    """{task: file} of one split of a `llava_json` source (patterns in `data.files`)."""
    patterns = self._data.get("files") or {}
    if split not in patterns:
      raise PipelineError(f"config.data.files has no {split!r} pattern (it has {sorted(patterns)})")
    tasks = self._ws.config.section("tasks")["tasks"]
    out = {}
    for t in self._plan.names if split == "train" else self._plan.eval_tasks:
      pattern = (tasks[t].get("files") or {}).get(split) or patterns[split]
      out[t] = os.path.join(self.root, pattern.format(task=t))
    return out

  # --- preparing --------------------------------------------------------------------------------

  def prepare(self) -> None:
    """Makes the data and tokenizer ready, and encodes the training set once to check it.

    `shapes`: writes the built-in benchmark and trains a tokenizer on its training text.
    `llava_json`: checks every task file of every split and copies the checkpoint's tokenizer
    into the run directory, so that every later stage reads the same one.
    """
    if self.source == "shapes":
      if fileio.is_primary():  # the others read the benchmark process 0 wrote
        self._prepare_shapes()
      fileio.sync("shapes benchmark")
    else:
      for split in ("train", "val", "test"):
        for t, f in self.split_files(split).items():
          if not os.path.isfile(f):
            raise PipelineError(f"task {t!r}: {split} file {f} does not exist")
      if not os.path.exists(self.tokenizer_dir) and fileio.is_primary():
        tokenizer_lib.copy_pretrained_tokenizer(self._pretrained_tokenizer_path(),
                                                self.tokenizer_dir)
      fileio.sync("tokenizer")
    self.encoded_train()  # fail now, not in the middle of training, on bad samples
    try:  # every image decoded once: a corrupt file is named now, not in a later stage
      images_lib.check_images(sorted({p for split in ("train", "val", "test")
                                      for s in self.samples(split)
                                      for p in s.get("image_paths") or []}))
    except ValueError as e:
      raise PipelineError(str(e)) from e
    if self.loader_kind == "grain":
      from visatb_jax.data import prepare  # pylint: disable=g-import-not-at-top
      if fileio.is_primary():  # raw samples as array_record, read by every host's loader
        prepare.prepare_mixture({"train": self.samples("train")}, self.prepared_dir)
      fileio.sync("prepared mixture")

  def _pretrained_tokenizer_path(self) -> str:
    path = self._data.get("tokenizer") or self._ws.config.section("model").get("path") or ""
    if not path:
      raise PipelineError("a llava_json source needs a tokenizer: set config.data.tokenizer or "
                          "config.model.path to a local Hugging Face directory")
    path = os.path.expanduser(path)
    if not os.path.isdir(path):
      raise PipelineError(f"tokenizer directory {path} does not exist")
    return path

  def _prepare_shapes(self) -> None:
    sh = self._data["shapes"]
    shapes.generate_benchmark(self.root, seed=int(self._ws.config.seed), sizes=dict(sh["sizes"]),
                              grid=sh["grid"], cell=sh["cell"], max_objects=sh["max_objects"],
                              count_scope=sh.get("count_scope") or "any")
    if not os.path.exists(self.tokenizer_dir):  # written whole or not at all
      # Whole rendered conversations, so that the system prompt and role tags, which every
      # sample repeats, become a handful of merged tokens.
      roles = {"human": "USER:", "gpt": "ASSISTANT:"}
      system = self.system_prompt or template.get_template(self.template).default_system
      texts = [" ".join([system] + [f"{roles[t['from']]} {t['value']}"
                                    for t in s["conversations"]])
               for s in self.samples("train")]
      tokenizer_lib.train_tokenizer(texts, vocab_size=int(self._data["vocab_size"]),
                                    save_dir=self.tokenizer_dir)

  # --- reading ----------------------------------------------------------------------------------

  @functools.cached_property
  def tokenizer(self):
    if not os.path.exists(self.tokenizer_dir):
      raise PipelineError(f"{self.tokenizer_dir} does not exist: run the 'data' stage first")
    if self.source == "shapes":
      return tokenizer_lib.load_tokenizer(self.tokenizer_dir)
    return tokenizer_lib.load_pretrained_tokenizer(self.tokenizer_dir)

  @functools.lru_cache(maxsize=None)
  def samples(self, split: str) -> list[dict]:
    """The valid samples of a split, every task present; what was skipped goes to the stats."""
    if self.source == "shapes":
      path = os.path.join(self.root, f"{split}.json")
      if not os.path.exists(path):
        raise PipelineError(f"{path} does not exist: run the 'data' stage first")
      loaded = [sources.load_samples(path)]
    else:
      image_root = self._data.get("image_root") or None
      loaded = []
      for t, f in self.split_files(split).items():
        if not os.path.isfile(f):
          raise PipelineError(f"task {t!r}: {split} file {f} does not exist")
        try:
          loaded.append(sources.load_samples(
              f, image_root=image_root, task=t,
              on_missing_image=self._data.get("on_missing_image") or "error"))
        except ValueError as e:
          raise PipelineError(str(e)) from e
    plan = self._plan
    tasks = plan.names if split == "train" else plan.eval_tasks
    suffixes = {t: self._ws.config.section("tasks")["tasks"][t].get("prompt_suffix") or ""
                for t in plan.names}
    wanted = [_with_prompt_suffix(s, suffixes[s["task"]])
              for part in loaded for s in part.samples if s["task"] in tasks]
    self._skipped[split] = {os.path.basename(part.path): part.skipped for part in loaded
                            if part.skipped}
    for t in tasks:
      if not any(s["task"] == t for s in wanted):
        where = ", ".join(part.path for part in loaded)
        raise PipelineError(f"task {t!r} has no samples in the {split} split ({where})")
    return wanted

  def _encode(self, samples: Sequence[dict], names: Sequence[str]
              ) -> tuple[dict[str, list[packing.Example]], dict[str, dict[str, int]]]:
    """Samples as token ids + label mask + images, grouped by task (task ids: index in `names`),
    and per-task counts of kept, truncated and dropped samples."""
    tok, mc = self.tokenizer, self._ws.models.model_config
    image_size = int(mc.vision.image_size)
    max_len = int(self._data["max_len"])
    by_task: dict[str, list[packing.Example]] = {t: [] for t in names}
    stats = {t: {"samples": 0, "truncated": 0, "dropped_too_long": 0} for t in names}
    for record, s in enumerate(samples):
      t = s["task"]
      enc = template.encode_conversation(s["conversations"], tok,
                                         num_image_tokens=mc.num_image_tokens, max_len=max_len,
                                         system=self.system_prompt, template=self.template)
      if enc is None:
        stats[t]["dropped_too_long"] += 1
        continue
      stats[t]["samples"] += 1
      stats[t]["truncated"] += int(enc.truncated)
      paths = s.get("image_paths") or []
      # The small built-in benchmark lives in memory; user data is read when a batch is built
      # (hundreds of thousands of images would not fit).
      imgs = images_lib.load_images(paths, image_size) if self.source == "shapes" else paths
      by_task[t].append(packing.Example(enc.input_ids, enc.label_mask, list(names).index(t), imgs,
                                        record))
    return by_task, stats

  @functools.lru_cache(maxsize=None)
  def encoded_train(self) -> dict[str, list[packing.Example]]:
    """Every training sample as token ids + label mask + image, grouped by task; counts saved."""
    names = self._plan.names
    by_task, stats = self._encode(self.samples("train"), names)
    # One row per task in the report, then what each file lost to invalid samples.
    report = {f"{t} (train)": stats[t] for t in names}
    for split in ("train", "val", "test"):
      self.samples(split)
      for name, skipped in self._skipped.get(split, {}).items():
        report[f"{name} (skipped)"] = skipped
    fileio.atomic_write_json(self._ws.dir.path("data_stats.json"), report, sort_keys=False)
    for t, exs in by_task.items():
      if not exs:
        raise PipelineError(f"task {t!r} has no usable training samples (data.max_len="
                            f"{self._data['max_len']}; stats: {stats[t]})")
    return by_task

  # --- pretraining --------------------------------------------------------------------------------

  def pretrain_samples(self) -> list[dict]:
    """The pretrain stage's samples: a generated split of the built-in benchmark (images of its
    own) or the configured LLaVA JSON files; every sample's task is the pretraining task."""
    settings = self._ws.config.section("pretrain")
    if self.source == "shapes":
      root = self._ws.dir.path("data", "pretrain")
      if fileio.is_primary():
        sh = self._data["shapes"]
        shapes.generate_benchmark(root, seed=int(self._ws.config.seed),
                                  sizes={shapes.PRETRAIN_SPLIT: dict(settings["tasks"])},
                                  grid=sh["grid"], cell=sh["cell"], max_objects=sh["max_objects"],
                                  count_scope=sh.get("count_scope") or "any")
      fileio.sync("pretrain benchmark")
      loaded = sources.load_samples(os.path.join(root, f"{shapes.PRETRAIN_SPLIT}.json"))
      return list(loaded.samples)
    out = []
    for path in settings["files"]:
      path = os.path.expanduser(path)
      if not os.path.isfile(path):
        raise PipelineError(f"config.pretrain.files: {path} does not exist")
      try:
        loaded = sources.load_samples(path, image_root=self._data.get("image_root") or None,
                                      task="pretrain",
                                      on_missing_image=self._data.get("on_missing_image") or "error")
      except ValueError as e:
        raise PipelineError(str(e)) from e
      out += [{**s, "task": "pretrain"} for s in loaded.samples]
    return out

  def pretrain_examples(self) -> tuple[list[str], list[packing.Example]]:
    """(the pretraining tasks, their encoded samples)."""
    samples = self.pretrain_samples()
    names = list(dict.fromkeys(s["task"] for s in samples))
    by_task, stats = self._encode(samples, names)
    examples = [e for t in names for e in by_task[t]]
    if not examples:
      raise PipelineError(f"the pretrain stage has no usable samples (stats: {stats})")
    return names, examples

  # --- subsets and training sets ------------------------------------------------------------------

  @functools.cached_property
  def subsets(self) -> dict[str, dict[str, np.ndarray]]:
    enc = self.encoded_train()
    prep = self._ws.config.section("prep")
    return subsets.split_subsets({t: len(v) for t, v in enc.items()}, self._plan.names,
                                 r_large=float(prep["r_large"]), r_mini=float(prep["r_mini"]),
                                 seed=int(self._ws.config.seed))

  def subset_warnings(self) -> list[str]:
    fixed = self._plan.fixed
    return subsets.size_warnings({t: s for t, s in self.subsets.items() if t not in fixed})

  def prep_examples(self, model_name: str) -> list[packing.Example] | None:
    """Training data of a preparation model (see TaskPlan.prep_subsets); None for `base`."""
    try:
      parts = self._plan.prep_subsets(model_name)
    except ValueError as e:
      raise PipelineError(str(e)) from e
    if parts is None:
      return None
    enc = self.encoded_train()
    return [enc[t][i] for t, which in parts for i in self.subsets[t][which]]

  def task_examples(self, tasks: Sequence[str]) -> list[packing.Example]:
    enc = self.encoded_train()
    return [e for t in tasks for e in enc[t]]

  def grain_loader(self, examples: Sequence[packing.Example]):
    """Batches from the grain pipeline over the prepared mixture; its position is checkpointed."""
    from visatb_jax.data import loader as loader_lib  # pylint: disable=g-import-not-at-top
    from visatb_jax.data import prepare  # pylint: disable=g-import-not-at-top
    train = self._ws.config.section("train")
    mc = self._ws.models.model_config
    prepared = prepare.open_prepared(self.prepared_dir)
    config = loader_lib.LoaderConfig(
        tasks=tuple(self._plan.names), seq_len=int(self._data["seq_len"]),
        max_images=int(self._data["max_images"]), image_size=int(mc.vision.image_size),
        num_image_tokens=mc.num_image_tokens, max_len=int(self._data["max_len"]),
        batch_size=int(train["batch_size"]), seed=int(self._ws.config.seed),
        template=self.template, system=self.system_prompt,
        worker_count=int(self._data.get("loader_workers") or 0))
    return loader_lib.Loader(prepared.data_source("train"), self.tokenizer, config,
                             record_indices=[e.record for e in examples])

  @functools.lru_cache(maxsize=None)
  def eval_sets(self, split: str):
    from visatb_jax.pipeline import evaluation  # pylint: disable=g-import-not-at-top
    mc = self._ws.models.model_config
    plan = self._plan
    return evaluation.build_eval_sets(
        self.samples(split), tokenizer=self.tokenizer,
        task_metrics={t: plan.metrics[t] for t in plan.eval_tasks},
        num_image_tokens=mc.num_image_tokens, image_size=int(mc.vision.image_size),
        system=self.system_prompt, template_name=self.template)
