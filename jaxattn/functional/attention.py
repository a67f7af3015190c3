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

from jaxattn.functional.masks import MASK_VALUE, MaskSpec


# --------------------------------------------------------------------------- checks


def _check_bool_mask(mask) -> None:
    dtype = jnp.asarray(mask).dtype
    if dtype != jnp.bool_:
        raise TypeError(
            f"mask must be boolean (True = may attend), got dtype {dtype}; "
            "for an additive float bias, add it to the logits yourself"
        )


def _check_same_dtype(**arrays) -> None:
    dtypes = {name: x.dtype if hasattr(x, "dtype") else jnp.asarray(x).dtype for name, x in arrays.items()}
    if len(set(dtypes.values())) > 1:
        named = ", ".join(f"{name}: {dtype}" for name, dtype in dtypes.items())
        raise ValueError(f"attention inputs must share one dtype, got {named}")


def default_scale(D: int, scale: float | None = None) -> float:
    """The logits' multiplier: ``1/sqrt(D)`` unless ``scale`` is given (the one place it is chosen)."""
    return 1.0 / math.sqrt(D) if scale is None else float(scale)


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
    logits = logits * default_scale(D, scale)
    if mask is None:
        return jax.nn.softmax(logits, axis=-1)
    _check_bool_mask(mask)
    try:
        jnp.broadcast_shapes(mask.shape, (T, S))
    except ValueError:
        raise ValueError(f"mask {mask.shape} does not broadcast to [T, S] = {(T, S)}") from None
    logits = jnp.where(mask, logits, MASK_VALUE)
    # How a row with nothing to attend to becomes zeros: every logit of that row is
    # MASK_VALUE, so the softmax sees equal numbers and returns the uniform 1/S (finite:
    # MASK_VALUE - max is 0, not inf - inf). The final where() replaces those 1/S by 0,
    # and because where() passes no gradient to the branch it did not pick, no gradient
    # reaches the masked logits either. In a row with at least one visible key, masked
    # logits sit 1e30 below the maximum and exp() underflows to exactly 0.
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


def resolve_call(q, k, v, *, scale=None, **masking):
    """Validates the arguments every multi-head kernel takes.

    ``masking`` are the masking keywords of ``multi_head_attention`` (``mask``,
    ``is_causal``, ``q_positions``, ``kv_positions``, ``kv_lengths``, ``window``,
    ``q_segment_ids``, ``kv_segment_ids``), checked by ``MaskSpec.resolve``. Returns
    ``(AttentionShapes, MaskSpec, scale)``; ``multi_head_attention``, ``flash_attention``
    and the decode and ring kernels all start here.
    """
    shapes = check_multi_head_shapes(q, k, v)
    spec = MaskSpec.resolve(B=shapes.B, T=shapes.T, S=shapes.S, H=shapes.H, **masking)
    return shapes, spec, default_scale(shapes.D, scale)


def group_heads(mask, K: int):
    """bool ``[B|1, H|1, T, S]`` -> ``[B|1, K|1, G|1, T, S]``: query head h = (h // G, h % G)."""
    B, H = mask.shape[:2]
    if H == 1:
        return mask[:, :, None]  # [B|1, 1, 1, T, S]
    return mask.reshape(B, K, H // K, *mask.shape[2:])  # [B|1, K, G, T, S]


def vmap_heads(one_head, mask, *, n_query: int, n_kv: int, head_axis: int):
    """vmaps ``one_head(*query_args, *kv_args, mask)`` over the G query heads that share
    a K/V head, then the K heads, then the batch.

    Query arguments are ``[B, ..., K, G, ...]`` and key/value arguments
    ``[B, ..., K, ...]`` with the K axis (and then G) at ``head_axis`` once the batch axis
    is gone: ``head_axis=1`` for the token-major ``[B, T, K, G, D]``, 0 for the head-major
    ``[B, K, G, T, D]``. K/V are passed unbatched over G, so GQA never copies them.
    ``mask`` is ``[B|1, K|1, G|1, T, S]`` (``group_heads``); an axis of size 1 is passed
    unbatched, and ``None`` (nothing masked) stays ``None``. Returns
    ``(vmapped_fn, mask)`` with the size-1 axes of the mask removed.
    """
    sizes = (1, 1, 1) if mask is None else mask.shape[:3]
    b_axis, k_axis, g_axis = (0 if size > 1 else None for size in sizes)
    squeezed = None if mask is None else mask.reshape(tuple(size for size in sizes if size > 1) + mask.shape[3:])
    query, kv = (head_axis,) * n_query, (head_axis,) * n_kv
    over_group = jax.vmap(one_head, in_axes=query + (None,) * n_kv + (g_axis,), out_axes=head_axis)
    over_kv_heads = jax.vmap(over_group, in_axes=query + kv + (k_axis,), out_axes=head_axis)
    over_batch = jax.vmap(over_kv_heads, in_axes=(0,) * (n_query + n_kv) + (b_axis,))
    return over_batch, squeezed


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
    q_segment_ids=None,
    kv_segment_ids=None,
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
      q_segment_ids: int ``[B, T]`` or ``[T]``: several sequences packed in one row; a
        query sees only keys with its own segment id.
      kv_segment_ids: int ``[B, S]`` or ``[S]``, with ``q_segment_ids``.
      scale: multiplier of the logits, ``1/sqrt(D)`` when ``None``.

    Returns:
      ``[B, T, H, E]`` in the dtype of ``q``.
    """
    shapes, spec, scale = resolve_call(
        q, k, v, mask=mask, is_causal=is_causal, q_positions=q_positions, kv_positions=kv_positions,
        kv_lengths=kv_lengths, window=window, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, scale=scale,
    )
    B, T, S, H, K, D, E = shapes
    full_mask = spec.full_mask()  # [B|1, H|1, T, S], or None when nothing is masked
    full_mask = None if full_mask is None else group_heads(full_mask, K)  # [B|1, K|1, G|1, T, S]

    def one_head(q, k, v, mask):  # [T, D], [S, D], [S, E], [T, S] -> [T, E]
        return attention(q, k, v, mask=mask, scale=scale)

    over_heads, full_mask = vmap_heads(one_head, full_mask, n_query=1, n_kv=2, head_axis=1)
    q = q.reshape(B, T, K, H // K, D)  # [B, T, K, G, D]
    out = over_heads(q, k, v, full_mask)  # [B, T, K, G, E]
    return out.reshape(B, T, H, E)  # [B, T, H, E]


def multi_head_attention_weights(q, k, **masking):
    """The attention weights of every head: what ``multi_head_attention`` averages values with.

    q ``[B, T, H, D]``, k ``[B, S, K, D]`` and the masking keywords (and ``scale``) of
    ``multi_head_attention`` -> float32 ``[B, H, T, S]``; rows sum to 1 (0 for a row with
    nothing to attend to). For looking inside a model (``jaxattn inspect``); the kernels
    never materialise this.
    """
    scale = masking.pop("scale", None)
    shapes, spec, scale = resolve_call(q, k, k, scale=scale, **masking)
    B, T, S, H, K, D, _ = shapes
    full_mask = spec.full_mask()
    full_mask = None if full_mask is None else group_heads(full_mask, K)

    def one_head(q, k, mask):  # [T, D], [S, D], [T, S] -> [T, S]
        return attention_weights(q, k, mask=mask, scale=scale)

    over_heads, full_mask = vmap_heads(one_head, full_mask, n_query=1, n_kv=1, head_axis=1)
    weights = over_heads(q.reshape(B, T, K, H // K, D), k, full_mask)  # [B, T, K, G, S]
    return weights.reshape(B, T, H, S).transpose(0, 2, 1, 3)  # [B, H, T, S]
