"""Key/value caches: decode one token at a time without recomputing the past.

A cache is a value (a ``NamedTuple`` pytree), not hidden state: a call that uses one
returns ``(output, new_cache)``. Both caches here have the same interface,

    view, new_cache = cache.update(k_new, v_new, num_new)

where ``k_new [B, T, K, D]``, ``v_new [B, T, K, E]`` are this call's keys and values
(T tokens: a whole prompt or one decode step, through the same code) and ``view`` holds
what the queries attend to: keys, values and the **absolute position** of every key
slot. Masks come from positions (``kv_pos <= q_pos``), so an empty or stale slot is
hidden simply by giving it a position no query can reach (``EMPTY_POSITION``).

- ``KVCache``: preallocated ``[B, S_max, ...]`` buffers; slot j holds position j.
- ``SlidingKVCache``: for sliding-window layers. It keeps only the last ``W`` tokens,
  so its memory is the window, not the sequence.

Shape letters: B batch, T new tokens, S_max capacity, W window, K key/value heads,
D key width, E value width.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

# A position larger than any query position: a key slot holding it is never visible.
EMPTY_POSITION = jnp.iinfo(jnp.int32).max


class KVView(NamedTuple):
    """What the queries of one call attend to.

    k ``[B, S, K, D]``, v ``[B, S, K, E]``, positions int32 ``[B, S]`` (absolute token
    position of each slot; ``EMPTY_POSITION`` for a slot that holds nothing).
    """

    k: jax.Array
    v: jax.Array
    positions: jax.Array


def _check_new_tokens(k_buffer, v_buffer, k_new, v_new):
    B, _, K, D = k_buffer.shape
    E = v_buffer.shape[-1]
    T = k_new.shape[1] if k_new.ndim == 4 else None
    if k_new.shape != (B, T, K, D) or v_new.shape != (B, T, K, E):
        raise ValueError(
            f"new keys {k_new.shape} / values {v_new.shape} do not fit the cache "
            f"k {k_buffer.shape}, v {v_buffer.shape} (need [B={B}, T, K={K}, D={D}] and [B, T, K, E={E}])"
        )
    if k_new.dtype != k_buffer.dtype or v_new.dtype != v_buffer.dtype:
        raise ValueError(f"new keys/values ({k_new.dtype}, {v_new.dtype}) must have the cache dtype {k_buffer.dtype}")


def check_num_new(num_new, B: int, T: int):
    """``num_new [B]``: how many of the T new tokens of each row are real (ragged prompts)."""
    if num_new is None:
        return jnp.full((B,), T, jnp.int32)
    num_new = jnp.asarray(num_new, jnp.int32)
    if num_new.shape != (B,):
        raise ValueError(f"num_new must be [B={B}], got {num_new.shape}")
    return num_new


def write_at_lengths(buffer, new, lengths):
    """Writes row b of ``new [B, T, ...]`` into ``buffer [B, S_max, ...]`` at slot ``lengths[b]``.

    One ``lax.dynamic_update_slice`` per row (vmapped over the batch), so a prefill
    (T > 1) and a decode step (T = 1) are the same operation.
    """

    def write(row, new_row, start):  # [S_max, ...], [T, ...], [] -> [S_max, ...]
        return lax.dynamic_update_slice(row, new_row, (start,) + (0,) * (row.ndim - 1))

    return jax.vmap(write)(buffer, new, lengths)


def slot_positions(batch: int, capacity: int):
    """int32 ``[B, S_max]``: slot j of a preallocated cache holds position j."""
    return jnp.broadcast_to(jnp.arange(capacity, dtype=jnp.int32), (batch, capacity))


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
        return self.lengths > self.capacity

    def update(self, k_new, v_new, num_new=None):
        """Writes T new tokens at each row's length; returns ``(KVView, new_cache)``.

        Row b's tokens go to slots ``lengths[b] .. lengths[b] + T - 1`` with
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
        _check_new_tokens(self.k, self.v, k_new, v_new)
        B, T = k_new.shape[:2]
        if T > self.capacity:
            raise ValueError(f"cannot write {T} tokens into a KV cache of capacity {self.capacity} (k {self.k.shape})")
        num_new = check_num_new(num_new, B, T)

        k = write_at_lengths(self.k, k_new, self.lengths)
        v = write_at_lengths(self.v, v_new, self.lengths)
        new_cache = KVCache(k, v, self.lengths + num_new)
        return KVView(k, v, slot_positions(B, self.capacity)), new_cache


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
        """Appends T tokens; returns ``(KVView, new_cache)``.

        The view is the old window followed by the T new tokens (``W + T`` slots), so
        that every query of a multi-token prefill still finds the ``W - 1`` tokens
        before it even when T > W. The new cache is the last W real tokens, taken
        from that same sequence with one ``lax.dynamic_slice`` per row.
        """
        _check_new_tokens(self.k, self.v, k_new, v_new)
        B, T = k_new.shape[:2]
        W = self.window
        num_new = check_num_new(num_new, B, T)
        k_all = jnp.concatenate([self.k, k_new], axis=1)  # [B, W + T, K, D]
        v_all = jnp.concatenate([self.v, v_new], axis=1)  # [B, W + T, K, E]
        positions = self.lengths[:, None] - W + jnp.arange(W + T, dtype=jnp.int32)  # [B, W + T]
        positions = jnp.where(positions < 0, EMPTY_POSITION, positions)  # slots before the first token

        def keep_last_window(sequence, start):  # [W + T, ...], [] -> [W, ...]
            return lax.dynamic_slice_in_dim(sequence, start, W, axis=0)

        new_cache = SlidingKVCache(
            k=jax.vmap(keep_last_window)(k_all, num_new),
            v=jax.vmap(keep_last_window)(v_all, num_new),
            lengths=self.lengths + num_new,
        )
        return KVView(k_all, v_all, positions), new_cache
