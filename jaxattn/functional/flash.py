"""Memory-efficient blockwise ("flash") attention in pure JAX, for any backend.

Standard attention materialises the ``[T, S]`` score matrix of every head. Here the
keys and values are visited one block at a time and the softmax is accumulated online
(``softmax.py``: the running maximum, denominator and numerator of each query row), so
memory is linear in the sequence; the decode kernel (``decode.py``) and ring attention
(``ring.py``) are siblings that use the same online softmax.

Which blocks are visited is decided by ``AttentionContext.block_visibility`` (``masks.py``):
key blocks that causality, the window, the padding, the segment ids or the caller's mask
hide completely from a query block are never visited, so causal attention does about
half the work. Blocks that every query sees entirely (``block_completeness``) are visited
without a mask; inside the others the mask comes from the same context (the rule lives in
``masks.py`` only). Soft-capping bends each block's logits; sinks start each query row's
softmax. The backward pass (``jax.custom_vjp``) saves only the output and the per-row
log-sum-exp and recomputes each block's probabilities ``p = exp(s - lse)``; it returns the
sinks' gradient too.

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

from jaxattn.functional.heads import check_multi_head_shapes
from jaxattn.functional.masks import AttentionContext
from jaxattn.functional.softmax import (
    SoftmaxState,
    block_gradients,
    fold_block,
    online_softmax_finish,
    sink_gradient,
)

DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_KV = 256  # measured on 2 CPU cores, T = 4096: (512, 256) beat 256², 512² and (1024, 512)


# ----------------------------------------------------------------- block layout


class _Static(NamedTuple):
    """Everything about a call that shapes the program (hashable, not traced)."""

    scale: float
    cap: float | None
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


def visit_list(visible_row):
    """The indices of the True entries of a bool ``[n]``, first, and how many there are."""
    n = visible_row.shape[0]
    (order,) = jnp.nonzero(visible_row, size=n, fill_value=0)
    return order, visible_row.sum()


# ------------------------------------------------------------------ forward, backward


def _forward(static: _Static, q, k, v, context: AttentionContext, plan):
    """q ``[B, K, G, Tp, D]``, k/v ``[B, K, Sp, D|E]`` -> out ``[B, K, G, Tp, E]``, lse ``[B, K, G, Tp]``."""
    B, K, G, Tp, _ = q.shape
    E = v.shape[-1]
    bq, bk = static.block_q, static.block_kv
    visible, complete = plan
    sinks = context.head_sinks(K)
    sinks = None if sinks is None else sinks[None, :, :, None]  # [1, K, G, 1]

    def query_block(i):
        q_start = i * bq
        q_block = lax.dynamic_slice_in_dim(q, q_start, bq, axis=3)  # [B, K, G, bq, D]

        def key_blocks(blocks, masked, state):
            order, count = visit_list(blocks)

            def key_block(t, state):
                kv_start = order[t] * bk
                k_block = lax.dynamic_slice_in_dim(k, kv_start, bk, axis=2)  # [B, K, bk, D]
                v_block = lax.dynamic_slice_in_dim(v, kv_start, bk, axis=2)  # [B, K, bk, E]
                mask = context.grouped_block_mask(K, q_start, bq, kv_start, bk) if masked else None
                return fold_block(q_block, state, k_block, v_block, mask, head_axis=0, scale=static.scale,
                                  cap=static.cap)

            return lax.fori_loop(0, count, key_block, state)

        state = SoftmaxState.start((B, K, G, bq), E, sinks)
        state = key_blocks(complete[i], False, state)  # every query sees every key: no mask to build
        state = key_blocks(visible[i] & ~complete[i], True, state)  # the partly masked blocks
        return online_softmax_finish(state)

    nq = Tp // bq
    out, lse = lax.map(query_block, jnp.arange(nq))  # [nq, B, K, G, bq, E], [nq, B, K, G, bq]
    out = jnp.moveaxis(out, 0, 3).reshape(B, K, G, Tp, E)
    lse = jnp.moveaxis(lse, 0, 3).reshape(B, K, G, Tp)
    return out, lse


def _backward(static: _Static, q, k, v, context: AttentionContext, plan, out, lse, d_out):
    """Gradients dq ``[B, K, G, Tp, D]``, dk ``[B, K, Sp, D]``, dv ``[B, K, Sp, E]`` (float32)
    and d sinks ``[K, G]`` (or ``None``)."""
    B, K, G, Tp, D = q.shape
    E = v.shape[-1]
    bq, bk = static.block_q, static.block_kv
    nk = k.shape[2] // bk
    visible, complete = plan
    delta = jnp.einsum("bkgte,bkgte->bkgt", d_out.astype(jnp.float32), out)  # [B, K, G, Tp]

    def key_block(dq_total, j):
        kv_start = j * bk
        k_block = lax.dynamic_slice_in_dim(k, kv_start, bk, axis=2)  # [B, K, bk, D]
        v_block = lax.dynamic_slice_in_dim(v, kv_start, bk, axis=2)

        def query_blocks(blocks, masked, carry):
            order, count = visit_list(blocks)

            def query_block(t, carry):
                dq_total, dk, dv = carry
                q_start = order[t] * bq
                take = lambda x: lax.dynamic_slice_in_dim(x, q_start, bq, axis=3)  # noqa: E731
                mask = context.grouped_block_mask(K, q_start, bq, kv_start, bk) if masked else None
                dq, dk_heads, dv_heads = block_gradients(take(q), take(d_out), take(lse), take(delta), k_block, v_block,
                                                         mask, head_axis=0, scale=static.scale, cap=static.cap)
                dq_total = lax.dynamic_update_slice_in_dim(dq_total, take(dq_total) + dq, q_start, axis=3)
                return dq_total, dk + dk_heads.sum(axis=2), dv + dv_heads.sum(axis=2)  # sum the G queries sharing K/V

            return lax.fori_loop(0, count, query_block, carry)

        carry = (dq_total, jnp.zeros((B, K, bk, D), jnp.float32), jnp.zeros((B, K, bk, E), jnp.float32))
        carry = query_blocks(complete[:, j], False, carry)
        dq_total, dk, dv = query_blocks(visible[:, j] & ~complete[:, j], True, carry)
        return dq_total, (dk, dv)

    dq, (dk, dv) = lax.scan(key_block, jnp.zeros((B, K, G, Tp, D), jnp.float32), jnp.arange(nk))
    dk = jnp.moveaxis(dk, 0, 2).reshape(B, K, nk * bk, D)
    dv = jnp.moveaxis(dv, 0, 2).reshape(B, K, nk * bk, E)
    sinks = context.head_sinks(K)
    d_sinks = None if sinks is None else sink_gradient(sinks[None, :, :, None], lse, delta, rows_axes=(0, 3))  # [K, G]
    return dq, dk, dv, d_sinks


def _plan(static: _Static, context: AttentionContext):
    """The context padded to whole blocks, and its plan: which block pairs are visited
    (``[nq, nk]``) and which of those need no mask."""
    Tp, Sp = static.padded
    context = context.padded(Tp, Sp)
    bq, bk = static.block_q, static.block_kv
    return context, (context.block_visibility(bq, bk), context.block_completeness(bq, bk))


def _blocks(static: _Static, q, k, v, context: AttentionContext):
    """The padded head-major operands, the padded context and its plan."""
    Tp, Sp = static.padded
    K = k.shape[2]
    context, plan = _plan(static, context)
    return _queries_to_blocks(q, K, Tp), _keys_to_blocks(k, Sp), _keys_to_blocks(v, Sp), context, plan


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(static: _Static, q, k, v, context: AttentionContext):
    return _flash_forward(static, q, k, v, context)[0]


def _flash_forward(static, q, k, v, context):
    q_blocks, k_blocks, v_blocks, padded, plan = _blocks(static, q, k, v, context)
    out, lse = _forward(static, q_blocks, k_blocks, v_blocks, padded, plan)
    result = _queries_from_blocks(out, static.T).astype(q.dtype)
    return result, (q, k, v, context, result, lse)


def _flash_backward(static, residuals, d_out):
    q, k, v, context, out, lse = residuals
    q_blocks, k_blocks, v_blocks, padded, plan = _blocks(static, q, k, v, context)
    K, Tp = k.shape[2], q_blocks.shape[3]
    out_blocks = _queries_to_blocks(out.astype(jnp.float32), K, Tp)
    dq, dk, dv, d_sinks = _backward(
        static, q_blocks, k_blocks, v_blocks, padded, plan, out_blocks, lse, _queries_to_blocks(d_out, K, Tp)
    )
    return (
        _queries_from_blocks(dq, static.T).astype(q.dtype),
        _keys_from_blocks(dk, static.S).astype(k.dtype),
        _keys_from_blocks(dv, static.S).astype(v.dtype),
        context.sinks_cotangent(None if d_sinks is None else d_sinks.reshape(-1)),
    )


_flash.defvjp(_flash_forward, _flash_backward)


def _static(q, k, v, context: AttentionContext, block_q: int, block_kv: int) -> _Static:
    B, T, S, H, K, D, E = check_multi_head_shapes(q, k, v)
    context.check(B, T, S, H)
    if block_q < 1 or block_kv < 1:
        raise ValueError(f"block sizes must be >= 1, got block_q={block_q}, block_kv={block_kv}")
    return _Static(scale=context.logit_scale(D), cap=context.logit_softcap, block_q=min(block_q, T),
                   block_kv=min(block_kv, S), T=T, S=S)


def flash_kernel(q, k, v, context: AttentionContext, *, block_q: int = DEFAULT_BLOCK_Q,
                 block_kv: int = DEFAULT_BLOCK_KV):
    """Blockwise attention with the shapes and numerics of ``dense_kernel``.

    q ``[B, T, H, D]``, k ``[B, S, K, D]``, v ``[B, S, K, E]`` -> ``[B, T, H, E]``.
    Memory is O(T + S) per head instead of O(T S); key blocks hidden from a query block
    (``flash_block_map``) are skipped. ``block_q``/``block_kv`` are clipped to T/S; T and
    S need not be multiples of them. Differentiable in q, k, v and the context's sinks.
    """
    return _flash(_static(q, k, v, context, block_q, block_kv), q, k, v, context)


def flash_attention(q, k, v, *, block_q: int = DEFAULT_BLOCK_Q, block_kv: int = DEFAULT_BLOCK_KV, **keywords):
    """``flash_kernel`` with the call described by the keywords of ``multi_head_attention``."""
    return flash_kernel(q, k, v, AttentionContext.from_keywords(q, k, **keywords), block_q=block_q, block_kv=block_kv)


def flash_block_plan(q, k, v, *, block_q: int = DEFAULT_BLOCK_Q, block_kv: int = DEFAULT_BLOCK_KV, **keywords):
    """The kernel's own plan for a call: ``(visited, whole)``, bool ``[nq, nk]`` each: which
    block pairs it computes (forward; the backward visits the same), and which of those it
    computes without a mask because every query sees every key. Takes ``flash_attention``'s
    arguments."""
    context = AttentionContext.from_keywords(q, k, **keywords)
    return _plan(_static(q, k, v, context, block_q, block_kv), context)[1]


def flash_block_map(q, k, v, *, block_q: int = DEFAULT_BLOCK_Q, block_kv: int = DEFAULT_BLOCK_KV, **keywords):
    """The kernel's own visiting plan for a call: bool ``[nq, nk]``, True where query
    block i visits key block j (forward pass; the backward visits the same pairs).

    Takes the arguments of ``flash_attention``. ``.sum()`` is the number of block pairs
    the kernel computes, out of ``nq * nk``.
    """
    return flash_block_plan(q, k, v, block_q=block_q, block_kv=block_kv, **keywords)[0]
