"""The multi-head latent attention layer (DeepSeek-V2): NNX parameters around
``jaxattn.functional.mla``. Training and full passes use the naive path; a call with a
``LatentCache`` uses the absorbed path, attending directly over the cached latents.

Shape letters: B batch, T tokens now, C model width, H heads, D/E per-head key/value
width, L latent width, R RoPE width, P query latent width."""

from __future__ import annotations

import math

import jax.numpy as jnp
from flax import nnx

from jaxattn.functional import Kernels, LatentCache, MLAParams, MLASettings, mla_absorbed, mla_naive
from jaxattn.functional.layer import call_context
from jaxattn.nn.layers import param


class MultiHeadLatentAttention(nnx.Module):
    """Causal MLA. Call: ``x [B, T, C]``, ``positions`` int ``[B, T]`` or ``[T]`` (default
    ``arange(T)``) or the model's ``context`` -> ``[B, T, C]``; with ``cache=`` (a
    ``LatentCache``) -> ``(out, new_cache)``, the positions then coming from the cache.

    Sizes: ``heads`` H, ``head_dim`` D, ``value_dim`` E, ``latent_dim`` L, ``rope_dim`` R,
    ``query_latent_dim`` P (``None``: no query compression). ``settings`` (``MLASettings``):
    the decoupled RoPE, the latent norms' epsilon, the scale. ``kernels`` (``Kernels``)
    chooses the kernel of both paths; a cached step uses ``decode_attention`` over the latents.
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
        settings: MLASettings = MLASettings(),
        kernels: Kernels = Kernels(),
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

        def weight(shape, axes, *, fan_in, stddev=None):
            stddev = 1.0 / math.sqrt(fan_in) if stddev is None else stddev
            return param(rngs, nnx.initializers.normal(stddev), shape, axes)

        ones = nnx.initializers.ones_init()
        self.w_dkv = weight((C, L), ("embed", "latent"), fan_in=C)
        self.w_kr = weight((C, R), ("embed", "rope"), fan_in=C)
        self.w_uk = weight((L, H, D), ("latent", "heads", "head_dim"), fan_in=L)
        self.w_uv = weight((L, H, E), ("latent", "heads", "head_dim"), fan_in=L)
        self.w_o = weight((H, E, C), ("heads", "head_dim", "embed"), fan_in=H * E, stddev=out_stddev)
        self.kv_norm = param(rngs, ones, (L,), ("latent",)) if latent_norms else None
        if P is None:
            self.w_q = weight((C, H, D), ("embed", "heads", "head_dim"), fan_in=C)
            self.w_qr = weight((C, H, R), ("embed", "heads", "rope"), fan_in=C)
            self.w_dq = self.w_uq = self.q_norm = None
        else:
            self.w_dq = weight((C, P), ("embed", "query_latent"), fan_in=C)
            self.w_uq = weight((P, H, D), ("query_latent", "heads", "head_dim"), fan_in=P)
            self.w_qr = weight((P, H, R), ("query_latent", "heads", "rope"), fan_in=P)
            self.q_norm = param(rngs, ones, (P,), ("query_latent",)) if latent_norms else None
            self.w_q = None
        self.settings, self.kernels, self.dtype = settings, kernels, dtype

    def params(self) -> MLAParams:
        """The weights as the functional ``MLAParams`` pytree, in the compute dtype."""
        names = MLAParams._fields
        return MLAParams(*(None if getattr(self, n) is None else getattr(self, n)[...].astype(self.dtype) for n in names))

    def _record(self, weights):
        self.sow(nnx.Intermediate, "attention_weights", weights)

    def __call__(self, x, positions=None, *, context=None, cache: LatentCache | None = None, num_new=None):
        x = x.astype(self.dtype)
        context = call_context(x, positions, context=context, cache=cache)  # with a cache, from its lengths
        common = dict(settings=self.settings, kernels=self.kernels, context=context, record=self._record)
        if cache is None:
            return mla_naive(self.params(), x, **common)
        return mla_absorbed(self.params(), x, cache, num_new=num_new, **common)
