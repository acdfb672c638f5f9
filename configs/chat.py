"""The paper's Chat benchmark: LLaVA-Instruct's 3 tasks, balanced in the simpler "base" form.

python -m visatb_jax.launch --config chat.py --config.data.root=/data/visatb/chat \
    --config.model.vision_path=/models/clip-vit-large-patch14-336 \
    --config.model.text_path=/models/vicuna-7b-v1.5 \
    --config.model.projector_path=/models/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5/mm_projector.bin \
    --config.data.tokenizer=/models/vicuna-7b-v1.5-image

The model starts as the paper's: CLIP ViT-L/14-336, Vicuna-7B-v1.5 and the stage-1 projector
(those four paths are the defaults; README, "Starting from the official parts").

Free-form answers have no format to learn, so the pretrained model itself is the reference
(docs/method.md §7): the preparation models are `base` (not trained), each task alone, and each
task's mini subset alone. The paper judges these answers with GPT; here every score is GPT-free:
CIDEr against the reference answer, as the release computes CIDEr, on answers of up to 2048
tokens. T = 0.5; 3 epochs, as the release's finetune_chat.sh (the other benchmarks train 1).
"""

from visatb_jax.pipeline.presets import free_form_task, paper_config


def get_config():
  return paper_config("chat", {
      "conversation": free_form_task(),
      "detail": free_form_task(),
      "complex_reasoning": free_form_task(),
  }, r_large=1.0, r_mini=1 / 32, form="base", temperature=0.5, epochs=3.0)
