"""Ring attention: one sequence spread over the devices of a mesh axis (Liu et al. 2023,
arXiv 2310.01889).

Each of the n devices on the sequence axis holds a chunk of the queries, keys and values
(with their absolute positions). The key/value chunks travel around the ring with
``lax.ppermute``; at every step each device folds the chunk it holds into the running
softmax of its own queries, the same online softmax as ``flash_attention``
(``fold_block``; each chunk is visited in sub-blocks of ``block_kv`` keys, so memory per
device is linear in its chunk), and passes it on:

    step 0:  device i attends to chunk i,      then sends it to device i + 1
    step 1:  device i attends to chunk i - 1,  then sends it on
    ...
    step n-1: device i attends to chunk i + 1; every query has seen every key

Masks come from positions (the rule of ``masks.py``), so any assignment of tokens to
devices is correct; sub-blocks that a device's queries cannot see are skipped. With a
causal mask and chunks in order, device i has i + 1 chunks of work and the last device
n: the load is unbalanced. ``zigzag_order`` gives each device one early and one late
chunk (chunks i and 2n - 1 - i), so every device does about the same work.

The backward pass (``jax.custom_vjp``) runs a second ring: the key/value chunks travel
again, together with the gradients of their keys and values, which every device adds to
as they pass; a last hop of the gradients alone brings them back to their owners. No device ever
holds more than its own chunk and one visiting chunk: the sequence is never gathered.

``ring_attention`` takes global arrays and a mesh and calls ``jax.shard_map``;
``ring_attention_shard`` is the per-device function for use inside a ``shard_map`` of your
own. Shape letters as in ``attention.py``; ``n`` is the size of the sequence axis.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec

from jaxattn.functional.attention import check_multi_head_shapes, default_scale
from jaxattn.functional.flash import (
    SoftmaxState,
    block_gradients,
    fold_block,
    grouped_block_mask,
    online_softmax_finish,
    scaled_queries,
)
from jaxattn.functional.masks import MaskSpec, check_window, padding_mask

DEFAULT_RING_BLOCK = 512


def zigzag_order(T: int, n: int):
    """A load-balanced causal layout: int32 ``[T]``, the tokens in the order to shard them.

    The sequence is cut into 2n equal chunks and device i gets chunks i and 2n - 1 - i, so
    under a causal mask every device has the same amount of work (one early chunk with
    little to see, one late chunk with much). ``x[:, order]`` lays a ``[B, T, ...]`` array
    out; ``argsort(order)`` undoes it.
    """
    if T % (2 * n):
        raise ValueError(f"the zigzag layout cuts T={T} into 2n={2 * n} equal chunks: T must be a multiple of {2 * n}")
    chunks = np.arange(T).reshape(2 * n, T // (2 * n))
    return jnp.asarray(np.concatenate([np.concatenate([chunks[i], chunks[2 * n - 1 - i]]) for i in range(n)]), jnp.int32)


class _Chunk(NamedTuple):
    """What travels around the ring: one device's keys, values and what masks them."""

    k: jax.Array  # [B, S_c, K, D]
    v: jax.Array  # [B, S_c, K, E]
    positions: jax.Array | None  # [B|1, S_c]
    valid: jax.Array | None  # [B|1, S_c]
    segment_ids: jax.Array | None  # [B|1, S_c]


class _Static(NamedTuple):
    axis_name: str
    n: int
    scale: float
    block_q: int
    block_kv: int
    window: int | None


def _rotate(tree, static: _Static):
    """Sends every array of ``tree`` to the next device of the ring."""
    perm = [(i, (i + 1) % static.n) for i in range(static.n)]
    return jax.tree.map(lambda x: lax.ppermute(x, static.axis_name, perm), tree)


def _spec(q_positions, q_segment_ids, chunk: _Chunk, static: _Static, T: int) -> MaskSpec:
    return MaskSpec(T=T, S=chunk.k.shape[1], q_positions=q_positions, kv_positions=chunk.positions, kv_valid=chunk.valid,
                    q_segment_ids=q_segment_ids, kv_segment_ids=chunk.segment_ids, window=static.window)


def _visit_pairs(spec: MaskSpec, bq: int, bk: int, body, carry):
    """Runs ``body(i, j, masked, carry)`` for every (query sub-block i, key sub-block j) of a
    chunk pair that the mask lets any query see; ``masked`` is False (a static choice: two
    loops) where every query sees every key of the pair, so no mask is built there."""
    visible, complete = spec.block_visibility(bq, bk), spec.block_completeness(bq, bk)  # [nq, nk]

    def query_block(i, carry):
        for masked, blocks in ((False, complete[i]), (True, visible[i] & ~complete[i])):
            (order,) = jnp.nonzero(blocks, size=blocks.shape[0], fill_value=0)
            carry = lax.fori_loop(0, blocks.sum(), lambda t, c, masked=masked: body(i, order[t], masked, c), carry)
        return carry

    return lax.fori_loop(0, visible.shape[0], query_block, carry)


def _take(x, start, size):
    return lax.dynamic_slice_in_dim(x, start, size, axis=1)


def _put(x, update, start):
    return lax.dynamic_update_slice_in_dim(x, update, start, axis=1)


def _fold_chunk(q, state, chunk: _Chunk, spec: MaskSpec, static: _Static, K: int):
    """Folds one chunk into the state of the device's queries, sub-block pair by sub-block pair."""
    bq, bk = static.block_q, static.block_kv

    def body(i, j, masked, state):
        rows, keys = i * bq, j * bk
        mask = grouped_block_mask(spec, K, rows, bq, keys, bk) if masked else None
        part = fold_block(_take(q, rows, bq), SoftmaxState(*(_take(x, rows, bq) for x in state)),
                          _take(chunk.k, keys, bk), _take(chunk.v, keys, bk), mask, head_axis=1)
        return SoftmaxState(*(_put(x, y, rows) for x, y in zip(state, part)))

    return _visit_pairs(spec, bq, bk, body, state)


def _chunk_gradients(q, do, lse, delta, chunk: _Chunk, spec: MaskSpec, static: _Static, K: int):
    """This device's queries against one chunk: (dq [B, T, K, G, D], dk [B, S_c, K, D], dv)."""
    bq, bk = static.block_q, static.block_kv
    grads = (jnp.zeros(q.shape, jnp.float32), jnp.zeros(chunk.k.shape, jnp.float32), jnp.zeros(chunk.v.shape, jnp.float32))

    def body(i, j, masked, grads):
        dq, dk, dv = grads
        rows, keys = i * bq, j * bk
        mask = grouped_block_mask(spec, K, rows, bq, keys, bk) if masked else None
        dq_ij, dk_ij, dv_ij = block_gradients(*(_take(x, rows, bq) for x in (q, do, lse, delta)), _take(chunk.k, keys, bk),
                                              _take(chunk.v, keys, bk), mask, head_axis=1)  # dk, dv per query head
        dq = _put(dq, _take(dq, rows, bq) + dq_ij, rows)
        dk = _put(dk, _take(dk, keys, bk) + dk_ij.sum(3), keys)  # sum the G query heads sharing a K/V head
        dv = _put(dv, _take(dv, keys, bk) + dv_ij.sum(3), keys)
        return dq, dk, dv

    return _visit_pairs(spec, bq, bk, body, grads)


def _ring_forward(static: _Static, q, chunk: _Chunk, q_positions, q_segment_ids):
    B, T, H, D = q.shape
    K, E = chunk.k.shape[2], chunk.v.shape[3]
    q_s = scaled_queries(q, static.scale).reshape(B, T, K, H // K, D)  # [B, T, K, G, D]

    def step(_, carry):
        state, chunk = carry
        state = _fold_chunk(q_s, state, chunk, _spec(q_positions, q_segment_ids, chunk, static, T), static, K)
        return state, _rotate(chunk, static)

    state, last = lax.fori_loop(0, static.n - 1, step, (SoftmaxState.empty((B, T, K, H // K), E), chunk))
    state = _fold_chunk(q_s, state, last, _spec(q_positions, q_segment_ids, last, static, T), static, K)
    out, lse = online_softmax_finish(state)  # [B, T, K, G, E], [B, T, K, G]
    return out.reshape(B, T, H, E).astype(q.dtype), lse


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(static: _Static, q, chunk: _Chunk, q_positions, q_segment_ids):
    return _ring_forward(static, q, chunk, q_positions, q_segment_ids)[0]


def _ring_fwd(static, q, chunk, q_positions, q_segment_ids):
    out, lse = _ring_forward(static, q, chunk, q_positions, q_segment_ids)
    return out, (q, chunk, q_positions, q_segment_ids, out, lse)


def _ring_bwd(static, residuals, d_out):
    q, chunk, q_positions, q_segment_ids, out, lse = residuals
    B, T, H, D = q.shape
    K, E = chunk.k.shape[2], chunk.v.shape[3]
    G = H // K
    q_s = scaled_queries(q, static.scale).reshape(B, T, K, G, D)
    do = d_out.reshape(B, T, K, G, E)
    delta = jnp.einsum("btkge,btkge->btkg", do.astype(jnp.float32), out.reshape(B, T, K, G, E).astype(jnp.float32))

    def gradients(chunk):
        spec = _spec(q_positions, q_segment_ids, chunk, static, T)
        return _chunk_gradients(q_s, do, lse, delta, chunk, spec, static, K)

    def step(_, carry):
        dq, chunk, dk, dv = carry
        dq_c, dk_c, dv_c = gradients(chunk)
        chunk, dk, dv = _rotate((chunk, dk + dk_c, dv + dv_c), static)  # the chunk moves on with its gradients
        return dq + dq_c, chunk, dk, dv

    zeros = (jnp.zeros(q_s.shape, jnp.float32), chunk, jnp.zeros(chunk.k.shape, jnp.float32),
             jnp.zeros(chunk.v.shape, jnp.float32))
    dq, chunk, dk, dv = lax.fori_loop(0, static.n - 1, step, zeros)
    dq_c, dk_c, dv_c = gradients(chunk)
    dk, dv = _rotate((dk + dk_c, dv + dv_c), static)  # the n-th move: only the gradients travel, and arrive home
    dq = dq + dq_c
    dq = (dq * static.scale).reshape(B, T, H, D)
    d_chunk = _Chunk(dk.astype(chunk.k.dtype), dv.astype(chunk.v.dtype), None, None, None)  # positions etc.: no gradient
    return dq.astype(q.dtype), d_chunk, None, None


_ring.defvjp(_ring_fwd, _ring_bwd)


def ring_attention_shard(
    q,
    k,
    v,
    *,
    axis_name: str,
    q_positions=None,
    kv_positions=None,
    kv_valid=None,
    q_segment_ids=None,
    kv_segment_ids=None,
    window: int | None = None,
    scale: float | None = None,
    block_q: int = DEFAULT_RING_BLOCK,
    block_kv: int = DEFAULT_RING_BLOCK,
):
    """The per-device ring attention, for use inside ``jax.shard_map`` over ``axis_name``.

    This device's chunk: q ``[B, T_c, H, D]``, k ``[B, S_c, K, D]``, v ``[B, S_c, K, E]``;
    ``q_positions [B|1, T_c]`` and ``kv_positions [B|1, S_c]`` (absolute; given together,
    they make the attention causal), ``kv_valid [B|1, S_c]`` (padding), segment ids
    ``[B|1, T_c]`` / ``[B|1, S_c]``. A chunk pair is computed in sub-blocks of the largest
    sizes up to ``block_q`` / ``block_kv`` that divide T_c / S_c; sub-blocks no query can see
    are skipped. Returns this device's ``[B, T_c, H, E]``.
    """
    shapes = check_multi_head_shapes(q, k, v)
    if (q_positions is None) != (kv_positions is None):
        raise ValueError("pass both q_positions and kv_positions (causal), or neither")
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("pass both q_segment_ids and kv_segment_ids, or neither")
    if window is not None and q_positions is None:
        raise ValueError(f"window={window} is a causal sliding window: pass positions with it")
    check_window(window)
    if block_q < 1 or block_kv < 1:
        raise ValueError(f"block sizes must be >= 1, got block_q={block_q}, block_kv={block_kv}")

    def tile(size, block):  # the largest sub-block up to `block` that tiles the chunk
        return max(b for b in range(1, min(block, size) + 1) if size % b == 0)

    static = _Static(axis_name, lax.axis_size(axis_name), default_scale(shapes.D, scale), tile(shapes.T, block_q),
                     tile(shapes.S, block_kv), window)

    def as_rows(x, length):
        return None if x is None else jnp.asarray(x).reshape(-1, length)

    chunk = _Chunk(k, v, as_rows(kv_positions, shapes.S), as_rows(kv_valid, shapes.S), as_rows(kv_segment_ids, shapes.S))
    return _ring(static, q, chunk, as_rows(q_positions, shapes.T), as_rows(q_segment_ids, shapes.T))


def ring_attention(
    q,
    k,
    v,
    *,
    mesh,
    seq_axis: str = "seq",
    batch_axis: str | None = None,
    head_axis: str | None = None,
    is_causal: bool = False,
    q_positions=None,
    kv_positions=None,
    kv_lengths=None,
    window: int | None = None,
    q_segment_ids=None,
    kv_segment_ids=None,
    scale: float | None = None,
    block_q: int = DEFAULT_RING_BLOCK,
    block_kv: int = DEFAULT_RING_BLOCK,
):
    """Self-attention over a sequence sharded across ``mesh``'s ``seq_axis``, by ring.

    Global arrays with the arguments and numerics of ``multi_head_attention``: q
    ``[B, T, H, D]``, k ``[B, T, K, D]``, v ``[B, T, K, E]`` -> ``[B, T, H, E]``, T divisible
    by the axis size. The token order is the layout: position i of the arrays goes to
    device ``i // (T / n)``; causality follows ``q_positions``/``kv_positions`` (default
    ``arange(T)``), so reordering the tokens (and their positions) with ``zigzag_order``
    balances a causal call. ``batch_axis`` / ``head_axis`` name mesh axes that also shard
    the batch and the heads (data and tensor parallelism). ``kv_lengths [B]`` counts valid
    keys in token order.
    """
    shapes = check_multi_head_shapes(q, k, v)
    B, T, S = shapes.B, shapes.T, shapes.S
    if T != S:
        raise ValueError(f"ring attention is self-attention: q and k need the same length, got T={T}, S={S}")
    n = mesh.shape[seq_axis]
    if T % n:
        raise ValueError(f"T={T} tokens cannot be split evenly over the {n} devices of mesh axis {seq_axis!r}")
    spec = MaskSpec.resolve(B=B, T=T, S=S, H=shapes.H, is_causal=is_causal, q_positions=q_positions,
                            kv_positions=kv_positions, window=window, q_segment_ids=q_segment_ids,
                            kv_segment_ids=kv_segment_ids)
    kv_valid = None if kv_lengths is None else padding_mask(jnp.asarray(kv_lengths), S)
    tokens = PartitionSpec(batch_axis, seq_axis, head_axis, None)

    def rows(x):  # [B|1, T] token arrays: the batch is sharded only when it is really B
        return None if x is None else PartitionSpec(batch_axis if x.shape[0] == B and B > 1 else None, seq_axis)

    extras = dict(q_positions=spec.q_positions, kv_positions=spec.kv_positions, kv_valid=kv_valid,
                  q_segment_ids=spec.q_segment_ids, kv_segment_ids=spec.kv_segment_ids)
    present = {name: x for name, x in extras.items() if x is not None}

    def per_device(q, k, v, present):
        return ring_attention_shard(q, k, v, axis_name=seq_axis, window=window, scale=scale, block_q=block_q,
                                    block_kv=block_kv, **present)

    run = jax.shard_map(per_device, mesh=mesh, in_specs=(tokens, tokens, tokens, {n: rows(x) for n, x in present.items()}),
                        out_specs=tokens, check_vma=False)
    return run(q, k, v, present)
