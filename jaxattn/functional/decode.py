"""Decode attention: a few new queries against a cache, paying for the tokens it holds.

A decode step has T = 1 (or a few) queries and a preallocated cache of S_max slots, of
which each row holds ``kv_lengths[b]``. ``multi_head_attention`` would score, mask and
average all S_max slots; ``flash_attention`` would also transpose and pad the whole
buffer into its block layout. Here the keys are visited block by block, in the cache's
own layout ``[B, S, K, D]``, by a loop whose trip count is *traced*:

    for j in 0 .. ceil(max_b kv_lengths[b] / bk) - 1:      (a while loop, not unrolled)
        k_j, v_j = cache[:, j bk : (j + 1) bk]             (a dynamic slice: no copy of the buffer)
        state = online_softmax_step(scores(q, k_j), v_j, mask_j, state)

(a cache of at most one block, ``S <= bk``, is that one block, without the loop: measured on
GPT-2 small's decode, a step of 38.6 ms became 35.5 ms, the loop's dispatch gone), with the
online softmax of ``softmax.py`` (the same functions as the flash kernel: soft-cap,
sinks) and the block's mask from the call's ``AttentionContext`` (the same rule as every
kernel: causal on absolute positions, so a step is aligned bottom-right; window; padding).
A step therefore costs what the longest row holds, whatever the capacity. GQA/MQA read each K/V head once for its G queries;
MLA's absorbed path passes its key as two parts, ``[c_kv; k_r]``, whose scores add, and
its buffers as they are, ``[B, S, L]`` (one head for all queries), so the latent cache is
never concatenated, reshaped or copied.

A **paged** cache (``PagedKVCache``, the serving engine's) keeps every sequence's tokens in
pages of a shared pool ``[P, page, K, D]``, found through the sequence's page table (the
context's ``kv_pages [B, N]``). The same loop then visits m = block_kv / page pages per
step, gathering pages ``kv_pages[b, j m : (j + 1) m]`` of every row ``b`` (``[B, m page, K,
D]``: the pages in use, never the whole pool), with the same mask and the same online
softmax. A call of any T (one decode step,
a few speculative tokens, a chunk of a long prompt) reads a paged cache this way.

An **int8** cache (``Int8Tokens``: int8 values, a scale per token and head) is read the same
way: the block's values and scales are sliced (or gathered) and multiplied out, ``[B, bk, K, D]``
in the queries' dtype, so the whole buffer is never dequantized and the loop reads about a quarter
of a float32 cache's bytes.

Forward only: this is the inference path (training uses ``flash_kernel``). Shape
letters as in ``heads.py``; ``bk`` is the key block (m whole pages, for a paged cache).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxattn.functional.heads import check_multi_head_shapes, group_heads, vmap_heads
from jaxattn.functional.kv_cache import Int8Tokens, dequantize_tokens
from jaxattn.functional.masks import AttentionContext, combine_masks
from jaxattn.functional.softmax import (
    SoftmaxState,
    block_logits,
    online_softmax_finish,
    online_softmax_step,
)

DEFAULT_DECODE_BLOCK = 512  # measured: see benchmarks/decode.py
DEFAULT_PAGED_BLOCK = 256  # measured on the engine's decode step (benchmarks/serve.py): pages are gathered,
# so a block past a row's length costs a copy; 128-256 tokens were fastest, 512 17% slower
# The model uses this kernel for calls with a cache of at most this many new tokens
# (one decode step, a few speculative tokens); longer calls (a prompt) use the blockwise
# or dense kernel. Measured in benchmarks/decode.py ("threshold").
DECODE_MAX_TOKENS = 16
# A call of at most this many queries forms its logits keys first, ``block_logits(k, q).T``
# (the same products): XLA's CPU backend then reads each key block in its own layout, where
# with the queries first it copied every block transposed before the product (the copy was
# the costliest op of a step after the matrix products). Measured on benchmarks/serve.py's
# model (heads of 64), one row: generate's step 0.80-0.83 -> 0.72-0.77 ms at 50 tokens held,
# 1.35-1.45 -> 1.16-1.24 ms at 400; on benchmarks/decode.py's GQA model (heads of 32, 1,000
# tokens held) no change. A 128-token prefill chunk was ~10% slower keys first: larger calls
# keep the queries first.
KEYS_FIRST_MAX_TOKENS = DECODE_MAX_TOKENS


def _parts(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _described(x, dtype):
    """Keys or values as the kernel's checks see them: an int8 cache's ``Int8Tokens`` stands for
    floats of the queries' dtype."""
    return jax.ShapeDtypeStruct(x.shape, dtype) if isinstance(x, Int8Tokens) else x


def _with_head_axis(x):
    """``[B, S, D]`` (one key/value head for every query) described as ``[B, S, 1, D]``, without touching it."""
    return jax.ShapeDtypeStruct(x.shape[:2] + (1,) + x.shape[2:], x.dtype) if x.ndim == 3 else x


def _read(x, take, dtype):
    """One block of keys or values: ``take`` applied to x (to values and scales alike for an int8
    cache, which is then dequantized: this block only), as ``[B, bk, K|1, D]`` in ``dtype``."""
    block = dequantize_tokens(jax.tree.map(take, x), dtype)
    return block[:, :, None] if block.ndim == 3 else block


def _block(x, start, size, dtype):
    """Keys ``start .. start + size`` of ``[B, S, K, D]`` or ``[B, S, D]``, as ``[B, size, K|1, D]``."""
    return _read(x, lambda leaf: lax.dynamic_slice_in_dim(leaf, start, size, axis=1), dtype)


def _pages(pool, pages, dtype):
    """Pages ``pages[b, :]`` of ``pool [P, page, K, D]`` (or ``[P, page, D]``) for every row b,
    in order: ``[B, m x page, K|1, D]`` for ``pages [B, m]``, a gather of B x m pages."""
    B, m = pages.shape

    def take(leaf):  # [P, page, ...] -> [B, m page, ...]
        block = jnp.take(leaf, pages.reshape(-1), axis=0)  # [B m, page, ...]
        return block.reshape((B, m * leaf.shape[1]) + leaf.shape[2:])

    return _read(pool, take, dtype)


def _as_sequences(pool, B: int, S: int):
    """A pool ``[P, page, ...]`` described as the ``[B, S, ...]`` keys it stands for (for the checks)."""
    return jax.ShapeDtypeStruct((B, S) + pool.shape[2:], pool.dtype)


def _check_parts(q_parts, k_parts, v):
    """Each (q part, k part) pair is a multi-head attention's (q, k); returns the sizes of the first."""
    if len(q_parts) != len(k_parts):
        raise ValueError(f"q and k must have as many parts, got {len(q_parts)} and {len(k_parts)}")
    if any(part.ndim == 3 for part in k_parts) != (v.ndim == 3):
        raise ValueError("give keys and values with a head axis [B, S, K, D] or both without one [B, S, D]")
    v = _with_head_axis(v)
    shapes = [check_multi_head_shapes(q, _with_head_axis(k), v) for q, k in zip(q_parts, k_parts)]
    first = shapes[0]
    for part in shapes[1:]:
        if (part.B, part.T, part.S, part.H, part.K) != (first.B, first.T, first.S, first.H, first.K):
            raise ValueError(f"the parts of q and k must share B, T, S, H and K, got {shapes}")
    return first, sum(part.D for part in shapes)


def decode_kernel(q, k, v, context: AttentionContext, *, block_kv: int | None = None,
                  return_visits: bool = False):
    """Attention of a few queries over a cache, visiting only the slots that hold tokens.

    Args:
      q: ``[B, T, H, D]``, or a tuple of parts ``[B, T, H, D_i]`` (MLA: ``(q_latent, q_rope)``).
      k: ``[B, S, K, D]``, or parts ``[B, S, K, D_i]`` matching q's; the scores of the parts add.
        ``[B, S, D]`` (no head axis) is one key head shared by all query heads (MQA).
        With ``context.kv_pages`` set: pools ``[P, page, K, D]`` (or ``[P, page, D]``) instead.
        Any of them may be an int8 cache's ``Int8Tokens``: each block is dequantized as it is read.
      v: ``[B, S, K, E]`` (or ``[B, S, E]`` with keys of that form; a pool with pooled keys).
      context: the call; with ``kv_lengths [B]`` only the first ``max(kv_lengths)`` slots are
        visited; with ``kv_pages [B, N]`` the keys are read from the pools a block of pages at a time
        (S = N x page). Its default scale is ``1/sqrt(sum D_i)``.
      block_kv: keys per block, clipped to S (default ``DEFAULT_DECODE_BLOCK``); with pages, the
        whole pages that fit in it, at least one (default ``DEFAULT_PAGED_BLOCK``).
      return_visits: also return how many key blocks the loop visited (for tests).

    Returns:
      ``[B, T, H, E]`` in q's dtype (and the visit count, int32 ``[]``).
    """
    q_parts, k_parts = _parts(q), _parts(k)
    dtype = q_parts[0].dtype
    pages = context.kv_pages
    if pages is not None:  # pools: check them as the [B, S, ...] keys they stand for
        page_size = k_parts[0].shape[1]
        if pages.ndim != 2 or pages.shape[0] != q_parts[0].shape[0] or any(
                part.shape[1] != page_size for part in (*k_parts, v)):
            raise ValueError(f"a paged call needs pools [P, page, ...] of one page size and kv_pages [B, N]; got "
                             f"k {[part.shape for part in k_parts]}, v {v.shape}, kv_pages {pages.shape}")
        B, S = pages.shape[0], pages.shape[1] * page_size
        shapes, D_total = _check_parts(q_parts, tuple(_as_sequences(_described(part, dtype), B, S) for part in k_parts),
                                       _as_sequences(_described(v, dtype), B, S))
    else:
        shapes, D_total = _check_parts(q_parts, tuple(_described(part, dtype) for part in k_parts), _described(v, dtype))
    B, T, S, H, K, _, E = shapes
    G = H // K
    context.check(B, T, S, H)
    scale, cap = context.logit_scale(D_total), context.logit_softcap
    block_kv = (DEFAULT_DECODE_BLOCK if pages is None else DEFAULT_PAGED_BLOCK) if block_kv is None else block_kv
    if block_kv < 1:
        raise ValueError(f"block_kv must be >= 1, got {block_kv}")
    if pages is None:
        bk = min(block_kv, S)
    else:  # a block is m whole pages
        m = max(1, min(block_kv // page_size, pages.shape[1]))
        bk = m * page_size
    longest = S if context.kv_lengths is None else jnp.minimum(jnp.max(context.kv_lengths), S)
    n_blocks = (longest + bk - 1) // bk  # traced: the loop runs as long as the longest row needs
    q_parts = tuple(part.reshape(B, T, K, G, part.shape[-1]) for part in q_parts)  # [B, T, K, G, D_i]
    keys_first = T <= KEYS_FIRST_MAX_TOKENS

    def one_head(*args):  # q parts [T, D_i], m, l [T], acc [T, E], k parts [bk, D_i], v [bk, E], mask [T, bk], sink
        n = len(q_parts)
        qs, (m, l, acc), ks, (v_block, mask, _) = args[:n], args[n : n + 3], args[n + 3 : 2 * n + 3], args[2 * n + 3 :]
        if keys_first:  # [bk, T] -> [T, bk]: the same products, the keys read in their own layout
            s = block_logits(tuple(ks), tuple(qs), scale=scale, cap=cap).T
        else:
            s = block_logits(tuple(qs), tuple(ks), scale=scale, cap=cap)  # [T, bk]: the parts' products add
        return online_softmax_step(s, v_block, mask, SoftmaxState(m, l, acc))

    def key_block(j, carry):
        state, visits = carry
        start = j * bk
        first = jnp.minimum(start, S - bk)  # the last block is slid back to fit; its older keys are masked
        if pages is None:
            k_blocks = tuple(_block(part, first, bk, dtype) for part in k_parts)  # [B, bk, K, D_i]
            v_block = _block(v, first, bk, dtype)  # [B, bk, K, E]
        else:  # pages first/page .. first/page + m - 1 of every row
            table = lax.dynamic_slice_in_dim(pages, first // page_size, m, axis=1)  # [B, m]
            k_blocks = tuple(_pages(part, table, dtype) for part in k_parts)  # [B, bk, K, D_i]
            v_block = _pages(v, table, dtype)  # [B, bk, K, E]
        unseen = (first + jnp.arange(bk) >= start)[None, None, None]  # [1, 1, 1, bk]: keys no earlier block visited
        mask = combine_masks(context.keys(first, bk).full_mask(), unseen)  # [B|1, H|1, T|1, bk]
        mask = group_heads(jnp.broadcast_to(mask, mask.shape[:2] + (T, bk)), K)  # [B|1, K|1, G|1, T, bk]
        over_heads, mask = vmap_heads(one_head, mask, n_query=len(q_parts) + 3, n_kv=len(k_parts) + 1, head_axis=1)
        state = SoftmaxState(*over_heads(*q_parts, *state, *k_blocks, v_block, mask, None))
        return state, visits + 1

    sinks = context.head_sinks(K)
    init = (SoftmaxState.start((B, T, K, G), E, None if sinks is None else sinks[None, None]), jnp.zeros((), jnp.int32))
    if pages is None and bk == S:  # the whole cache is one block: no loop to dispatch
        state, visits = key_block(0, init)
    else:
        state, visits = lax.fori_loop(0, n_blocks, key_block, init)
    out, _ = online_softmax_finish(state)  # [B, T, K, G, E]
    out = out.reshape(B, T, H, E).astype(q_parts[0].dtype)
    return (out, visits) if return_visits else out


def decode_attention(q, k, v, *, block_kv: int | None = None, return_visits: bool = False, **keywords):
    """``decode_kernel`` with the call described by the keywords of ``multi_head_attention``
    (with ``kv_lengths [B]`` only the first ``max(kv_lengths)`` slots are visited)."""
    context = AttentionContext.from_keywords(q, k, **keywords)
    return decode_kernel(q, k, v, context, block_kv=block_kv, return_visits=return_visits)
