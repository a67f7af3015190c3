"""Pure JAX attention: the call context, positions, kernels, caches and layers. No Flax, no I/O.

``__all__`` is the public surface; docs/api.md documents each name.
"""

from jaxattn.functional.attention import (
    attention,
    attention_weights,
    dense_kernel,
    dense_weights,
    multi_head_attention,
    multi_head_attention_weights,
)
from jaxattn.functional.decode import decode_attention, decode_kernel
from jaxattn.functional.flash import flash_attention, flash_block_map, flash_kernel
from jaxattn.functional.kernels import Kernels
from jaxattn.functional.kv_cache import (
    EMPTY_POSITION,
    Int8Tokens,
    KVCache,
    KVView,
    LatentCache,
    LatentView,
    PagedKVCache,
    PagedLatentCache,
    SlidingKVCache,
    dequantize_tokens,
    kv_cache_elements_per_token,
    latent_cache_elements_per_token,
    quantize_tokens,
    stored_bytes_per_token,
)
from jaxattn.functional.masks import (
    AttentionContext,
    causal_mask,
    combine_masks,
    next_positions,
    padding_mask,
    segment_mask,
)
from jaxattn.functional.pallas import (
    pallas_attention,
    pallas_decode_attention,
    pallas_decode_kernel,
    pallas_kernel,
)
from jaxattn.functional.mla import MLAParams, MLASettings, mla_absorbed, mla_decompressed, mla_naive
from jaxattn.functional.positions import Rope, RopeScaling, rope, sinusoidal_positions
from jaxattn.functional.ring import (
    ring_attention,
    ring_attention_shard,
    ring_kernel,
    ring_shard_kernel,
    ring_work_per_device,
    zigzag_order,
)
from jaxattn.functional.self_attention import AttentionParams, AttentionSettings, causal_self_attention

__all__ = [
    "EMPTY_POSITION",
    "AttentionContext",
    "AttentionParams",
    "AttentionSettings",
    "Int8Tokens",
    "KVCache",
    "KVView",
    "Kernels",
    "LatentCache",
    "LatentView",
    "MLAParams",
    "MLASettings",
    "PagedKVCache",
    "PagedLatentCache",
    "Rope",
    "RopeScaling",
    "SlidingKVCache",
    "attention",
    "attention_weights",
    "causal_mask",
    "causal_self_attention",
    "combine_masks",
    "decode_attention",
    "decode_kernel",
    "dense_kernel",
    "dense_weights",
    "dequantize_tokens",
    "flash_attention",
    "flash_block_map",
    "flash_kernel",
    "kv_cache_elements_per_token",
    "latent_cache_elements_per_token",
    "mla_absorbed",
    "mla_decompressed",
    "mla_naive",
    "multi_head_attention",
    "multi_head_attention_weights",
    "next_positions",
    "padding_mask",
    "pallas_attention",
    "pallas_decode_attention",
    "pallas_decode_kernel",
    "pallas_kernel",
    "quantize_tokens",
    "ring_attention",
    "ring_attention_shard",
    "ring_kernel",
    "ring_shard_kernel",
    "ring_work_per_device",
    "rope",
    "segment_mask",
    "sinusoidal_positions",
    "stored_bytes_per_token",
    "zigzag_order",
]
