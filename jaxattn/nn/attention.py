"""The multi-head attention layer: projections, RoPE, a swappable kernel and a KV cache.

Shape letters: B batch, T tokens now, S keys (cached + new), C model width,
H query heads, K key/value heads, D head width.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxattn.functional import multi_head_attention, rope
from jaxattn.nn.layers import default_kernel_init


class MultiHeadAttention(nnx.Module):
    """Causal multi-head attention with H query heads and K key/value heads.

    K = H is MHA, 1 < K < H is GQA, K = 1 is MQA. ``attention_fn`` is any kernel with
    the signature of ``jaxattn.functional.multi_head_attention`` (e.g. the flash kernel).

    Call: ``x [B, T, C]``, ``positions`` int ``[B, T]`` or ``[T]`` (absolute positions of
    the T tokens) -> ``[B, T, C]``; with ``cache=`` (a ``KVCache`` or ``SlidingKVCache``)
    -> ``(out, new_cache)``, where the positions must continue the cache
    (``cache.lengths[:, None] + arange(T)``).
    """

    def __init__(
        self,
        width: int,
        *,
        heads: int,
        kv_heads: int | None = None,
        head_dim: int | None = None,
        rope_theta: float | None = None,
        rope_style: str = "half",
        window: int | None = None,
        attention_fn=multi_head_attention,
        dtype=jnp.float32,
        out_init=default_kernel_init,
        rngs: nnx.Rngs,
    ):
        kv_heads = heads if kv_heads is None else kv_heads
        head_dim = width // heads if head_dim is None else head_dim
        if heads < 1 or kv_heads < 1 or heads % kv_heads:
            raise ValueError(f"heads={heads} must be a positive multiple of kv_heads={kv_heads}")
        if rope_theta is not None and head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.rope_theta, self.rope_style, self.window = rope_theta, rope_style, window
        self.attention_fn = attention_fn
        linear = dict(use_bias=False, dtype=dtype, kernel_init=default_kernel_init, rngs=rngs)
        self.q_proj = nnx.Linear(width, heads * head_dim, **linear)
        self.k_proj = nnx.Linear(width, kv_heads * head_dim, **linear)
        self.v_proj = nnx.Linear(width, kv_heads * head_dim, **linear)
        self.o_proj = nnx.Linear(heads * head_dim, width, **{**linear, "kernel_init": out_init})

    def __call__(self, x, positions, *, cache=None, num_new=None):
        B, T, _ = x.shape
        H, K, D = self.heads, self.kv_heads, self.head_dim
        q = self.q_proj(x).reshape(B, T, H, D)  # [B, T, H, D]
        k = self.k_proj(x).reshape(B, T, K, D)  # [B, T, K, D]
        v = self.v_proj(x).reshape(B, T, K, D)  # [B, T, K, D]
        positions = jnp.asarray(positions)
        if self.rope_theta is not None:
            q = rope(q, positions[..., None], theta=self.rope_theta, style=self.rope_style)
            k = rope(k, positions[..., None], theta=self.rope_theta, style=self.rope_style)
        if cache is None:
            kv_positions, new_cache = positions, None
        else:
            view, new_cache = cache.update(k.astype(cache.k.dtype), v.astype(cache.v.dtype), num_new)
            k, v, kv_positions = view.k.astype(q.dtype), view.v.astype(q.dtype), view.positions
        out = self.attention_fn(
            q, k, v, is_causal=True, q_positions=positions, kv_positions=kv_positions, window=self.window
        )  # [B, T, H, D]
        out = self.o_proj(out.reshape(B, T, H * D))  # [B, T, C]
        return out if cache is None else (out, new_cache)
