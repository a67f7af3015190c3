"""Flash attention as a Pallas kernel: one body for GPUs (Triton) and TPUs (Mosaic).

The XLA flash kernel (``flash.py``) loops over blocks in XLA; here the loop runs *inside* a
kernel, on the chip, and each program keeps its block of queries and its running softmax in
registers or VMEM while the keys stream past. One program of the forward pass:

    grid (B, H, nq): program (b, h, i) holds queries i bq .. (i + 1) bq of head h   [bq, D]
    its key/value head is h // G (GQA: the K/V operands have K heads, never copied to H)
    for t < count[i]:                            the key blocks this query block may see
        j = order[i, t]                          (from the call context's block plan, as flash.py)
        s = block_logits(q, k_j)                 [bq, bk] float32, scale then soft-cap
        state = online_softmax_step(s, v_j, mask_ij, state)    m, l [bq, 1], acc [bq, E]
    out, lse = online_softmax_finish(state)

The mask of a block comes from the call context's per-token arrays, read as a column for the
program's own block and a row for the block the loop is at (``masks.visible_keys``, the rule
every kernel uses), so causality, windows, padding, segments and a caller's mask are one
rule, and blocks the plan hides are never loaded: NaN in them cannot reach the output. A
learned sink joins each row's softmax after the kernel (``softmax.with_sinks``), so the
kernel itself never sees one.

The backward pass (``jax.custom_vjp``) is two kernels over the same plan, both recomputing
``p = exp(s - lse)``: ``dq`` (grid (B, H, nq), streaming key blocks, as the forward) and
``dk, dv`` (grid (B, H, nk), streaming the query blocks that see key block j, on the
transposed block ``[bk, bq]``: the same rule with the key side as the column). dk, dv come
out per query head and are summed over the G heads that share a K/V head.

What differs by chip is only around the body (``platforms.py``): block sizes, where the
plan's tables live (SMEM on TPU), the compiler's parameters. On the TPU a program's
``BlockSpec`` blocks sit in VMEM, so its streamed side (a whole head of keys, or of queries
for dk, dv) is in VMEM too: ``Target.footprint`` counts it, and a call that would not fit is
refused before it is lowered.

Shape letters as in ``heads.py``; ``bq``/``bk`` the block sizes; ``Dp``/``Ep`` the widths
padded for the chip (``platforms.padded_width``); ``Tp``/``Sp`` T and S padded to whole blocks.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxattn.functional.flash import flash_kernel, visit_list
from jaxattn.functional.heads import check_multi_head_shapes
from jaxattn.functional.masks import MASK_VALUE, AttentionContext, visible_keys
from jaxattn.functional.pallas.platforms import TARGETS, Target, divide, pad_last, padded_width
from jaxattn.functional.softmax import (
    SoftmaxState,
    block_logits,
    block_probabilities,
    logits_gradient,
    online_softmax_finish,
    online_softmax_step,
    sink_gradient,
    with_sinks,
)

Q_SIDE = ("q_positions", "q_segment_ids")
KV_SIDE = ("kv_positions", "kv_valid", "kv_segment_ids")


# ------------------------------------------------------------- the call context, on the chip


class TokenLayout(NamedTuple):
    """Which per-token arrays a kernel receives (static), and which side is its own: the
    program's own block reads its arrays as a column ``[b_own, 1]``, the loop's block as a
    row ``[1, b_other]`` (or a ``[b_own, b_other]`` block of the caller's mask)."""

    names: tuple[str, ...]
    own: str  # "q": a program holds queries (forward, dq); "kv": keys (dk, dv)

    def block_mask(self, refs, other_block, window):
        """The mask of (own block, loop block ``other_block``): bool ``[b_own, b_other]`` or ``None``."""
        own_names = Q_SIDE if self.own == "q" else KV_SIDE
        values = {name: ref[...] if name in own_names else ref[other_block] for name, ref in zip(self.names, refs)}
        return visible_keys(**values, window=window)


def token_operands(context: AttentionContext, own: str, b_own: int, b_other: int):
    """The padded context's per-token arrays laid out for a kernel whose programs hold blocks
    of ``own`` ("q" or "kv") side: ``(layout, arrays, specs)``, specs indexed by (b, h, n).

    Own side: int32 ``[B|1, L, 1]``, block ``(bq, 1)`` of the program's block n. Other side:
    int32 ``[B|1, n_other, 1, b_other]``, all of it, a row picked by the loop. The caller's mask
    ``[B|1, H|1, T, S]`` (transposed when the keys are the own side): int32
    ``[B|1, H|1, n_other, L_own, b_other]``, the program's rows of every block.
    """
    own_names = Q_SIDE if own == "q" else KV_SIDE
    names, arrays, specs = [], [], []
    for name in Q_SIDE + KV_SIDE:
        x = context.key_validity() if name == "kv_valid" else getattr(context, name)  # a flag per key, from the lengths
        if x is None:
            continue
        x, batched = x.astype(jnp.int32), x.shape[0] > 1  # [B|1, L]
        pick = (lambda b: b) if batched else (lambda b: 0)
        if name in own_names:
            arrays.append(x[:, :, None])  # [B|1, L, 1]
            specs.append(pl.BlockSpec((None, b_own, 1), lambda b, h, n, pick=pick: (pick(b), n, 0)))
        else:
            n_other = x.shape[1] // b_other
            arrays.append(x.reshape(x.shape[0], n_other, 1, b_other))  # [B|1, n_other, 1, b_other]
            specs.append(pl.BlockSpec((None, n_other, 1, b_other), lambda b, h, n, pick=pick: (pick(b), 0, 0, 0)))
        names.append(name)
    mask = context.user_mask
    if mask is not None:
        mask = mask if own == "q" else mask.swapaxes(2, 3)  # [B|1, H|1, L_own, L_other]
        Bm, Hm, L_own, L_other = mask.shape
        n_other = L_other // b_other
        blocks = mask.reshape(Bm, Hm, L_own, n_other, b_other).transpose(0, 1, 3, 2, 4)  # [Bm, Hm, n_other, L_own, b_other]
        arrays.append(blocks.astype(jnp.int32))
        specs.append(pl.BlockSpec((None, None, n_other, b_own, b_other),
                                  lambda b, h, n: (b if Bm > 1 else 0, h if Hm > 1 else 0, 0, n, 0)))
        names.append("user_mask")
    return TokenLayout(tuple(names), own), arrays, specs


# ------------------------------------------------------------------------- the bodies


class Settings(NamedTuple):
    """The static numbers of one call (hashable)."""

    scale: float
    cap: float | None
    window: int | None
    bq: int
    bk: int


def forward_body(layout: TokenLayout, settings: Settings, order_ref, count_ref, q_ref, k_ref, v_ref, *refs):
    """One program of the forward pass: ``out [bq, Ep]`` and ``lse [bq, 1]`` of its query block."""
    tokens, (out_ref, lse_ref) = refs[:-2], refs[-2:]
    i, bk = pl.program_id(2), settings.bk
    q = q_ref[...]  # [bq, Dp]

    def key_block(t, state):
        j = order_ref[i, t]
        start = pl.multiple_of(j * bk, bk)
        k, v = k_ref[pl.ds(start, bk), :], v_ref[pl.ds(start, bk), :]  # [bk, Dp], [bk, Ep]
        s = block_logits(q, k, scale=settings.scale, cap=settings.cap)  # [bq, bk]
        return online_softmax_step(s, v, layout.block_mask(tokens, j, settings.window), state)

    bq, Ep = q.shape[0], v_ref.shape[-1]
    start = SoftmaxState(jnp.full((bq, 1), MASK_VALUE, jnp.float32), jnp.zeros((bq, 1), jnp.float32),
                         jnp.zeros((bq, Ep), jnp.float32))
    out, lse = online_softmax_finish(lax.fori_loop(0, count_ref[i], key_block, start))
    out_ref[...] = out.astype(out_ref.dtype)
    lse_ref[...] = lse


def dq_body(layout: TokenLayout, settings: Settings, order_ref, count_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
            delta_ref, *refs):
    """One program of dq: the query block's gradient, streaming the key blocks it sees."""
    tokens, dq_ref = refs[:-1], refs[-1]
    i, bk = pl.program_id(2), settings.bk
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]  # [bq, Dp], [bq, Ep], [bq, 1] x2

    def key_block(t, dq):
        j = order_ref[i, t]
        start = pl.multiple_of(j * bk, bk)
        k, v = k_ref[pl.ds(start, bk), :], v_ref[pl.ds(start, bk), :]
        s = block_logits(q, k, scale=settings.scale, cap=settings.cap)  # [bq, bk]
        p = block_probabilities(s, lse, layout.block_mask(tokens, j, settings.window))
        dp = jnp.einsum("qe,ke->qk", do, v, preferred_element_type=jnp.float32)
        ds = logits_gradient(s, p, dp, delta, scale=settings.scale, cap=settings.cap)
        return dq + jnp.einsum("qk,kd->qd", ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    dq_ref[...] = lax.fori_loop(0, count_ref[i], key_block, jnp.zeros(q.shape, jnp.float32))


def dkv_body(layout: TokenLayout, settings: Settings, order_ref, count_ref, k_ref, v_ref, q_ref, do_ref, lse_ref,
             delta_ref, *refs):
    """One program of dk, dv: a key block's gradients from one query head, streaming the query
    blocks that see it, on the transposed block ``[bk, bq]``."""
    tokens, (dk_ref, dv_ref) = refs[:-2], refs[-2:]
    j, bq = pl.program_id(2), settings.bq
    k, v = k_ref[...], v_ref[...]  # [bk, Dp], [bk, Ep]

    def query_block(t, grads):
        dk, dv = grads
        i = order_ref[j, t]
        start = pl.multiple_of(i * bq, bq)
        q, do = q_ref[pl.ds(start, bq), :], do_ref[pl.ds(start, bq), :]  # [bq, Dp], [bq, Ep]
        lse, delta = lse_ref[i], delta_ref[i]  # [1, bq]: rows, against the keys' column
        s = block_logits(k, q, scale=settings.scale, cap=settings.cap)  # [bk, bq]
        p = block_probabilities(s, lse, layout.block_mask(tokens, i, settings.window))
        dv = dv + jnp.einsum("kq,qe->ke", p.astype(do.dtype), do, preferred_element_type=jnp.float32)
        dp = jnp.einsum("ke,qe->kq", v, do, preferred_element_type=jnp.float32)
        ds = logits_gradient(s, p, dp, delta, scale=settings.scale, cap=settings.cap)
        return dk + jnp.einsum("kq,qd->kd", ds.astype(q.dtype), q, preferred_element_type=jnp.float32), dv

    zeros = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dk, dv = lax.fori_loop(0, count_ref[j], query_block, zeros)
    dk_ref[...], dv_ref[...] = dk, dv


# ---------------------------------------------------------------------- the calls


class Call(NamedTuple):
    """Everything static about one call (hashable): sizes, the logit settings, the blocks the
    user asked for (``None``: the target's), the target ("gpu": Triton, "tpu": Mosaic) and
    whether its body runs in interpret mode (on the CPU)."""

    T: int
    S: int
    D: int
    E: int
    scale: float
    cap: float | None
    window: int | None
    block_q: int | None
    block_kv: int | None
    target: str
    interpret: bool
    itemsize: int

    def blocks(self, *, backward: bool = False) -> tuple[int, int]:
        """``(bq, bk)``: the user's, else the target's for these sizes."""
        bq, bk = TARGETS[self.target].blocks(self.T, self.S, padded_width(max(self.D, self.E)), backward=backward)
        return self.block_q or bq, self.block_kv or bk

    def footprints(self):
        """The on-chip bytes of the three kernels at this call's blocks (``Target.footprint``)."""
        target, Dp, Ep = TARGETS[self.target], padded_width(self.D), padded_width(self.E)
        result = []
        for kernel, backward in (("forward", False), ("dq", True), ("dkv", True)):
            bq, bk = self.blocks(backward=backward)
            result.append(target.footprint(kernel, bq=bq, bk=bk, Dp=Dp, Ep=Ep, T=-(-self.T // bq) * bq,
                                           S=-(-self.S // bk) * bk, itemsize=self.itemsize))
        return result


class Operands(NamedTuple):
    """A call laid out for one target: head-major, padded to whole blocks and chip widths."""

    q: jax.Array  # [B, H, Tp, Dp]
    k: jax.Array  # [B, K, Sp, Dp]
    v: jax.Array  # [B, K, Sp, Ep]
    context: AttentionContext  # padded to Tp, Sp
    visible: jax.Array  # bool [nq, nk]
    settings: Settings
    Dp: int
    Ep: int


def _pad_tokens(x, size: int):  # [B, L, heads, F] -> [B, heads, size, F]
    return jnp.pad(x.transpose(0, 2, 1, 3), [(0, 0), (0, 0), (0, size - x.shape[1]), (0, 0)])


def lay_out(call: Call, target: Target, q, k, v, context: AttentionContext, *, backward: bool = False) -> Operands:
    """q, k, v and the context as ``target``'s kernels read them, with the block plan."""
    Dp, Ep = padded_width(call.D), padded_width(call.E)
    bq, bk = call.blocks(backward=backward)
    if not call.interpret:
        target.check_blocks(bq, bk)
    Tp, Sp = -(-call.T // bq) * bq, -(-call.S // bk) * bk
    padded = context.padded(Tp, Sp)
    q, k, v = pad_last(_pad_tokens(q, Tp), Dp), pad_last(_pad_tokens(k, Sp), Dp), pad_last(_pad_tokens(v, Sp), Ep)
    settings = Settings(call.scale, call.cap, call.window, bq, bk)
    return Operands(q, k, v, padded, padded.block_visibility(bq, bk), settings, Dp, Ep)


def _pallas_call(body, target: Target, call: Call, ops: Operands, kernel: str, *, grid, in_specs, out_specs, out_shape):
    footprint = target.footprint(kernel, bq=ops.settings.bq, bk=ops.settings.bk, Dp=ops.Dp, Ep=ops.Ep,
                                 T=ops.q.shape[2], S=ops.k.shape[2], itemsize=ops.q.dtype.itemsize)
    if not call.interpret:
        footprint.check(f"the Pallas {kernel} kernel at T={call.T}, S={call.S}, D={call.D} "
                        f"(blocks {ops.settings.bq} x {ops.settings.bk})")
    params = None if call.interpret else target.compiler_params(footprint, ops.Dp, len(grid))
    return pl.pallas_call(body, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                          compiler_params=params, interpret=bool(call.interpret), name=f"jaxattn_{kernel}")


def _visits(visible):
    """The plan as tables: ``order [n, m]`` (the visited blocks of each row first) and ``count [n]``."""
    order, count = jax.vmap(visit_list)(visible)
    return order.astype(jnp.int32), count.astype(jnp.int32)


def forward(call: Call, target: Target, q, k, v, context: AttentionContext):
    """The forward kernel on ``target``: out ``[B, H, T, E]`` (q's dtype, float32 with sinks)
    and lse ``[B, H, T]`` of the keys alone (no sink)."""
    ops = lay_out(call, target, q, k, v, context)
    B, H, Tp, Dp = ops.q.shape
    K, Sp = ops.k.shape[1], ops.k.shape[2]
    G, (bq, bk) = H // K, ops.settings[3:]
    layout, token_arrays, token_specs = token_operands(ops.context, "q", bq, bk)
    order, count = _visits(ops.visible)
    own = lambda width: pl.BlockSpec((None, None, bq, width), lambda b, h, i: (b, h, i, 0))  # noqa: E731
    streamed = lambda width: pl.BlockSpec((None, None, Sp, width), lambda b, h, i: (b, divide(h, G), 0, 0))  # noqa: E731
    out_dtype = jnp.float32 if context.sinks is not None else q.dtype
    out, lse = _pallas_call(
        partial(forward_body, layout, ops.settings), target, call, ops, "forward",
        grid=(B, H, Tp // bq),
        in_specs=[target.scalars(), target.scalars(), own(Dp), streamed(Dp), streamed(ops.Ep), *token_specs],
        out_specs=[own(ops.Ep), own(1)],
        out_shape=[jax.ShapeDtypeStruct((B, H, Tp, ops.Ep), out_dtype), jax.ShapeDtypeStruct((B, H, Tp, 1), jnp.float32)],
    )(order, count, ops.q, ops.k, ops.v, *token_arrays)
    return out[:, :, : call.T, : call.E], lse[:, :, : call.T, 0]


def backward(call: Call, target: Target, q, k, v, context: AttentionContext, do, lse, delta):
    """The two backward kernels on ``target``: dq ``[B, H, T, D]``, dk, dv ``[B, K, S, D|E]`` (float32)."""
    ops = lay_out(call, target, q, k, v, context, backward=True)
    B, H, Tp, Dp = ops.q.shape
    K, Sp, Ep = ops.k.shape[1], ops.k.shape[2], ops.Ep
    G, (bq, bk) = H // K, ops.settings[3:]
    nq, nk = Tp // bq, Sp // bk
    do = pad_last(jnp.pad(do, [(0, 0), (0, 0), (0, Tp - call.T), (0, 0)]), Ep)  # [B, H, Tp, Ep]
    lse, delta = (jnp.pad(x, [(0, 0), (0, 0), (0, Tp - call.T)]) for x in (lse, delta))  # [B, H, Tp]

    # dq: programs hold query blocks, as the forward
    layout, token_arrays, token_specs = token_operands(ops.context, "q", bq, bk)
    order, count = _visits(ops.visible)
    own = lambda width: pl.BlockSpec((None, None, bq, width), lambda b, h, i: (b, h, i, 0))  # noqa: E731
    keys = lambda width: pl.BlockSpec((None, None, Sp, width), lambda b, h, i: (b, divide(h, G), 0, 0))  # noqa: E731
    dq = _pallas_call(
        partial(dq_body, layout, ops.settings), target, call, ops, "dq", grid=(B, H, nq),
        in_specs=[target.scalars(), target.scalars(), own(Dp), keys(Dp), keys(Ep), own(Ep), own(1), own(1), *token_specs],
        out_specs=own(Dp), out_shape=jax.ShapeDtypeStruct((B, H, Tp, Dp), jnp.float32),
    )(order, count, ops.q, ops.k, ops.v, do, lse[..., None], delta[..., None], *token_arrays)

    # dk, dv: programs hold key blocks (per query head), the query blocks that see them stream past
    layout, token_arrays, token_specs = token_operands(ops.context, "kv", bk, bq)
    order, count = _visits(ops.visible.T)
    own_keys = lambda width: pl.BlockSpec((None, None, bk, width), lambda b, h, j: (b, divide(h, G), j, 0))  # noqa: E731
    queries = lambda width: pl.BlockSpec((None, None, Tp, width), lambda b, h, j: (b, h, 0, 0))  # noqa: E731
    rows = pl.BlockSpec((None, None, nq, 1, bq), lambda b, h, j: (b, h, 0, 0, 0))
    out = lambda width: pl.BlockSpec((None, None, bk, width), lambda b, h, j: (b, h, j, 0))  # noqa: E731
    dk, dv = _pallas_call(
        partial(dkv_body, layout, ops.settings), target, call, ops, "dkv", grid=(B, H, nk),
        in_specs=[target.scalars(), target.scalars(), own_keys(Dp), own_keys(Ep), queries(Dp), queries(Ep), rows, rows,
                  *token_specs],
        out_specs=[out(Dp), out(Ep)],
        out_shape=[jax.ShapeDtypeStruct((B, H, Sp, Dp), jnp.float32), jax.ShapeDtypeStruct((B, H, Sp, Ep), jnp.float32)],
    )(order, count, ops.k, ops.v, ops.q, do, lse.reshape(B, H, nq, 1, bq), delta.reshape(B, H, nq, 1, bq),
      *token_arrays)
    per_kv_head = lambda x, width: x[:, :, : call.S, :width].reshape(B, K, G, call.S, width).sum(axis=2)  # noqa: E731
    return dq[:, :, : call.T, : call.D], per_kv_head(dk, call.D), per_kv_head(dv, call.E)


# ---------------------------------------------------------------- differentiation


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(call: Call, q, k, v, context: AttentionContext):
    return _attention_forward(call, q, k, v, context)[0]


def _attention_forward(call: Call, q, k, v, context):
    out, lse = forward(call, TARGETS[call.target], q, k, v, context)  # [B, H, T, E], [B, H, T]
    if context.sinks is not None:
        sinks = context.sinks.astype(jnp.float32)[None, :, None]  # [1, H, 1]
        out, lse = with_sinks(out.astype(jnp.float32), lse, sinks)
    out = out.transpose(0, 2, 1, 3).astype(q.dtype)  # [B, T, H, E]
    return out, (q, k, v, context, out, lse)


def _attention_backward(call: Call, residuals, d_out):
    q, k, v, context, out, lse = residuals
    delta = jnp.einsum("bthe,bthe->bht", d_out.astype(jnp.float32), out.astype(jnp.float32))  # [B, H, T]
    do = d_out.transpose(0, 2, 1, 3)  # [B, H, T, E]
    dq, dk, dv = backward(call, TARGETS[call.target], q, k, v, context, do, lse, delta)
    d_sinks = None
    if context.sinks is not None:
        d_sinks = sink_gradient(context.sinks.astype(jnp.float32)[None, :, None], lse, delta, rows_axes=(0, 2))  # [H]
    return (dq.transpose(0, 2, 1, 3).astype(q.dtype), dk.transpose(0, 2, 1, 3).astype(k.dtype),
            dv.transpose(0, 2, 1, 3).astype(v.dtype), context.sinks_cotangent(d_sinks))


_attention.defvjp(_attention_forward, _attention_backward)


# ----------------------------------------------------------------------- the edge


def check_call(q, k, v, context: AttentionContext, *, block_q, block_kv, interpret):
    """The checks every kernel makes, and those of this one's arguments; returns the sizes."""
    shapes = check_multi_head_shapes(q, k, v)
    context.check(shapes.B, shapes.T, shapes.S, shapes.H)
    for name, size in (("block_q", block_q), ("block_kv", block_kv)):
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"{name} must be an int >= 1 or None, got {size!r}")
    if interpret not in (False, True, "gpu", "tpu"):
        raise ValueError(f"interpret must be False, True, 'gpu' or 'tpu', got {interpret!r}")
    return shapes


def make_call(q, k, v, context: AttentionContext, *, target: str, interpret: bool, block_q=None,
              block_kv=None) -> Call:
    """The static description of a call on ``target`` (after ``check_call``)."""
    B, T, S, H, K, D, E = check_multi_head_shapes(q, k, v)
    return Call(T, S, D, E, context.logit_scale(D), context.logit_softcap, context.window, block_q, block_kv,
                target, interpret, q.dtype.itemsize)


def fits(q, k, v, context: AttentionContext, target: str, *, block_q=None, block_kv=None) -> bool:
    """Whether the three kernels' programs fit ``target``'s on-chip memory for this call."""
    call = make_call(q, k, v, context, target=target, interpret=False, block_q=block_q, block_kv=block_kv)
    return all(footprint.fits for footprint in call.footprints())


def on_target(q, k, v, context: AttentionContext, target: str, *, block_q=None, block_kv=None):
    """The Pallas kernel compiled for ``target`` ("gpu" or "tpu"), or ``flash_kernel`` where its
    programs would not fit the chip (``Target.footprint``)."""
    if not fits(q, k, v, context, target, block_q=block_q, block_kv=block_kv):
        return flash_kernel(q, k, v, context)
    call = make_call(q, k, v, context, target=target, interpret=False, block_q=block_q, block_kv=block_kv)
    return _attention(call, q, k, v, context)


def pallas_kernel(q, k, v, context: AttentionContext, *, block_q: int | None = None, block_kv: int | None = None,
                  interpret: bool | str = False):
    """Flash attention as a Pallas kernel, with the shapes and numerics of ``flash_kernel``.

    q ``[B, T, H, D]``, k ``[B, S, K, D]``, v ``[B, S, K, E]`` -> ``[B, T, H, E]`` in q's dtype;
    differentiable in q, k, v and the context's sinks. The chip is picked when the call is
    lowered: for ``cuda`` the Triton kernel, for ``tpu`` the Mosaic one (each with its chip's
    default blocks, ``Target.blocks``), and on any other platform (a CPU) the Triton-shaped
    body in interpret mode. A call whose programs would not fit a chip's on-chip memory
    (``Target.footprint``) is served there by ``flash_kernel``. ``interpret=True`` (or "tpu":
    the TPU's blocks and tables) runs the body on the CPU. T, S need not be multiples of the
    blocks; D, E are padded to a width the chip tiles (``padded_width``).
    """
    check_call(q, k, v, context, block_q=block_q, block_kv=block_kv, interpret=interpret)
    blocks = dict(block_q=block_q, block_kv=block_kv)
    if interpret:
        call = make_call(q, k, v, context, target="tpu" if interpret == "tpu" else "gpu", interpret=True, **blocks)
        return _attention(call, q, k, v, context)
    on_cpu = make_call(q, k, v, context, target="gpu", interpret=True, **blocks)
    return lax.platform_dependent(
        q, k, v, context,
        cuda=lambda *args: on_target(*args, "gpu", **blocks),
        tpu=lambda *args: on_target(*args, "tpu", **blocks),
        default=lambda *args: _attention(on_cpu, *args),
    )


def pallas_attention(q, k, v, *, block_q: int | None = None, block_kv: int | None = None,
                     interpret: bool | str = False, **keywords):
    """``pallas_kernel`` with the call described by the keywords of ``multi_head_attention``."""
    context = AttentionContext.from_keywords(q, k, **keywords)
    return pallas_kernel(q, k, v, context, block_q=block_q, block_kv=block_kv, interpret=interpret)
