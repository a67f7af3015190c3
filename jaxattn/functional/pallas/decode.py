"""Decode attention as a Pallas kernel: a few new queries against a cache, contiguous or paged,
reading only the blocks each row holds.

One program serves one row b of the batch and one key/value head: its queries are the
T new tokens of the G query heads that share that K/V head, stacked as rows
``[G T, D]`` (so a GQA step is one matrix product per block, not G). It reads its key
blocks from the cache where they are, without copying the cache into another layout:

    grid (B, K): program (b, kh)
    for j < ceil(lengths[b] / bk):                 this row's blocks only (the XLA kernel stops
        k_j, v_j, positions_j = read(b, kh, j)       at the longest row; here each row at its own)
        s = block_logits(q, k_j)                   [G T, bk] float32, scale then soft-cap
        state = online_softmax_step(s, v_j, mask, state)
    out, lse = online_softmax_finish(state)        the sinks join after the kernel

The mask is the rule of every kernel (``masks.visible_keys``): causal on the absolute
positions of the queries (a column) and of the block's keys (a row), the window, and the
row's length. A block past the end of the cache is slid back to end at S, its keys that an
earlier block already read masked (as ``decode.py`` does).

Reading a block is the one thing the chips do differently, so the body takes a ``read``:
on a GPU (Triton) a program loads from the cache in HBM directly (a contiguous block, or one
page through the page table); on a TPU (Mosaic) the cache stays in HBM (``pl.ANY``) and the
program copies a block (or m pages) into VMEM scratch with a DMA, then reads it there.

Served: causal calls over a float cache (``[B, S, K, D]`` or pools ``[P, page, K, D]`` with the
context's ``kv_pages``), lengths, positions, window, scale, soft-cap, sinks, GQA/MQA, head
widths that are powers of two from 16. Not served (``decode_kernel`` is): int8 caches, MLA's
parts, segment ids and a caller's mask. Forward only, like ``decode_kernel``.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxattn.functional.decode import decode_kernel
from jaxattn.functional.heads import AttentionShapes, check_multi_head_shapes
from jaxattn.functional.kv_cache import Int8Tokens
from jaxattn.functional.masks import MASK_VALUE, PAD_QUERY_POSITION, AttentionContext, visible_keys
from jaxattn.functional.pallas.platforms import TARGETS, Target, divide, next_power_of_two, round_up
from jaxattn.functional.softmax import SoftmaxState, block_logits, online_softmax_finish, online_softmax_step, with_sinks

DEFAULT_BLOCK = 128  # keys per block (whole pages of a paged cache, at least one); 64 on a GPU at width 256


class DecodeCall(NamedTuple):
    """Everything static about one decode call (hashable)."""

    shapes: AttentionShapes  # B, T, S, H, K, D, E
    scale: float
    cap: float | None
    window: int | None
    page: int | None  # tokens per page of a paged cache, None for a contiguous one
    bk: int  # keys per block (a multiple of page)
    rows: int  # G T rounded up to what the chip tiles
    interpret: str | bool
    target: str

    def footprint(self, itemsize: int):
        """The program's on-chip bytes (``Target.footprint``, kernel "decode")."""
        return TARGETS[self.target].footprint("decode", bq=self.rows, bk=self.bk, Dp=self.shapes.D, Ep=self.shapes.E, T=self.shapes.T,
                                              S=self.bk, itemsize=itemsize)


def _block_mask(settings: DecodeCall, q_pos, kv_pos, first, start, length):
    """The block's mask ``[rows, bk]``: the rule, with the row's length and the keys an earlier
    block read (a slid-back last block) marked invalid."""
    index = first + lax.broadcasted_iota(jnp.int32, (1, settings.bk), 1)  # [1, bk]
    fresh = (index >= start) & (index < length)
    return visible_keys(q_pos, kv_pos, window=settings.window, kv_valid=fresh)


def decode_body(settings: DecodeCall, read, lengths_ref, pages_ref, q_ref, q_pos_ref, k_ref, v_ref, kv_pos_ref,
                out_ref, lse_ref, *scratch):
    """One program: the stacked queries of row b and K/V head kh against the blocks row b holds."""
    b, kh, bk = pl.program_id(0), pl.program_id(1), settings.bk
    q, q_pos, length = q_ref[...], q_pos_ref[...], lengths_ref[b]  # [rows, Dp], [rows, 1], []

    def key_block(j, state):
        start = j * bk
        first = jnp.minimum(start, settings.shapes.S - bk)  # the last block slid back to fit
        k, v, kv_pos = read(b, kh, first, pages_ref, k_ref, v_ref, kv_pos_ref, scratch)  # [bk, D], [bk, E], [1, bk]
        s = block_logits(q, k, scale=settings.scale, cap=settings.cap)  # [rows, bk]
        return online_softmax_step(s, v, _block_mask(settings, q_pos, kv_pos, first, start, length), state)

    rows, E = q.shape[0], out_ref.shape[-1]
    start = SoftmaxState(jnp.full((rows, 1), MASK_VALUE, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
                         jnp.zeros((rows, E), jnp.float32))
    out, lse = online_softmax_finish(lax.fori_loop(0, divide(length + (bk - 1), bk), key_block, start))
    out_ref[...] = out.astype(out_ref.dtype)
    lse_ref[...] = lse


# ------------------------------------------------------------- reading a block, by chip


def read_loaded(settings: DecodeCall, b, kh, first, pages_ref, k_ref, v_ref, kv_pos_ref, scratch):
    """GPU: load the block from HBM, contiguous (``[S, D]`` refs of row b, head kh) or one page
    (pool refs ``[P, page, K, D]``, block = page)."""
    positions = kv_pos_ref[:, pl.ds(first, settings.bk)]  # [1, bk]
    if settings.page is None:
        return k_ref[pl.ds(first, settings.bk), :], v_ref[pl.ds(first, settings.bk), :], positions
    page = pages_ref[b, divide(first, settings.page)]
    return k_ref[page, :, kh, :], v_ref[page, :, kh, :], positions


def read_copied(settings: DecodeCall, b, kh, first, pages_ref, k_ref, v_ref, kv_pos_ref, scratch):
    """TPU: copy the block from HBM into VMEM scratch (m pages one by one for a paged cache),
    then read it there."""
    k_buf, v_buf, pos_buf = scratch
    bk = settings.bk
    pltpu.sync_copy(kv_pos_ref.at[b, :, pl.ds(first, bk)], pos_buf)
    if settings.page is None:
        pltpu.sync_copy(k_ref.at[b, pl.ds(first, bk), kh, :], k_buf)
        pltpu.sync_copy(v_ref.at[b, pl.ds(first, bk), kh, :], v_buf)
    else:
        size = settings.page
        for p in range(bk // size):  # static: m pages
            page = pages_ref[b, divide(first, size) + p]
            pltpu.sync_copy(k_ref.at[page, :, kh, :], k_buf.at[pl.ds(p * size, size), :])
            pltpu.sync_copy(v_ref.at[page, :, kh, :], v_buf.at[pl.ds(p * size, size), :])
    return k_buf[...], v_buf[...], pos_buf[...]


# ---------------------------------------------------------------------- the call


def _stack_queries(q, K: int, rows: int):  # [B, T, H, D] -> [B, K, rows, D]: row g T + t
    B, T, H, D = q.shape
    stacked = q.reshape(B, T, K, H // K, D).transpose(0, 2, 3, 1, 4).reshape(B, K, (H // K) * T, D)
    return jnp.pad(stacked, [(0, 0), (0, 0), (0, rows - stacked.shape[2]), (0, 0)])


def _unstack(x, call: DecodeCall):  # [B, K, rows, F] -> [B, T, H, F]
    G = call.shapes.H // call.shapes.K
    x = x[:, :, : G * call.shapes.T].reshape(call.shapes.B, call.shapes.K, G, call.shapes.T, x.shape[-1])
    return x.transpose(0, 3, 1, 2, 4).reshape(call.shapes.B, call.shapes.T, call.shapes.H, x.shape[-1])


def run(call: DecodeCall, target: Target, q, k, v, context: AttentionContext):
    """The decode kernel on ``target``: out ``[B, T, H, E]`` (float32) and lse ``[B, T, H]``."""
    B, K, rows, G = call.shapes.B, call.shapes.K, call.rows, call.shapes.H // call.shapes.K
    q_rows = _stack_queries(q, K, rows)  # [B, K, rows, D]
    q_pos = context.q_positions  # [B|1, T]
    q_pos = jnp.pad(jnp.tile(jnp.broadcast_to(q_pos, (B, call.shapes.T)), (1, G)), [(0, 0), (0, rows - G * call.shapes.T)],
                    constant_values=PAD_QUERY_POSITION)[:, :, None]  # [B, rows, 1]: row g T + t at position t's
    kv_pos = jnp.broadcast_to(context.kv_positions, (B, call.shapes.S)).astype(jnp.int32)[:, None, :]  # [B, 1, S]
    lengths = jnp.full((B,), call.shapes.S, jnp.int32) if context.kv_lengths is None else \
        jnp.broadcast_to(context.kv_lengths, (B,)).astype(jnp.int32)
    pages = jnp.zeros((B, 1), jnp.int32) if context.kv_pages is None else context.kv_pages.astype(jnp.int32)
    own = lambda width: pl.BlockSpec((None, None, rows, width), lambda b, h: (b, h, 0, 0))  # noqa: E731
    if target.name == "gpu":
        read = read_loaded
        if call.page is None:
            cache = lambda width: pl.BlockSpec((None, call.shapes.S, None, width), lambda b, h: (b, 0, h, 0))  # noqa: E731
        else:
            cache = lambda width: pl.BlockSpec()  # noqa: E731: the whole pool, read a page at a time
        kv_pos_spec = pl.BlockSpec((None, 1, call.shapes.S), lambda b, h: (b, 0, 0))
        scratch = []
    else:
        read = read_copied
        cache = lambda width: pl.BlockSpec(memory_space=pl.ANY)  # noqa: E731: stays in HBM
        kv_pos_spec = pl.BlockSpec(memory_space=pl.ANY)
        scratch = [pltpu.VMEM((call.bk, call.shapes.D), k.dtype), pltpu.VMEM((call.bk, call.shapes.E), v.dtype),
                   pltpu.VMEM((1, call.bk), jnp.int32)]
    footprint = call.footprint(q.dtype.itemsize)
    if not call.interpret:
        footprint.check(f"the Pallas decode kernel at rows={rows}, block {call.bk}, D={call.shapes.D}")
    params = None if call.interpret else target.compiler_params(footprint, call.shapes.D, 2)
    if call.interpret == "tpu":
        interpret = pltpu.InterpretParams()
    else:
        interpret = bool(call.interpret)
    out, lse = pl.pallas_call(
        partial(decode_body, call, partial(read, call)),
        grid=(B, K),
        in_specs=[target.scalars(), target.scalars(), own(call.shapes.D), pl.BlockSpec((None, rows, 1), lambda b, h: (b, 0, 0)),
                  cache(call.shapes.D), cache(call.shapes.E), kv_pos_spec],
        out_specs=[own(call.shapes.E), own(1)],
        out_shape=[jax.ShapeDtypeStruct((B, K, rows, call.shapes.E), jnp.float32),
                   jax.ShapeDtypeStruct((B, K, rows, 1), jnp.float32)],
        scratch_shapes=scratch, compiler_params=params, interpret=interpret, name="jaxattn_decode",
    )(lengths, pages, q_rows, q_pos, k, v, kv_pos)
    return _unstack(out, call), _unstack(lse, call)[..., 0]


def serves(q, k, v, context: AttentionContext) -> str | None:
    """``None`` when this kernel serves the call, else what it does not serve (``decode_kernel``
    serves all of it). Static: read from the call's types and the context's structure."""
    parts = isinstance(q, (tuple, list)) or isinstance(k, (tuple, list))
    reasons = [reason for reason, applies in (
        ("MLA's key parts (q, k as tuples)", parts),
        ("an int8 cache", isinstance(k, Int8Tokens) or isinstance(v, Int8Tokens) or context.kv_int8),
        ("a non-causal call (a decode step is causal: positions decide what each query sees)", not context.is_causal),
        ("segment ids", context.q_segment_ids is not None),
        ("a caller's mask", context.user_mask is not None),
    ) if applies]
    if not reasons:
        widths = (q.shape[-1], v.shape[-1])
        if any(width < 16 or width & (width - 1) for width in widths):
            reasons.append(f"head widths {widths} (the cache is read as it is: powers of two from 16)")
    return ", ".join(reasons) or None


def make_decode_call(q, k, v, context: AttentionContext, *, block_kv, interpret, target: Target) -> DecodeCall:
    pages = context.kv_pages
    if pages is not None:
        page = k.shape[1]
        if pages.ndim != 2 or pages.shape[0] != q.shape[0] or v.shape[1] != page or k.ndim != 4 or v.ndim != 4:
            raise ValueError(f"a paged call needs pools [P, page, K, D] of one page size and kv_pages [B, N]; got "
                             f"k {k.shape}, v {v.shape}, kv_pages {pages.shape}")
        S = pages.shape[1] * page
        shapes = check_multi_head_shapes(q, jax.ShapeDtypeStruct((q.shape[0], S) + k.shape[2:], k.dtype),
                                         jax.ShapeDtypeStruct((q.shape[0], S) + v.shape[2:], v.dtype))
    else:
        page, shapes = None, check_multi_head_shapes(q, k, v)
    B, T, S, H, K, D, E = shapes
    context.check(B, T, S, H)
    if block_kv is not None and (isinstance(block_kv, bool) or not isinstance(block_kv, int) or block_kv < 1):
        raise ValueError(f"block_kv must be an int >= 1 or None, got {block_kv!r}")
    wanted = block_kv or (DEFAULT_BLOCK // 2 if target.name == "gpu" and max(D, E) > 128 else DEFAULT_BLOCK)
    if page is None:  # a power of two no longer than the cache
        bk = min(next_power_of_two(wanted), 1 << (S.bit_length() - 1))
    else:
        if target.name == "gpu" and not interpret and (page < 16 or page & (page - 1)):
            raise ValueError(f"page size {page}: a Triton program reads a whole page, so pages are powers of two from 16")
        bk = page if target.name == "gpu" else page * max(1, min(wanted // page, S // page))
    G = H // K
    rows = max(16, next_power_of_two(G * T)) if target.name == "gpu" else round_up(G * T, 8)
    return DecodeCall(AttentionShapes(B, T, S, H, K, D, E), context.logit_scale(D), context.logit_softcap, context.window, page, bk,
                      rows, interpret, target.name)


def decode_fits(q, k, v, context: AttentionContext, target: str, *, block_kv=None) -> bool:
    """Whether this kernel serves the call on ``target`` (``serves``) and its program fits the chip."""
    if serves(q, k, v, context) is not None:
        return False
    call = make_decode_call(q, k, v, context, block_kv=block_kv, interpret=False, target=TARGETS[target])
    return call.footprint(q.dtype.itemsize).fits


def _decode(call: DecodeCall, target: Target, q, k, v, context: AttentionContext):
    out, lse = run(call, target, q, k, v, context)  # [B, T, H, E], [B, T, H]
    if context.sinks is not None:
        out, lse = with_sinks(out, lse, context.sinks.astype(jnp.float32)[None, None, :])  # sinks [1, 1, H]
    return out.astype(q.dtype)


def on_target(q, k, v, context: AttentionContext, target: str, *, block_kv=None):
    """The kernel compiled for ``target`` ("gpu" or "tpu"), or ``decode_kernel`` where it does not
    serve the call or its program would not fit the chip."""
    if not decode_fits(q, k, v, context, target, block_kv=block_kv):
        return decode_kernel(q, k, v, context)
    call = make_decode_call(q, k, v, context, block_kv=block_kv, interpret=False, target=TARGETS[target])
    return _decode(call, TARGETS[target], q, k, v, context)


def pallas_decode_kernel(q, k, v, context: AttentionContext, *, block_kv: int | None = None,
                         interpret: bool | str = False):
    """Attention of a few queries over a cache, as a Pallas kernel; the values of ``decode_kernel``.

    Args:
      q: ``[B, T, H, D]``, the new tokens' queries.
      k, v: the cache, ``[B, S, K, D|E]``; or with ``context.kv_pages [B, N]`` set, pools
        ``[P, page, K, D|E]`` read through the page table (S = N x page).
      context: a causal call; ``kv_lengths [B]`` bounds each row (default S), ``kv_positions``
        say where each slot's token is (empty slots at a position no query reaches).
      block_kv: keys per block (default 128, 64 on a GPU at width 256; a paged block is whole
        pages, and a Triton program reads one page per block).
      interpret: run the body on the CPU: True (the GPU's loads) or "tpu" (the TPU's copies).

    Returns:
      ``[B, T, H, E]`` in q's dtype. Lowered for ``cuda`` a Triton kernel, for ``tpu`` a Mosaic
      one, on any other platform the GPU's body in interpret mode; where the program would not
      fit a chip (``Target.footprint``), ``decode_kernel`` serves the call there.
    """
    reason = serves(q, k, v, context)
    if reason is not None:
        raise ValueError(f"the Pallas decode kernel does not serve {reason}: use decode_kernel")
    if interpret not in (False, True, "gpu", "tpu"):
        raise ValueError(f"interpret must be False, True, 'gpu' or 'tpu', got {interpret!r}")

    if interpret:
        target = TARGETS["tpu" if interpret == "tpu" else "gpu"]
        return _decode(make_decode_call(q, k, v, context, block_kv=block_kv, interpret=interpret, target=target),
                       target, q, k, v, context)
    on_cpu = make_decode_call(q, k, v, context, block_kv=block_kv, interpret="gpu", target=TARGETS["gpu"])
    return lax.platform_dependent(q, k, v, context, cuda=lambda *args: on_target(*args, "gpu", block_kv=block_kv),
                                  tpu=lambda *args: on_target(*args, "tpu", block_kv=block_kv),
                                  default=lambda *args: _decode(on_cpu, TARGETS["gpu"], *args))


def pallas_decode_attention(q, k, v, *, block_kv: int | None = None, interpret: bool | str = False, **keywords):
    """``pallas_decode_kernel`` with the call described by the keywords of ``multi_head_attention``
    (``is_causal=True``, ``kv_lengths``, ``q_positions``, ``window``, ``logit_softcap``, ``sinks``, ...)."""
    context = AttentionContext.from_keywords(q, k, **keywords)
    return pallas_decode_kernel(q, k, v, context, block_kv=block_kv, interpret=interpret)
