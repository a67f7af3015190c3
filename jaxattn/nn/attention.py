"""The multi-head attention layer: NNX parameters around ``jaxattn.functional.causal_self_attention``.

Shape letters: B batch, T tokens now, S keys (cached + new), C model width,
H query heads, K key/value heads, D head width.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxattn.functional import AttentionParams, AttentionSettings, Kernels, causal_self_attention
from jaxattn.functional.packed import PackedWeight
from jaxattn.nn.layers import default_kernel_init, param


class MultiHeadAttention(nnx.Module):
    """Causal multi-head attention with H query heads and K key/value heads.

    K = H is MHA, 1 < K < H is GQA, K = 1 is MQA. ``settings`` (``AttentionSettings``):
    RoPE, window, scale, soft-cap, QK-norm. ``qkv_bias``/``out_bias`` add biases to the
    projections (GPT-2 has both, Qwen2 the first only); ``sinks`` adds one learned logit per
    head (gpt-oss), starting at 0. ``kernels`` (``Kernels``) chooses the kernel of each call:
    by default ``dense_kernel`` for full calls and ``decode_kernel`` for cached steps.

    The weights are made in their head shapes, with named axes: ``w_q [C, H, D]``,
    ``w_k [C, K, D]``, ``w_v [C, K, D]``, ``w_o [H, D, C]`` (and ``b_q [H, D]`` ...; the
    QK-norm scales ``q_norm``, ``k_norm`` ``[D]`` or ``[H|K, D]``, start at 1; ``sinks [H]``).

    Call: ``x [B, T, C]``, ``positions`` int ``[B, T]`` or ``[T]`` (default ``arange(T)``), or
    the model's ``context`` -> ``[B, T, C]``; with ``cache=`` (a ``KVCache`` or
    ``SlidingKVCache``) -> ``(out, new_cache)``, the positions then coming from the cache.
    Under ``nnx.capture`` with ``context.record_weights``, the weights are sown as
    ``attention_weights`` (``nnx.Intermediate``).
    """

    def __init__(
        self,
        width: int,
        *,
        heads: int,
        kv_heads: int | None = None,
        head_dim: int | None = None,
        settings: AttentionSettings = AttentionSettings(),
        qkv_bias: bool = False,
        out_bias: bool = False,
        sinks: bool = False,
        kernels: Kernels = Kernels(),
        dtype=jnp.float32,
        out_init=default_kernel_init,
        rngs: nnx.Rngs,
    ):
        kv_heads = heads if kv_heads is None else kv_heads
        head_dim = width // heads if head_dim is None else head_dim
        if heads < 1 or kv_heads < 1 or heads % kv_heads:
            raise ValueError(f"heads={heads} must be a positive multiple of kv_heads={kv_heads}")
        if settings.rope is not None and head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        C, H, K, D = width, heads, kv_heads, head_dim
        self.settings, self.kernels, self.dtype = settings, kernels, dtype
        zeros = nnx.initializers.zeros_init()
        self.w_q = param(rngs, default_kernel_init, (C, H, D), ("embed", "heads", "head_dim"))
        self.w_k = param(rngs, default_kernel_init, (C, K, D), ("embed", "kv_heads", "head_dim"))
        self.w_v = param(rngs, default_kernel_init, (C, K, D), ("embed", "kv_heads", "head_dim"))
        self.w_o = param(rngs, out_init, (H, D, C), ("heads", "head_dim", "embed"))
        self.b_q = param(rngs, zeros, (H, D), ("heads", "head_dim")) if qkv_bias else None
        self.b_k = param(rngs, zeros, (K, D), ("kv_heads", "head_dim")) if qkv_bias else None
        self.b_v = param(rngs, zeros, (K, D), ("kv_heads", "head_dim")) if qkv_bias else None
        self.b_o = param(rngs, zeros, (C,), ("embed",)) if out_bias else None
        ones = nnx.initializers.ones_init()
        if settings.qk_norm == "projection":  # one scale per number of all the token's heads
            self.q_norm = param(rngs, ones, (H, D), ("heads", "head_dim"))
            self.k_norm = param(rngs, ones, (K, D), ("kv_heads", "head_dim"))
        elif settings.qk_norm == "head":  # one scale per number of a head, shared by the heads
            self.q_norm = param(rngs, ones, (D,), ("head_dim",))
            self.k_norm = param(rngs, ones, (D,), ("head_dim",))
        else:
            self.q_norm = self.k_norm = None
        self.sinks = param(rngs, zeros, (H,), ("heads",)) if sinks else None

    def params(self) -> AttentionParams:
        """The weights as the functional ``AttentionParams`` pytree, in the compute dtype."""
        def value(name):
            variable = getattr(self, name)
            if variable is None:
                return None
            value = variable.get_value()  # a PackedWeight (jaxattn.lm.quantize) stays packed
            return value if isinstance(value, PackedWeight) else value.astype(self.dtype)

        return AttentionParams(*(value(name) for name in AttentionParams._fields))

    def _record(self, weights):
        self.sow(nnx.Intermediate, "attention_weights", weights)

    def __call__(self, x, positions=None, *, context=None, cache=None, num_new=None):
        return causal_self_attention(
            self.params(), x.astype(self.dtype), positions, settings=self.settings, kernels=self.kernels,
            context=context, cache=cache, num_new=num_new, record=self._record,
        )
