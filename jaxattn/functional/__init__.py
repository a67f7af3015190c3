"""Pure JAX attention: masks, positions and kernels. No Flax, no I/O."""

from jaxattn.functional.attention import (
    MASK_VALUE,
    attention,
    attention_weights,
    default_positions,
    multi_head_attention,
    multi_head_mask,
)
from jaxattn.functional.flash import flash_attention
from jaxattn.functional.kv_cache import EMPTY_POSITION, KVCache, KVView, SlidingKVCache
from jaxattn.functional.mla import (
    LatentCache,
    LatentView,
    MLAParams,
    kv_cache_elements_per_token,
    latent_cache_elements_per_token,
    mla_absorbed,
    mla_latent_cache,
    mla_naive,
)
from jaxattn.functional.masks import causal_mask, combine_masks, padding_mask
from jaxattn.functional.positions import rope, sinusoidal_positions

__all__ = [
    "EMPTY_POSITION",
    "KVCache",
    "KVView",
    "LatentCache",
    "LatentView",
    "MLAParams",
    "MASK_VALUE",
    "SlidingKVCache",
    "attention",
    "attention_weights",
    "causal_mask",
    "combine_masks",
    "default_positions",
    "flash_attention",
    "kv_cache_elements_per_token",
    "latent_cache_elements_per_token",
    "mla_absorbed",
    "mla_latent_cache",
    "mla_naive",
    "multi_head_attention",
    "multi_head_mask",
    "padding_mask",
    "rope",
    "sinusoidal_positions",
]
