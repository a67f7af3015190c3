"""Memory-efficient blockwise ("flash") attention in pure JAX, for any backend.

Standard attention materialises the ``[T, S]`` score matrix of every head. Here the
keys and values are visited one block at a time and the softmax is accumulated online
(Rabe & Staats 2021, arXiv 2112.05682; Dao et al. 2022, arXiv 2205.14135). For a query
row, after each block of scores ``s_j``:

    m'   = max(m, max_j s_j)                          running maximum
    l'   = l e^(m - m') + sum_j e^(s_j - m')            running softmax denominator
    acc' = acc e^(m - m') + sum_j e^(s_j - m') v_j      running numerator
    out  = acc / l,   lse = m + log l                  at the end

so memory is linear in the sequence. ``online_softmax_step`` and ``online_softmax_finish``
are that update (given a block's scores, ``block_scores``) and that ending, for one head;
the decode kernel (``decode.py``) and ring attention (``ring.py``) call the same functions.

Which blocks are visited is decided by ``MaskSpec.block_visibility`` (``masks.py``): key
blocks that causality, the window, the padding, the segment ids or the caller's mask
hide completely from a query block are never visited, so causal attention does about
half the work. Blocks that every query sees entirely (``MaskSpec.block_completeness``)
are visited without a mask; inside the others the mask comes from the same ``MaskSpec``
(the rule lives in ``masks.py`` only). The backward pass (``jax.custom_vjp``) saves only the
output and the per-row log-sum-exp and recomputes each block's probabilities
``p = exp(s - lse)``.

The block update is written for one head, ``[block, D]``, and ``jax.vmap``-ed over the
batch, the key/value heads and the queries that share them (GQA/MQA), like
``multi_head_attention``. Shape letters as there; ``bq``/``bk`` are the block sizes.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxattn.functional.attention import group_heads, resolve_call, vmap_heads
from jaxattn.functional.masks import MASK_VALUE, MaskSpec

DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_KV = 256  # measured on 2 CPU cores, T = 4096: (512, 256) beat 256², 512² and (1024, 512)


# ----------------------------------------------------------- the online softmax, one head


class SoftmaxState(NamedTuple):
    """Running statistics of the online softmax for ``[bq]`` query rows (float32):
    maximum m ``[bq]``, denominator l ``[bq]``, numerator acc ``[bq, E]``."""

    m: jax.Array
    l: jax.Array
    acc: jax.Array

    @classmethod
    def empty(cls, shape, E: int) -> "SoftmaxState":
        """Nothing seen yet: m = MASK_VALUE, l = 0, acc = 0, for rows of ``shape``."""
        return cls(
            jnp.full(shape, MASK_VALUE, jnp.float32),
            jnp.zeros(shape, jnp.float32),
            jnp.zeros((*shape, E), jnp.float32),
        )


def scaled_queries(q, scale: float):
    """``q * scale``, applied once to a block of queries rather than to every block of
    scores it meets (one elementwise pass over ``[bq, D]`` instead of ``[bq, bk]`` per block)."""
    return (q.astype(jnp.float32) * scale).astype(q.dtype)


def block_scores(q, k):
    """Scores of one head and block, float32: q ``[bq, D]`` (already scaled), k ``[bk, D]`` -> ``[bq, bk]``."""
    return jnp.einsum("qd,kd->qk", q, k, preferred_element_type=jnp.float32)


def online_softmax_step(s, v, mask, state: SoftmaxState) -> SoftmaxState:
    """Folds one block of keys into the running softmax of one head.

    s ``[bq, bk]`` the block's scaled scores (float32), v ``[bk, E]``, mask bool
    ``[bq, bk]`` or ``None``. A masked score never counts: its ``p`` is set to exactly 0,
    so a row that has seen only masked keys keeps ``l = 0``.
    """
    if mask is not None:
        s = jnp.where(mask, s, MASK_VALUE)
    m_new = jnp.maximum(state.m, s.max(axis=-1))
    p = jnp.exp(s - m_new[:, None])  # [bq, bk]
    if mask is not None:
        p = jnp.where(mask, p, 0.0)  # a fully masked row stays all zero
    correction = jnp.exp(state.m - m_new)
    l = state.l * correction + p.sum(axis=-1)
    pv = jnp.einsum("qk,ke->qe", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return SoftmaxState(m_new, l, state.acc * correction[:, None] + pv)


def online_softmax_finish(state: SoftmaxState):
    """``(out [..., E], lse [...])`` from the running statistics, float32.

    How a row that saw no visible key becomes zeros: its ``l`` stayed exactly 0 (every
    ``p`` was masked to 0), so ``out`` and ``lse`` are set to 0 instead of ``0 / 0``; the
    backward pass then recomputes ``p = exp(s - 0)`` only where the mask allows, i.e.
    nowhere, and that row passes no gradient.
    """
    seen = state.l > 0
    safe_l = jnp.where(seen, state.l, 1.0)
    out = jnp.where(seen[..., None], state.acc / safe_l[..., None], 0.0)
    lse = jnp.where(seen, state.m + jnp.log(safe_l), 0.0)
    return out, lse


def fold_block(q, state: SoftmaxState, k, v, mask, *, head_axis: int) -> SoftmaxState:
    """``online_softmax_step`` for every head at once: one key block into each head's state.

    q ``[B, ..K, G.., bq, D]`` (scaled) and the state's ``m``, ``l`` ``[B, ..K, G.., bq]``,
    ``acc`` ``[.., E]``; k/v ``[B, ..K.., bk, D|E]``; the K (then G) axis at ``head_axis``
    once B is gone (``vmap_heads``: 0 head-major, 1 token-major); mask
    ``[B|1, K|1, G|1, bq, bk]`` or ``None``. Keys and values are read once per K/V head.
    """

    def one_head(q, m, l, acc, k, v, mask):
        return online_softmax_step(block_scores(q, k), v, mask, SoftmaxState(m, l, acc))

    over_heads, mask = vmap_heads(one_head, mask, n_query=4, n_kv=2, head_axis=head_axis)
    return SoftmaxState(*over_heads(q, *state, k, v, mask))


def block_gradients(q, do, lse, delta, k, v, mask, *, head_axis: int):
    """``_block_backward`` for every head at once (layout as in ``fold_block``). Returns
    dq (w.r.t. the scaled queries, per query head), dk and dv per query head (sum over G
    for the K/V heads)."""
    over_heads, mask = vmap_heads(_block_backward, mask, n_query=4, n_kv=2, head_axis=head_axis)
    return over_heads(q, do, lse, delta, k, v, mask)


def _block_backward(q, do, lse, delta, k, v, mask):
    """Gradients of one head from one (query block, key block) pair, recomputing p.

    q ``[bq, D]`` already scaled (``q_s = q * scale``), do ``[bq, E]`` output cotangent, lse
    and delta = rowsum(do * out) ``[bq]``, mask ``[bq, bk]`` or ``None``. Returns the
    gradient w.r.t. the *scaled* queries ``[bq, D]`` (multiply by the scale for q's),
    dk ``[bk, D]``, dv ``[bk, E]`` (float32).
    """
    p = jnp.exp(block_scores(q, k) - lse[:, None])  # [bq, bk]
    if mask is not None:
        p = jnp.where(mask, p, 0.0)
    dv = jnp.einsum("qk,qe->ke", p.astype(do.dtype), do, preferred_element_type=jnp.float32)
    dp = jnp.einsum("qe,ke->qk", do, v, preferred_element_type=jnp.float32)
    ds = p * (dp - delta[:, None])
    dq = jnp.einsum("qk,kd->qd", ds.astype(k.dtype), k, preferred_element_type=jnp.float32)
    dk = jnp.einsum("qk,qd->kd", ds.astype(q.dtype), q, preferred_element_type=jnp.float32)
    return dq, dk, dv


# ----------------------------------------------------------------- block layout


class _Static(NamedTuple):
    """Everything about a call that shapes the program (hashable, not traced)."""

    scale: float
    block_q: int
    block_kv: int
    T: int
    S: int

    @property
    def padded(self) -> tuple[int, int]:
        """(Tp, Sp): T and S rounded up to whole blocks."""
        return -(-self.T // self.block_q) * self.block_q, -(-self.S // self.block_kv) * self.block_kv


def _pad_axis(x, axis: int, size: int):
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


def _queries_to_blocks(x, K: int, Tp: int):  # [B, T, H, F] -> [B, K, G, Tp, F]
    B, T, H, F = x.shape
    return _pad_axis(x.reshape(B, T, K, H // K, F).transpose(0, 2, 3, 1, 4), 3, Tp)


def _keys_to_blocks(x, Sp: int):  # [B, S, K, F] -> [B, K, Sp, F]
    return _pad_axis(x.transpose(0, 2, 1, 3), 2, Sp)


def _queries_from_blocks(x, T: int):  # [B, K, G, Tp, F] -> [B, T, H, F]
    B, K, G, _, F = x.shape
    return x[:, :, :, :T].transpose(0, 3, 1, 2, 4).reshape(B, T, K * G, F)


def _keys_from_blocks(x, S: int):  # [B, K, Sp, F] -> [B, S, K, F]
    return x[:, :, :S].transpose(0, 2, 1, 3)


def _visit_list(visible_row):
    """The indices of the True entries of a bool ``[n]``, first, and how many there are."""
    n = visible_row.shape[0]
    (order,) = jnp.nonzero(visible_row, size=n, fill_value=0)
    return order, visible_row.sum()


def grouped_block_mask(spec: MaskSpec, K: int, q_start, block_q: int, kv_start, block_kv: int):
    """bool ``[B|1, K|1, G|1, bq, bk]`` of one block, from the call's ``MaskSpec``; or ``None``."""
    mask = spec.block(q_start, block_q, kv_start, block_kv).full_mask()
    return None if mask is None else group_heads(mask, K)


# ------------------------------------------------------------------ forward, backward


def _forward(static: _Static, q, k, v, spec: MaskSpec, plan):
    """q ``[B, K, G, Tp, D]``, k/v ``[B, K, Sp, D|E]`` -> out ``[B, K, G, Tp, E]``, lse ``[B, K, G, Tp]``."""
    B, K, G, Tp, _ = q.shape
    E = v.shape[-1]
    bq, bk = static.block_q, static.block_kv
    visible, complete = plan

    def query_block(i):
        q_start = i * bq
        q_block = scaled_queries(lax.dynamic_slice_in_dim(q, q_start, bq, axis=3), static.scale)  # [B, K, G, bq, D]

        def key_blocks(blocks, masked, state):
            order, count = _visit_list(blocks)

            def key_block(t, state):
                kv_start = order[t] * bk
                k_block = lax.dynamic_slice_in_dim(k, kv_start, bk, axis=2)  # [B, K, bk, D]
                v_block = lax.dynamic_slice_in_dim(v, kv_start, bk, axis=2)  # [B, K, bk, E]
                mask = grouped_block_mask(spec, K, q_start, bq, kv_start, bk) if masked else None
                return fold_block(q_block, state, k_block, v_block, mask, head_axis=0)

            return lax.fori_loop(0, count, key_block, state)

        state = SoftmaxState.empty((B, K, G, bq), E)
        state = key_blocks(complete[i], False, state)  # every query sees every key: no mask to build
        state = key_blocks(visible[i] & ~complete[i], True, state)  # the partly masked blocks
        return online_softmax_finish(state)

    nq = Tp // bq
    out, lse = lax.map(query_block, jnp.arange(nq))  # [nq, B, K, G, bq, E], [nq, B, K, G, bq]
    out = jnp.moveaxis(out, 0, 3).reshape(B, K, G, Tp, E)
    lse = jnp.moveaxis(lse, 0, 3).reshape(B, K, G, Tp)
    return out, lse


def _backward(static: _Static, q, k, v, spec: MaskSpec, plan, out, lse, d_out):
    """Gradients dq ``[B, K, G, Tp, D]``, dk ``[B, K, Sp, D]``, dv ``[B, K, Sp, E]`` (float32)."""
    B, K, G, Tp, D = q.shape
    E = v.shape[-1]
    bq, bk = static.block_q, static.block_kv
    nk = k.shape[2] // bk
    visible, complete = plan
    delta = jnp.einsum("bkgte,bkgte->bkgt", d_out.astype(jnp.float32), out)  # [B, K, G, Tp]
    q = scaled_queries(q, static.scale)

    def key_block(dq_total, j):
        kv_start = j * bk
        k_block = lax.dynamic_slice_in_dim(k, kv_start, bk, axis=2)  # [B, K, bk, D]
        v_block = lax.dynamic_slice_in_dim(v, kv_start, bk, axis=2)

        def query_blocks(blocks, masked, carry):
            order, count = _visit_list(blocks)

            def query_block(t, carry):
                dq_total, dk, dv = carry
                q_start = order[t] * bq
                take = lambda x: lax.dynamic_slice_in_dim(x, q_start, bq, axis=3)  # noqa: E731
                mask = grouped_block_mask(spec, K, q_start, bq, kv_start, bk) if masked else None
                dq, dk_heads, dv_heads = block_gradients(take(q), take(d_out), take(lse), take(delta), k_block, v_block,
                                                         mask, head_axis=0)
                dq_total = lax.dynamic_update_slice_in_dim(dq_total, take(dq_total) + dq, q_start, axis=3)
                return dq_total, dk + dk_heads.sum(axis=2), dv + dv_heads.sum(axis=2)  # sum the G queries sharing K/V

            return lax.fori_loop(0, count, query_block, carry)

        carry = (dq_total, jnp.zeros((B, K, bk, D), jnp.float32), jnp.zeros((B, K, bk, E), jnp.float32))
        carry = query_blocks(complete[:, j], False, carry)
        dq_total, dk, dv = query_blocks(visible[:, j] & ~complete[:, j], True, carry)
        return dq_total, (dk, dv)

    dq, (dk, dv) = lax.scan(key_block, jnp.zeros((B, K, G, Tp, D), jnp.float32), jnp.arange(nk))
    dq = dq * static.scale  # the loop found the gradient w.r.t. the scaled queries
    dk = jnp.moveaxis(dk, 0, 2).reshape(B, K, nk * bk, D)
    dv = jnp.moveaxis(dv, 0, 2).reshape(B, K, nk * bk, E)
    return dq, dk, dv


def _plan(static: _Static, spec: MaskSpec):
    """The spec padded to whole blocks, and its plan: which block pairs are visited
    (``[nq, nk]``) and which of those need no mask."""
    Tp, Sp = static.padded
    spec = spec.padded(Tp, Sp)
    return spec, (spec.block_visibility(static.block_q, static.block_kv), spec.block_completeness(static.block_q, static.block_kv))


def _blocks(static: _Static, q, k, v, spec: MaskSpec):
    """The padded head-major operands, the padded spec and its plan."""
    Tp, Sp = static.padded
    K = k.shape[2]
    spec, plan = _plan(static, spec)
    return _queries_to_blocks(q, K, Tp), _keys_to_blocks(k, Sp), _keys_to_blocks(v, Sp), spec, plan


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(static: _Static, q, k, v, spec: MaskSpec):
    return _flash_forward(static, q, k, v, spec)[0]


def _flash_forward(static, q, k, v, spec):
    q_blocks, k_blocks, v_blocks, padded_spec, plan = _blocks(static, q, k, v, spec)
    out, lse = _forward(static, q_blocks, k_blocks, v_blocks, padded_spec, plan)
    result = _queries_from_blocks(out, static.T).astype(q.dtype)
    return result, (q, k, v, spec, result, lse)


def _flash_backward(static, residuals, d_out):
    q, k, v, spec, out, lse = residuals
    q_blocks, k_blocks, v_blocks, padded_spec, plan = _blocks(static, q, k, v, spec)
    K, Tp = k.shape[2], q_blocks.shape[3]
    out_blocks = _queries_to_blocks(out.astype(jnp.float32), K, Tp)
    dq, dk, dv = _backward(
        static, q_blocks, k_blocks, v_blocks, padded_spec, plan, out_blocks, lse, _queries_to_blocks(d_out, K, Tp)
    )
    return (
        _queries_from_blocks(dq, static.T).astype(q.dtype),
        _keys_from_blocks(dk, static.S).astype(k.dtype),
        _keys_from_blocks(dv, static.S).astype(v.dtype),
        None,
    )


_flash.defvjp(_flash_forward, _flash_backward)


def _prepare(q, k, v, block_q, block_kv, masking):
    shapes, spec, scale = resolve_call(q, k, v, **masking)
    if block_q < 1 or block_kv < 1:
        raise ValueError(f"block sizes must be >= 1, got block_q={block_q}, block_kv={block_kv}")
    static = _Static(scale=scale, block_q=min(block_q, shapes.T), block_kv=min(block_kv, shapes.S), T=shapes.T, S=shapes.S)
    return static, spec


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
    q_segment_ids=None,
    kv_segment_ids=None,
    scale=None,
    block_q: int = DEFAULT_BLOCK_Q,
    block_kv: int = DEFAULT_BLOCK_KV,
):
    """Blockwise attention with the arguments, shapes and numerics of ``multi_head_attention``.

    q ``[B, T, H, D]``, k ``[B, S, K, D]``, v ``[B, S, K, E]`` -> ``[B, T, H, E]``.
    Memory is O(T + S) per head instead of O(T S); key blocks hidden from a query block
    (``flash_block_map``) are skipped. ``block_q``/``block_kv`` are clipped to T/S; T and
    S need not be multiples of them.
    """
    static, spec = _prepare(q, k, v, block_q, block_kv, dict(
        mask=mask, is_causal=is_causal, q_positions=q_positions, kv_positions=kv_positions, kv_lengths=kv_lengths,
        window=window, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, scale=scale,
    ))
    return _flash(static, q, k, v, spec)


def flash_block_plan(q, k, v, *, block_q: int = DEFAULT_BLOCK_Q, block_kv: int = DEFAULT_BLOCK_KV, **masking):
    """The kernel's own plan for a call: ``(visited, whole)``, bool ``[nq, nk]`` each: which
    block pairs it computes (forward; the backward visits the same), and which of those it
    computes without a mask because every query sees every key. Takes ``flash_attention``'s
    arguments."""
    static, spec = _prepare(q, k, v, block_q, block_kv, masking)
    return _plan(static, spec)[1]


def flash_block_map(q, k, v, *, block_q: int = DEFAULT_BLOCK_Q, block_kv: int = DEFAULT_BLOCK_KV, **masking):
    """The kernel's own visiting plan for a call: bool ``[nq, nk]``, True where query
    block i visits key block j (forward pass; the backward visits the same pairs).

    Takes the arguments of ``flash_attention``. ``.sum()`` is the number of block pairs
    the kernel computes, out of ``nq * nk``.
    """
    return flash_block_plan(q, k, v, block_q=block_q, block_kv=block_kv, **masking)[0]
