"""Memory-efficient blockwise ("flash") attention in pure JAX, for any backend.

Standard attention materialises the ``[T, S]`` score matrix of every head. Here the
keys and values are visited one block at a time and the softmax is accumulated online
(Rabe & Staats 2021, arXiv 2112.05682; Dao et al. 2022, arXiv 2205.14135). For a query
row, after each block of scores ``s_j``:

    m'   = max(m, max_j s_j)                          running maximum
    l'   = l e^(m - m') + sum_j e^(s_j - m')            running softmax denominator
    acc' = acc e^(m - m') + sum_j e^(s_j - m') v_j      running numerator
    out  = acc / l,   lse = m + log l                  at the end

so memory is linear in the sequence. Key blocks that the causal mask, the window or the
padding hide completely from a query block are never visited: the loop over key blocks
runs only over the range ``[lo, hi)`` that can be seen, so causal attention does about
half the work. The backward pass (``jax.custom_vjp``) saves only the output and the
per-row log-sum-exp and recomputes each block's probabilities ``p = exp(s - lse)``.

The block update is written for one head, ``[block, D]``, and ``jax.vmap``-ed over the
batch, the key/value heads and the queries that share them (GQA/MQA), like
``multi_head_attention``. Shape letters as there; ``bq``/``bk`` are the block sizes.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxattn.functional.attention import (
    MASK_VALUE,
    check_kv_lengths,
    check_multi_head_shapes,
    check_user_mask,
    resolve_positions,
)

DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_KV = 256  # measured on 2 CPU cores, T = 4096: (512, 256) beat 256², 512² and (1024, 512)
# Position of a padding query row: earlier than every key, so it sees nothing.
_PAD_QUERY_POSITION = -(2**30)
_BIG = jnp.iinfo(jnp.int32).max


class _Static(NamedTuple):
    """Everything about a call that shapes the program (hashable, not traced)."""

    is_causal: bool
    window: int | None
    scale: float
    block_q: int
    block_kv: int
    S: int


# ------------------------------------------------------------- one head, one block


def _block_forward(q, k, v, mask, m, l, acc, *, scale):
    """Online-softmax update of one head by one key block.

    q ``[bq, D]``, k ``[bk, D]``, v ``[bk, E]``, mask bool ``[bq, bk]``; running max m and
    sum l ``[bq]`` and accumulator acc ``[bq, E]``, all float32.
    """
    s = jnp.einsum("qd,kd->qk", q, k, preferred_element_type=jnp.float32) * scale  # [bq, bk]
    s = jnp.where(mask, s, MASK_VALUE)
    m_new = jnp.maximum(m, s.max(axis=-1))
    p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)  # a fully masked row stays all zero
    correction = jnp.exp(m - m_new)
    l = l * correction + p.sum(axis=-1)
    acc = acc * correction[:, None] + jnp.einsum("qk,ke->qe", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return m_new, l, acc


def _block_backward(q, k, v, do, lse, delta, mask, *, scale):
    """Gradients of one head from one (query block, key block) pair, recomputing p.

    do ``[bq, E]`` output cotangent, lse and delta = rowsum(do * out) ``[bq]``.
    Returns dq ``[bq, D]``, dk ``[bk, D]``, dv ``[bk, E]`` (float32).
    """
    s = jnp.einsum("qd,kd->qk", q, k, preferred_element_type=jnp.float32) * scale
    p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)  # [bq, bk]
    dv = jnp.einsum("qk,qe->ke", p.astype(do.dtype), do, preferred_element_type=jnp.float32)
    dp = jnp.einsum("qe,ke->qk", do, v, preferred_element_type=jnp.float32)
    ds = p * (dp - delta[:, None]) * scale
    dq = jnp.einsum("qk,kd->qd", ds.astype(k.dtype), k, preferred_element_type=jnp.float32)
    dk = jnp.einsum("qk,qd->kd", ds.astype(q.dtype), q, preferred_element_type=jnp.float32)
    return dq, dk, dv


# ----------------------------------------------------------------- block layout


def _pad_to(x, axis: int, size: int, value=0):
    pad = size - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


class _Blocks(NamedTuple):
    """The padded, head-major operands and the per-block visiting ranges."""

    q: jax.Array  # [B, K, G, Tp, D]
    k: jax.Array  # [B, K, Sp, D]
    v: jax.Array  # [B, K, Sp, E]
    q_pos: jax.Array  # [B|1, Tp] int32 (zeros when not causal)
    kv_pos: jax.Array  # [B|1, Sp] int32
    kv_valid: jax.Array  # [B|1, Sp] bool: inside S and kv_lengths
    user_mask: jax.Array | None  # [B|1, K|1, G|1, Tp, Sp] bool
    visible: jax.Array  # [nq, nk] bool: may query block i see anything of key block j?


def _layout(static: _Static, q, k, v, positions, kv_lengths, user_mask) -> _Blocks:
    B, T, H, D = q.shape
    K = k.shape[2]
    G = H // K
    bq, bk = static.block_q, static.block_kv
    nq, nk = -(-T // bq), -(-static.S // bk)
    Tp, Sp = nq * bq, nk * bk
    q = _pad_to(q.reshape(B, T, K, G, D).transpose(0, 2, 3, 1, 4), 3, Tp)  # [B, K, G, Tp, D]
    k = _pad_to(k.transpose(0, 2, 1, 3), 2, Sp)  # [B, K, Sp, D]
    v = _pad_to(v.transpose(0, 2, 1, 3), 2, Sp)  # [B, K, Sp, E]

    index = jnp.arange(Sp)
    kv_valid = (index < static.S)[None]  # [1, Sp]
    if kv_lengths is not None:
        kv_valid = kv_valid & (index[None] < kv_lengths[:, None])  # [B, Sp]
    if positions is None:
        q_pos = jnp.zeros((1, Tp), jnp.int32)
        kv_pos = jnp.zeros((1, Sp), jnp.int32)
    else:
        q_pos = _pad_to(positions[0].astype(jnp.int32), 1, Tp, _PAD_QUERY_POSITION)  # [B|1, Tp]
        kv_pos = _pad_to(positions[1].astype(jnp.int32), 1, Sp, _BIG)  # [B|1, Sp]

    if user_mask is not None:
        Bm, Hm = user_mask.shape[:2]
        user_mask = jnp.broadcast_to(user_mask, (Bm, Hm, T, static.S))
        user_mask = user_mask.reshape(Bm, K, G, T, static.S) if Hm == H else user_mask[:, :, None]  # [B|1, K|1, G|1, T, S]
        user_mask = _pad_to(_pad_to(user_mask, 3, Tp, False), 4, Sp, False)

    # Which key blocks can a query block see at all? Conservative block-level bounds.
    valid_blocks = kv_valid.reshape(kv_valid.shape[0], nk, bk).any(axis=(0, 2))  # [nk]
    if positions is None:
        visible = jnp.broadcast_to(valid_blocks[None], (nq, nk))
    else:
        real_q = q_pos != _PAD_QUERY_POSITION
        q_max = jnp.where(real_q, q_pos, -_BIG).reshape(-1, nq, bq).max(axis=(0, 2))  # [nq]
        q_min = jnp.where(real_q, q_pos, _BIG).reshape(-1, nq, bq).min(axis=(0, 2))
        live_kv = jnp.broadcast_to(kv_valid, (max(kv_valid.shape[0], kv_pos.shape[0]), Sp))
        kv_min = jnp.where(live_kv, kv_pos, _BIG).reshape(-1, nk, bk).min(axis=(0, 2))  # [nk]
        kv_max = jnp.where(live_kv, kv_pos, -_BIG).reshape(-1, nk, bk).max(axis=(0, 2))
        visible = (kv_min[None] <= q_max[:, None]) & valid_blocks[None]
        if static.window is not None:
            # some key with q_pos - kv_pos < window, i.e. kv_max > q_min - window
            visible = visible & (kv_max[None] > q_min[:, None] - static.window)
    return _Blocks(q, k, v, q_pos, kv_pos, kv_valid, user_mask, visible)


def _visit_range(visible_row):
    """First and one-past-last True index of a bool vector; (0, 0) when none."""
    n = visible_row.shape[0]
    index = jnp.arange(n)
    lo = jnp.min(jnp.where(visible_row, index, n))
    hi = jnp.max(jnp.where(visible_row, index + 1, 0))
    return jnp.minimum(lo, hi), hi


def _block_mask(static: _Static, blocks: _Blocks, q_start, kv_start):
    """bool ``[B|1, K|1, G|1, bq, bk]`` for the query block at q_start and key block at kv_start."""
    bq, bk = static.block_q, static.block_kv
    kv_valid = lax.dynamic_slice_in_dim(blocks.kv_valid, kv_start, bk, axis=1)  # [B|1, bk]
    mask = kv_valid[:, None, :]  # [B|1, 1, bk]
    if static.is_causal:
        q_pos = lax.dynamic_slice_in_dim(blocks.q_pos, q_start, bq, axis=1)[:, :, None]  # [B|1, bq, 1]
        kv_pos = lax.dynamic_slice_in_dim(blocks.kv_pos, kv_start, bk, axis=1)[:, None, :]  # [B|1, 1, bk]
        mask = mask & (kv_pos <= q_pos)
        if static.window is not None:
            mask = mask & (q_pos - kv_pos < static.window)
    mask = mask[:, None, None]  # [B|1, 1, 1, bq|1, bk]
    if blocks.user_mask is not None:
        user = lax.dynamic_slice_in_dim(blocks.user_mask, q_start, bq, axis=3)
        user = lax.dynamic_slice_in_dim(user, kv_start, bk, axis=4)  # [B|1, K|1, G|1, bq, bk]
        mask = mask & user
    return jnp.broadcast_to(mask, mask.shape[:3] + (bq, bk))


def _vmap_heads(fn, mask, n_shared: int, n_per_head: int):
    """vmaps ``fn(per-head args..., shared args..., mask)`` over G, then K, then B.

    Per-head args are ``[B, K, G, ...]``, shared args (keys, values) ``[B, K, ...]``;
    the mask's size-1 axes are passed unbatched.
    """
    sizes = mask.shape[:3]  # [B|1, K|1, G|1]
    b_ax, k_ax, g_ax = (0 if size > 1 else None for size in sizes)
    squeezed = mask.reshape(tuple(size for size in sizes if size > 1) + mask.shape[3:])
    over_g = jax.vmap(fn, in_axes=(0,) * n_per_head + (None,) * n_shared + (g_ax,))
    over_k = jax.vmap(over_g, in_axes=(0,) * n_per_head + (0,) * n_shared + (k_ax,))
    over_b = jax.vmap(over_k, in_axes=(0,) * n_per_head + (0,) * n_shared + (b_ax,))
    return over_b, squeezed


# ------------------------------------------------------------------ forward, backward


def _forward(static: _Static, blocks: _Blocks):
    """Returns out ``[B, K, G, Tp, E]`` (float32) and lse ``[B, K, G, Tp]``."""
    B, K, G, _, D = blocks.q.shape
    E = blocks.v.shape[-1]
    bq, bk = static.block_q, static.block_kv
    update = partial(_block_forward, scale=static.scale)

    def query_block(i):
        q_start = i * bq
        q = lax.dynamic_slice_in_dim(blocks.q, q_start, bq, axis=3)  # [B, K, G, bq, D]
        lo, hi = _visit_range(blocks.visible[i])

        def key_block(j, carry):
            m, l, acc = carry
            kv_start = j * bk
            k = lax.dynamic_slice_in_dim(blocks.k, kv_start, bk, axis=2)  # [B, K, bk, D]
            v = lax.dynamic_slice_in_dim(blocks.v, kv_start, bk, axis=2)  # [B, K, bk, E]
            mask = _block_mask(static, blocks, q_start, kv_start)
            fn, mask = _vmap_heads(lambda q, m, l, acc, k, v, mask: update(q, k, v, mask, m, l, acc), mask, 2, 4)
            return fn(q, m, l, acc, k, v, mask)

        init = (
            jnp.full((B, K, G, bq), MASK_VALUE, jnp.float32),
            jnp.zeros((B, K, G, bq), jnp.float32),
            jnp.zeros((B, K, G, bq, E), jnp.float32),
        )
        m, l, acc = lax.fori_loop(lo, hi, key_block, init)
        seen = l > 0
        out = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)  # nothing seen -> zeros
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
        return out, lse

    nq = blocks.q.shape[3] // bq
    out, lse = lax.map(query_block, jnp.arange(nq))  # [nq, B, K, G, bq, E], [nq, B, K, G, bq]
    out = jnp.moveaxis(out, 0, 3).reshape(B, K, G, nq * bq, E)
    lse = jnp.moveaxis(lse, 0, 3).reshape(B, K, G, nq * bq)
    return out, lse


def _backward(static: _Static, blocks: _Blocks, out, lse, d_out):
    """Gradients dq ``[B, K, G, Tp, D]``, dk ``[B, K, Sp, D]``, dv ``[B, K, Sp, E]`` (float32)."""
    B, K, G, Tp, D = blocks.q.shape
    E = blocks.v.shape[-1]
    bq, bk = static.block_q, static.block_kv
    nk = blocks.k.shape[2] // bk
    delta = jnp.einsum("bkgte,bkgte->bkgt", d_out.astype(jnp.float32), out)  # [B, K, G, Tp]
    grads = partial(_block_backward, scale=static.scale)

    def key_block(dq_total, j):
        kv_start = j * bk
        k = lax.dynamic_slice_in_dim(blocks.k, kv_start, bk, axis=2)  # [B, K, bk, D]
        v = lax.dynamic_slice_in_dim(blocks.v, kv_start, bk, axis=2)
        lo, hi = _visit_range(blocks.visible[:, j])

        def query_block(i, carry):
            dq_total, dk, dv = carry
            q_start = i * bq
            take = lambda x: lax.dynamic_slice_in_dim(x, q_start, bq, axis=3)  # noqa: E731
            mask = _block_mask(static, blocks, q_start, kv_start)
            fn, mask = _vmap_heads(
                lambda q, do, lse, delta, k, v, mask: grads(q, k, v, do, lse, delta, mask), mask, 2, 4
            )
            dq, dk_heads, dv_heads = fn(take(blocks.q), take(d_out), take(lse), take(delta), k, v, mask)
            dq_total = lax.dynamic_update_slice_in_dim(dq_total, take(dq_total) + dq, q_start, axis=3)
            return dq_total, dk + dk_heads.sum(axis=2), dv + dv_heads.sum(axis=2)  # sum the G queries sharing K/V

        init = (dq_total, jnp.zeros((B, K, bk, D), jnp.float32), jnp.zeros((B, K, bk, E), jnp.float32))
        dq_total, dk, dv = lax.fori_loop(lo, hi, query_block, init)
        return dq_total, (dk, dv)

    dq, (dk, dv) = lax.scan(key_block, jnp.zeros((B, K, G, Tp, D), jnp.float32), jnp.arange(nk))
    dk = jnp.moveaxis(dk, 0, 2).reshape(B, K, nk * bk, D)
    dv = jnp.moveaxis(dv, 0, 2).reshape(B, K, nk * bk, E)
    return dq, dk, dv


def _unlayout_queries(x, B, T, H):  # [B, K, G, Tp, F] -> [B, T, H, F]
    return x[:, :, :, :T].transpose(0, 3, 1, 2, 4).reshape(B, T, H, x.shape[-1])


def _unlayout_keys(x, S):  # [B, K, Sp, F] -> [B, S, K, F]
    return x[:, :, :S].transpose(0, 2, 1, 3)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(static: _Static, q, k, v, q_pos, kv_pos, kv_lengths, user_mask):
    return _flash_forward(static, q, k, v, q_pos, kv_pos, kv_lengths, user_mask)[0]


def _positions(q_pos, kv_pos):
    return None if q_pos is None else (q_pos, kv_pos)


def _flash_forward(static, q, k, v, q_pos, kv_pos, kv_lengths, user_mask):
    blocks = _layout(static, q, k, v, _positions(q_pos, kv_pos), kv_lengths, user_mask)
    out, lse = _forward(static, blocks)
    B, T, H, _ = q.shape
    result = _unlayout_queries(out, B, T, H).astype(q.dtype)
    return result, (q, k, v, q_pos, kv_pos, kv_lengths, user_mask, result, lse)


def _flash_backward(static, residuals, d_out):
    q, k, v, q_pos, kv_pos, kv_lengths, user_mask, out, lse = residuals
    blocks = _layout(static, q, k, v, _positions(q_pos, kv_pos), kv_lengths, user_mask)
    B, T, H, _ = q.shape
    K = k.shape[2]
    Tp = blocks.q.shape[3]
    to_blocks = lambda x: _pad_to(x.reshape(B, T, K, H // K, -1).transpose(0, 2, 3, 1, 4), 3, Tp)  # noqa: E731
    dq, dk, dv = _backward(static, blocks, to_blocks(out.astype(jnp.float32)), lse, to_blocks(d_out))
    return (
        _unlayout_queries(dq, B, T, H).astype(q.dtype),
        _unlayout_keys(dk, static.S).astype(k.dtype),
        _unlayout_keys(dv, static.S).astype(v.dtype),
        None,
        None,
        None,
        None,
    )


_flash.defvjp(_flash_forward, _flash_backward)


def flash_attention(
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
    block_q: int = DEFAULT_BLOCK_Q,
    block_kv: int = DEFAULT_BLOCK_KV,
):
    """Blockwise attention with the arguments, shapes and numerics of ``multi_head_attention``.

    q ``[B, T, H, D]``, k ``[B, S, K, D]``, v ``[B, S, K, E]`` -> ``[B, T, H, E]``.
    Memory is O(T + S) per head instead of O(T S); key blocks hidden from a query block
    by causality, the window or ``kv_lengths`` are skipped. ``block_q``/``block_kv`` are
    clipped to T/S; T and S need not be multiples of them.
    """
    shapes = check_multi_head_shapes(q, k, v)
    positions = resolve_positions(
        shapes, is_causal=is_causal, q_positions=q_positions, kv_positions=kv_positions, window=window
    )
    kv_lengths = check_kv_lengths(shapes, kv_lengths)
    user_mask = check_user_mask(shapes, mask)
    if block_q < 1 or block_kv < 1:
        raise ValueError(f"block sizes must be >= 1, got block_q={block_q}, block_kv={block_kv}")
    static = _Static(
        is_causal=bool(is_causal),
        window=window,
        scale=1.0 / math.sqrt(shapes.D) if scale is None else float(scale),
        block_q=min(block_q, shapes.T),
        block_kv=min(block_kv, shapes.S),
        S=shapes.S,
    )
    q_pos, kv_pos = (None, None) if positions is None else positions
    return _flash(static, q, k, v, q_pos, kv_pos, kv_lengths, user_mask)
