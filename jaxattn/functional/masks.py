"""Boolean attention masks.

Every mask in jaxattn is boolean with ``True`` meaning *may attend*. Masks are
built from absolute token positions, not from array indices, so one rule serves a
full forward pass, a chunk of a prefill and a single decode step:

    key j is visible to query i  iff  kv_pos[j] <= q_pos[i]
                                      (and q_pos[i] - kv_pos[j] < window)

Shape letters: B batch, T queries, S keys (see the README glossary).
"""

from __future__ import annotations

import jax.numpy as jnp


def _check_integer(name: str, x) -> None:
    if not jnp.issubdtype(jnp.asarray(x).dtype, jnp.integer):
        raise TypeError(f"{name} must be an integer array of token positions, got dtype {jnp.asarray(x).dtype}")


def causal_mask(q_positions, kv_positions, window: int | None = None):
    """Causal (optionally sliding-window) mask from absolute positions.

    Args:
      q_positions: int ``[..., T]`` absolute position of each query.
      kv_positions: int ``[..., S]`` absolute position of each key; leading axes
        broadcast against those of ``q_positions``.
      window: keep only keys with ``q_pos - kv_pos < window`` (a query sees itself
        and the ``window - 1`` tokens before it). ``None`` means no window.

    Returns:
      bool ``[..., T, S]``: ``kv_pos <= q_pos`` (and inside the window).
    """
    _check_integer("q_positions", q_positions)
    _check_integer("kv_positions", kv_positions)
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be a positive int, got {window!r}")
    q_pos = jnp.asarray(q_positions)[..., :, None]  # [..., T, 1]
    kv_pos = jnp.asarray(kv_positions)[..., None, :]  # [..., 1, S]
    mask = kv_pos <= q_pos  # [..., T, S]
    if window is not None:
        mask = mask & (q_pos - kv_pos < window)
    return mask


def padding_mask(kv_lengths, S: int):
    """Mask of the valid prefix of each sequence.

    Args:
      kv_lengths: int ``[B]``, the number of valid keys of each sequence.
      S: the padded key length.

    Returns:
      bool ``[B, S]``: ``True`` at ``j < kv_lengths[b]``.
    """
    _check_integer("kv_lengths", kv_lengths)
    kv_lengths = jnp.asarray(kv_lengths)
    if kv_lengths.ndim != 1:
        raise ValueError(f"kv_lengths must have shape [B], got {kv_lengths.shape}")
    return jnp.arange(S)[None, :] < kv_lengths[:, None]  # [B, S]


def combine_masks(*masks):
    """Logical AND of boolean masks that broadcast together; ``None`` entries are skipped.

    Returns ``None`` when every mask is ``None`` (nothing is masked).
    """
    result = None
    for mask in masks:
        if mask is None:
            continue
        mask = jnp.asarray(mask)
        if mask.dtype != jnp.bool_:
            raise TypeError(f"masks must be boolean (True = may attend), got dtype {mask.dtype}")
        result = mask if result is None else jnp.logical_and(result, mask)
    return result
