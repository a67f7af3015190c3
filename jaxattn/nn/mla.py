"""The multi-head latent attention layer (DeepSeek-V2): NNX parameters around
``jaxattn.functional.mla``. Training and full passes use the naive path; a call with a
``LatentCache`` uses the absorbed path, attending directly over the cached latents.

Shape letters: B batch, T tokens now, C model width, H heads, D/E per-head key/value
width, L latent width, R RoPE width, P query latent width."""

from __future__ import annotations

import math

import jax.numpy as jnp
from flax import nnx

from jaxattn.functional import LatentCache, MLAParams, mla_absorbed, mla_naive, multi_head_attention
from jaxattn.functional.decode import DECODE_MAX_TOKENS
from jaxattn.functional.kv_cache import positions_from_cache


class MultiHeadLatentAttention(nnx.Module):
    """Causal MLA. Call: ``x [B, T, C]``, ``positions`` int ``[B, T]`` or ``[T]`` (default
    ``arange(T)``) -> ``[B, T, C]``; with ``cache=`` (a ``LatentCache``) ->
    ``(out, new_cache)``, the positions then coming from the cache.

    Sizes: ``heads`` H, ``head_dim`` D, ``value_dim`` E, ``latent_dim`` L, ``rope_dim`` R,
    ``query_latent_dim`` P (``None``: no query compression). ``attention_fn`` is the kernel
    of both paths (``multi_head_attention``'s signature); a call with a cache and at most
    ``decode_max_tokens`` new tokens uses ``decode_attention`` over the latents.
    """

    def __init__(
        self,
        width: int,
        *,
        heads: int,
        head_dim: int,
        latent_dim: int,
        rope_dim: int,
        value_dim: int | None = None,
        query_latent_dim: int | None = None,
        latent_norms: bool = True,
        rope_theta: float = 10000.0,
        rope_style: str = "interleaved",
        epsilon: float = 1e-6,
        attention_fn=multi_head_attention,
        decode_max_tokens: int = DECODE_MAX_TOKENS,
        dtype=jnp.float32,
        out_stddev: float = 0.02,
        rngs: nnx.Rngs,
    ):
        value_dim = head_dim if value_dim is None else value_dim
        for name, value in dict(heads=heads, head_dim=head_dim, latent_dim=latent_dim, rope_dim=rope_dim, value_dim=value_dim).items():
            if value < 1:
                raise ValueError(f"MLA needs {name} >= 1, got {value}")
        if rope_dim % 2:
            raise ValueError(f"MLA's decoupled RoPE width rope_dim must be even, got {rope_dim}")
        C, H, D, E, L, R, P = width, heads, head_dim, value_dim, latent_dim, rope_dim, query_latent_dim

        def weight(*shape, fan_in, stddev=None):
            stddev = 1.0 / math.sqrt(fan_in) if stddev is None else stddev
            return nnx.Param(nnx.initializers.normal(stddev)(rngs.params(), shape, jnp.float32))

        self.w_dkv = weight(C, L, fan_in=C)
        self.w_kr = weight(C, R, fan_in=C)
        self.w_uk = weight(L, H, D, fan_in=L)
        self.w_uv = weight(L, H, E, fan_in=L)
        self.w_o = weight(H, E, C, fan_in=H * E, stddev=out_stddev)
        self.kv_norm = nnx.Param(jnp.ones((L,))) if latent_norms else None
        if P is None:
            self.w_q = weight(C, H, D, fan_in=C)
            self.w_qr = weight(C, H, R, fan_in=C)
            self.w_dq = self.w_uq = self.q_norm = None
        else:
            self.w_dq = weight(C, P, fan_in=C)
            self.w_uq = weight(P, H, D, fan_in=P)
            self.w_qr = weight(P, H, R, fan_in=P)
            self.q_norm = nnx.Param(jnp.ones((P,))) if latent_norms else None
            self.w_q = None
        self.rope_theta, self.rope_style, self.epsilon, self.dtype = rope_theta, rope_style, epsilon, dtype
        self.attention_fn, self.decode_max_tokens = attention_fn, decode_max_tokens

    def params(self) -> MLAParams:
        """The weights as the functional ``MLAParams`` pytree, in the compute dtype."""

        def value(p):
            return None if p is None else p[...].astype(self.dtype)

        return MLAParams(
            w_dkv=value(self.w_dkv), w_kr=value(self.w_kr), w_uk=value(self.w_uk), w_uv=value(self.w_uv),
            w_o=value(self.w_o), w_qr=value(self.w_qr), w_dq=value(self.w_dq), w_uq=value(self.w_uq),
            w_q=value(self.w_q), q_norm=value(self.q_norm), kv_norm=value(self.kv_norm),
        )

    def __call__(self, x, positions=None, *, cache: LatentCache | None = None, num_new=None):
        kwargs = dict(
            rope_theta=self.rope_theta, rope_style=self.rope_style, epsilon=self.epsilon, attention_fn=self.attention_fn
        )
        x = x.astype(self.dtype)
        if cache is None:
            return mla_naive(self.params(), x, positions, **kwargs)
        positions_from_cache(cache, x.shape[1], positions)  # with a cache, positions must not be passed
        return mla_absorbed(self.params(), x, cache, num_new=num_new, decode_max_tokens=self.decode_max_tokens, **kwargs)
