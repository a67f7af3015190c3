"""Caches: decode one token at a time without recomputing the past.

A cache is a value (a ``NamedTuple`` pytree: buffers, then ``lengths``), not hidden
state: a call that uses one returns ``(output, new_cache)``. Every cache has the same
interface,

    view, new_cache = cache.update(*new_tokens, num_new=None)

where the new tokens are this call's ``[B, T, ...]`` entries (T tokens: a whole prompt
or one decode step, through the same code) and ``view`` holds what the queries attend
to: the buffers and the **absolute position** of every slot. Masks come from positions
(``kv_pos <= q_pos``), so an empty or stale slot is hidden simply by giving it a position
no query can reach (``EMPTY_POSITION``). The queries' own positions always come from the
cache (``next_positions``), so they cannot disagree with it.

- ``KVCache``: preallocated ``[B, S_max, K, D]`` keys and ``[B, S_max, K, E]`` values;
  slot j holds position j.
- ``SlidingKVCache``: for sliding-window layers; keeps only the last ``W`` tokens, so its
  memory is the window, not the sequence.
- ``LatentCache``: MLA's compressed latent ``[B, S_max, L]`` and RoPE key
  ``[B, S_max, R]``; preallocated like ``KVCache``.

The two ways of keeping tokens, writing at each row's length (``_append``) and keeping a
window (``_slide``), and one policy for what may be written (``_check_new_tokens``: the
cache's shapes and exactly its dtype), are shared by all three. At the end: how many
numbers each kind stores per token (DeepSeek-V2, Table 1).

Shape letters: B batch, T new tokens, S_max capacity, W window, K key/value heads,
D key width, E value width, L latent width, R RoPE width.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

# A position larger than any query position: a key slot holding it is never visible.
EMPTY_POSITION = jnp.iinfo(jnp.int32).max


def next_positions(lengths, T: int):
    """int32 ``[B, T]``: the positions of T tokens that continue sequences of ``lengths [B]``."""
    return jnp.asarray(lengths, jnp.int32)[:, None] + jnp.arange(T, dtype=jnp.int32)


def positions_from_cache(cache, T: int, positions=None):
    """int32 ``[B, T]``: where T new tokens that continue ``cache`` sit.

    The one rule every layer follows with a cache: the queries' positions are derived
    from ``cache.lengths``; a caller who passes ``positions`` as well gets an error
    instead of a silent choice between the two.
    """
    if positions is not None:
        raise ValueError(
            "with a cache the positions of the new tokens come from cache.lengths "
            "(cache.lengths[:, None] + arange(T)); do not pass positions as well"
        )
    return next_positions(cache.lengths, T)


def slot_positions(batch: int, capacity: int):
    """int32 ``[B, S_max]``: slot j of a preallocated cache holds position j."""
    return jnp.broadcast_to(jnp.arange(capacity, dtype=jnp.int32), (batch, capacity))


def check_num_new(num_new, B: int, T: int):
    """``num_new [B]``: how many of the T new tokens of each row are real (ragged prompts)."""
    if num_new is None:
        return jnp.full((B,), T, jnp.int32)
    num_new = jnp.asarray(num_new)
    if not jnp.issubdtype(num_new.dtype, jnp.integer):
        raise TypeError(f"num_new must be integers, got dtype {num_new.dtype}")
    if num_new.shape != (B,):
        raise ValueError(f"num_new must be [B={B}], got {num_new.shape}")
    return num_new.astype(jnp.int32)


def write_at_lengths(buffer, new, lengths):
    """Writes row b of ``new [B, T, ...]`` into ``buffer [B, S_max, ...]`` at slot ``lengths[b]``.

    One ``lax.dynamic_update_slice`` per row (vmapped over the batch), so a prefill
    (T > 1) and a decode step (T = 1) are the same operation.
    """

    def write(row, new_row, start):  # [S_max, ...], [T, ...], [] -> [S_max, ...]
        return lax.dynamic_update_slice(row, new_row, (start,) + (0,) * (row.ndim - 1))

    return jax.vmap(write)(buffer, new, lengths)


# ------------------------------------------------------------- shared by every cache


def _check_new_tokens(cache, new: tuple):
    """The one policy for what may enter a cache: entries ``[B, T, ...]`` with the
    buffers' B and trailing axes, and exactly their dtype (no silent cast). Returns (B, T)."""
    names = cache._fields[:-1]
    buffers = cache[:-1]
    if len(new) != len(buffers):
        raise ValueError(f"{type(cache).__name__}.update takes {len(buffers)} arrays ({', '.join(names)}), got {len(new)}")
    B = buffers[0].shape[0]
    T = new[0].shape[1] if new[0].ndim >= 2 else None
    for name, buffer, x in zip(names, buffers, new):
        expected = (B, T) + buffer.shape[2:]
        if x.shape != expected:
            described = ", ".join(f"{n} {b.shape}" for n, b in zip(names, buffers))
            got = ", ".join(f"{n} {a.shape}" for n, a in zip(names, new))
            raise ValueError(
                f"new {got} do not fit the {type(cache).__name__} ({described}): "
                f"need {name} [B={B}, T, {', '.join(map(str, buffer.shape[2:]))}]"
            )
        if x.dtype != buffer.dtype:
            raise ValueError(
                f"new {name} has dtype {x.dtype} but the {type(cache).__name__} holds {buffer.dtype}; "
                f"cast it (x.astype({buffer.dtype})) or create the cache with dtype={x.dtype}"
            )
    return B, T


def _append(cache, new: tuple, num_new):
    """Writes the new tokens at each row's length of a preallocated cache.

    Returns ``(buffers, positions [B, S_max], lengths)`` of the new cache.
    """
    B, T = _check_new_tokens(cache, new)
    capacity = cache[0].shape[1]
    if T > capacity:
        shapes = ", ".join(f"{n} {b.shape}" for n, b in zip(cache._fields[:-1], cache[:-1]))
        raise ValueError(f"cannot write {T} tokens into a {type(cache).__name__} of capacity {capacity} ({shapes})")
    num_new = check_num_new(num_new, B, T)
    buffers = tuple(write_at_lengths(buffer, x, cache.lengths) for buffer, x in zip(cache[:-1], new))
    return buffers, slot_positions(B, capacity), cache.lengths + num_new


def _slide(cache, new: tuple, num_new):
    """Appends the new tokens to a window of the last W tokens.

    Returns ``(view buffers [B, W + T, ...], view positions [B, W + T], kept buffers
    [B, W, ...], lengths)``: the view is the old window followed by the T new tokens,
    so that every query of a prefill with T > W still finds the W - 1 tokens before it;
    the kept window is the last W real tokens of that sequence (one ``dynamic_slice``
    per row).
    """
    B, T = _check_new_tokens(cache, new)
    W = cache[0].shape[1]
    num_new = check_num_new(num_new, B, T)
    view = tuple(jnp.concatenate([buffer, x], axis=1) for buffer, x in zip(cache[:-1], new))  # [B, W + T, ...]
    positions = next_positions(cache.lengths - W, W + T)  # [B, W + T]
    positions = jnp.where(positions < 0, EMPTY_POSITION, positions)  # slots before the first token

    def keep_last_window(sequence, start):  # [W + T, ...], [] -> [W, ...]
        return lax.dynamic_slice_in_dim(sequence, start, W, axis=0)

    kept = tuple(jax.vmap(keep_last_window)(x, num_new) for x in view)
    return view, positions, kept, cache.lengths + num_new


def _overflowed(cache):
    return cache.lengths > cache[0].shape[1]


# ------------------------------------------------------------------- the caches


class KVView(NamedTuple):
    """What the queries of one call attend to.

    k ``[B, S, K, D]``, v ``[B, S, K, E]``, positions int32 ``[B, S]`` (absolute token
    position of each slot; ``EMPTY_POSITION`` for a slot that holds nothing), lengths
    int32 ``[B]``: slots ``>= lengths[b]`` of row b hold nothing, so a kernel may stop
    there (``decode_attention`` does).
    """

    k: jax.Array
    v: jax.Array
    positions: jax.Array
    lengths: jax.Array


class KVCache(NamedTuple):
    """A preallocated key/value cache of capacity ``S_max`` per sequence.

    k ``[B, S_max, K, D]``, v ``[B, S_max, K, E]``, lengths int32 ``[B]`` (tokens
    stored per sequence; also the position of the next token).
    """

    k: jax.Array
    v: jax.Array
    lengths: jax.Array

    @classmethod
    def create(cls, *, batch: int, max_length: int, kv_heads: int, head_dim: int, value_dim=None, dtype=jnp.float32):
        """Zero buffers ``[batch, max_length, kv_heads, head_dim]`` and lengths 0."""
        value_dim = head_dim if value_dim is None else value_dim
        return cls(
            k=jnp.zeros((batch, max_length, kv_heads, head_dim), dtype),
            v=jnp.zeros((batch, max_length, kv_heads, value_dim), dtype),
            lengths=jnp.zeros((batch,), jnp.int32),
        )

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    def overflowed(self):
        """bool ``[B]``: rows that were asked to hold more than ``S_max`` tokens."""
        return _overflowed(self)

    def update(self, k_new, v_new, num_new=None):
        """Writes T new tokens at each row's length; returns ``(KVView, new_cache)``.

        ``k_new [B, T, K, D]`` and ``v_new [B, T, K, E]`` in the cache's dtype. Row b's
        tokens go to slots ``lengths[b] .. lengths[b] + T - 1`` with
        ``lax.dynamic_update_slice``; only the first ``num_new[b]`` count (the rest is
        padding of a ragged prompt: it sits at positions no query reaches and is
        overwritten by the next call).

        Overflow: ``T > S_max`` is a ``ValueError`` here. Where lengths are traced,
        ``lengths[b] + T > S_max`` cannot be an exception; then
        ``dynamic_update_slice`` clamps the write to end at slot ``S_max - 1`` (older
        tokens are overwritten), ``lengths`` still count every token and
        ``overflowed()`` is True for that row. ``jaxattn.lm.generate`` checks the
        sizes before tracing so that this never happens there.
        """
        (k, v), positions, lengths = _append(self, (k_new, v_new), num_new)
        return KVView(k, v, positions, jnp.minimum(lengths, self.capacity)), KVCache(k, v, lengths)


class SlidingKVCache(NamedTuple):
    """The last ``W`` keys/values of each sequence, for a sliding-window layer.

    k ``[B, W, K, D]``, v ``[B, W, K, E]`` in time order (slot W-1 is the newest),
    lengths int32 ``[B]``: tokens seen so far (slot j holds position ``lengths - W + j``).
    Memory is ``W`` tokens whatever the sequence length.
    """

    k: jax.Array
    v: jax.Array
    lengths: jax.Array

    @classmethod
    def create(cls, *, batch: int, window: int, kv_heads: int, head_dim: int, value_dim=None, dtype=jnp.float32):
        value_dim = head_dim if value_dim is None else value_dim
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        return cls(
            k=jnp.zeros((batch, window, kv_heads, head_dim), dtype),
            v=jnp.zeros((batch, window, kv_heads, value_dim), dtype),
            lengths=jnp.zeros((batch,), jnp.int32),
        )

    @property
    def window(self) -> int:
        return self.k.shape[1]

    def overflowed(self):
        """A sliding cache never overflows: old tokens leave the window."""
        return jnp.zeros(self.lengths.shape, bool)

    def update(self, k_new, v_new, num_new=None):
        """Appends T tokens; returns ``(KVView, new_cache)`` (the view has W + T slots)."""
        (k_all, v_all), positions, (k, v), lengths = _slide(self, (k_new, v_new), num_new)
        every_slot = jnp.full(lengths.shape, k_all.shape[1], jnp.int32)  # the view is window-sized: no bound to use
        return KVView(k_all, v_all, positions, every_slot), SlidingKVCache(k, v, lengths)


class LatentView(NamedTuple):
    """What MLA's queries attend to: c_kv ``[B, S, L]``, k_rope ``[B, S, R]``, positions
    ``[B, S]`` and lengths ``[B]`` (as in ``KVView``)."""

    c_kv: jax.Array
    k_rope: jax.Array
    positions: jax.Array
    lengths: jax.Array


class LatentCache(NamedTuple):
    """MLA's cache: ``c_kv [B, S_max, L]`` and ``k_rope [B, S_max, R]`` (L + R numbers per
    token and layer) plus lengths int32 ``[B]``. Same convention as ``KVCache``: slot j
    holds position j, one write path for prefill and decode."""

    c_kv: jax.Array
    k_rope: jax.Array
    lengths: jax.Array

    @classmethod
    def create(cls, *, batch: int, max_length: int, latent_dim: int, rope_dim: int, dtype=jnp.float32):
        return cls(
            c_kv=jnp.zeros((batch, max_length, latent_dim), dtype),
            k_rope=jnp.zeros((batch, max_length, rope_dim), dtype),
            lengths=jnp.zeros((batch,), jnp.int32),
        )

    @property
    def capacity(self) -> int:
        return self.c_kv.shape[1]

    def overflowed(self):
        """bool ``[B]``: rows asked to hold more than ``S_max`` tokens (see ``KVCache.update``)."""
        return _overflowed(self)

    def update(self, c_kv_new, k_rope_new, num_new=None):
        """Writes ``c_kv_new [B, T, L]``, ``k_rope_new [B, T, R]`` (the cache's dtype) at each
        row's length; returns ``(LatentView, new_cache)``. Overflow as in ``KVCache.update``."""
        (c_kv, k_rope), positions, lengths = _append(self, (c_kv_new, k_rope_new), num_new)
        return LatentView(c_kv, k_rope, positions, jnp.minimum(lengths, self.capacity)), LatentCache(c_kv, k_rope, lengths)


# ------------------------------------------------------------------ cache accounting


def kv_cache_elements_per_token(*, kv_heads: int, head_dim: int, value_dim: int | None = None) -> int:
    """Numbers a KV cache stores per token and layer: ``K (D + E)``.

    MHA (K = H): ``2 H D``; GQA: ``2 K D``; MQA (K = 1): ``2 D`` (DeepSeek-V2, Table 1).
    """
    return kv_heads * (head_dim + (head_dim if value_dim is None else value_dim))


def latent_cache_elements_per_token(*, latent_dim: int, rope_dim: int) -> int:
    """Numbers MLA's cache stores per token and layer: ``L + R`` (DeepSeek-V2, Table 1,
    written there as ``(d_c + d_h^R) l``, i.e. ``9/2 d_h`` per layer at d_c = 4 d_h, d_h^R = d_h / 2)."""
    return latent_dim + rope_dim
