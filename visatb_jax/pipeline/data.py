"""The run's data: task files or the built-in benchmark, the tokenizer, encoded training samples,
the preparation subsets, and the evaluation sets (of the trained tasks and of the zero-shot ones).

Everything expensive is built lazily and cached for the life of the process. Settings are read
through the workspace's current config view, so each stage reads only what its hash covers; the
user files the data and pretrain stages read are covered by their fingerprints
(`input_fingerprints`).
"""

from __future__ import annotations

import functools
import hashlib
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from visatb_jax.data import image_digest, image_format
from visatb_jax.data import images as images_lib
from visatb_jax.data import packing, shapes, sources, subsets, template
from visatb_jax.data import tokenizer as tokenizer_lib
from visatb_jax.pipeline.errors import PipelineError
from visatb_jax.runtime import fileio

if TYPE_CHECKING:
  from visatb_jax.pipeline.config import RunConfig
  from visatb_jax.pipeline.tasks import TaskPlan
  from visatb_jax.pipeline.workspace import Workspace

# Fewest optimizer steps the paper recommends for a preparation run (docs/method.md §2).
MIN_PREP_STEPS = 100

# Files of a Hugging Face checkpoint directory that its tokenizer is loaded from (besides those
# named tokenizer*): never its weights, which are gigabytes to hash.
_TOKENIZER_FILES = ("special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt",
                    "merges.txt", "spiece.model", "chat_template.json", "chat_template.jinja")


def _with_prompt_suffix(sample: dict, suffix: str) -> dict:
  """The sample with `suffix` ending every human turn that does not already end with it."""
  if not suffix:
    return sample
  turns = [dict(t, value=f"{t['value']}\n{suffix}")
           if t["from"] == "human" and not t["value"].rstrip().endswith(suffix) else t
           for t in sample["conversations"]]
  return {**sample, "conversations": turns}


def _split_files(data: Mapping[str, Any], tasks: Mapping[str, Any], plan: TaskPlan,
                 split: str) -> dict[str, str]:
  """{task: file} of one split of a `llava_json` source (patterns in `data.files`)."""
  patterns = data.get("files") or {}
  if split not in patterns:
    raise PipelineError(f"config.data.files has no {split!r} pattern (it has {sorted(patterns)})")
  root = os.path.expanduser(data["root"])
  out = {}
  for t in plan.names if split == "train" else plan.eval_tasks:
    pattern = (tasks[t].get("files") or {}).get(split) or patterns[split]
    out[t] = os.path.join(root, pattern.format(task=t))
  return out


def _tokenizer_source(data: Mapping[str, Any], model: Mapping[str, Any]) -> str:
  """The directory a `llava_json` source's tokenizer is copied from ('' when none is set)."""
  path = data.get("tokenizer") or model.get("path") or ""
  return os.path.expanduser(path) if path else ""


# --- input fingerprints ------------------------------------------------------------------------


def _sha256(path: str) -> str | None:
  """The content's digest; None for a file that cannot be read (its stage names the problem)."""
  try:
    with open(path, "rb") as f:
      return hashlib.file_digest(f, "sha256").hexdigest()
  except OSError:
    return None


def _images_digest(path: str, image_root: str | None) -> str | None:
  """One digest of the content of every image a sample file lists.

  Each image's bytes are hashed once and cached by (size, mtime, ctime, inode)
  (`image_digest.file_digests`), so a re-run costs a stat per image, and an edit in place that
  keeps the size and restores the mtime is still seen. None when the file does not parse: the
  data stage names the problem.
  """
  root = os.path.abspath(image_root) if image_root else os.path.dirname(os.path.abspath(path))
  names = set()
  try:
    for record in sources.read_records(path):
      try:
        if isinstance(record.value, dict):
          names.update(sources.image_list(record.value))
      except sources.SampleError:
        continue  # skipped by the loader too
  except (OSError, ValueError):
    return None
  names = sorted(names)
  files = {name: os.path.normpath(os.path.join(root, name)) for name in names}
  digests = image_digest.file_digests(files.values())
  digest = hashlib.sha256()
  for name in names:
    # Names as the file lists them, not resolved paths: moving the data keeps the fingerprint.
    digest.update(f"{name}\t{digests[files[name]] or 'missing'}\n".encode())
  return digest.hexdigest()


def _sample_file_fingerprint(path: str, image_root: str | None) -> dict[str, str | None]:
  # "image_bytes", not the "images" (size and mtime) of runs made before images were hashed:
  # `input_changes` tells the one from the other.
  return {"sha256": _sha256(path), "image_bytes": _images_digest(path, image_root)}


def input_fingerprints(run_config: RunConfig) -> dict[str, dict[str, dict[str, str | None]]]:
  """{stage: {file: digests}} of the user files the data and pretrain stages read.

  data: every task file of every split (its content and that of each image it lists)
  and the tokenizer files of a `llava_json` source; pretrain: its files, alike. The built-in
  `shapes` source reads no user file: {}. Never raises: a missing or malformed file is the
  stage's error, with its own message.
  """
  data = run_config.section("data")
  if data["source"] == "shapes":
    return {}
  image_root = data.get("image_root") or None
  tasks = run_config.section("tasks")["tasks"]
  task_files = set()
  for split in ("train", "val", "test"):
    try:
      task_files.update(_split_files(data, tasks, run_config.tasks, split).values())
    except PipelineError:
      continue  # the data stage names the missing pattern
  inputs = {f: _sample_file_fingerprint(f, image_root) for f in sorted(task_files)}
  tokenizer = _tokenizer_source(data, run_config.section("model"))
  if tokenizer and os.path.isdir(tokenizer):
    for name in sorted(os.listdir(tokenizer)):
      path = os.path.join(tokenizer, name)
      if (name.startswith("tokenizer") or name in _TOKENIZER_FILES) and os.path.isfile(path):
        inputs[path] = {"sha256": _sha256(path)}
  out = {"data": inputs}
  pretrain = run_config.section("pretrain")
  if pretrain and pretrain.get("files"):
    out["pretrain"] = {p: _sample_file_fingerprint(p, image_root)
                       for p in map(os.path.expanduser, pretrain["files"])}
  return out


def input_changes(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
  """What differs between two fingerprints of `input_fingerprints`, one phrase per file."""
  out = []
  for path in sorted(set(recorded) | set(current)):
    old, new = recorded.get(path), current.get(path)
    if old == new:
      continue
    if old and new and old.get("sha256") == new.get("sha256"):
      if "images" in old and "image_bytes" in new:  # recorded before images were hashed
        out.append(f"the fingerprint of the images listed in {path} changed from size and mtime "
                   "to content")
      else:
        out.append(f"an image listed in {path} changed")
    else:
      out.append(f"input file {path} changed")
  return out


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
    return _split_files(self._data, self._ws.config.section("tasks")["tasks"], self._plan, split)

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
      # Copied again each time the stage runs: it re-runs when the tokenizer's files changed.
      if fileio.is_primary():
        tokenizer_lib.copy_pretrained_tokenizer(
            self._pretrained_tokenizer_path(), self.tokenizer_dir,
            image_token=template.get_template(self.template).image_token)
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
    path = _tokenizer_source(self._data, self._ws.config.section("model"))
    if not path:
      raise PipelineError("a llava_json source needs a tokenizer: set config.data.tokenizer or "
                          "config.model.path to a local Hugging Face directory")
    if not os.path.isdir(path):
      raise PipelineError(f"tokenizer directory {path} does not exist")
    return path

  def _prepare_shapes(self) -> None:
    sh = self._data["shapes"]
    shapes.generate_benchmark(self.root, seed=int(self._ws.config.seed), sizes=dict(sh["sizes"]),
                              grid=sh["grid"], cell=sh["cell"], max_objects=sh["max_objects"],
                              count_scope=sh.get("count_scope") or "any",
                              vqa_scope=sh.get("vqa_scope") or "any")
    # Trained again whenever the stage runs (deterministic, about a second): a tokenizer that an
    # earlier config made (another vocab_size or prompt) is never reused. Whole rendered
    # conversations, so that the system prompt and role tags, which every sample repeats, become
    # a handful of merged tokens.
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
    return tokenizer_lib.load_pretrained_tokenizer(
        self.tokenizer_dir, image_token=template.get_template(self.template).image_token)

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
    tok, fmt = self.tokenizer, self._ws.models.image_format
    native = not isinstance(fmt, image_format.SquareImages)
    max_len = int(self._data["max_len"])
    by_task: dict[str, list[packing.Example]] = {t: [] for t in names}
    stats = {t: {"samples": 0, "truncated": 0, "dropped_too_long": 0} for t in names}
    for record, s in enumerate(samples):
      t = s["task"]
      paths = s.get("image_paths") or []
      # The small built-in benchmark lives in memory; user data is read when a batch is built
      # (hundreds of thousands of images would not fit), sized from the file header alone.
      if self.source != "shapes":
        imgs = paths
      elif native:
        imgs = [fmt.load(p) for p in paths]
      else:
        imgs = images_lib.load_images(paths, fmt.image_size)
      if not native:
        counts = fmt.num_image_tokens  # One count for every image.
      elif self.source == "shapes":
        counts = [fmt.num_tokens(im) for im in imgs]
      else:
        counts = [fmt.num_tokens_of_file(p) for p in paths]
      try:
        enc = template.encode_conversation(s["conversations"], tok, num_image_tokens=counts,
                                           max_len=max_len, system=self.system_prompt,
                                           template=self.template)
      except ValueError as e:  # e.g. <image> placeholders and images that disagree
        raise PipelineError(f"task {t!r}, sample {s.get('id')!r}: {e}") from e
      if enc is None:
        stats[t]["dropped_too_long"] += 1
        continue
      stats[t]["samples"] += 1
      stats[t]["truncated"] += int(enc.truncated)
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
                                  count_scope=sh.get("count_scope") or "any",
                                  vqa_scope=sh.get("vqa_scope") or "any")
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

  @functools.cache  # pylint: disable=method-cache-max-size-none  (one entry per replicate)
  def subsets(self, replicate: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Every task's large and mini subsets for preparation replicate `replicate` (§2, §13)."""
    enc = self.encoded_train()
    prep = self._ws.config.section("prep")
    return subsets.split_subsets({t: len(v) for t, v in enc.items()}, self._plan.names,
                                 r_large=float(prep["r_large"]), r_mini=float(prep["r_mini"]),
                                 seed=self.replicate_seed(replicate))

  def replicate_seed(self, replicate: int) -> int:
    """The seed of replicate `replicate`'s subset draw and data order (0: the run's seed)."""
    return subsets.replicate_seed(int(self._ws.config.seed), replicate)

  def subset_warnings(self) -> list[str]:
    """The paper's recommended sizes (docs/method.md §2) that the preparation runs miss: samples
    per subset, and optimizer steps per preparation model."""
    fixed = self._plan.fixed
    return (subsets.size_warnings({t: s for t, s in self.subsets().items() if t not in fixed})
            + self.prep_step_warnings())

  def prep_step_warnings(self) -> list[str]:
    """One warning per preparation model of fewer than MIN_PREP_STEPS optimizer steps, with its
    count (replicates draw subsets of the same sizes, so replicate 0 stands for all)."""
    train = self._ws.config.section("train")
    batch, epochs = int(train["batch_size"]), float(self._ws.config.train_epochs)
    msgs = []
    for name, _ in self._plan.prep_models(self._ws.config.balance.form):
      examples = self.prep_examples(name)
      if not examples:  # base: the initial model, not trained
        continue
      steps = packing.num_steps(len(examples), batch, epochs)
      if steps < MIN_PREP_STEPS:
        msgs.append(f"preparation model {name!r} trains {steps} optimizer steps ({len(examples)} "
                    f"samples, {epochs:g} epoch(s) of train.batch_size={batch} samples), under "
                    f"the paper's {MIN_PREP_STEPS} recommended")
    for m in msgs:
      warnings.warn(m, stacklevel=2)
    return msgs

  def prep_examples(self, model_name: str, replicate: int = 0) -> list[packing.Example] | None:
    """Training data of a preparation model (see TaskPlan.prep_subsets) in replicate
    `replicate`; None for `base`."""
    try:
      parts = self._plan.prep_subsets(model_name)
    except ValueError as e:
      raise PipelineError(str(e)) from e
    if parts is None:
      return None
    enc = self.encoded_train()
    chosen = self.subsets(replicate)
    return [enc[t][i] for t, which in parts for i in chosen[t][which]]

  def task_examples(self, tasks: Sequence[str]) -> list[packing.Example]:
    enc = self.encoded_train()
    return [e for t in tasks for e in enc[t]]

  def grain_loader(self, examples: Sequence[packing.Example], seed: int | None = None, *,
                   steps: int, multiple: int = 1):
    """Batches from the grain pipeline over the prepared mixture; its position is checkpointed.
    `seed`: the data order's (default: the run's seed). Each of the run's `steps` steps takes
    train.batch_size samples, padded to the least rows that fit every step (a multiple of
    `multiple`: the batch shards x micro-batches), found by replaying grain's order on the
    examples' lengths (`loader.rows_per_step`)."""
    from visatb_jax.data import loader as loader_lib  # pylint: disable=g-import-not-at-top
    from visatb_jax.data import prepare  # pylint: disable=g-import-not-at-top
    train = self._ws.config.section("train")
    fmt = self._ws.models.image_format
    prepared = prepare.open_prepared(self.prepared_dir)
    kwargs = dict(
        tasks=tuple(self._plan.names), seq_len=int(self._data["seq_len"]),
        max_images=int(self._data["max_images"]), image_size=getattr(fmt, "image_size", 0),
        num_image_tokens=getattr(fmt, "num_image_tokens", 0), image_format=fmt,
        max_len=int(self._data["max_len"]),
        batch_size=int(train["batch_size"]),
        seed=int(self._ws.config.seed) if seed is None else int(seed),
        template=self.template, system=self.system_prompt,
        worker_count=int(self._data.get("loader_workers") or 0))
    config = loader_lib.LoaderConfig(**kwargs)
    import jax  # pylint: disable=g-import-not-at-top
    processes = jax.process_count()
    rows = loader_lib.rows_per_step([len(e) for e in examples], [e.num_images for e in examples],
                                    config, steps, process_count=processes, multiple=multiple)
    config = loader_lib.LoaderConfig(**kwargs, rows_per_step=rows)
    return loader_lib.Loader(prepared.data_source("train"), self.tokenizer, config,
                             record_indices=[e.record for e in examples])

  def _build_eval_sets(self, samples: Sequence[dict], task_metrics: dict[str, str],
                       task_options: dict[str, dict]):
    from visatb_jax.pipeline import evaluation  # pylint: disable=g-import-not-at-top
    fmt = self._ws.models.image_format
    try:
      return evaluation.build_eval_sets(
          samples, tokenizer=self.tokenizer, task_metrics=task_metrics, image_format=fmt,
          system=self.system_prompt, template_name=self.template, task_options=task_options)
    except images_lib.ImageError:
      raise  # already names the image
    except ValueError as e:  # a malformed sample (duplicate id, bad "answers"): one line
      raise PipelineError(str(e)) from e

  @functools.lru_cache(maxsize=None)
  def eval_sets(self, split: str, tasks: tuple[str, ...] | None = None):
    """The scored tasks' eval sets of a split (all of them, or `tasks`)."""
    plan = self._plan
    names = tasks or plan.eval_tasks
    entries = self._ws.config.section("tasks")["tasks"]
    return self._build_eval_sets(
        [s for s in self.samples(split) if s["task"] in names],
        {t: plan.metrics[t] for t in names},
        {t: dict(entries[t].get("metric_options") or {}) for t in names})

  # --- zero-shot tasks (docs/method.md §12) --------------------------------------------------------

  def _zero_shot_file(self, name: str, split: str) -> str | None:
    """A zero-shot task's file of `split`; None for a built-in task read from the generated split.

    Resolved like a task file: its own `files`, else the `data.files` pattern; relative to
    `data.root` (the config requires absolute paths for the shapes source).
    """
    task = self._ws.config.zero_shot[name]
    pattern = task.files.get(split)
    if pattern is None and self.source == "shapes":
      return None
    pattern = pattern or (self._data.get("files") or {}).get(split)
    if not pattern:
      raise PipelineError(f"zero-shot task {name!r} has no {split} file (config.zero_shot.{name}"
                          f".files.{split}, or config.data.files.{split})")
    return os.path.join(self.root, os.path.expanduser(pattern.format(task=name)))

  @functools.lru_cache(maxsize=None)
  def zero_shot_samples(self, split: str, tasks: tuple[str, ...] | None = None) -> list[dict]:
    """The zero-shot tasks' samples of a split (all of them, or `tasks`), each task's own.

    A file's samples all belong to its zero-shot task, whatever their `"task"` field says, so a
    file written for another benchmark can be used as it is.
    """
    out = []
    for name in tasks or tuple(self._ws.config.zero_shot):
      path = self._zero_shot_file(name, split)
      if path is None:
        found = [s for s in self.samples_of_generated_split(split) if s["task"] == name]
      else:
        if not os.path.isfile(path):
          raise PipelineError(f"zero-shot task {name!r}: {split} file {path} does not exist")
        try:
          loaded = sources.load_samples(
              path, image_root=self._data.get("image_root") or None, task=name,
              on_missing_image=self._data.get("on_missing_image") or "error")
        except ValueError as e:
          raise PipelineError(f"zero-shot task {name!r}: {e}") from e
        found = [{**s, "task": name} for s in loaded.samples]
      if not found:
        raise PipelineError(f"zero-shot task {name!r} has no samples in the {split} split"
                            + (f" ({path})" if path else ""))
      suffix = self._ws.config.zero_shot[name].prompt_suffix
      out += [_with_prompt_suffix(s, suffix) for s in found]
    return out

  def samples_of_generated_split(self, split: str) -> list[dict]:
    """Every sample of a split of the built-in benchmark, whatever its task."""
    path = os.path.join(self.root, f"{split}.json")
    if not os.path.exists(path):
      raise PipelineError(f"{path} does not exist: run the 'data' stage first")
    return list(sources.load_samples(path).samples)

  @functools.lru_cache(maxsize=None)
  def zero_shot_eval_sets(self, split: str, tasks: tuple[str, ...] | None = None):
    """The zero-shot tasks' eval sets of a split (all of them, or `tasks`)."""
    zero_shot = self._ws.config.zero_shot
    names = tasks or tuple(zero_shot)
    return self._build_eval_sets(self.zero_shot_samples(split, tuple(names)),
                                 {t: zero_shot[t].metric for t in names},
                                 {t: dict(zero_shot[t].metric_options) for t in names})
