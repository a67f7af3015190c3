"""Flax NNX modules that hold parameters and call ``jaxattn.functional``."""

from jaxattn.nn.attention import MultiHeadAttention
from jaxattn.nn.layers import GatedMlp, Mlp, SwiGluMlp, make_norm
from jaxattn.nn.mla import MultiHeadLatentAttention
from jaxattn.nn.transformer import (
    Config,
    TransformerBlock,
    TransformerConfig,
    TransformerLM,
    cache_bytes_per_token,
    cache_elements_per_token,
)

__all__ = [
    "Config",
    "GatedMlp",
    "Mlp",
    "MultiHeadAttention",
    "MultiHeadLatentAttention",
    "SwiGluMlp",
    "TransformerBlock",
    "TransformerConfig",
    "TransformerLM",
    "cache_bytes_per_token",
    "cache_elements_per_token",
    "make_norm",
]
