"""Scaled dot-product attention, from one head to many.

The chapter in three steps:

1. ``attention_weights``: one query row against all keys, ``softmax(q k^T / sqrt(D))``.
2. ``attention``: the weighted sum of values. This one-head kernel, ``[T, D]``, is the
   only place where attention is computed; everything multi-head is built from it.
3. ``multi_head_attention``: the same kernel ``jax.vmap``-ed over query heads, key/value
   heads (so that GQA/MQA share K/V without copying them) and the batch.

Shape letters: B batch, T queries, S keys/values, H query heads, K key/value heads
(G = H // K queries share one K/V head), D query/key width, E value width.

Numerics contract: logits and softmax in float32 whatever the input dtype, output
in the input dtype; boolean masks (``True`` = may attend); masked logits use a large
finite negative; a query row that may attend to nothing returns zeros (and zero
gradients), never NaN.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxattn.functional.masks import causal_mask, combine_masks, padding_mask

# A finite stand-in for -inf: exp(MASK_VALUE - max) underflows to exactly 0 in float32,
# while MASK_VALUE - MASK_VALUE stays 0 instead of NaN.
MASK_VALUE = -1e30


# --------------------------------------------------------------------------- checks


def _check_bool_mask(mask) -> None:
    dtype = jnp.asarray(mask).dtype
    if dtype != jnp.bool_:
        raise TypeError(
            f"mask must be boolean (True = may attend), got dtype {dtype}; "
            "for an additive float bias, add it to the logits yourself"
        )


def _check_same_dtype(**arrays) -> None:
    dtypes = {name: jnp.asarray(x).dtype for name, x in arrays.items()}
    if len(set(dtypes.values())) > 1:
        named = ", ".join(f"{name}: {dtype}" for name, dtype in dtypes.items())
        raise ValueError(f"attention inputs must share one dtype, got {named}")


def _default_scale(D: int, scale: float | None) -> float:
    return 1.0 / math.sqrt(D) if scale is None else scale


# ------------------------------------------------------------------- one head, [T, D]


def attention_weights(q, k, *, mask=None, scale=None):
    """Softmax attention weights of one head.

    ``weights = softmax(q k^T * scale)`` row by row, with ``scale = 1/sqrt(D)`` by
    default (Vaswani et al. 2017, equation 1).

    Args:
      q: ``[T, D]`` queries.
      k: ``[S, D]`` keys.
      mask: optional bool ``[T, S]`` (or broadcastable), ``True`` = may attend.
      scale: multiplier of the logits; ``1/sqrt(D)`` when ``None``.

    Returns:
      float32 ``[T, S]``; every row sums to 1, except a row with nothing to attend
      to, which is all zeros.
    """
    if q.ndim != 2 or k.ndim != 2:
        raise ValueError(f"attention_weights takes one head: q [T, D], k [S, D]; got q {q.shape}, k {k.shape}")
    (T, D), (S, Dk) = q.shape, k.shape
    if D != Dk:
        raise ValueError(f"q and k need the same width D, got q {q.shape}, k {k.shape}")
    _check_same_dtype(q=q, k=k)
    logits = jnp.einsum("td,sd->ts", q, k, preferred_element_type=jnp.float32)  # [T, S]
    logits = logits * _default_scale(D, scale)
    if mask is None:
        return jax.nn.softmax(logits, axis=-1)
    _check_bool_mask(mask)
    try:
        jnp.broadcast_shapes(mask.shape, (T, S))
    except ValueError:
        raise ValueError(f"mask {mask.shape} does not broadcast to [T, S] = {(T, S)}") from None
    logits = jnp.where(mask, logits, MASK_VALUE)
    # A fully masked row has uniform softmax over MASK_VALUE; zeroing by the mask turns
    # it into zeros and stops any gradient from flowing into it.
    return jnp.where(mask, jax.nn.softmax(logits, axis=-1), 0.0)


def attention(q, k, v, *, mask=None, scale=None):
    """One head of scaled dot-product attention: ``softmax(q k^T * scale) v``.

    Args:
      q: ``[T, D]`` queries.
      k: ``[S, D]`` keys.
      v: ``[S, E]`` values.
      mask: optional bool ``[T, S]``, ``True`` = may attend.
      scale: multiplier of the logits; ``1/sqrt(D)`` when ``None``.

    Returns:
      ``[T, E]`` in the dtype of ``q``. A query row with nothing to attend to is zeros.
    """
    if v.ndim != 2 or v.shape[0] != k.shape[0]:
        raise ValueError(f"v must be [S, E] with the S of k; got k {k.shape}, v {v.shape}")
    _check_same_dtype(q=q, k=k, v=v)
    weights = attention_weights(q, k, mask=mask, scale=scale)  # [T, S] float32
    out = jnp.einsum("ts,se->te", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype)


# ------------------------------------------------------------- many heads, [B, T, H, D]


class AttentionShapes(NamedTuple):
    """The sizes of one multi-head attention call (letters as in the glossary)."""

    B: int
    T: int
    S: int
    H: int
    K: int
    D: int
    E: int


def check_multi_head_shapes(q, k, v) -> AttentionShapes:
    """Validates ``q [B, T, H, D]``, ``k [B, S, K, D]``, ``v [B, S, K, E]`` and their dtypes."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            "multi-head attention takes q [B, T, H, D], k [B, S, K, D], v [B, S, K, E]; "
            f"got q {q.shape}, k {k.shape}, v {v.shape}"
        )
    B, T, H, D = q.shape
    Bk, S, K, Dk = k.shape
    Bv, Sv, Kv, E = v.shape
    if not (B == Bk == Bv):
        raise ValueError(f"batch sizes differ: q {q.shape}, k {k.shape}, v {v.shape}")
    if D != Dk:
        raise ValueError(f"q and k need the same head width D: q {q.shape}, k {k.shape}")
    if (S, K) != (Sv, Kv):
        raise ValueError(f"k and v need the same S and K: k {k.shape}, v {v.shape}")
    if K < 1 or H % K:
        raise ValueError(
            f"query heads H={H} must be a multiple of key/value heads K={K} "
            f"(q {q.shape}, k {k.shape})"
        )
    _check_same_dtype(q=q, k=k, v=v)
    return AttentionShapes(B, T, S, H, K, D, E)


def _as_batched_positions(name: str, positions, B: int, length: int):
    positions = jnp.asarray(positions)
    if not jnp.issubdtype(positions.dtype, jnp.integer):
        raise TypeError(f"{name} must be integers, got dtype {positions.dtype}")
    if positions.shape not in ((length,), (1, length), (B, length)):
        raise ValueError(f"{name} must be [{length}] or [B={B}, {length}], got {positions.shape}")
    return positions.reshape(-1, length)  # [B or 1, length]


def default_positions(T: int, S: int):
    """Bottom-right aligned positions: the T queries are the last T of the S keys.

    Returns ``(q_positions [T], kv_positions [S])`` with ``q_positions = arange(T) + S - T``.
    Right for a full pass (T = S), a prefill chunk and a one-token decode (T = 1).
    """
    return jnp.arange(T) + (S - T), jnp.arange(S)


def resolve_positions(shapes: AttentionShapes, *, is_causal, q_positions, kv_positions, window):
    """Checks the causal arguments and returns ``(q_pos [B|1, T], kv_pos [B|1, S])``, or ``None``.

    ``None`` means there is no causal structure (``is_causal`` is False).
    """
    B, T, S = shapes.B, shapes.T, shapes.S
    if not is_causal:
        if window is not None:
            raise ValueError(f"window={window} is a causal sliding window: pass is_causal=True with it")
        if q_positions is not None or kv_positions is not None:
            raise ValueError("q_positions/kv_positions decide causality: pass is_causal=True with them")
        return None
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be a positive int, got {window!r}")
    default_q, default_kv = default_positions(T, S)
    q_pos = _as_batched_positions("q_positions", default_q if q_positions is None else q_positions, B, T)
    kv_pos = _as_batched_positions("kv_positions", default_kv if kv_positions is None else kv_positions, B, S)
    return q_pos, kv_pos


def check_kv_lengths(shapes: AttentionShapes, kv_lengths):
    """Validates ``kv_lengths [B]`` (int) and returns it as an array, or ``None``."""
    if kv_lengths is None:
        return None
    kv_lengths = jnp.asarray(kv_lengths)
    if not jnp.issubdtype(kv_lengths.dtype, jnp.integer):
        raise TypeError(f"kv_lengths must be integers, got dtype {kv_lengths.dtype}")
    if kv_lengths.shape != (shapes.B,):
        raise ValueError(f"kv_lengths must be [B={shapes.B}], got {kv_lengths.shape}")
    return kv_lengths


def check_user_mask(shapes: AttentionShapes, mask):
    """Validates a bool mask broadcastable to ``[B, H, T, S]``; returns it as 4-D, or ``None``."""
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    _check_bool_mask(mask)
    B, T, S, H = shapes.B, shapes.T, shapes.S, shapes.H
    if mask.ndim > 4:
        raise ValueError(f"mask must broadcast to [B, H, T, S] = {(B, H, T, S)}, got {mask.shape}")
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)  # [B|1, H|1, T|1, S|1]
    try:
        jnp.broadcast_shapes(mask.shape, (B, H, T, S))
    except ValueError:
        raise ValueError(f"mask {mask.shape} does not broadcast to [B, H, T, S] = {(B, H, T, S)}") from None
    return mask


def multi_head_mask(
    shapes: AttentionShapes,
    *,
    mask=None,
    is_causal=False,
    q_positions=None,
    kv_positions=None,
    kv_lengths=None,
    window=None,
):
    """Combines every masking argument of ``multi_head_attention`` into one bool mask.

    Returns:
      bool ``[B|1, H|1, T, S]`` (an axis of size 1 is shared), or ``None`` when nothing
      is masked.
    """
    positions = resolve_positions(
        shapes, is_causal=is_causal, q_positions=q_positions, kv_positions=kv_positions, window=window
    )
    kv_lengths = check_kv_lengths(shapes, kv_lengths)
    user_mask = check_user_mask(shapes, mask)
    causal = None
    if positions is not None:
        q_pos, kv_pos = positions
        causal = causal_mask(q_pos, kv_pos, window)[:, None]  # [B|1, 1, T, S]
    padding = None if kv_lengths is None else padding_mask(kv_lengths, shapes.S)[:, None, None, :]  # [B, 1, 1, S]
    combined = combine_masks(causal, padding, user_mask)
    if combined is None:
        return None
    Bm, Hm = combined.shape[0], combined.shape[1]
    return jnp.broadcast_to(combined, (Bm, Hm, shapes.T, shapes.S))  # [B|1, H|1, T, S]


def multi_head_attention(
    q,
    k,
    v,
    *,
    mask=None,
    is_causal=False,
    q_positions=None,
    kv_positions=None,
    kv_lengths=None,
    window=None,
    scale=None,
):
    """Multi-head attention built from the one-head ``attention`` kernel with ``jax.vmap``.

    ``out[b, :, h] = attention(q[b, :, h], k[b, :, h // G], v[b, :, h // G])`` with
    ``G = H // K``: MHA when K = H, GQA when 1 < K < H, MQA when K = 1
    (Ainslie et al. 2023, arXiv 2305.13245; Shazeer 2019, arXiv 1911.02150).

    Args:
      q: ``[B, T, H, D]`` queries.
      k: ``[B, S, K, D]`` keys, ``H % K == 0``.
      v: ``[B, S, K, E]`` values.
      mask: optional bool, broadcastable to ``[B, H, T, S]``; ``True`` = may attend.
      is_causal: key j is visible to query i iff ``kv_pos[j] <= q_pos[i]``.
      q_positions: int ``[B, T]`` or ``[T]``, absolute positions of the queries. Default
        (with ``is_causal``): ``arange(T) + S - T``, the last T positions (bottom-right).
      kv_positions: int ``[B, S]`` or ``[S]``; default ``arange(S)``.
      kv_lengths: int ``[B]``; only keys ``j < kv_lengths[b]`` are valid (padding).
      window: causal sliding window; keeps keys with ``q_pos - kv_pos < window``.
      scale: multiplier of the logits, ``1/sqrt(D)`` when ``None``.

    Returns:
      ``[B, T, H, E]`` in the dtype of ``q``.
    """
    shapes = check_multi_head_shapes(q, k, v)
    B, T, S, H, K, D, E = shapes
    G = H // K
    full_mask = multi_head_mask(
        shapes,
        mask=mask,
        is_causal=is_causal,
        q_positions=q_positions,
        kv_positions=kv_positions,
        kv_lengths=kv_lengths,
        window=window,
    )

    # Where the mask is shared along an axis (size 1), vmap passes it unbatched (None).
    if full_mask is None:
        batch_axis = kv_head_axis = group_axis = None
    else:
        batch_axis = 0 if full_mask.shape[0] == B else None
        if full_mask.shape[1] == H:
            full_mask = full_mask.reshape(full_mask.shape[0], K, G, T, S)  # [B|1, K, G, T, S]
            kv_head_axis = group_axis = 0
        else:
            full_mask = full_mask[:, 0]  # [B|1, T, S]
            kv_head_axis = group_axis = None
        if batch_axis is None:
            full_mask = full_mask[0]

    def one_head(q, k, v, mask):  # [T, D], [S, D], [S, E], [T, S] -> [T, E]
        return attention(q, k, v, mask=mask, scale=scale)

    # q heads sharing one K/V head: [T, G, D], [S, D], [S, E] -> [T, G, E]
    over_group = jax.vmap(one_head, in_axes=(1, None, None, group_axis), out_axes=1)
    # K/V heads: [T, K, G, D], [S, K, D], [S, K, E] -> [T, K, G, E]
    over_kv_heads = jax.vmap(over_group, in_axes=(1, 1, 1, kv_head_axis), out_axes=1)
    over_batch = jax.vmap(over_kv_heads, in_axes=(0, 0, 0, batch_axis))

    q = q.reshape(B, T, K, G, D)  # [B, T, K, G, D]
    out = over_batch(q, k, v, full_mask)  # [B, T, K, G, E]
    return out.reshape(B, T, H, E)  # [B, T, H, E]
