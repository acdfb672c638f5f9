"""The VisATB pipeline: run config, method registry, task plan, run directory, data, models,
stages, run, report.

  config.py     RunConfig: built once from a config file, every default and check
  methods.py    the method registry: name → how its final model is trained
  tasks.py      TaskPlan: fixed, balanced, grouped and scored tasks; the preparation models
  run_dir.py    paths, claims, score caches, the manifest
  data.py       task files or the built-in benchmark, tokenizer, encoded samples, subsets
  models.py     the mesh, building, training, loading and scoring models
  workspace.py  what the stages share
  stages.py     the stages and the sections each reads
  runner.py     running stages in order: skipped when done, refused when stale
  evaluation.py generation and per-sample scoring
  comparison.py comparison.json: ΔI/ΔE against STL and differences to EW, from a run directory
  report.py     report.md and plots, from a run directory alone
  presets.py    what the paper's configs share
"""

from visatb_jax.pipeline.errors import ConfigError, PipelineError
from visatb_jax.pipeline.runner import run
from visatb_jax.pipeline.stages import STAGE_NAMES as STAGES

__all__ = ["ConfigError", "PipelineError", "STAGES", "run"]
