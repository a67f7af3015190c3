"""What every attention layer does around its kernel, written once for the standard layer
(``self_attention.py``) and MLA (``mla.py``): the token side of a call's context, and RMSNorm.

Shape letters: B batch, T tokens now.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxattn.functional.masks import AttentionContext


def call_context(x, positions=None, *, context: AttentionContext | None = None, cache=None):
    """The token side of a layer's call: ``context`` when the model built it, else from
    ``positions`` (default ``arange(T)``) or the cache's lengths."""
    B, T = x.shape[:2]
    if context is None:
        return AttentionContext.for_tokens(T, positions, lengths=None if cache is None else cache.lengths, B=B)
    if positions is not None:
        raise ValueError("pass the positions in the context, or positions without a context, not both")
    if context.T != T:
        raise ValueError(f"the context describes T={context.T} tokens, x has T={T}: {x.shape}")
    return context


def rms_norm(x, scale, epsilon: float, axes=-1):
    """RMSNorm (Zhang & Sennrich 2019): ``x / rms(x) * scale`` over ``axes``, computed in float32."""
    xf = x.astype(jnp.float32)
    normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=axes, keepdims=True) + epsilon)
    return (normed * scale).astype(x.dtype)
