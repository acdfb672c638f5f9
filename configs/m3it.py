"""The paper's M3IT benchmark: 17 tasks in 5 groups, balanced at group level.

python -m visatb_jax.launch --config m3it.py --config.data.root=/data/visatb/m3it \
    --config.model.vision_path=/models/clip-vit-large-patch14-336 \
    --config.model.text_path=/models/vicuna-7b-v1.5 \
    --config.model.projector_path=/models/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5/mm_projector.bin \
    --config.data.tokenizer=/models/vicuna-7b-v1.5-image

The model starts as the paper's: CLIP ViT-L/14-336, Vicuna-7B-v1.5 and the stage-1 projector
(those four paths are the defaults; README, "Starting from the official parts").

Balancing runs over the groups captioning, classification, VQA, reasoning and generation
(docs/method.md §6); every task gets its group's λ. R_large = 1/4, R_mini = 1/32, T = 1.0 (§10).
The 17 tasks are grouped by M3IT's own taxonomy under its dataset names (a task's file is
data.root/{task}_{split}.json unless its `files` says otherwise). Captioning and generation are
scored by CIDEr (as the release computes it, generating up to 2048 tokens), every other task by
exact match against its reference answer, all GPT-free.

A group's validation score is the plain mean of its members' scores (docs/method.md §6): every
group below has one metric, but its members' scores still differ in scale (CIDEr of coco vs
textcap), so a high-scoring member moves the group's C and D more. docs/method.md §10 says what
the paper states and what the release does.
"""

from visatb_jax.pipeline.presets import free_form_task, paper_config, task

_GROUPS = {
    "captioning": {"coco": "cider", "textcap": "cider", "image-paragraph-captioning": "cider"},
    "classification": {"coco-goi": "exact_match", "coco-text": "exact_match",
                       "imagenet": "exact_match", "snli-ve": "exact_match",
                       "coco-itm": "exact_match", "mocheg": "exact_match"},
    "vqa": {"gqa": "exact_match", "ocr-vqa": "exact_match", "shapes": "exact_match"},
    "reasoning": {"clevr": "exact_match", "nlvr": "exact_match", "science-qa": "exact_match"},
    "generation": {"visual-dialog": "cider", "multi30k": "cider"},
}


def get_config():
  tasks = {name: free_form_task(group=group) if metric == "cider" else task(metric, group=group)
           for group, members in _GROUPS.items() for name, metric in members.items()}
  return paper_config("m3it", tasks, r_large=0.25, r_mini=1 / 32, temperature=1.0)
