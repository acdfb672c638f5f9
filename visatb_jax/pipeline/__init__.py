"""The VisATB pipeline: run config, method registry, run directory, stages, report."""

from visatb_jax.pipeline.stages import *  # noqa: F401,F403  (temporary during the restructure)
from visatb_jax.pipeline.stages import PipelineError, STAGES, run  # noqa: F401
