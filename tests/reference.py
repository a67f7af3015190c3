"""Inputs and the independent references the tests compare against: seeded random arrays, a
float64 NumPy loop for attention (values and, by the softmax's backward written out, gradients),
explicit 2x2 rotations for RoPE, and a float64 attention layer.

    from tests.reference import normal, reference_attention
"""

import jax
import jax.numpy as jnp
import numpy as np


def normal(shape, dtype=jnp.float32, seed=0, scale=1.0):
    """Seeded standard-normal numbers. NumPy draws: jax.random would compile a sampler
    for every new shape, and the suite is compile-bound."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * scale, dtype)


def packed_segments(lengths):
    """Segment ids of sequences of the given lengths packed one after another: int32 [sum(lengths)]."""
    return np.repeat(np.arange(len(lengths)), lengths).astype(np.int32)


def value_and_grads(fn, q, k, v, cotangent=None, **kwargs):
    """``fn(q, k, v, **kwargs)`` and the gradients of ``sum(out * cotangent)`` w.r.t. q, k, v."""
    if cotangent is None:
        cotangent = normal((q.shape[0], q.shape[1], q.shape[2], v.shape[-1]), seed=9)

    def loss(q, k, v):
        out = fn(q, k, v, **kwargs)
        return jnp.sum(out.astype(jnp.float32) * cotangent), out

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return out, grads


def allowed_keys(b, h, i, B, T, S, H, *, q_positions, kv_positions, kv_lengths, window, mask, q_segment_ids, kv_segment_ids):
    """Which keys query i of row b, head h may see: the rule, written out token by token."""
    allowed = np.ones(S, dtype=bool)
    if q_positions is not None:
        qp = np.broadcast_to(np.asarray(q_positions), (B, T))[b, i]
        kp = np.broadcast_to(np.asarray(kv_positions), (B, S))[b]
        allowed &= kp <= qp
        if window is not None:
            allowed &= qp - kp < window
    if kv_lengths is not None:
        allowed &= np.arange(S) < np.asarray(kv_lengths)[b]
    if q_segment_ids is not None:
        qs = np.broadcast_to(np.asarray(q_segment_ids), (B, T))[b, i]
        allowed &= np.broadcast_to(np.asarray(kv_segment_ids), (B, S))[b] == qs
    if mask is not None:
        allowed &= np.broadcast_to(np.asarray(mask), (B, H, T, S))[b, h, i]
    return allowed


def reference_attention(
    q, k, v, *, q_positions=None, kv_positions=None, kv_lengths=None, window=None, mask=None, scale=None,
    q_segment_ids=None, kv_segment_ids=None, logit_softcap=None, sinks=None, cotangent=None,
):
    """Float64 loop over batch, heads and queries: the textbook formula, written independently.

    q [B, T, H, D], k [B, S, K, D], v [B, S, K, E] -> out [B, T, H, E]. Causal when
    positions are given. Logits ``scale * q.k``, then ``cap * tanh(s / cap)`` with
    ``logit_softcap``, then the mask; ``sinks [H]`` adds ``e^sink`` to each row's denominator.
    Rows with nothing to attend to are zeros. With ``cotangent`` [B, T, H, E] it also returns
    the gradients of ``sum(out * cotangent)``, by the softmax's backward written out by hand:
    ``(out, dq, dk, dv)``, and ``d sinks [H]`` last when sinks are given.
    """
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    B, T, H, D = q.shape
    S, K, E = k.shape[1], k.shape[2], v.shape[3]
    scale = 1.0 / np.sqrt(D) if scale is None else scale
    g = None if cotangent is None else np.asarray(cotangent, np.float64)
    sinks = None if sinks is None else np.asarray(sinks, np.float64)
    out = np.zeros((B, T, H, E))
    dq, dk, dv, dsinks = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v), np.zeros(H)
    rule = dict(q_positions=q_positions, kv_positions=kv_positions, kv_lengths=kv_lengths, window=window, mask=mask,
                q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids)
    for b in range(B):
        for h in range(H):
            kv_head = h // (H // K)
            for i in range(T):
                allowed = allowed_keys(b, h, i, B, T, S, H, **rule)
                if not allowed.any() and sinks is None:
                    continue
                raw = scale * k[b, :, kv_head] @ q[b, i, h]  # [S]
                capped = raw if logit_softcap is None else logit_softcap * np.tanh(raw / logit_softcap)
                logits = np.where(allowed, capped, -np.inf)
                top = logits.max() if sinks is None else max(logits.max(), sinks[h])
                p = np.exp(logits - top)
                denominator = p.sum() + (0.0 if sinks is None else np.exp(sinks[h] - top))
                p /= denominator
                out[b, i, h] = p @ v[b, :, kv_head]
                if g is not None:
                    dv[b, :, kv_head] += np.outer(p, g[b, i, h])
                    dp = v[b, :, kv_head] @ g[b, i, h]  # [S]
                    ds = p * (dp - p @ dp)  # the softmax's Jacobian applied to dp (the sink's dp is 0)
                    if sinks is not None:
                        dsinks[h] -= np.exp(sinks[h] - top) / denominator * (p @ dp)
                    if logit_softcap is not None:
                        ds = ds * (1 - np.tanh(raw / logit_softcap) ** 2)
                    dq[b, i, h] += scale * ds @ k[b, :, kv_head]
                    dk[b, :, kv_head] += scale * np.outer(ds, q[b, i, h])
    if g is None:
        return out
    return (out, dq, dk, dv) if sinks is None else (out, dq, dk, dv, dsinks)


def reference_rope(x, positions, style, theta=10000.0, *, rotary_dim=None, inv_freq=None, factor=1.0):
    """Explicit 2x2 rotation of each pair of the first ``rotary_dim`` dimensions, float64. x [T, D],
    positions [T]; ``inv_freq`` [rotary_dim / 2] replaces ``theta^(-2i/R)``; cos and sin times ``factor``."""
    x = np.asarray(x, np.float64)
    D = x.shape[-1]
    R = D if rotary_dim is None else rotary_dim
    frequencies = theta ** (-2 * np.arange(R // 2) / R) if inv_freq is None else np.asarray(inv_freq, np.float64)
    out = x.copy()
    for t in range(x.shape[0]):
        for i in range(R // 2):
            a, b = (i, i + R // 2) if style == "half" else (2 * i, 2 * i + 1)
            angle = positions[t] * frequencies[i]
            c, s = factor * np.cos(angle), factor * np.sin(angle)
            out[t, a] = c * x[t, a] - s * x[t, b]
            out[t, b] = s * x[t, a] + c * x[t, b]
    return out


def reference_layer(params, x, positions, *, rope_theta, style="half", window=None, rotary_dim=None, inv_freq=None,
                    rope_factor=1.0, qk_norm=None, epsilon=1e-6, scale=None, logit_softcap=None):
    """Float64 attention layer from ``AttentionParams``-shaped weights: projections, QK-norm
    (``"head"``: over D; ``"projection"``: over H and D), RoPE per head (partial, rescaled
    frequencies), the reference attention (causal on ``positions [B, T]``; soft-cap, sinks),
    output projection."""
    params = params if isinstance(params, dict) else params._asdict()
    p = {name: None if value is None else np.asarray(value, np.float64) for name, value in params.items()}
    p = {name: p.get(name) for name in ("w_q", "w_k", "w_v", "w_o", "b_q", "b_k", "b_v", "b_o", "q_norm", "k_norm",
                                        "sinks")}
    x = np.asarray(x, np.float64)
    q = np.einsum("btc,chd->bthd", x, p["w_q"]) + (0 if p["b_q"] is None else p["b_q"])
    k = np.einsum("btc,ckd->btkd", x, p["w_k"]) + (0 if p["b_k"] is None else p["b_k"])
    v = np.einsum("btc,cke->btke", x, p["w_v"]) + (0 if p["b_v"] is None else p["b_v"])
    if qk_norm is not None:
        axes = -1 if qk_norm == "head" else (-2, -1)

        def norm(y, w):
            return y / np.sqrt(np.mean(y * y, axis=axes, keepdims=True) + epsilon) * w

        q, k = norm(q, p["q_norm"]), norm(k, p["k_norm"])
    positions = np.broadcast_to(positions, x.shape[:2])
    if rope_theta is not None:
        def rotate(y):
            return np.stack([np.stack([reference_rope(y[b, :, h], positions[b], style, rope_theta, rotary_dim=rotary_dim,
                                                      inv_freq=inv_freq, factor=rope_factor)
                                       for h in range(y.shape[2])], 1) for b in range(x.shape[0])])

        q, k = rotate(q), rotate(k)
    o = reference_attention(q, k, v, q_positions=positions, kv_positions=positions, window=window, scale=scale,
                            logit_softcap=logit_softcap, sinks=p["sinks"])
    return np.einsum("bthe,hec->btc", o, p["w_o"]) + (0 if p["b_o"] is None else p["b_o"])
