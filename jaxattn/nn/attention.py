"""The multi-head attention layer: NNX parameters around ``jaxattn.functional.causal_self_attention``.

Shape letters: B batch, T tokens now, S keys (cached + new), C model width,
H query heads, K key/value heads, D head width.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxattn.functional import AttentionParams, causal_self_attention, multi_head_attention
from jaxattn.functional.decode import DECODE_MAX_TOKENS
from jaxattn.nn.layers import default_kernel_init


class MultiHeadAttention(nnx.Module):
    """Causal multi-head attention with H query heads and K key/value heads.

    K = H is MHA, 1 < K < H is GQA, K = 1 is MQA. ``attention_fn`` is any kernel with
    the signature of ``jaxattn.functional.multi_head_attention`` (e.g. the flash kernel).
    ``qkv_bias``/``out_bias`` add biases to the projections (GPT-2 has both, Qwen2 the
    first only). Calls with a cache and at most ``decode_max_tokens`` new tokens use
    ``decode_attention`` (0: never).

    Call: ``x [B, T, C]``, ``positions`` int ``[B, T]`` or ``[T]`` (default ``arange(T)``)
    -> ``[B, T, C]``; with ``cache=`` (a ``KVCache`` or ``SlidingKVCache``) ->
    ``(out, new_cache)``, the positions then coming from the cache.
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
        qkv_bias: bool = False,
        out_bias: bool = False,
        attention_fn=multi_head_attention,
        decode_max_tokens: int = DECODE_MAX_TOKENS,
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
        self.width, self.heads, self.kv_heads, self.head_dim = width, heads, kv_heads, head_dim
        self.rope_theta, self.rope_style, self.window = rope_theta, rope_style, window
        self.attention_fn, self.decode_max_tokens = attention_fn, decode_max_tokens
        self.dtype = dtype
        linear = dict(dtype=dtype, kernel_init=default_kernel_init, rngs=rngs)
        self.q_proj = nnx.Linear(width, heads * head_dim, use_bias=qkv_bias, **linear)
        self.k_proj = nnx.Linear(width, kv_heads * head_dim, use_bias=qkv_bias, **linear)
        self.v_proj = nnx.Linear(width, kv_heads * head_dim, use_bias=qkv_bias, **linear)
        self.o_proj = nnx.Linear(heads * head_dim, width, use_bias=out_bias, **{**linear, "kernel_init": out_init})

    def params(self) -> AttentionParams:
        """The weights as the functional ``AttentionParams`` pytree, in the compute dtype.

        ``nnx.Linear`` stores ``[C, H·D]``; the functional layer reads ``[C, H, D]`` (a
        reshape, no copy).
        """
        C, H, K, D = self.width, self.heads, self.kv_heads, self.head_dim

        def weight(linear, shape):
            return linear.kernel[...].astype(self.dtype).reshape(shape)

        def bias(linear, shape):
            return None if linear.bias is None else linear.bias[...].astype(self.dtype).reshape(shape)

        return AttentionParams(
            w_q=weight(self.q_proj, (C, H, D)),
            w_k=weight(self.k_proj, (C, K, D)),
            w_v=weight(self.v_proj, (C, K, D)),
            w_o=weight(self.o_proj, (H, D, C)),
            b_q=bias(self.q_proj, (H, D)),
            b_k=bias(self.k_proj, (K, D)),
            b_v=bias(self.v_proj, (K, D)),
            b_o=bias(self.o_proj, (C,)),
        )

    def __call__(self, x, positions=None, *, cache=None, num_new=None):
        return causal_self_attention(
            self.params(),
            x.astype(self.dtype),
            positions,
            cache=cache,
            num_new=num_new,
            rope_theta=self.rope_theta,
            rope_style=self.rope_style,
            window=self.window,
            attention_fn=self.attention_fn,
            decode_max_tokens=self.decode_max_tokens,
        )
