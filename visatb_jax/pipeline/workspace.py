"""What the stages of one run share: the run config (seen through the current stage's view),
the run directory, the data and the models."""

from __future__ import annotations

from collections.abc import Iterable

from visatb_jax.pipeline.config import ConfigView, RunConfig
from visatb_jax.pipeline.data import DataStore
from visatb_jax.pipeline.models import Models
from visatb_jax.pipeline.run_dir import RunDir


class Workspace:
  """One run directory of one run config.

  `config` is the view of the stage that is running: data and models read their settings
  through it, so a stage that reaches a section its hash does not cover fails loudly.
  """

  def __init__(self, run_config: RunConfig, workdir: str):
    self.run_config = run_config
    self.config: ConfigView | RunConfig = run_config
    self.dir = RunDir(workdir)
    self.data = DataStore(self)
    self.models = Models(self)
    # Every stage's hash (runner.stage_hashes, input files included), set by the runner: a stage
    # may key a model on an earlier stage's hash when the model reads nothing after it.
    self.stage_hashes: dict[str, str] = {}

  def enter_stage(self, stage: str, allowed: Iterable[str]) -> None:
    self.config = self.run_config.restricted(allowed, stage)

  @property
  def workdir(self) -> str:
    return self.dir.workdir
