"""Many heads from one: the sizes of a multi-head call, and ``jax.vmap`` over heads.

Every kernel of jaxattn is written for one head (``[T, D]`` queries against ``[S, D]``
keys). This module turns such a function into a multi-head one: it checks the shapes of
``q [B, T, H, D]``, ``k [B, S, K, D]``, ``v [B, S, K, E]`` once (``check_multi_head_shapes``)
and vmaps the one-head function over the G = H // K query heads that share a key/value
head, then over the K key/value heads, then over the batch (``vmap_heads``), so that GQA
and MQA never copy keys or values.

Shape letters: B batch, T queries, S keys/values, H query heads, K key/value heads
(G = H // K), D query/key width, E value width.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class AttentionShapes(NamedTuple):
    """The sizes of one multi-head attention call (letters as in the glossary)."""

    B: int
    T: int
    S: int
    H: int
    K: int
    D: int
    E: int


def check_same_dtype(**arrays) -> None:
    dtypes = {name: x.dtype if hasattr(x, "dtype") else jnp.asarray(x).dtype for name, x in arrays.items()}
    if len(set(dtypes.values())) > 1:
        named = ", ".join(f"{name}: {dtype}" for name, dtype in dtypes.items())
        raise ValueError(f"attention inputs must share one dtype, got {named}")


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
    check_same_dtype(q=q, k=k, v=v)
    return AttentionShapes(B, T, S, H, K, D, E)


def group_heads(mask, K: int):
    """bool ``[B|1, H|1, T, S]`` -> ``[B|1, K|1, G|1, T, S]``: query head h = (h // G, h % G)."""
    B, H = mask.shape[:2]
    if H == 1:
        return mask[:, :, None]  # [B|1, 1, 1, T, S]
    return mask.reshape(B, K, H // K, *mask.shape[2:])  # [B|1, K, G, T, S]


def vmap_heads(one_head, mask, *, n_query: int, n_kv: int, head_axis: int, per_head=None):
    """vmaps ``one_head(*query_args, *kv_args, mask, head_value)`` over the G query heads that
    share a K/V head, then the K heads, then the batch.

    Query arguments are ``[B, ..., K, G, ...]`` and key/value arguments ``[B, ..., K, ...]``
    with the K axis (and then G) at ``head_axis`` once the batch axis is gone:
    ``head_axis=1`` for the token-major ``[B, T, K, G, D]``, 0 for the head-major
    ``[B, K, G, T, D]``. K/V are passed unbatched over G, so GQA never copies them.
    ``mask`` is ``[B|1, K|1, G|1, T, S]`` (``group_heads``); an axis of size 1 is passed
    unbatched, and ``None`` (nothing masked) stays ``None``. ``per_head`` is an optional
    ``[K, G]`` array of one number per query head (a learned sink), passed to ``one_head``
    as a scalar; ``None`` stays ``None``. Returns ``(vmapped_fn, mask)`` with the size-1 axes
    of the mask removed; call it as ``fn(*query_args, *kv_args, mask, per_head)``.
    """
    sizes = (1, 1, 1) if mask is None else mask.shape[:3]
    b_axis, k_axis, g_axis = (0 if size > 1 else None for size in sizes)
    h_axis = None if per_head is None else 0
    squeezed = None if mask is None else mask.reshape(tuple(size for size in sizes if size > 1) + mask.shape[3:])
    query, kv = (head_axis,) * n_query, (head_axis,) * n_kv
    over_group = jax.vmap(one_head, in_axes=query + (None,) * n_kv + (g_axis, h_axis), out_axes=head_axis)
    over_kv_heads = jax.vmap(over_group, in_axes=query + kv + (k_axis, h_axis), out_axes=head_axis)
    over_batch = jax.vmap(over_kv_heads, in_axes=(0,) * (n_query + n_kv) + (b_axis, None))
    return over_batch, squeezed
