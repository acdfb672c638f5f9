"""Training: state and optimizer, the step core, the VITW and per-task-gradient steps, the loop."""

from visatb_jax.train.loop import *  # noqa: F401,F403  (temporary during the restructure)
from visatb_jax.train.loop import (_cached_train_step, _flat, _optimizer, _optimizer_key,  # noqa: F401
                                   _loss_sums, _micro_batches)
