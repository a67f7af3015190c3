"""Shared test helpers: an independent float64 NumPy reference for attention."""

import os

import numpy as np

# The suite is dominated by XLA compile time, not run time: skip LLVM's optimisation
# passes (the HLO, and so the numerics, are unchanged). Must be set before JAX starts.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")


def reference_attention(q, k, v, *, q_positions=None, kv_positions=None, kv_lengths=None, window=None, mask=None, scale=None):
    """Float64 loop over batch and heads: the textbook formula, written independently.

    q [B, T, H, D], k [B, S, K, D], v [B, S, K, E] -> [B, T, H, E]. Causal when positions
    are given. Rows with nothing to attend to are zeros.
    """
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    B, T, H, D = q.shape
    S, K, E = k.shape[1], k.shape[2], v.shape[3]
    scale = 1.0 / np.sqrt(D) if scale is None else scale
    out = np.zeros((B, T, H, E))
    for b in range(B):
        for h in range(H):
            kv_head = h // (H // K)
            for i in range(T):
                allowed = np.ones(S, dtype=bool)
                if q_positions is not None:
                    qp = np.broadcast_to(np.asarray(q_positions), (B, T))[b, i]
                    kp = np.broadcast_to(np.asarray(kv_positions), (B, S))[b]
                    allowed &= kp <= qp
                    if window is not None:
                        allowed &= qp - kp < window
                if kv_lengths is not None:
                    allowed &= np.arange(S) < kv_lengths[b]
                if mask is not None:
                    allowed &= np.broadcast_to(np.asarray(mask), (B, H, T, S))[b, h, i]
                if not allowed.any():
                    continue
                logits = scale * k[b, :, kv_head] @ q[b, i, h]
                logits = np.where(allowed, logits, -np.inf)
                weights = np.exp(logits - logits.max())
                weights /= weights.sum()
                out[b, i, h] = weights @ v[b, :, kv_head]
    return out
