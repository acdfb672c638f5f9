"""The paper's Chat benchmark: LLaVA-Instruct's 3 tasks, balanced in the simpler "base" form.

python -m visatb_jax.launch --config chat.py \
    --config.data.root=/data/visatb/chat --config.model.path=/models/llava-1.5-7b-hf

Free-form answers have no format to learn, so the pretrained model itself is the reference
(docs/method.md §7): the preparation models are `base` (not trained), each task alone, and each
task's mini subset alone. The paper judges these answers with GPT; here every score is GPT-free:
CIDEr against the reference answer. T = 0.5; 3 epochs, as the release's finetune_chat.sh (the
other benchmarks train 1).
"""

from visatb_jax.pipeline.presets import paper_config, task


def get_config():
  return paper_config("chat", {
      "conversation": task("cider"),
      "detail": task("cider"),
      "complex_reasoning": task("cider"),
  }, r_large=1.0, r_mini=1 / 32, form="base", temperature=0.5, epochs=3.0)
