"""The causal self-attention layer as a function: projections, RoPE, cache, kernel, output.

    q = x W_q + b_q      k = x W_k + b_k      v = x W_v + b_v         [B, T, H|K, D|E]
    q, k = RoPE(q, pos), RoPE(k, pos)                                  (when rope_theta is set)
    k, v = the cache's keys and values, with this call's written in   (when a cache is given)
    o = attention(q, k, v), causal on absolute positions               [B, T, H, E]
    y = o W_o + b_o                                                    [B, T, C]

This is the whole standard attention layer of a decoder (GPT-2, Llama, Qwen2, Mistral:
they differ only in which biases exist, whether RoPE is used and the window). The
parameters are a plain pytree (``AttentionParams``), so the same function serves the NNX
module ``jaxattn.nn.MultiHeadAttention``, the benchmarks and checkpoint loaders. MLA's
counterpart is ``jaxattn.functional.mla``.

Kernels: ``attention_fn`` (default ``multi_head_attention``) serves calls without a cache
and long calls with one (a prompt); a call with a cache and at most ``decode_max_tokens``
new tokens (a decode step; default ``DECODE_MAX_TOKENS``) uses ``decode_attention``,
which reads the cache only up to its longest row instead of the whole buffer.

Positions: without a cache, ``positions`` (int ``[B, T]`` or ``[T]``, default
``arange(T)``) say where the T tokens are. With a cache they are *derived* from the
cache's lengths (``next_positions``), and passing positions as well is an error: a call
cannot make the queries and the cache disagree.

Shape letters: B batch, T tokens now, S keys (cached + new), C model width, H query
heads, K key/value heads, D query/key width, E value width.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxattn.functional.attention import multi_head_attention
from jaxattn.functional.decode import DECODE_MAX_TOKENS, decode_attention
from jaxattn.functional.kv_cache import positions_from_cache
from jaxattn.functional.positions import rope


class AttentionParams(NamedTuple):
    """Weights of one attention layer; biases are optional (``None``: no bias)."""

    w_q: jax.Array  # [C, H, D]
    w_k: jax.Array  # [C, K, D]
    w_v: jax.Array  # [C, K, E]
    w_o: jax.Array  # [H, E, C]
    b_q: jax.Array | None = None  # [H, D]
    b_k: jax.Array | None = None  # [K, D]
    b_v: jax.Array | None = None  # [K, E]
    b_o: jax.Array | None = None  # [C]


class AttentionDims(NamedTuple):
    C: int
    H: int
    K: int
    D: int
    E: int


def check_attention_params(params: AttentionParams) -> AttentionDims:
    """Checks that every weight fits the others; returns the sizes. Errors name the shapes."""
    shapes = {name: None if value is None else tuple(value.shape) for name, value in params._asdict().items()}
    if any(len(shapes[name]) != 3 for name in ("w_q", "w_k", "w_v", "w_o")):
        raise ValueError(f"attention weights must be w_q [C, H, D], w_k [C, K, D], w_v [C, K, E], w_o [H, E, C]; got {shapes}")
    C, H, D = shapes["w_q"]
    K, E = shapes["w_k"][1], shapes["w_v"][2]
    expected = {"w_k": (C, K, D), "w_v": (C, K, E), "w_o": (H, E, C), "b_q": (H, D), "b_k": (K, D), "b_v": (K, E), "b_o": (C,)}
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


def _project(x, weight, bias, equation):
    y = jnp.einsum(equation, x, weight)
    return y if bias is None else y + bias


def causal_self_attention(
    params: AttentionParams,
    x,
    positions=None,
    *,
    cache=None,
    num_new=None,
    rope_theta: float | None = None,
    rope_style: str = "half",
    window: int | None = None,
    scale: float | None = None,
    attention_fn=multi_head_attention,
    decode_max_tokens: int = DECODE_MAX_TOKENS,
):
    """One causal self-attention layer (the module docstring has the equations).

    Args:
      params: ``AttentionParams``.
      x: ``[B, T, C]``.
      positions: int ``[B, T]`` or ``[T]``; default ``arange(T)``. Must be ``None`` with a
        cache (the positions then continue the cache: ``cache.lengths[:, None] + arange(T)``).
      cache: a ``KVCache`` or ``SlidingKVCache`` in the dtype of ``x``; this call's keys
        and values are written into it.
      num_new: int ``[B]``, with a cache: how many of the T tokens of each row are real.
      rope_theta: RoPE base; ``None`` means no RoPE (positions then only decide causality).
      rope_style: ``"half"`` or ``"interleaved"`` (see ``rope``).
      window: causal sliding window.
      scale: logit multiplier, default ``1/sqrt(D)``.
      attention_fn: the kernel, any function with the signature of ``multi_head_attention``.
      decode_max_tokens: calls with a cache and at most this many new tokens use
        ``decode_attention`` instead (0: never).

    Returns:
      ``[B, T, C]``, or ``(out, new_cache)`` when a cache is given.
    """
    dims = check_attention_params(params)
    if x.ndim != 3 or x.shape[-1] != dims.C:
        raise ValueError(f"attention takes x [B, T, C={dims.C}], got {x.shape}")
    T = x.shape[1]
    if cache is not None:
        positions = positions_from_cache(cache, T, positions)  # [B, T]
    elif positions is None:
        positions = jnp.arange(T, dtype=jnp.int32)  # [T]
    q = _project(x, params.w_q, params.b_q, "btc,chd->bthd")  # [B, T, H, D]
    k = _project(x, params.w_k, params.b_k, "btc,ckd->btkd")  # [B, T, K, D]
    v = _project(x, params.w_v, params.b_v, "btc,cke->btke")  # [B, T, K, E]
    if rope_theta is not None:
        q = rope(q, positions, theta=rope_theta, style=rope_style)
        k = rope(k, positions, theta=rope_theta, style=rope_style)
    new_cache = None
    kv_positions = positions
    kernel = attention_fn
    if cache is not None:
        view, new_cache = cache.update(k, v, num_new)
        k, v, kv_positions = view.k, view.v, view.positions  # [B, S, K, D], [B, S, K, E], [B, S]
        if T <= decode_max_tokens:
            kernel = partial(decode_attention, kv_lengths=view.lengths)
    o = kernel(
        q, k, v, is_causal=True, q_positions=positions, kv_positions=kv_positions, window=window, scale=scale
    )  # [B, T, H, E]
    out = _project(o, params.w_o, params.b_o, "bthe,hec->btc")  # [B, T, C]
    return out if cache is None else (out, new_cache)
