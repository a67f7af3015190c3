"""Feed-forward layers and norms of a transformer block.

Shape letters: B batch, T tokens, C model width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

# GPT-2's initialisation: small normal weights keep the residual stream's scale in check.
default_kernel_init = nnx.initializers.normal(stddev=0.02)


class Mlp(nnx.Module):
    """``W_2 gelu(W_1 x + b_1) + b_2``: the feed-forward layer of GPT-2 (hidden width usually
    4C). GELU in its tanh form (Hendrycks & Gimpel 2016), GPT-2's ``gelu_new``."""

    def __init__(self, width: int, hidden: int, *, bias: bool = False, dtype=jnp.float32, out_init=default_kernel_init,
                 rngs: nnx.Rngs):
        self.up = nnx.Linear(width, hidden, use_bias=bias, dtype=dtype, kernel_init=default_kernel_init, rngs=rngs)
        self.down = nnx.Linear(hidden, width, use_bias=bias, dtype=dtype, kernel_init=out_init, rngs=rngs)

    def __call__(self, x):  # [B, T, C] -> [B, T, C]
        return self.down(jax.nn.gelu(self.up(x), approximate=True))


class SwiGluMlp(nnx.Module):
    """``W_2 (silu(W_gate x) * W_1 x)`` (Shazeer 2020, arXiv 2002.05202), as in Llama."""

    def __init__(self, width: int, hidden: int, *, bias: bool = False, dtype=jnp.float32, out_init=default_kernel_init,
                 rngs: nnx.Rngs):
        linear = dict(use_bias=bias, dtype=dtype, rngs=rngs)
        self.gate = nnx.Linear(width, hidden, kernel_init=default_kernel_init, **linear)
        self.up = nnx.Linear(width, hidden, kernel_init=default_kernel_init, **linear)
        self.down = nnx.Linear(hidden, width, kernel_init=out_init, **linear)

    def __call__(self, x):  # [B, T, C] -> [B, T, C]
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


def make_norm(kind: str, width: int, *, epsilon: float = 1e-6, dtype=jnp.float32, rngs: nnx.Rngs):
    """``"rms"``: RMSNorm (Zhang & Sennrich 2019), ``"layer"``: LayerNorm (Ba et al. 2016), from Flax."""
    if kind == "rms":
        return nnx.RMSNorm(width, epsilon=epsilon, dtype=dtype, rngs=rngs)
    if kind == "layer":
        return nnx.LayerNorm(width, epsilon=epsilon, dtype=dtype, rngs=rngs)
    raise ValueError(f"norm must be 'rms' or 'layer', got {kind!r}")
