"""NNX vision-language models: LLaVA (CLIP tower -> projector -> Llama-style decoder) and Qwen2-VL
(ViT with 2-D rotary -> patch merger -> Qwen2 decoder with M-RoPE), plus KV-cache generation."""

from visatb_jax.model.clip import CLIPVisionModel
from visatb_jax.model.config import LlavaConfig, TextConfig, VisionConfig, to_jnp_dtype
from visatb_jax.model.generate import greedy_generate, greedy_generate_nocache
from visatb_jax.model.llama import KVCache, LlamaForCausalLM, LlamaModel
from visatb_jax.model.llava import LlavaForConditionalGeneration, splice_image_features
from visatb_jax.model.qwen2vl import (Qwen2VLConfig, Qwen2VLForConditionalGeneration,
                                      Qwen2VLTextModel, Qwen2VLVisionConfig, RowImages,
                                      VisionBatch, vision_batch)

__all__ = [
    "CLIPVisionModel",
    "KVCache",
    "LlamaForCausalLM",
    "LlamaModel",
    "LlavaConfig",
    "LlavaForConditionalGeneration",
    "Qwen2VLConfig",
    "Qwen2VLForConditionalGeneration",
    "Qwen2VLTextModel",
    "Qwen2VLVisionConfig",
    "TextConfig",
    "RowImages",
    "VisionBatch",
    "VisionConfig",
    "greedy_generate",
    "greedy_generate_nocache",
    "splice_image_features",
    "to_jnp_dtype",
    "vision_batch",
]
