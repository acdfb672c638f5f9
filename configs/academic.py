"""The paper's Academic benchmark: LLaVA-1.5-7B on 8 tasks, ShareGPT fixed at λ = 1.

python -m visatb_jax.launch --config academic.py --config.data.root=/data/visatb/academic \
    --config.model.vision_path=/models/clip-vit-large-patch14-336 \
    --config.model.text_path=/models/vicuna-7b-v1.5 \
    --config.model.projector_path=/models/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5/mm_projector.bin \
    --config.data.tokenizer=/models/vicuna-7b-v1.5-image \
    --config.zero_shot_root=/data/visatb/zero_shot

The model starts as the paper's: CLIP ViT-L/14-336, Vicuna-7B-v1.5 and the stage-1 projector
(those four paths are the defaults; README, "Starting from the official parts"). Tasks, metrics
and the shared recipe: `visatb_jax.pipeline.presets` (`academic_tasks`, `paper_config`).
R_large = 1, R_mini = 1/32, T = 0.5, 1 epoch, and the paper's baselines (docs/method.md §10).

The paper's zero-shot suite (TextVQA, POPE, MME, SQA-IMG, MMBench, SEED-IMG, MM-Vet; prompts and
scorers in `presets.zero_shot_suite`, docs/method.md §12) is declared, its files
`<zero_shot_root>/<name>_test.json`; with `zero_shot_root` empty (the default) it is skipped, with
a warning and a line in the report, and the report has no ΔI_zero.
"""

from visatb_jax.pipeline.presets import academic_tasks, paper_config, with_zero_shot_suite


def get_config():
  c = paper_config("academic", academic_tasks(), r_large=1.0, r_mini=1 / 32, temperature=0.5)
  return with_zero_shot_suite(c)
