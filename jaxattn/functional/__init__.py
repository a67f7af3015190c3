"""Pure JAX attention: masks, positions, kernels, caches and layers. No Flax, no I/O.

``__all__`` is the public surface; the README's API table documents each name.
"""

from jaxattn.functional.attention import attention, attention_weights, multi_head_attention, multi_head_attention_weights
from jaxattn.functional.decode import decode_attention
from jaxattn.functional.flash import flash_attention, flash_block_map
from jaxattn.functional.kv_cache import (
    EMPTY_POSITION,
    KVCache,
    KVView,
    LatentCache,
    LatentView,
    SlidingKVCache,
    kv_cache_elements_per_token,
    latent_cache_elements_per_token,
    next_positions,
)
from jaxattn.functional.masks import causal_mask, combine_masks, padding_mask, segment_mask
from jaxattn.functional.mla import MLAParams, mla_absorbed, mla_decompressed, mla_naive
from jaxattn.functional.positions import rope, sinusoidal_positions
from jaxattn.functional.ring import ring_attention, ring_attention_shard, zigzag_order
from jaxattn.functional.self_attention import AttentionParams, causal_self_attention

__all__ = [
    "EMPTY_POSITION",
    "AttentionParams",
    "KVCache",
    "KVView",
    "LatentCache",
    "LatentView",
    "MLAParams",
    "SlidingKVCache",
    "attention",
    "attention_weights",
    "causal_mask",
    "causal_self_attention",
    "combine_masks",
    "decode_attention",
    "flash_attention",
    "flash_block_map",
    "kv_cache_elements_per_token",
    "latent_cache_elements_per_token",
    "mla_absorbed",
    "mla_decompressed",
    "mla_naive",
    "multi_head_attention",
    "multi_head_attention_weights",
    "next_positions",
    "padding_mask",
    "ring_attention",
    "ring_attention_shard",
    "rope",
    "segment_mask",
    "sinusoidal_positions",
    "zigzag_order",
]
