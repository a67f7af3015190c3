"""The online softmax: attention over keys seen one block at a time.

Standard attention materialises a query row's scores against every key before its
softmax. The blockwise kernels (``flash.py``, ``decode.py``, ``ring.py``) instead fold the
keys in one block at a time, keeping three running statistics per query row (Rabe &
Staats 2021, arXiv 2112.05682; Dao et al. 2022, arXiv 2205.14135). After each block of
scores ``s_j``:

    m'   = max(m, max_j s_j)                          running maximum
    l'   = l e^(m - m') + sum_j e^(s_j - m')            running softmax denominator
    acc' = acc e^(m - m') + sum_j e^(s_j - m') v_j      running numerator
    out  = acc / l,   lse = m + log l                  at the end

A learned sink logit (gpt-oss) is a term of the denominator with no value: the state
starts from it (``m = sink``, ``l = 1``, ``acc = 0``) instead of from nothing, so it joins
each row's softmax exactly once, however many blocks follow and on whichever device they
are folded. Every kernel forms its logits with one function, ``block_logits``: the products
``q . k`` accumulated in float32, times the scale (in float32), then soft-capped (Gemma 2:
``s -> cap tanh(s / cap)``), before any mask or softmax sees them, so the dense kernel and the
blockwise ones round alike in every dtype. The weighted sum is float32 too (the values widened,
never the weights narrowed), so the kernels' outputs differ only by float32 summation order.

The backward pass (``block_gradients``) needs only ``lse`` and ``delta = rowsum(do * out)``:
each block's probabilities are recomputed as ``p = exp(s - lse)``. The sink's gradient is
``-sum_rows exp(sink - lse) * delta`` (``sink_gradient``).

Everything here is for one head and is ``jax.vmap``-ed over heads (``heads.vmap_heads``).
Shape letters as in ``heads.py``; ``bq``/``bk`` are the block sizes.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxattn.functional.heads import vmap_heads
from jaxattn.functional.masks import MASK_VALUE


class SoftmaxState(NamedTuple):
    """Running statistics of the online softmax for rows of some shape (float32): maximum
    m, denominator l, numerator acc ``[..., E]``."""

    m: jax.Array
    l: jax.Array
    acc: jax.Array

    @classmethod
    def start(cls, shape, E: int, sinks=None) -> "SoftmaxState":
        """The state before any key: nothing (m = MASK_VALUE, l = 0), or the sink alone
        (m = sink, l = e^0 = 1) when ``sinks`` (float32, broadcastable to ``shape``) is given."""
        if sinks is None:
            m, l = jnp.full(shape, MASK_VALUE, jnp.float32), jnp.zeros(shape, jnp.float32)
        else:
            m, l = jnp.broadcast_to(sinks.astype(jnp.float32), shape), jnp.ones(shape, jnp.float32)
        return cls(m, l, jnp.zeros((*shape, E), jnp.float32))


def soft_cap(s, cap: float | None):
    """Logit soft-capping (Gemma 2): ``cap * tanh(s / cap)``, smooth, and within (-cap, cap)."""
    return s if cap is None else cap * jnp.tanh(s / cap)


def block_logits(q, k, *, scale: float, cap: float | None = None):
    """The logits of one head and one block of keys: ``soft_cap(scale * q . k, cap)``, float32.

    The one rule every kernel (dense, flash, decode, ring) forms its logits by. q ``[bq, D]``
    and k ``[bk, D]`` (or tuples of parts ``[bq, D_i]`` and ``[bk, D_i]`` whose products add:
    MLA's content and RoPE halves) -> ``[bq, bk]``. One dtype policy: the products accumulate
    in float32 from the inputs' own dtype; the scale multiplies those float32 products (never
    the queries in their dtype); the cap comes last, before any mask (a capped mask value would
    be -cap, a real weight).
    """
    q_parts, k_parts = (q, k) if isinstance(q, tuple) else ((q,), (k,))
    products = sum(jnp.einsum("qd,kd->qk", q_i, k_i, preferred_element_type=jnp.float32)
                   for q_i, k_i in zip(q_parts, k_parts))  # [bq, bk]
    return soft_cap(products * jnp.float32(scale), cap)


def _row_stat(x, like):
    """A per-row statistic reduced over the keys of ``x [rows, bk]``, shaped like the state's
    ``like``: ``[rows]`` (the XLA kernels, vmapped) or ``[rows, 1]`` (a Pallas kernel, whose
    values stay 2-D on the chip)."""
    return x if like.ndim == x.ndim else x[..., 0]


def _as_column(stat, s):
    """A per-row statistic ``[rows]`` or ``[rows, 1]`` as a column against ``s [rows, bk]``."""
    return stat if stat.ndim == s.ndim else stat[..., None]


def online_softmax_step(s, v, mask, state: SoftmaxState) -> SoftmaxState:
    """Folds one block of keys into the running softmax of one head.

    s ``[bq, bk]`` the block's logits (float32), v ``[bk, E]``, mask bool ``[bq, bk]`` or
    ``None``; the state's m, l are ``[bq]`` or ``[bq, 1]`` (kept as given). A masked logit
    never counts: its ``p`` is set to exactly 0, so a row that has seen only masked keys
    keeps ``l = 0`` (or the sink's 1).
    """
    if mask is not None:
        s = jnp.where(mask, s, MASK_VALUE)
    m_new = jnp.maximum(state.m, _row_stat(s.max(axis=-1, keepdims=True), state.m))
    p = jnp.exp(s - _as_column(m_new, s))  # [bq, bk]
    if mask is not None:
        p = jnp.where(mask, p, 0.0)  # a fully masked row stays all zero
    correction = jnp.exp(state.m - m_new)
    l = state.l * correction + _row_stat(p.sum(axis=-1, keepdims=True), state.l)
    pv = jnp.einsum("qk,ke->qe", p, v.astype(jnp.float32),
                    preferred_element_type=jnp.float32)  # float32: the values widened, the weights as they are
    return SoftmaxState(m_new, l, state.acc * _as_column(correction, pv) + pv)


def online_softmax_finish(state: SoftmaxState):
    """``(out [..., E], lse)`` from the running statistics, float32 (lse shaped like ``m``).

    How a row that saw no visible key becomes zeros: without a sink its ``l`` stayed exactly
    0 (every ``p`` was masked to 0), so ``out`` and ``lse`` are set to 0 instead of ``0 / 0``;
    the backward pass then recomputes ``p = exp(s - 0)`` only where the mask allows, i.e.
    nowhere, and that row passes no gradient. With a sink, ``l = 1`` and ``acc = 0``: the
    sink took all the weight and the output is 0.
    """
    seen = state.l > 0
    safe_l = jnp.where(seen, state.l, 1.0)
    out = jnp.where(_as_column(seen, state.acc), state.acc / _as_column(safe_l, state.acc), 0.0)
    lse = jnp.where(seen, state.m + jnp.log(safe_l), 0.0)
    return out, lse


def with_sinks(out, lse, sinks):
    """A finished softmax ``(out [..., E], lse [...])`` joined by one sink logit per row
    (``sinks`` broadcastable to ``lse``), as if the state had started from it.

    Two softmaxes over disjoint sets merge by their log-sum-exps: the keys keep the share
    ``e^lse / (e^lse + e^sink) = sigmoid(lse - sink)`` of the weight, and the sink (no value)
    the rest. A row that saw no key (``out = 0``) stays 0. Returns the joined ``(out, lse)``.
    """
    share = jax.nn.sigmoid(lse - sinks)
    return out * share[..., None], jnp.logaddexp(lse, sinks)


def fold_block(q, state: SoftmaxState, k, v, mask, *, head_axis: int, scale: float,
               cap: float | None = None) -> SoftmaxState:
    """``online_softmax_step`` for every head at once: one key block into each head's state.

    q ``[B, ..K, G.., bq, D]`` and the state's ``m``, ``l`` ``[B, ..K, G.., bq]``,
    ``acc`` ``[.., E]``; k/v ``[B, ..K.., bk, D|E]``; the K (then G) axis at ``head_axis``
    once B is gone (``vmap_heads``: 0 head-major, 1 token-major); mask
    ``[B|1, K|1, G|1, bq, bk]`` or ``None``. Keys and values are read once per K/V head.
    """

    def one_head(q, m, l, acc, k, v, mask, _):
        return online_softmax_step(block_logits(q, k, scale=scale, cap=cap), v, mask, SoftmaxState(m, l, acc))

    over_heads, mask = vmap_heads(one_head, mask, n_query=4, n_kv=2, head_axis=head_axis)
    return SoftmaxState(*over_heads(q, *state, k, v, mask, None))


def block_probabilities(s, lse, mask):
    """A block's softmax weights recomputed from its logits: ``p = exp(s - lse)``, 0 where masked.
    s ``[rows, cols]``; lse broadcastable to it (a column ``[bq, 1]``, or a row ``[1, bq]`` when a
    kernel works on the transposed block ``[bk, bq]``); mask like s or ``None``."""
    p = jnp.exp(s - lse)
    return p if mask is None else jnp.where(mask, p, 0.0)


def logits_gradient(s, p, dp, delta, *, scale: float, cap: float | None):
    """d loss / d (q . k) of one block from its capped logits s, weights p and ``dp = do . v``:
    ``ds = p (dp - delta)`` through the cap's ``tanh`` and the scale. Any orientation: s, p, dp
    alike, delta (``rowsum(do * out)`` of each query) broadcastable to them."""
    ds = p * (dp - delta)
    if cap is not None:  # d tanh: through the cap to the scaled scores
        ds = ds * (1.0 - jnp.square(s / cap))
    return ds * jnp.float32(scale)  # through the scale to the products q . k


def _block_backward(q, do, lse, delta, k, v, mask, scale, cap):
    """Gradients of one head from one (query block, key block) pair, recomputing p.

    q ``[bq, D]``, do ``[bq, E]`` output cotangent, lse and delta = rowsum(do * out) ``[bq]``,
    mask ``[bq, bk]`` or ``None``. Returns dq ``[bq, D]``, dk ``[bk, D]``, dv ``[bk, E]`` (float32).
    """
    s = block_logits(q, k, scale=scale, cap=cap)  # [bq, bk], capped
    p = block_probabilities(s, lse[:, None], mask)
    dv = jnp.einsum("qk,qe->ke", p.astype(do.dtype), do, preferred_element_type=jnp.float32)
    dp = jnp.einsum("qe,ke->qk", do, v, preferred_element_type=jnp.float32)
    ds = logits_gradient(s, p, dp, delta[:, None], scale=scale, cap=cap)
    dq = jnp.einsum("qk,kd->qd", ds.astype(k.dtype), k, preferred_element_type=jnp.float32)
    dk = jnp.einsum("qk,qd->kd", ds.astype(q.dtype), q, preferred_element_type=jnp.float32)
    return dq, dk, dv


def block_gradients(q, do, lse, delta, k, v, mask, *, head_axis: int, scale: float, cap: float | None = None):
    """``_block_backward`` for every head at once (layout as in ``fold_block``). Returns
    dq (per query head), dk and dv per query head (sum over G for the K/V heads)."""

    def one_head(q, do, lse, delta, k, v, mask, _):
        return _block_backward(q, do, lse, delta, k, v, mask, scale, cap)

    over_heads, mask = vmap_heads(one_head, mask, n_query=4, n_kv=2, head_axis=head_axis)
    return over_heads(q, do, lse, delta, k, v, mask, None)


def sink_gradient(sinks, lse, delta, rows_axes):
    """d loss / d sink per head: ``-sum over rows of exp(sink - lse) * delta``.

    The sink's probability in row i is ``exp(sink - lse_i)``; raising the sink lowers every
    key's weight in proportion, so ``d out_i / d sink = -p_sink,i out_i``. ``sinks`` float32
    broadcastable to ``lse``; ``rows_axes`` the axes of ``lse``/``delta`` that are not heads.
    """
    return -jnp.sum(jnp.exp(sinks - lse) * delta, axis=rows_axes)
