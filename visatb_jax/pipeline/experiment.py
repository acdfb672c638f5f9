"""One run directory and what the pipeline's stages share: data, tokenizer, models, scores.

Everything expensive is built lazily and cached for the life of the process; everything that must
survive a kill is written to the run directory with the hash of the stage that produced it.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
from collections.abc import Sequence

import numpy as np

from visatb_jax.runtime import fileio
from visatb_jax.data import images as images_lib
from visatb_jax.data import packing, shapes, sources, subsets, template, tokenizer as tokenizer_lib


class PipelineError(RuntimeError):
  """A problem the user must fix (bad config, missing input); printed as one line."""


# Where the data comes from: the built-in benchmark, or one LLaVA JSON/JSONL file per task and split.
DATA_SOURCES = ("shapes", "llava_json")


def _task_settings(config) -> tuple[tuple[str, ...], dict[str, float], dict[str, str]]:
  tasks = tuple(config.task_order)
  if len(set(tasks)) != len(tasks):
    raise PipelineError(f"config.task_order has duplicates: {list(tasks)}")
  fixed, groups = {}, {}
  for t in tasks:
    if t not in config.tasks:
      raise PipelineError(f"task {t!r} is in config.task_order but not in config.tasks")
    info = config.tasks[t]
    if info.get("fixed_weight") is not None:
      fixed[t] = float(info.fixed_weight)
    elif info.get("group"):
      groups[t] = str(info.group)
  if groups and len(groups) != len(tasks) - len(fixed):
    missing = [t for t in tasks if t not in fixed and t not in groups]
    raise PipelineError(f"tasks {missing} have no group while others do; give every balanced "
                        "task a group or none")
  return tasks, fixed, groups


def _with_prompt_suffix(sample: dict, suffix: str) -> dict:
  """The sample with `suffix` ending every human turn that does not already end with it."""
  if not suffix:
    return sample
  turns = [dict(t, value=f"{t['value']}\n{suffix}")
           if t["from"] == "human" and not t["value"].rstrip().endswith(suffix) else t
           for t in sample["conversations"]]
  return {**sample, "conversations": turns}


class Experiment:
  """The run directory `workdir` of one config."""

  def __init__(self, config, workdir: str):
    self.config = config
    self.workdir = workdir
    self.task_names, self.fixed_weights, self.groups = _task_settings(config)
    self._skipped: dict[str, dict[str, dict[str, int]]] = {}  # split -> file -> reason -> count
    self.num_tasks = len(self.task_names)
    balanced = [t for t in self.task_names if t not in self.fixed_weights]
    self.balanced_units = list(dict.fromkeys(self.groups[t] for t in balanced)) if self.groups else balanced
    if len(self.balanced_units) < 2:
      raise PipelineError(f"VisATB needs at least 2 balanced tasks, got {self.balanced_units}")
    # A task with no metric (ShareGPT in the paper) is trained but never scored.
    self.eval_tasks = tuple(t for t in self.task_names if config.tasks[t].get("metric"))
    unscored = [t for t in balanced if t not in self.eval_tasks]
    if unscored:
      raise PipelineError(f"balanced task(s) {unscored} have no metric; λ is computed from "
                          "validation scores, so only fixed-weight tasks may go unscored")

  # --- paths -------------------------------------------------------------------------------------

  def path(self, *parts: str) -> str:
    return os.path.join(self.workdir, *parts)

  def read_output(self, *parts: str):
    p = self.path(*parts)
    if not os.path.exists(p):
      raise PipelineError(f"{p} does not exist: run the stage that writes it first")
    return fileio.read_json(p)

  @property
  def source(self) -> str:
    source = self.config.data.source
    if source not in DATA_SOURCES:
      raise PipelineError(f"config.data.source={source!r}; known sources: {list(DATA_SOURCES)}")
    return source

  @property
  def data_root(self) -> str:
    """Where the split files are: generated in the run directory, or the user's `data.root`."""
    if self.source == "shapes":
      return self.path("data", "shapes")
    root = self.config.data.get("root") or ""
    if not root:
      raise PipelineError("config.data.root is empty: set it to the directory of the task files "
                          "(--config.data.root=/data/...)")
    return os.path.expanduser(root)

  def split_files(self, split: str) -> dict[str, str]:
    """{task: file} of one split of a `llava_json` source (patterns in `data.files`)."""
    patterns = self.config.data.get("files") or {}
    if split not in patterns:
      raise PipelineError(f"config.data.files has no {split!r} pattern (it has {sorted(patterns)})")
    out = {}
    for t in self.task_names if split == "train" else self.eval_tasks:
      pattern = (self.config.tasks[t].get("files") or {}).get(split) or patterns[split]
      out[t] = os.path.join(self.data_root, pattern.format(task=t))
    return out

  @property
  def tokenizer_dir(self) -> str:
    return self.path("data", "tokenizer")

  # --- data ----------------------------------------------------------------------------------------

  def prepare_data(self) -> None:
    """Makes the data and tokenizer ready, and encodes the training set once to check it.

    `shapes`: writes the built-in benchmark and trains a tokenizer on its training text.
    `llava_json`: checks every task file of every split and copies the checkpoint's tokenizer
    into the run directory, so that every later stage reads the same one.
    """
    if self.source == "shapes":
      unknown = sorted(set(self.task_names) - set(shapes.TASKS))
      if unknown:
        raise PipelineError(f"unknown task(s) {unknown} for the shapes benchmark "
                            f"(it has {list(shapes.TASKS)})")
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
    if self.loader_kind == "grain":
      from visatb_jax.data import prepare
      if fileio.is_primary():  # raw samples as array_record, read by every host's loader
        prepare.prepare_mixture({"train": self.samples("train")}, self.prepared_dir)
      fileio.sync("prepared mixture")

  def _pretrained_tokenizer_path(self) -> str:
    path = self.config.data.get("tokenizer") or self.config.model.get("path") or ""
    if not path:
      raise PipelineError("a llava_json source needs a tokenizer: set config.data.tokenizer or "
                          "config.model.path to a local Hugging Face directory")
    path = os.path.expanduser(path)
    if not os.path.isdir(path):
      raise PipelineError(f"tokenizer directory {path} does not exist")
    return path

  def _prepare_shapes(self) -> None:
    dc = self.config.data
    sh = dc.shapes
    shapes.generate_benchmark(self.data_root, seed=int(self.config.seed), sizes=dict(sh.sizes),
                              grid=sh.grid, cell=sh.cell, max_objects=sh.max_objects)
    if not os.path.exists(self.tokenizer_dir):  # written whole or not at all
      # Whole rendered conversations, so that the system prompt and role tags, which every
      # sample repeats, become a handful of merged tokens.
      roles = {"human": "USER:", "gpt": "ASSISTANT:"}
      system = self.system_prompt or template.get_template(self.template).default_system
      texts = [" ".join([system] + [f"{roles[t['from']]} {t['value']}"
                                                    for t in s["conversations"]])
               for s in self.samples("train")]
      tokenizer_lib.train_tokenizer(texts, vocab_size=int(dc.vocab_size), save_dir=self.tokenizer_dir)

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
      path = os.path.join(self.data_root, f"{split}.json")
      if not os.path.exists(path):
        raise PipelineError(f"{path} does not exist: run the 'data' stage first")
      loaded = [sources.load_samples(path)]
    else:
      dc = self.config.data
      image_root = dc.get("image_root") or None
      loaded = []
      for t, f in self.split_files(split).items():
        if not os.path.isfile(f):
          raise PipelineError(f"task {t!r}: {split} file {f} does not exist")
        try:
          loaded.append(sources.load_samples(
              f, image_root=image_root, task=t,
              on_missing_image=dc.get("on_missing_image") or "error"))
        except ValueError as e:
          raise PipelineError(str(e)) from e
    tasks = self.task_names if split == "train" else self.eval_tasks
    wanted = [_with_prompt_suffix(s, self.config.tasks[s["task"]].get("prompt_suffix") or "")
              for part in loaded for s in part.samples if s["task"] in tasks]
    self._skipped[split] = {os.path.basename(part.path): part.skipped for part in loaded
                            if part.skipped}
    for t in tasks:
      if not any(s["task"] == t for s in wanted):
        where = ", ".join(part.path for part in loaded)
        raise PipelineError(f"task {t!r} has no samples in the {split} split ({where})")
    return wanted

  @property
  def template(self) -> str:
    name = self.config.data.get("template") or template.DEFAULT_TEMPLATE
    if name not in template.TEMPLATES:
      raise PipelineError(f"config.data.template={name!r}; known: {sorted(template.TEMPLATES)}")
    return name

  @property
  def system_prompt(self) -> str | None:
    """The config's system prompt; None for the template's own (LLaVA-1.5's for vicuna_v1)."""
    return self.config.data.get("system_prompt")

  @property
  def image_size(self) -> int:
    return int(self.model_config.vision.image_size)

  @functools.cached_property
  def model_config(self):
    from visatb_jax.model import factory
    tok = self.tokenizer
    try:
      return factory.model_config(self.config.model, vocab_size=len(tok),
                                  image_token_id=tokenizer_lib.image_token_id(tok))
    except (OSError, ValueError) as e:
      raise PipelineError(f"model: {e}") from e

  @functools.lru_cache(maxsize=None)
  def encoded_train(self) -> dict[str, list[packing.Example]]:
    """Every training sample as token ids + label mask + image, grouped by task; counts saved."""
    tok, mc = self.tokenizer, self.model_config
    by_task: dict[str, list[packing.Example]] = {t: [] for t in self.task_names}
    stats = {t: {"samples": 0, "truncated": 0, "dropped_too_long": 0} for t in self.task_names}
    for record, s in enumerate(self.samples("train")):
      t = s["task"]
      enc = template.encode_conversation(s["conversations"], tok, num_image_tokens=mc.num_image_tokens,
                                         max_len=int(self.config.data.max_len),
                                         system=self.system_prompt, template=self.template)
      if enc is None:
        stats[t]["dropped_too_long"] += 1
        continue
      stats[t]["samples"] += 1
      stats[t]["truncated"] += int(enc.truncated)
      paths = s.get("image_paths") or []
      # The small built-in benchmark lives in memory; user data is read when a batch is built
      # (hundreds of thousands of images would not fit).
      imgs = images_lib.load_images(paths, self.image_size) if self.source == "shapes" else paths
      by_task[t].append(packing.Example(enc.input_ids, enc.label_mask, self.task_names.index(t),
                                        imgs, record))
    # One row per task in the report, then what each file lost to invalid samples.
    report = {f"{t} (train)": stats[t] for t in self.task_names}
    for split in ("train", "val", "test"):
      self.samples(split)
      for name, skipped in self._skipped.get(split, {}).items():
        report[f"{name} (skipped)"] = skipped
    fileio.atomic_write_json(self.path("data_stats.json"), report, sort_keys=False)
    for t, exs in by_task.items():
      if not exs:
        raise PipelineError(f"task {t!r} has no usable training samples (data.max_len="
                            f"{self.config.data.max_len}; stats: {stats[t]})")
    return by_task

  # --- subsets -------------------------------------------------------------------------------------

  @functools.cached_property
  def subsets(self) -> dict[str, dict[str, np.ndarray]]:
    enc = self.encoded_train()
    pc = self.config.prep
    return subsets.split_subsets({t: len(v) for t, v in enc.items()}, self.task_names,
                                 r_large=float(pc.r_large), r_mini=float(pc.r_mini),
                                 seed=int(self.config.seed))

  def subset_warnings(self) -> list[str]:
    return subsets.size_warnings({t: s for t, s in self.subsets.items() if t not in self.fixed_weights})

  def unit_of(self, task: str) -> str | None:
    if task in self.fixed_weights:
      return None
    return self.groups.get(task, task)

  def unit_tasks(self, unit: str) -> list[str]:
    return [t for t in self.task_names if self.unit_of(t) == unit]

  def prep_models(self) -> list[tuple[str, list[str] | None]]:
    """The preparation models of the balance form, each with the tasks it is validated on.

    real: `mini` and `<u>+mini`; precise: those and `<u>`, `mini_<u>`; base: `base` (the
    initial model, not trained), `<u>` and `mini_<u>` (METHOD.md sections 2 and 7). `<u>` and
    `<u>+mini` are scored on every task (they give C); `mini_<u>` only on u's (it gives D).
    """
    form = self.config.balance.form
    units = self.balanced_units
    if form == "real":
      return [("mini", None)] + [(f"{u}+mini", None) for u in units]
    own = [(u, None) for u in units] + [(f"mini_{u}", self.unit_tasks(u)) for u in units]
    if form == "precise":
      return [("mini", None)] + [(f"{u}+mini", None) for u in units] + own
    if form == "base":
      return [("base", None)] + own
    raise PipelineError(f"config.balance.form={form!r}; known forms: real, precise, base")

  def prep_examples(self, model_name: str) -> list[packing.Example] | None:
    """Training data of a preparation model; None for `base`, which is not trained.

    `mini`: the mini subsets of all tasks; `<u>+mini`: u's large subsets and the others' mini
    ones; `<u>`: u's large subsets alone; `mini_<u>`: u's mini subsets alone.
    """
    if model_name == "base":
      return None
    enc = self.encoded_train()

    def take(tasks, which):
      return [enc[t][i] for t in tasks for i in self.subsets[t][which]]
    if model_name == "mini":
      return take(self.task_names, "mini")
    if model_name.endswith("+mini"):
      unit = model_name.removesuffix("+mini")
      mine = self.unit_tasks(unit)
      return take(mine, "large") + take([t for t in self.task_names if t not in mine], "mini")
    if model_name.startswith("mini_"):
      return take(self.unit_tasks(model_name.removeprefix("mini_")), "mini")
    if model_name in self.balanced_units:
      return take(self.unit_tasks(model_name), "large")
    raise PipelineError(f"unknown preparation model {model_name!r}")

  def task_examples(self, tasks: Sequence[str]) -> list[packing.Example]:
    enc = self.encoded_train()
    return [e for t in tasks for e in enc[t]]

  # --- models --------------------------------------------------------------------------------------

  @functools.cached_property
  def mesh(self):
    from visatb_jax.runtime import sharding
    mesh_config = self.config.get("mesh")
    return sharding.make_mesh(mesh_config.to_dict() if mesh_config is not None else None)

  def sub_meshes(self, count: int) -> list:
    """`count` meshes of the config's shape over disjoint groups of the devices."""
    from visatb_jax.runtime import sharding
    mesh_config = self.config.get("mesh")
    try:
      return sharding.split_meshes(
          mesh_config.to_dict() if mesh_config is not None else None, count)
    except ValueError as e:
      raise PipelineError(str(e)) from e

  def new_model(self, mesh=None):
    """The initial model of every run: the checkpoint of `model.path`, or a seeded random init,
    placed on `mesh` (default: the whole mesh)."""
    from visatb_jax.model import factory
    try:
      return factory.build_model(self.config.model, self.model_config,
                                 mesh=self.mesh if mesh is None else mesh)
    except (OSError, ValueError) as e:
      raise PipelineError(f"model: {e}") from e

  def _claim_dir(self, directory: str, stage_hash: str) -> bool:
    """True when `directory` already holds a finished result of this stage hash.

    A directory left by another configuration is removed, so that its checkpoints are never
    resumed by a run they do not belong to.
    """
    info_path = os.path.join(directory, "run.json")
    fileio.sync(f"claim {directory}")  # every process decides on the same run.json
    info = fileio.read_json(info_path) if os.path.exists(info_path) else None
    if info is not None and info.get("hash") != stage_hash and fileio.is_primary():
      shutil.rmtree(directory)
    if info is None or info.get("hash") != stage_hash:
      fileio.atomic_write_json(info_path, {"hash": stage_hash, "done": False})
    done = info is not None and info.get("hash") == stage_hash and bool(info.get("done"))
    fileio.sync(f"claimed {directory}")
    return done

  def weighting_strategy(self, name: str):
    """A dynamic weighting baseline (visatb_jax.weighting) with the fixed tasks kept fixed."""
    from visatb_jax.core import weighting
    options = dict((self.config.get("weighting_options") or {}).get(name) or {})
    fixed = [t in self.fixed_weights for t in self.task_names]
    return weighting.get_strategy(
        name, fixed_mask=tuple(fixed),
        fixed_values=tuple(self.fixed_weights.get(t, 1.0) for t in self.task_names), **options)

  def train_model(self, rel_dir: str, examples: Sequence[packing.Example], lam: np.ndarray, *,
                  stage_hash: str, tla: bool = False, weighting=None,
                  gradient_method: str | None = None, mesh=None) -> None:
    """Trains one model into `rel_dir` (skipped when done, resumed when interrupted) on `mesh`
    (default: the whole mesh)."""
    from visatb_jax import train
    directory = self.path(rel_dir)
    if self._claim_dir(directory, stage_hash):
      print(f"  {rel_dir}: trained, skipped", flush=True)
      return
    dc, tc = self.config.data, self.config.train
    ds = packing.PackedDataset(examples, seq_len=int(dc.seq_len), max_images=int(dc.max_images),
                               pad_id=self.tokenizer.pad_token_id, seed=int(self.config.seed),
                               image_size=self.image_size)
    cfg = self.train_config(math.ceil(float(tc.epochs) * ds.num_rows / int(tc.batch_size)), tla)
    if gradient_method:
      options = (self.config.get("weighting_options") or {}).get(gradient_method) or {}
      cfg.update(gradient_method=gradient_method, gradient_method_options=dict(options))
    print(f"  {rel_dir}: {len(examples)} samples in {ds.num_rows} rows, {cfg['steps']} steps",
          flush=True)
    if self.loader_kind == "grain":
      # Batches from the grain pipeline over the prepared mixture; its position is checkpointed.
      data = self._grain_loader(examples)
    else:
      data = lambda step: ds.batch_at(step, int(tc.batch_size))  # noqa: E731
    try:
      mesh = self.mesh if mesh is None else mesh
      train.train(self.new_model(mesh), data, np.asarray(lam, np.float32), cfg, directory,
                  task_names=list(self.task_names), mesh=mesh, weighting=weighting)
    finally:
      if hasattr(data, "close"):
        data.close()
    fileio.atomic_write_json(os.path.join(directory, "run.json"), {
        "hash": stage_hash, "done": True, "train": cfg, "rows": ds.num_rows,
        "samples": len(examples), "packing_efficiency": ds.packing_efficiency()})

  @property
  def loader_kind(self) -> str:
    """`memory` (default: encoded once, packed once, batch = f(step)) or `grain` (data/loader.py)."""
    kind = self.config.data.get("loader") or "memory"
    if kind not in ("memory", "grain"):
      raise PipelineError(f"config.data.loader={kind!r}; known: memory, grain")
    return kind

  @property
  def prepared_dir(self) -> str:
    return self.path("data", "prepared")

  def _grain_loader(self, examples: Sequence[packing.Example]):
    from visatb_jax.data import loader as loader_lib
    from visatb_jax.data import prepare
    dc, tc = self.config.data, self.config.train
    prepared = prepare.open_prepared(self.prepared_dir)
    config = loader_lib.LoaderConfig(
        tasks=tuple(self.task_names), seq_len=int(dc.seq_len), max_images=int(dc.max_images),
        image_size=self.image_size, num_image_tokens=self.model_config.num_image_tokens,
        max_len=int(dc.max_len), batch_size=int(tc.batch_size), seed=int(self.config.seed),
        template=self.template, system=self.system_prompt,
        worker_count=int(dc.get("loader_workers") or 0))
    return loader_lib.Loader(prepared.data_source("train"), self.tokenizer, config,
                             record_indices=[e.record for e in examples])

  def train_config(self, steps: int, tla: bool = False) -> dict:
    cfg = self.config.train.to_dict()
    cfg.update(steps=max(1, int(steps)), tla=bool(tla), seed=int(self.config.seed))
    return cfg

  def load_model(self, rel_dir: str | None):
    """The trained model in `rel_dir`, or the untrained initial model for None."""
    model = self.new_model()
    if rel_dir is None:
      return model
    from visatb_jax import train
    info = fileio.read_json(self.path(rel_dir, "run.json"))
    if not info.get("done"):
      raise PipelineError(f"{self.path(rel_dir)} has no finished training run")
    return train.restore_model(model, info["train"], self.path(rel_dir))

  # --- evaluation ----------------------------------------------------------------------------------

  @functools.lru_cache(maxsize=None)
  def eval_sets(self, split: str):
    from visatb_jax.pipeline import evaluation as evaluate
    return evaluate.build_eval_sets(
        self.samples(split), tokenizer=self.tokenizer,
        task_metrics={t: self.config.tasks[t].metric for t in self.eval_tasks},
        num_image_tokens=self.model_config.num_image_tokens, image_size=self.image_size,
        system=self.system_prompt, template_name=self.template)

  def score_model(self, rel_dir: str | None, split: str, *, stage_hash: str,
                  tasks: Sequence[str] | None = None) -> dict[str, float]:
    """Scores of a trained model (None: the untrained one) on `split`, cached in its directory."""
    from visatb_jax.pipeline import evaluation as evaluate
    tasks = list(tasks or self.eval_tasks)
    cache = self.path(rel_dir or "untrained", f"scores_{split}.json")
    fileio.sync(f"scores {cache}")  # every process reads the cache in the same state
    if os.path.exists(cache):
      cached = fileio.read_json(cache)
      if cached.get("hash") == stage_hash and set(tasks) <= set(cached["scores"]):
        return {t: cached["scores"][t] for t in tasks}
    ec = self.config.eval
    scores, preds = evaluate.evaluate(
        self.load_model(rel_dir), self.eval_sets(split), tokenizer=self.tokenizer,
        batch_size=int(ec.batch_size), max_new_tokens=int(ec.max_new_tokens), tasks=tasks,
        desc=f"{rel_dir or 'untrained'} on {split}", mesh=self.mesh)
    print(f"  {rel_dir or 'untrained'} on {split}: "
          + ", ".join(f"{t}={v:.3f}" for t, v in scores.items()), flush=True)
    fileio.atomic_write_json(cache, {"hash": stage_hash, "scores": scores,
                                     "examples": {t: p[:5] for t, p in preds.items()}})
    return scores
