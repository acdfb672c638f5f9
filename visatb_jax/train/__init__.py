"""Training: configuration and state, the step core, the VITW and per-task-gradient steps, and the
resumable loop driven by one `TrainMethod`.

  state.py         TrainConfig (defaults and checks), optimizer, schedule, TrainState, split_model
  step.py          the core: forward sums, micro-batch accumulation, metrics, jit with shardings
  vitw_step.py     the λ-weighted token cross-entropy step (EW, VisATB, TLA, dynamic weightings)
  gradmtl_step.py  the per-task-gradient step (IMGrad, CAGrad, PCGrad, MGDA, Nash-MTL)
  method.py        TrainMethod: static, tla, dynamic or gradient
  loop.py          train(): batches, λ, checkpoints, metrics, resume
"""

from visatb_jax.train.loop import TrainingDiverged, restore_model, train, weighting_rng
from visatb_jax.train.method import TrainMethod
from visatb_jax.train.state import (TrainConfig, TrainState, init_train_state, make_optimizer,
                                    make_schedule, split_model)
from visatb_jax.train.vitw_step import make_train_step

__all__ = ["TrainConfig", "TrainMethod", "TrainState", "TrainingDiverged", "init_train_state",
           "make_optimizer", "make_schedule", "make_train_step", "restore_model", "split_model",
           "train", "weighting_rng"]
