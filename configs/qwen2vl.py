"""The Academic benchmark with a Qwen2-family language model and the ChatML template.

python -m visatb_jax.launch --config qwen2vl.py \
    --config.data.root=/data/visatb/academic --config.model.path=/models/llava-qwen2-1.5b

The checkpoint is a LLaVA-architecture directory (CLIP tower, MLP projector) whose text_config is
a Qwen2 model: q/k/v biases and RoPE theta are read from its config.json. The sizes below (a
Qwen2-1.5B language model behind the LLaVA-1.5 tower) serve `--dry-run` without a checkpoint.
"""

from visatb_jax.pipeline.presets import academic_tasks, paper_config


def get_config():
  # The paper's Qwen2-VL-2B runs balance at T = 1.0 (Academic itself uses 0.5).
  c = paper_config("qwen2vl", academic_tasks(), r_large=1.0, r_mini=1 / 32, temperature=1.0)
  c.data.template = "chatml"
  c.data.system_prompt = "You are a helpful assistant."
  c.model.text = {"vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960,
                  "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
                  "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "attention_bias": True,
                  "max_position_embeddings": 32768, "tie_word_embeddings": True}
  c.model.image_token_id = 151646
  return c
