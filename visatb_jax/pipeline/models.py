"""The run's models: the mesh, the initial model, training a model into a run sub-directory
(skipped when done, resumed when interrupted) and scoring a model on a split (cached)."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from visatb_jax.data import packing, template
from visatb_jax.pipeline.errors import PipelineError

PRETRAIN_DIR = "pretrain"
# The train.* fields the pretrain stage reads: TrainConfig's, less those it sets itself (its
# steps, learning rate and trainable parameters come from config.pretrain) and the run's seed.
# Only these are in its hash, so that e.g. train.lr or train.epochs keeps the pretrained model.
PRETRAIN_TRAIN_FIELDS = ("batch_size", "accum_steps", "warmup_frac", "clip_norm", "weight_decay",
                         "checkpoint_every", "log_every", "freeze_vision_tower", "ce_chunk_size")

if TYPE_CHECKING:
  from visatb_jax.pipeline.workspace import Workspace
  from visatb_jax.train.method import TrainMethod


def image_format_for(model_config, data):
  """How a model sees images (data/image_format.py): LLaVA's square `image_size` images of a
  fixed token count, or Qwen2-VL's native resolution within data.min_pixels / data.max_pixels
  (the processor's defaults when unset)."""
  from visatb_jax.data import image_format  # pylint: disable=g-import-not-at-top
  from visatb_jax.data import qwen2vl_image  # pylint: disable=g-import-not-at-top
  from visatb_jax.model.qwen2vl import Qwen2VLConfig  # pylint: disable=g-import-not-at-top
  if not isinstance(model_config, Qwen2VLConfig):
    return image_format.SquareImages(int(model_config.vision.image_size),
                                     int(model_config.num_image_tokens))
  v = model_config.vision
  return image_format.NativeImages(
      image_token_id=model_config.image_token_id,
      min_pixels=int(data.get("min_pixels") or qwen2vl_image.MIN_PIXELS),
      max_pixels=int(data.get("max_pixels") or qwen2vl_image.MAX_PIXELS),
      patch_size=v.patch_size, merge_size=v.spatial_merge_size,
      temporal_patch_size=v.temporal_patch_size)


def row_multiple(mesh, accum_steps: int) -> int:
  """What a step's row count must be a multiple of: every micro-batch split evenly over the batch
  shards of `mesh`, and the rows split evenly over the processes."""
  import jax  # pylint: disable=g-import-not-at-top
  from visatb_jax.runtime import sharding  # pylint: disable=g-import-not-at-top
  return math.lcm(sharding.batch_shards(mesh) * int(accum_steps), jax.process_count())


class Models:
  """Models of one run directory."""

  def __init__(self, ws: Workspace):
    self._ws = ws

  @functools.cached_property
  def mesh(self):
    from visatb_jax.runtime import sharding  # pylint: disable=g-import-not-at-top
    return sharding.make_mesh(self._ws.config.section("mesh"))

  def sub_meshes(self, count: int) -> list:
    """`count` meshes of the config's shape over disjoint groups of the devices."""
    from visatb_jax.runtime import sharding  # pylint: disable=g-import-not-at-top
    try:
      return sharding.split_meshes(self._ws.config.section("mesh"), count)
    except ValueError as e:
      raise PipelineError(str(e)) from e

  @functools.cached_property
  def model_config(self):
    from visatb_jax.model import factory  # pylint: disable=g-import-not-at-top
    data = self._ws.data
    try:
      # The id the template's image blocks carry (<image>, or Qwen2-VL's <|image_pad|>).
      image_token_id = template.image_token_id(data.tokenizer, data.template)
      return factory.model_config(self._ws.config.section("model"), vocab_size=len(data.tokenizer),
                                  image_token_id=image_token_id)
    except (OSError, ValueError) as e:
      raise PipelineError(f"model: {e}") from e

  @functools.cached_property
  def image_format(self):
    """How the model sees images (`image_format_for`)."""
    return image_format_for(self.model_config, self._ws.config.section("data"))

  def new_model(self, mesh=None, *, from_base: bool = True):
    """The model every run starts from, placed on `mesh` (default: the whole mesh): the
    checkpoint of `model.path` or a seeded random init, then, when a pretrain stage is configured
    (and `from_base`), the parameters it trained."""
    from visatb_jax.model import factory  # pylint: disable=g-import-not-at-top
    try:
      model = factory.build_model(self._ws.config.section("model"), self.model_config,
                                  mesh=self.mesh if mesh is None else mesh)
    except (OSError, ValueError) as e:
      raise PipelineError(f"model: {e}") from e
    if from_base and self._ws.config.pretrain:
      from visatb_jax import train as train_lib  # pylint: disable=g-import-not-at-top
      info = self._ws.dir.run_info(PRETRAIN_DIR)
      model = train_lib.restore_model(model, info["train"], self._ws.dir.path(PRETRAIN_DIR))
    return model

  def base_description(self, pretrained: bool = True) -> dict:
    """What a run starts from, recorded in its run.json."""
    from visatb_jax.model import factory  # pylint: disable=g-import-not-at-top
    start = {"init": factory.start_description(self._ws.config.section("model"))}
    if pretrained and self._ws.config.pretrain:
      start["pretrained"] = {"dir": PRETRAIN_DIR,
                             "hash": self._ws.dir.run_info(PRETRAIN_DIR).get("hash")}
    return start

  def train(self, rel_dir: str, examples: Sequence[packing.Example], method: TrainMethod, *,
            stage_hash: str, mesh=None, pretrain: bool = False,
            task_names: Sequence[str] | None = None, data_seed: int | None = None) -> bool:
    """Trains one model into `rel_dir` with `method` (skipped when done, resumed when
    interrupted) on `mesh` (default: the whole mesh). `pretrain`: the pretrain stage's run (its
    own settings, from the initial model). `data_seed`: the seed of the data order (default: the
    run's; a preparation replicate has its own, docs/method.md §13). `stage_hash`: what the model
    is keyed on. True when it was reused: trained before under the same hash."""
    from visatb_jax import train as train_lib  # pylint: disable=g-import-not-at-top
    from visatb_jax.train.state import TrainConfig  # pylint: disable=g-import-not-at-top
    ws = self._ws
    if ws.dir.claim(rel_dir, stage_hash):
      print(f"  {rel_dir}: trained, skipped", flush=True)
      return True
    data = ws.config.section("data")
    if pretrain:
      settings = ws.config.pretrain
      # The fields of its hash alone (ConfigView raises on any other).
      train = {f: ws.config.section(f"train.{f}") for f in PRETRAIN_TRAIN_FIELDS}
      train = {f: v for f, v in train.items() if v is not None}
      batch_size = int(settings["batch_size"] or train["batch_size"])
      epochs = float(settings["epochs"])
    else:
      batch_size, epochs = int(ws.config.section("train")["batch_size"]), ws.config.train_epochs
    # batch_size counts samples (the paper's); the rows they pack into follow (docs/architecture.md,
    # "Batch size in samples").
    ds = packing.PackedDataset(examples, seq_len=int(data["seq_len"]),
                               max_images=int(data["max_images"]),
                               pad_id=ws.data.tokenizer.pad_token_id,
                               seed=int(ws.config.seed) if data_seed is None else int(data_seed),
                               batch_size=batch_size, image_format=self.image_format)
    steps = ds.num_steps(epochs)
    mesh = self.mesh if mesh is None else mesh
    accum = int((train if pretrain else ws.config.section("train")).get("accum_steps") or 1)
    multiple = row_multiple(mesh, accum)
    if ws.data.loader_kind == "grain" and not pretrain:
      batches = ws.data.grain_loader(examples, seed=data_seed, steps=steps, multiple=multiple)
      rows, padding = batches.config.rows, None
    else:
      rows = ds.rows_per_step(steps, multiple)
      padding = ds.padding(steps, rows)
      batches = lambda step: ds.batch_at(step, rows)  # noqa: E731
    if pretrain:
      cfg = TrainConfig.of({
          **train, "steps": steps, "seed": ws.config.seed, "lr": float(settings["lr"]),
          "batch_size": rows, "accum_steps": accum,
          "trainable": "projector" if settings["trains"] == "projector" else "model"})
    else:
      cfg = ws.config.train_config(steps, rows_per_step=rows)
    print(f"  {rel_dir}: {len(examples)} samples, {cfg.steps} steps of {batch_size} samples in "
          f"{rows} rows" + (f" ({padding['samples_per_row']:.2f} samples a row, "
                            f"{padding['empty_rows']:.1%} of rows empty, "
                            f"{padding['non_pad']:.1%} non-pad tokens)" if padding else ""),
          flush=True)
    try:
      train_lib.train(self.new_model(mesh, from_base=not pretrain), batches, method, cfg,
                      ws.dir.path(rel_dir), task_names=list(task_names or ws.config.tasks.names),
                      mesh=mesh)
    finally:
      if hasattr(batches, "close"):
        batches.close()
    ws.dir.finish(rel_dir, {"hash": stage_hash, "method": method.name,
                            **({} if data_seed is None else {"data_seed": int(data_seed)}),
                            "start": self.base_description(pretrained=not pretrain),
                            "train": cfg.to_dict(),
                            "samples": len(examples), "samples_per_step": batch_size,
                            "rows_per_step": rows,
                            **({"padding": padding} if padding else {})})
    return False

  def load(self, rel_dir: str | None):
    """The trained model in `rel_dir`, or the untrained initial model for None."""
    model = self.new_model()
    if rel_dir is None:
      return model
    from visatb_jax import train as train_lib  # pylint: disable=g-import-not-at-top
    info = self._ws.dir.run_info(rel_dir)
    return train_lib.restore_model(model, info["train"], self._ws.dir.path(rel_dir))

  def score(self, rel_dir: str | None, split: str, *, stage_hash: str,
            tasks: Sequence[str] | None = None,
            zero_shot: bool = False) -> tuple[dict[str, float], dict[str, dict]]:
    """(scores, per-sample scores) of a trained model (None: the untrained one) on `split` of the
    scored tasks, or with `zero_shot` of the zero-shot tasks (docs/method.md §12), cached in its
    directory."""
    from visatb_jax.pipeline import evaluation  # pylint: disable=g-import-not-at-top
    ws = self._ws
    if zero_shot:
      tasks, eval_sets, name = list(ws.config.zero_shot), ws.data.zero_shot_eval_sets, "zero-shot "
    else:
      tasks, eval_sets, name = list(tasks or ws.config.tasks.eval_tasks), ws.data.eval_sets, ""
    if not tasks:
      return {}, {}
    where = rel_dir or "untrained"
    cache = f"{split}_zero_shot" if zero_shot else split  # scores_<cache>.json
    cached = ws.dir.cached_scores(where, cache, stage_hash, tasks)
    if cached is not None:
      return cached
    ev = ws.config.section("eval")
    result = evaluation.evaluate_samples(
        self.load(rel_dir), eval_sets(split), tokenizer=ws.data.tokenizer,
        batch_size=int(ev["batch_size"]), max_new_tokens=int(ev["max_new_tokens"]), tasks=tasks,
        desc=f"{where} on {name}{split}", mesh=self.mesh,
        task_max_new_tokens=evaluation.task_budgets(
            ev, ws.config.section("zero_shot") if zero_shot else None))
    print(f"  {where} on {name}{split}: "
          + ", ".join(f"{t}={v:.3f}" for t, v in result.scores.items()), flush=True)
    ws.dir.cache_scores(where, cache, stage_hash, result.scores, result.samples,
                        result.predictions)
    return dict(result.scores), dict(result.samples)
