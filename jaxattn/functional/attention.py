"""Scaled dot-product attention, from one head to many.

The chapter in three steps:

1. ``attention_weights``: one query row against all keys, ``softmax(q k^T / sqrt(D))``.
2. ``attention``: the weighted sum of values. This one-head kernel, ``[T, D]``, is the
   only place where dense attention is computed; everything multi-head is built from it.
3. ``dense_kernel``: the same kernel ``jax.vmap``-ed over query heads, key/value heads (so
   that GQA/MQA share K/V without copying them) and the batch, for a call described by an
   ``AttentionContext``; ``multi_head_attention`` is its keyword form.

Shape letters: B batch, T queries, S keys/values, H query heads, K key/value heads
(G = H // K queries share one K/V head), D query/key width, E value width.

Numerics contract: logits and softmax in float32 whatever the input dtype, output
in the input dtype; boolean masks (``True`` = may attend); masked logits use a large
finite negative; a query row that may attend to nothing returns zeros (and zero
gradients), never NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxattn.functional.heads import check_multi_head_shapes, check_same_dtype, group_heads, vmap_heads
from jaxattn.functional.checks import check_bool_mask
from jaxattn.functional.masks import MASK_VALUE, AttentionContext, default_scale
from jaxattn.functional.softmax import block_logits

# ------------------------------------------------------------------- one head, [T, D]


def attention_weights(q, k, *, mask=None, scale=None, logit_softcap=None, sink=None):
    """Softmax attention weights of one head.

    ``weights = softmax(s)`` row by row with the logits ``s = q k^T * scale`` (Vaswani et
    al. 2017, equation 1), ``scale = 1/sqrt(D)`` by default, soft-capped to
    ``cap * tanh(s / cap)`` when ``logit_softcap`` is set (Gemma 2). A ``sink`` logit joins
    every row's denominator, ``sum_j e^(s_j) + e^sink``, and is then dropped, so a row's
    weights sum to less than 1 (gpt-oss).

    Args:
      q: ``[T, D]`` queries.
      k: ``[S, D]`` keys.
      mask: optional bool ``[T, S]`` (or broadcastable), ``True`` = may attend.
      scale: multiplier of the logits; ``1/sqrt(D)`` when ``None``.
      logit_softcap: the cap, or ``None``.
      sink: a float scalar, or ``None``.

    Returns:
      float32 ``[T, S]``; every row sums to 1 (less with a sink), except a row with nothing
      to attend to, which is all zeros.
    """
    if q.ndim != 2 or k.ndim != 2:
        raise ValueError(f"attention_weights takes one head: q [T, D], k [S, D]; got q {q.shape}, k {k.shape}")
    (T, D), (S, Dk) = q.shape, k.shape
    if D != Dk:
        raise ValueError(f"q and k need the same width D, got q {q.shape}, k {k.shape}")
    check_same_dtype(q=q, k=k)
    logits = block_logits(q, k, scale=default_scale(D, scale), cap=logit_softcap)  # [T, S]: the one rule
    if mask is not None:
        mask = check_bool_mask(mask)
        try:
            mask = jnp.broadcast_to(mask, (T, S))
        except ValueError as error:
            raise ValueError(f"mask {mask.shape} does not broadcast to [T, S] = {(T, S)}") from error
        # Masking comes after the cap: a capped MASK_VALUE would be -cap, a real weight.
        logits = jnp.where(mask, logits, MASK_VALUE)
    if sink is not None:  # one more column, the sink's, always visible; dropped after the softmax
        logits = jnp.concatenate([logits, jnp.broadcast_to(jnp.asarray(sink, jnp.float32), (T, 1))], axis=-1)
    weights = jax.nn.softmax(logits, axis=-1)[:, :S]
    if mask is None:
        return weights
    # How a row with nothing to attend to becomes zeros: every logit of that row is
    # MASK_VALUE, so the softmax sees equal numbers and returns the uniform 1/S (finite:
    # MASK_VALUE - max is 0, not inf - inf); with a sink, the sink takes all the weight.
    # The where() replaces what is left by 0, and because where() passes no gradient to
    # the branch it did not pick, no gradient reaches the masked logits either. In a row
    # with at least one visible key, masked logits sit 1e30 below the maximum and exp()
    # underflows to exactly 0.
    return jnp.where(mask, weights, 0.0)


def attention(q, k, v, *, mask=None, scale=None, logit_softcap=None, sink=None):
    """One head of scaled dot-product attention: ``softmax(s) v`` (logits as in ``attention_weights``).

    Args:
      q: ``[T, D]`` queries.
      k: ``[S, D]`` keys.
      v: ``[S, E]`` values.
      mask, scale, logit_softcap, sink: as in ``attention_weights``.

    Returns:
      ``[T, E]`` in the dtype of ``q``. A query row with nothing to attend to is zeros.
    """
    if v.ndim != 2 or v.shape[0] != k.shape[0]:
        raise ValueError(f"v must be [S, E] with the S of k; got k {k.shape}, v {v.shape}")
    check_same_dtype(q=q, k=k, v=v)
    weights = attention_weights(q, k, mask=mask, scale=scale, logit_softcap=logit_softcap, sink=sink)  # [T, S]
    # The weighted sum in float32 (the weights as they are, the values widened), as the blockwise kernels do it.
    out = jnp.einsum("ts,se->te", weights, v.astype(jnp.float32))
    return out.astype(q.dtype)


# ------------------------------------------------------------- many heads, [B, T, H, D]


def _grouped_mask(context: AttentionContext, K: int):
    mask = context.full_mask()  # [B|1, H|1, T, S], or None when nothing is masked
    return None if mask is None else group_heads(mask, K)  # [B|1, K|1, G|1, T, S]


def dense_kernel(q, k, v, context: AttentionContext):
    """Multi-head attention built from the one-head ``attention`` kernel with ``jax.vmap``.

    ``out[b, :, h] = attention(q[b, :, h], k[b, :, h // G], v[b, :, h // G])`` with
    ``G = H // K``: MHA when K = H, GQA when 1 < K < H, MQA when K = 1
    (Ainslie et al. 2023, arXiv 2305.13245; Shazeer 2019, arXiv 1911.02150); masks and
    logits as ``context`` says.

    q ``[B, T, H, D]``, k ``[B, S, K, D]``, v ``[B, S, K, E]`` -> ``[B, T, H, E]`` in q's dtype.
    """
    B, T, S, H, K, D, E = check_multi_head_shapes(q, k, v)
    context.check(B, T, S, H)
    scale, cap = context.logit_scale(D), context.logit_softcap

    def one_head(q, k, v, mask, sink):  # [T, D], [S, D], [S, E], [T, S], [] -> [T, E]
        return attention(q, k, v, mask=mask, scale=scale, logit_softcap=cap, sink=sink)

    over_heads, mask = vmap_heads(one_head, _grouped_mask(context, K), n_query=1, n_kv=2, head_axis=1,
                                  per_head=context.sinks)
    out = over_heads(q.reshape(B, T, K, H // K, D), k, v, mask, context.head_sinks(K))  # [B, T, K, G, E]
    return out.reshape(B, T, H, E)  # [B, T, H, E]


def dense_weights(q, k, context: AttentionContext):
    """The attention weights of every head, float32 ``[B, H, T, S]``: what ``dense_kernel``
    averages values with (rows sum to 1, less with sinks, 0 with nothing to attend to)."""
    B, T, S, H, K, D, _ = check_multi_head_shapes(q, k, k)
    context.check(B, T, S, H)
    scale, cap = context.logit_scale(D), context.logit_softcap

    def one_head(q, k, mask, sink):  # [T, D], [S, D], [T, S], [] -> [T, S]
        return attention_weights(q, k, mask=mask, scale=scale, logit_softcap=cap, sink=sink)

    over_heads, mask = vmap_heads(one_head, _grouped_mask(context, K), n_query=1, n_kv=1, head_axis=1,
                                  per_head=context.sinks)
    weights = over_heads(q.reshape(B, T, K, H // K, D), k, mask, context.head_sinks(K))  # [B, T, K, G, S]
    return weights.reshape(B, T, H, S).transpose(0, 2, 1, 3)  # [B, H, T, S]


def dense_kernel_with_weights(q, k, v, context: AttentionContext):
    """``(out [B, T, H, E], weights [B, H, T, S])`` from one computation of the weights: the
    kernel a layer uses when its weights are recorded (``context.record_weights``)."""
    B, T, S, H, K, D, E = check_multi_head_shapes(q, k, v)
    weights = dense_weights(q, k, context)  # [B, H, T, S]
    grouped = weights.reshape(B, K, H // K, T, S)
    out = jnp.einsum("bkgts,bske->btkge", grouped, v.astype(jnp.float32))  # float32, as in attention
    return out.reshape(B, T, H, E).astype(q.dtype), weights


# --------------------------------------------------------------- the keyword edge


def multi_head_attention(q, k, v, **keywords):
    """``dense_kernel`` with the call described by keywords.

    q ``[B, T, H, D]``, k ``[B, S, K, D]`` (``H % K == 0``), v ``[B, S, K, E]`` ->
    ``[B, T, H, E]`` in q's dtype. Keywords (``AttentionContext.from_keywords``): ``mask``,
    ``is_causal``, ``q_positions``, ``kv_positions``, ``kv_lengths``, ``window``,
    ``q_segment_ids``, ``kv_segment_ids``, ``scale``, ``logit_softcap``, ``sinks``.
    """
    return dense_kernel(q, k, v, AttentionContext.from_keywords(q, k, **keywords))


def multi_head_attention_weights(q, k, **keywords):
    """The attention weights of every head: what ``multi_head_attention`` averages values with.

    q ``[B, T, H, D]``, k ``[B, S, K, D]`` and the keywords of ``multi_head_attention`` ->
    float32 ``[B, H, T, S]``. For looking inside a model; the kernels never materialise this.
    """
    return dense_weights(q, k, AttentionContext.from_keywords(q, k, **keywords))
