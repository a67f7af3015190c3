"""The causal self-attention layer as a function: projections, RoPE, cache, kernel, output.

    q = x W_q + b_q      k = x W_k + b_k      v = x W_v + b_v         [B, T, H|K, D|E]
    q, k = RMSNorm(q), RMSNorm(k)                                      (QK-norm: per head, or over all heads)
    q, k = RoPE(q, pos), RoPE(k, pos)                                  (when the layer has RoPE)
    k, v = the cache's keys and values, with this call's written in   (when a cache is given)
    o = attention(q, k, v), causal on absolute positions               [B, T, H, E]
        (window, scale, soft-capped logits, learned sinks: as the settings say)
    y = o W_o + b_o                                                    [B, T, C]

This is the whole standard attention layer of a decoder: GPT-2, Llama, Qwen2, Mistral
differ only in which biases exist, whether RoPE is used and the window; Qwen3, OLMo 2 and
Gemma 3 normalise queries and keys (QK-norm), Gemma 2 soft-caps the logits and scales them
by its own number, gpt-oss adds a learned sink per head, GPT-NeoX rotates a part of each
head, Llama 3 and Qwen2.5 rescale RoPE's frequencies. The
parameters are a plain pytree (``AttentionParams``), the layer's static settings one
hashable value (``AttentionSettings``), so the same function serves the NNX module
``jaxattn.nn.MultiHeadAttention``, the benchmarks and checkpoint loaders. MLA's
counterpart is ``jaxattn.functional.mla``.

The call: a ``context`` (``AttentionContext``) says where the T tokens are; a model builds
it once per forward and passes it to every layer. Without one, the layer builds it from
``positions`` (int ``[B, T]`` or ``[T]``, default ``arange(T)``) or, with a cache, from the
cache's lengths (passing positions as well is then an error: a call cannot make the
queries and the cache disagree). The layer completes it with its keys and settings.

Kernels: ``kernels`` (``Kernels``) chooses, in one place for every attention layer, the
kernel of each call: ``dense_kernel`` (or another) for full calls, ``decode_kernel`` for a
cached call of a few tokens, which reads the cache only up to its longest row.

Shape letters: B batch, T tokens now, S keys (cached + new), C model width, H query
heads, K key/value heads, D query/key width, E value width.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax

from jaxattn.functional.kernels import Kernels, attend
from jaxattn.functional.layer import call_context, rms_norm
from jaxattn.functional.packed import packed_matmul
from jaxattn.functional.checks import check_positive, check_window
from jaxattn.functional.masks import AttentionContext
from jaxattn.functional.positions import Rope


QK_NORMS = ("head", "projection")


class AttentionParams(NamedTuple):
    """Weights of one attention layer; the optional ones are ``None`` when the layer has none."""

    w_q: jax.Array  # [C, H, D]
    w_k: jax.Array  # [C, K, D]
    w_v: jax.Array  # [C, K, E]
    w_o: jax.Array  # [H, E, C]
    b_q: jax.Array | None = None  # [H, D]
    b_k: jax.Array | None = None  # [K, D]
    b_v: jax.Array | None = None  # [K, E]
    b_o: jax.Array | None = None  # [C]
    q_norm: jax.Array | None = None  # QK-norm scales: [D] per head, [H, D] over the projection
    k_norm: jax.Array | None = None  # [D] or [K, D]
    sinks: jax.Array | None = None  # [H]: one learned logit per query head


@dataclasses.dataclass(frozen=True)
class AttentionSettings:
    """How one attention layer attends, apart from its weights (static: hashable).

    rope: the layer's ``Rope``, or ``None`` for none (positions then only decide causality;
      a NoPE layer).
    window: causal sliding window, or ``None`` (a global layer).
    scale: the logits' multiplier, ``None`` for ``1/sqrt(D)`` (Gemma: ``query_pre_attn_scalar^-1/2``).
    logit_softcap: ``cap`` of ``s -> cap tanh(s / cap)`` on the scaled logits (Gemma 2), or ``None``.
    qk_norm: RMSNorm of queries and keys before RoPE: ``"head"`` over each head's D numbers
      (Qwen3, Gemma 3), ``"projection"`` over all of a token's heads at once (OLMo 2); ``None``.
    norm_epsilon: the QK-norms' epsilon.
    """

    rope: Rope | None = None
    window: int | None = None
    scale: float | None = None
    logit_softcap: float | None = None
    qk_norm: str | None = None
    norm_epsilon: float = 1e-6

    def __post_init__(self):
        check_window(self.window)
        check_positive("scale", self.scale)
        check_positive("logit_softcap", self.logit_softcap)
        check_positive("norm_epsilon", self.norm_epsilon)
        if self.qk_norm is not None and self.qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm must be one of {QK_NORMS} or None, got {self.qk_norm!r}")


class AttentionDims(NamedTuple):
    C: int
    H: int
    K: int
    D: int
    E: int


def check_attention_params(params: AttentionParams, settings: AttentionSettings | None = None) -> AttentionDims:
    """Checks that every weight fits the others (and ``settings``); returns the sizes. Errors
    name the shapes."""
    shapes = {name: None if value is None else tuple(value.shape) for name, value in params._asdict().items()}
    if any(len(shapes[name]) != 3 for name in ("w_q", "w_k", "w_v", "w_o")):
        raise ValueError(f"attention weights must be w_q [C, H, D], w_k [C, K, D], w_v [C, K, E], w_o [H, E, C]; got {shapes}")
    C, H, D = shapes["w_q"]
    K, E = shapes["w_k"][1], shapes["w_v"][2]
    expected = {"w_k": (C, K, D), "w_v": (C, K, E), "w_o": (H, E, C), "b_q": (H, D), "b_k": (K, D), "b_v": (K, E), "b_o": (C,),
                "sinks": (H,)}
    qk_norm = None if settings is None else settings.qk_norm
    if qk_norm == "projection":  # one scale per number of the token's heads
        expected.update(q_norm=(H, D), k_norm=(K, D))
    else:
        expected.update(q_norm=(D,), k_norm=(D,))
    if settings is not None and (qk_norm is None) != (params.q_norm is None or params.k_norm is None):
        raise ValueError(f"settings.qk_norm={qk_norm!r} needs q_norm and k_norm scales exactly when it is set; "
                         f"got q_norm {shapes['q_norm']}, k_norm {shapes['k_norm']}")
    wrong = {
        name: (shapes[name], shape)
        for name, shape in expected.items()
        if shapes[name] is not None and shapes[name] != shape
    }
    if wrong:
        details = ", ".join(f"{name} is {got}, expected {want}" for name, (got, want) in wrong.items())
        raise ValueError(f"attention weights do not fit together (C={C}, H={H}, K={K}, D={D}, E={E}): {details}")
    if K < 1 or H % K:
        raise ValueError(f"query heads H={H} must be a multiple of key/value heads K={K} (w_q {shapes['w_q']}, w_k {shapes['w_k']})")
    return AttentionDims(C, H, K, D, E)


def _project(x, weight, bias, contracted: int):
    """``x [B, T, *in]`` times ``weight [*in, *out]`` (plain or ``PackedWeight``) over the
    ``contracted`` axes ``in``, plus ``bias [*out]``: ``[B, T, *out]``. One matrix product of the
    flattened shapes (``packed_matmul``): an einsum over two head axes let XLA on the CPU
    transpose the whole of ``w_o`` on every call to match the activation's layout."""
    y = packed_matmul(x, weight, contracted)
    return y if bias is None else y + bias


def qk_norm(x, scale, settings: AttentionSettings):
    """QK-norm of queries or keys ``[B, T, H|K, D]``: per head (scale ``[D]``) or over all the
    token's heads (scale ``[H|K, D]``), as ``settings.qk_norm`` says."""
    axes = -1 if settings.qk_norm == "head" else (-2, -1)
    return rms_norm(x, scale, settings.norm_epsilon, axes)


def causal_self_attention(
    params: AttentionParams,
    x,
    positions=None,
    *,
    settings: AttentionSettings = AttentionSettings(),
    kernels: Kernels = Kernels(),
    context: AttentionContext | None = None,
    cache=None,
    num_new=None,
    record=None,
):
    """One causal self-attention layer (the module docstring has the equations).

    Args:
      params: ``AttentionParams``.
      x: ``[B, T, C]``.
      positions: int ``[B, T]`` or ``[T]``; default ``arange(T)``. Only without a context
        and a cache.
      settings: ``AttentionSettings`` (RoPE, window, scale, soft-cap, QK-norm).
      kernels: ``Kernels``: which kernel serves this call.
      context: the call's ``AttentionContext`` (token side), when a model built it.
      cache: a ``KVCache``, ``SlidingKVCache`` or ``PagedKVCache`` in the dtype of ``x``; this
        call's keys and values are written into it.
      num_new: int ``[B]``, with a cache: how many of the T tokens of each row are real.
      record: called with the weights ``[B, H, T, S]`` when ``context.record_weights``.

    Returns:
      ``[B, T, C]``, or ``(out, new_cache)`` when a cache is given.
    """
    dims = check_attention_params(params, settings)
    if x.ndim != 3 or x.shape[-1] != dims.C:
        raise ValueError(f"attention takes x [B, T, C={dims.C}], got {x.shape}")
    context = call_context(x, positions, context=context, cache=cache)
    with jax.named_scope("projections"):
        q = _project(x, params.w_q, params.b_q, 1)  # [B, T, H, D]
        k = _project(x, params.w_k, params.b_k, 1)  # [B, T, K, D]
        v = _project(x, params.w_v, params.b_v, 1)  # [B, T, K, E]
    if settings.qk_norm is not None:
        q, k = qk_norm(q, params.q_norm, settings), qk_norm(k, params.k_norm, settings)
    if settings.rope is not None:
        q, k = settings.rope(q, context.q_positions), settings.rope(k, context.q_positions)
    new_cache = None
    if cache is None:
        context = context.self_keys()
    else:
        with jax.named_scope("cache_write"):
            view, new_cache = cache.update(k, v, num_new)
        k, v = view.k, view.v  # [B, S, K, D], [B, S, K, E]
        context = context.with_view(view)
    context = context.for_layer(window=settings.window, scale=settings.scale, logit_softcap=settings.logit_softcap,
                                sinks=params.sinks)
    with jax.named_scope("attention_kernel"):
        o = attend(kernels, q, k, v, context, cached=cache is not None, record=record)  # [B, T, H, E]
    with jax.named_scope("projections"):
        out = _project(o, params.w_o, params.b_o, 2)  # [B, T, C]
    return out if cache is None else (out, new_cache)
