"""The Academic benchmark with Qwen2-VL-2B, as the paper's appendix runs it (T = 1.0).

python -m visatb_jax.launch --config qwen2vl.py \
    --config.data.root=/data/visatb/academic --config.model.path=/models/Qwen2-VL-2B

`model.path` is the pretrained base, Qwen2-VL-2B, which the paper fine-tunes; Qwen2-VL-2B-Instruct
was already instruction-tuned, and a run from it is warned about.

`model.path` is a Hugging Face Qwen2-VL directory (config.json `model_type: qwen2_vl`, safetensors,
the tokenizer with its <|vision_start|> / <|image_pad|> / <|vision_end|> tokens): its vision tower
(native resolution, 2x2 patch merger) and its Qwen2 decoder with M-RoPE (model/qwen2vl.py). The
sizes below are Qwen2-VL-2B's, so that `--dry-run` works without a checkpoint.

Images keep their aspect ratio and become (h / 28) (w / 28) tokens (data/image_format.py). The
paper does not state its pixel budget; ours caps an image at 576 tokens (max_pixels = 576 x 28²,
LLaVA-1.5's 336-pixel image count), so that three images and their text fit a 2048-token row.
"""

from visatb_jax.pipeline.presets import academic_tasks, paper_config

QWEN2VL_2B_VISION = {"depth": 32, "embed_dim": 1280, "num_heads": 16, "mlp_ratio": 4,
                     "hidden_act": "quick_gelu", "in_channels": 3, "patch_size": 14,
                     "spatial_merge_size": 2, "temporal_patch_size": 2}
QWEN2VL_2B_TEXT = {"vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960,
                   "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
                   "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
                   "max_position_embeddings": 32768, "tie_word_embeddings": True,
                   "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0,
                                       "mrope_section": [16, 24, 24]}}


def get_config():
  c = paper_config("qwen2vl", academic_tasks(), r_large=1.0, r_mini=1 / 32, temperature=1.0,
                   size=None)  # one checkpoint (model.path), not LLaVA's parts
  c.data.template = "qwen2vl"  # ChatML with Qwen2-VL's vision tokens around each image
  c.data.system_prompt = "You are a helpful assistant."
  c.data.min_pixels = 56 * 56         # the processor's default
  c.data.max_pixels = 576 * 28 * 28   # at most 576 image tokens (see above)
  c.model.family = "qwen2_vl"         # a checkpoint's own config.json decides when path is set
  c.model.vision = dict(QWEN2VL_2B_VISION)
  c.model.text = dict(QWEN2VL_2B_TEXT)
  c.model.image_token_id = 151655     # <|image_pad|>
  c.model.vision_start_token_id = 151652
  c.model.vision_end_token_id = 151653
  c.model.video_token_id = 151656
  return c
