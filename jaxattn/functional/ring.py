"""Ring attention: one sequence spread over the devices of a mesh axis (Liu et al. 2023,
arXiv 2310.01889).

Each of the n devices on the sequence axis holds a chunk of the queries, keys and values
(with their absolute positions). The key/value chunks travel around the ring with
``lax.ppermute``; at every step each device folds the chunk it holds into the running
softmax of its own queries, with the online softmax of ``softmax.py`` that the flash and
decode kernels use (``fold_block``; each chunk is visited in sub-blocks of at most
``block_kv`` keys, so memory per device is linear in its chunk), and passes it on:

    step 0:  device i attends to chunk i,      then sends it to device i + 1
    step 1:  device i attends to chunk i - 1,  then sends it on
    ...
    step n-1: device i attends to chunk i + 1; every query has seen every key

Masks come from positions (the rule of ``masks.py``, carried by the call's
``AttentionContext``), so any assignment of tokens to devices is correct; sub-blocks that
a device's queries cannot see are skipped. A learned sink starts each query row's softmax
once, on the device that owns the row, not once per hop. With a
causal mask and chunks in order, device i has i + 1 chunks of work and the last device
n: the load is unbalanced. ``zigzag_order`` gives each device one early and one late
chunk (chunks i and 2n - 1 - i), so every device does about the same work.

The backward pass (``jax.custom_vjp``) runs a second ring: the key/value chunks travel
again, together with the gradients of their keys and values, which every device adds to
as they pass; a last hop of the gradients alone brings them back to their owners. No device ever
holds more than its own chunk and one visiting chunk: the sequence is never gathered.

``ring_kernel`` takes global arrays, a context and a mesh and calls ``jax.shard_map``;
``ring_shard_kernel`` is the per-device function for use inside a ``shard_map`` of your
own; ``ring_attention`` and ``ring_attention_shard`` are their keyword forms. Shape letters
as in ``heads.py``; ``n`` is the size of the sequence axis.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec

from jaxattn.functional.heads import check_multi_head_shapes
from jaxattn.functional.masks import AttentionContext
from jaxattn.functional import softmax

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


def ring_work_per_device(T: int, n: int, *, block: int, zigzag: bool, causal: bool = True) -> list[int]:
    """The (query, key) sub-block pairs each of n devices computes over the n steps of one
    forward ring: T tokens, sub-blocks of ``block``, chunks in order or ``zigzag_order``. Counted
    with the same masks and block plan as the kernel (``AttentionContext.block_visibility``):
    the slowest device sets the time of a step."""
    if T % n or (T // n) % block:
        raise ValueError(f"T={T} must split into n={n} chunks of whole sub-blocks of {block}")
    order = np.asarray(zigzag_order(T, n) if zigzag else np.arange(T))
    chunk = T // n
    if not causal:
        return [n * (chunk // block) ** 2] * n
    work = []
    for device in range(n):
        queries = AttentionContext.for_tokens(chunk, order[device * chunk : (device + 1) * chunk])
        work.append(sum(int(queries.with_keys(jnp.asarray(order[source * chunk : (source + 1) * chunk])[None])
                            .block_visibility(block, block).sum()) for source in range(n)))
    return work


class _Chunk(NamedTuple):
    """What travels around the ring: one device's keys, values and what masks them."""

    k: jax.Array  # [B, S_c, K, D]
    v: jax.Array  # [B, S_c, K, E]
    positions: jax.Array | None  # [B|1, S_c]
    lengths: jax.Array | None  # [B|1]: the chunk's keys from kv_lengths[b] on are padding
    segment_ids: jax.Array | None  # [B|1, S_c]


class _Static(NamedTuple):
    axis_name: str
    n: int
    scale: float
    cap: float | None
    block_q: int
    block_kv: int


def _rotate(tree, static: _Static):
    """Sends every array of ``tree`` to the next device of the ring."""
    perm = [(i, (i + 1) % static.n) for i in range(static.n)]
    return jax.tree.map(lambda x: lax.ppermute(x, static.axis_name, perm), tree)


def _against(context: AttentionContext, chunk: _Chunk) -> AttentionContext:
    """This device's queries against the chunk it holds now."""
    return dataclasses.replace(context, S=chunk.k.shape[1], kv_positions=chunk.positions, kv_lengths=chunk.lengths,
                               kv_segment_ids=chunk.segment_ids)


def _visit_pairs(context: AttentionContext, bq: int, bk: int, body, carry):
    """Runs ``body(i, j, masked, carry)`` for every (query sub-block i, key sub-block j) of a
    chunk pair that the mask lets any query see; ``masked`` is False (a static choice: two
    loops) where every query sees every key of the pair, so no mask is built there."""
    visible, complete = context.block_visibility(bq, bk), context.block_completeness(bq, bk)  # [nq, nk]

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


def _fold_chunk(q, state, chunk: _Chunk, context: AttentionContext, static: _Static, K: int):
    """Folds one chunk into the state of the device's queries, sub-block pair by sub-block pair."""
    bq, bk = static.block_q, static.block_kv

    def body(i, j, masked, state):
        rows, keys = i * bq, j * bk
        mask = context.grouped_block_mask(K, rows, bq, keys, bk) if masked else None
        part = softmax.fold_block(_take(q, rows, bq), softmax.SoftmaxState(*(_take(x, rows, bq) for x in state)),
                          _take(chunk.k, keys, bk), _take(chunk.v, keys, bk), mask, head_axis=1, scale=static.scale,
                                  cap=static.cap)
        return softmax.SoftmaxState(*(_put(x, y, rows) for x, y in zip(state, part)))

    return _visit_pairs(context, bq, bk, body, state)


def _chunk_gradients(q, do, lse, delta, chunk: _Chunk, context: AttentionContext, static: _Static, K: int):
    """This device's queries against one chunk: (dq [B, T, K, G, D], dk [B, S_c, K, D], dv)."""
    bq, bk = static.block_q, static.block_kv
    grads = (jnp.zeros(q.shape, jnp.float32), jnp.zeros(chunk.k.shape, jnp.float32), jnp.zeros(chunk.v.shape, jnp.float32))

    def body(i, j, masked, grads):
        dq, dk, dv = grads
        rows, keys = i * bq, j * bk
        mask = context.grouped_block_mask(K, rows, bq, keys, bk) if masked else None
        rows_of = (_take(x, rows, bq) for x in (q, do, lse, delta))
        dq_ij, dk_ij, dv_ij = softmax.block_gradients(*rows_of, _take(chunk.k, keys, bk), _take(chunk.v, keys, bk), mask,
                                                      head_axis=1, scale=static.scale, cap=static.cap)  # per query head
        dq = _put(dq, _take(dq, rows, bq) + dq_ij, rows)
        dk = _put(dk, _take(dk, keys, bk) + dk_ij.sum(3), keys)  # sum the G query heads sharing a K/V head
        dv = _put(dv, _take(dv, keys, bk) + dv_ij.sum(3), keys)
        return dq, dk, dv

    return _visit_pairs(context, bq, bk, body, grads)


def _ring_forward(static: _Static, q, chunk: _Chunk, context: AttentionContext):
    B, T, H, D = q.shape
    K, E = chunk.k.shape[2], chunk.v.shape[3]
    q_s = q.reshape(B, T, K, H // K, D)  # [B, T, K, G, D]

    def step(_, carry):
        state, chunk = carry
        state = _fold_chunk(q_s, state, chunk, _against(context, chunk), static, K)
        return state, _rotate(chunk, static)

    sinks = context.head_sinks(K)  # the sink starts each row's softmax once, not once per hop
    start = softmax.SoftmaxState.start((B, T, K, H // K), E, None if sinks is None else sinks[None, None])
    state, last = lax.fori_loop(0, static.n - 1, step, (start, chunk))
    state = _fold_chunk(q_s, state, last, _against(context, last), static, K)
    out, lse = softmax.online_softmax_finish(state)  # [B, T, K, G, E], [B, T, K, G]
    return out.reshape(B, T, H, E).astype(q.dtype), lse


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(static: _Static, q, chunk: _Chunk, context: AttentionContext):
    return _ring_forward(static, q, chunk, context)[0]


def _ring_fwd(static, q, chunk, context):
    out, lse = _ring_forward(static, q, chunk, context)
    return out, (q, chunk, context, out, lse)


def _ring_bwd(static, residuals, d_out):
    q, chunk, context, out, lse = residuals
    B, T, H, D = q.shape
    K, E = chunk.k.shape[2], chunk.v.shape[3]
    G = H // K
    q_s = q.reshape(B, T, K, G, D)
    do = d_out.reshape(B, T, K, G, E)
    delta = jnp.einsum("btkge,btkge->btkg", do.astype(jnp.float32), out.reshape(B, T, K, G, E).astype(jnp.float32))

    def gradients(chunk):
        return _chunk_gradients(q_s, do, lse, delta, chunk, _against(context, chunk), static, K)

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
    dq = dq.reshape(B, T, H, D)
    d_chunk = _Chunk(dk.astype(chunk.k.dtype), dv.astype(chunk.v.dtype), None, None, None)  # positions etc.: no gradient
    sinks = context.head_sinks(K)
    # This device's rows only: shard_map sums the sinks' cotangent over the devices that share them.
    d_sinks = None if sinks is None else softmax.sink_gradient(sinks[None, None], lse, delta, rows_axes=(0, 1))
    d_sinks = None if d_sinks is None else d_sinks.reshape(H)  # [K, G] -> [H]
    return dq.astype(q.dtype), d_chunk, context.sinks_cotangent(d_sinks)


_ring.defvjp(_ring_fwd, _ring_bwd)


def sub_block_size(size: int, block: int) -> int:
    """The sub-block of a chunk of ``size`` tokens: near-equal sub-blocks of at most ``block``
    tokens covering it (the chunk is padded up to a multiple, by less than one token per
    sub-block): ``sub_block_size(1031, 512) == 344`` (3 sub-blocks, 1 token of padding), where
    a divisor of the prime 1031 would be 1."""
    count = -(-size // min(block, size))
    return -(-size // count)


def ring_shard_kernel(q, k, v, context: AttentionContext, *, axis_name: str, block_q: int = DEFAULT_RING_BLOCK,
                      block_kv: int = DEFAULT_RING_BLOCK):
    """The per-device ring attention, for use inside ``jax.shard_map`` over ``axis_name``.

    This device's chunk: q ``[B, T_c, H, D]``, k ``[B, S_c, K, D]``, v ``[B, S_c, K, E]`` and
    the context of its tokens (positions, segment ids and padding lengths of its queries and keys; the
    sinks of its heads). A chunk pair is computed in near-equal sub-blocks of at most
    ``block_q`` x ``block_kv`` tokens (a chunk whose length they do not divide is padded, and
    the padding masked); sub-blocks no query can see are skipped. Returns this device's
    ``[B, T_c, H, E]``; differentiable in q, k, v and the sinks.
    """
    B, T, S, H, K, D, E = check_multi_head_shapes(q, k, v)
    context = dataclasses.replace(context, T=T, S=S)  # the call's context, as this device sees it
    context.check(B, T, S, H)
    if context.user_mask is not None:
        raise ValueError("ring attention takes no dense mask: describe the call by positions, padding lengths and segment ids")
    if block_q < 1 or block_kv < 1:
        raise ValueError(f"block sizes must be >= 1, got block_q={block_q}, block_kv={block_kv}")
    bq, bk = sub_block_size(T, block_q), sub_block_size(S, block_kv)
    Tp, Sp = -(-T // bq) * bq, -(-S // bk) * bk
    static = _Static(axis_name, lax.axis_size(axis_name), context.logit_scale(D), context.logit_softcap, bq, bk)
    if (Tp, Sp) != (T, S):
        context = context.padded(Tp, Sp)
        q, k, v = (jnp.pad(x, ((0, 0), (0, size - x.shape[1]), (0, 0), (0, 0))) for x, size in ((q, Tp), (k, Sp), (v, Sp)))
    chunk = _Chunk(k, v, context.kv_positions, context.kv_lengths, context.kv_segment_ids)
    return _ring(static, q, chunk, context)[:, :T]


def ring_kernel(q, k, v, context: AttentionContext, *, mesh, seq_axis: str = "seq", batch_axis: str | None = None,
                head_axis: str | None = None, block_q: int = DEFAULT_RING_BLOCK, block_kv: int = DEFAULT_RING_BLOCK):
    """Self-attention over a sequence sharded across ``mesh``'s ``seq_axis``, by ring.

    Global arrays with the shapes and numerics of ``dense_kernel``: q ``[B, T, H, D]``,
    k ``[B, T, K, D]``, v ``[B, T, K, E]`` -> ``[B, T, H, E]``, T divisible by the axis size.
    The token order is the layout: position i of the arrays goes to device ``i // (T / n)``;
    causality follows the context's positions, so reordering the tokens (and their
    positions) with ``zigzag_order`` balances a causal call. ``batch_axis`` / ``head_axis``
    name mesh axes that also shard the batch and the heads (data and tensor parallelism);
    the sinks are split with the heads. A batch or head axis that does not divide B (or H
    and K) is not used (the layout changes, the values do not). ``kv_lengths [B]`` counts
    valid keys in token order.
    """
    B, T, S, H, K, D, E = check_multi_head_shapes(q, k, v)
    if T != S:
        raise ValueError(f"ring attention is self-attention: q and k need the same length, got T={T}, S={S}")
    n = mesh.shape[seq_axis]
    if T % n:
        raise ValueError(f"T={T} tokens cannot be split evenly over the {n} devices of mesh axis {seq_axis!r}")
    context.check(B, T, S, H)
    if batch_axis is not None and B % mesh.shape[batch_axis]:
        batch_axis = None
    if head_axis is not None and (H % mesh.shape[head_axis] or K % mesh.shape[head_axis]):
        head_axis = None
    tokens = PartitionSpec(batch_axis, seq_axis, head_axis, None)

    def rows(x):  # [B|1, T] token arrays: the batch is sharded only when it is really B
        return None if x is None else PartitionSpec(batch_axis if x.shape[0] == B and B > 1 else None, seq_axis)

    lengths = context.kv_lengths  # [B|1]: split with the batch, not the sequence
    specs = dataclasses.replace(
        context, **{name: rows(getattr(context, name)) for name in
                    ("q_positions", "kv_positions", "q_segment_ids", "kv_segment_ids")},
        kv_lengths=None if lengths is None else PartitionSpec(batch_axis if lengths.shape[0] == B and B > 1 else None),
        sinks=None if context.sinks is None else PartitionSpec(head_axis),
    )

    def per_device(q, k, v, context):
        if context.kv_lengths is not None:  # the call's lengths, counted from this device's first key
            S_c = k.shape[1]
            local = context.kv_lengths - lax.axis_index(seq_axis) * S_c
            context = dataclasses.replace(context, kv_lengths=jnp.clip(local, 0, S_c))
        return ring_shard_kernel(q, k, v, context, axis_name=seq_axis, block_q=block_q, block_kv=block_kv)

    run = jax.shard_map(per_device, mesh=mesh, in_specs=(tokens, tokens, tokens, specs), out_specs=tokens,
                        check_vma=False)
    return run(q, k, v, context)


# --------------------------------------------------------------- the keyword edges


def ring_attention_shard(q, k, v, *, axis_name: str, q_positions=None, kv_positions=None, kv_lengths=None,
                         q_segment_ids=None, kv_segment_ids=None, window: int | None = None, scale: float | None = None,
                         logit_softcap: float | None = None, sinks=None, block_q: int = DEFAULT_RING_BLOCK,
                         block_kv: int = DEFAULT_RING_BLOCK):
    """``ring_shard_kernel`` with this device's tokens given as keywords: ``q_positions
    [B|1, T_c]`` and ``kv_positions [B|1, S_c]`` (absolute; given together, they make the
    attention causal), ``kv_lengths [B]`` (this device's keys from ``kv_lengths[b]`` on are padding;
    a padding key elsewhere in a causal call: a position no query reaches), segment ids, and the
    logit side of ``multi_head_attention`` (``sinks``: this device's heads)."""
    if (q_positions is None) != (kv_positions is None):
        raise ValueError("pass both q_positions and kv_positions (causal), or neither")
    context = AttentionContext.from_keywords(
        q, k, is_causal=q_positions is not None, q_positions=q_positions, kv_positions=kv_positions,
        kv_lengths=kv_lengths, window=window,
        q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, scale=scale, logit_softcap=logit_softcap,
        sinks=sinks,
    )
    return ring_shard_kernel(q, k, v, context, axis_name=axis_name, block_q=block_q, block_kv=block_kv)


def ring_attention(q, k, v, *, mesh, seq_axis: str = "seq", batch_axis: str | None = None, head_axis: str | None = None,
                   block_q: int = DEFAULT_RING_BLOCK, block_kv: int = DEFAULT_RING_BLOCK, **keywords):
    """``ring_kernel`` with the call described by the keywords of ``multi_head_attention``
    (except ``mask``: the ring is described by positions, padding lengths and segment ids)."""
    context = AttentionContext.from_keywords(q, k, **keywords)
    return ring_kernel(q, k, v, context, mesh=mesh, seq_axis=seq_axis, batch_axis=batch_axis, head_axis=head_axis,
                       block_q=block_q, block_kv=block_kv)
