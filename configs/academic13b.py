"""The paper's Academic benchmark with LLaVA-1.5-13B: Vicuna-13B-v1.5, otherwise as academic.py.

python -m visatb_jax.launch --config academic13b.py --config.data.root=/data/visatb/academic \
    --config.model.vision_path=/models/clip-vit-large-patch14-336 \
    --config.model.text_path=/models/vicuna-13b-v1.5 \
    --config.model.projector_path=/models/llava-v1.5-mlp2x-336px-pretrain-vicuna-13b-v1.5/mm_projector.bin \
    --config.data.tokenizer=/models/vicuna-13b-v1.5-image \
    --config.zero_shot_root=/data/visatb/zero_shot

The release's finetune_academic_vicuna13b.sh is its 7B script with lmsys/vicuna-13b-v1.5 (and the
13B stage-1 projector): the same 8 tasks, 1 epoch, batch 128, lr 2e-5; its weighting_visatb.py
computes the 13B weights at the same T = 0.5 and α (docs/method.md §10). Tasks, metrics and the
shared recipe: `visatb_jax.pipeline.presets` (`academic_tasks`, `paper_config`); the zero-shot
suite is academic.py's (skipped while `zero_shot_root` is empty).

Memory: the 7B step with the default selective remat needs 69 GiB per device on 8 (BENCHMARKS.md,
"Dry run"); 13B has 1.6x its activations per token (hidden size x layers) and 1.9x its parameters,
so this config recomputes every layer (`model.remat = "full"`, 33 GiB per device for the 7B). Run
`--dry-run --dry_run_devices=8` for the figure of your mesh before renting it.
"""

from visatb_jax.pipeline.presets import academic_tasks, paper_config, with_zero_shot_suite


def get_config():
  c = paper_config("academic13b", academic_tasks(), r_large=1.0, r_mini=1 / 32, temperature=0.5,
                   size="13b")
  c.model.remat = "full"
  return with_zero_shot_suite(c)
