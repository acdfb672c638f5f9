"""NNX LLaVA: CLIP vision tower -> projector -> Llama-style decoder, plus KV-cache generation."""

from visatb_jax.model.clip import CLIPVisionModel
from visatb_jax.model.config import LlavaConfig, TextConfig, VisionConfig, to_jnp_dtype
from visatb_jax.model.generate import greedy_generate, greedy_generate_nocache
from visatb_jax.model.llama import KVCache, LlamaForCausalLM, LlamaModel
from visatb_jax.model.llava import LlavaForConditionalGeneration, splice_image_features

__all__ = [
    "CLIPVisionModel",
    "KVCache",
    "LlamaForCausalLM",
    "LlamaModel",
    "LlavaConfig",
    "LlavaForConditionalGeneration",
    "TextConfig",
    "VisionConfig",
    "greedy_generate",
    "greedy_generate_nocache",
    "splice_image_features",
    "to_jnp_dtype",
]
