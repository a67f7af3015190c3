"""Pure JAX attention: masks, positions and kernels. No Flax, no I/O."""

from jaxattn.functional.attention import (
    MASK_VALUE,
    attention,
    attention_weights,
    default_positions,
    multi_head_attention,
    multi_head_mask,
)
from jaxattn.functional.masks import causal_mask, combine_masks, padding_mask
from jaxattn.functional.positions import rope, sinusoidal_positions

__all__ = [
    "MASK_VALUE",
    "attention",
    "attention_weights",
    "causal_mask",
    "combine_masks",
    "default_positions",
    "multi_head_attention",
    "multi_head_mask",
    "padding_mask",
    "rope",
    "sinusoidal_positions",
]
