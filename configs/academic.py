"""The paper's Academic benchmark: LLaVA-1.5-7B on 8 tasks, ShareGPT fixed at λ = 1.

python -m visatb_jax.launch --config academic.py \
    --config.data.root=/data/visatb/academic --config.model.path=/models/llava-1.5-7b-hf

Tasks and metrics: `visatb_jax.pipeline.presets.academic_tasks`. R_large = 1, R_mini = 1/32, T = 0.5,
1 epoch, and the paper's baselines (docs/method.md §10).
"""

from visatb_jax.pipeline.presets import academic_tasks, paper_config


def get_config():
  return paper_config("academic", academic_tasks(), r_large=1.0, r_mini=1 / 32, temperature=0.5)
