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
- ``SlidingKVCache``: for sliding-window layers; a ring buffer of ``W + C - 1`` slots (W the
  window, C the most tokens one call adds) written in place at ``position % capacity``, with
  the position of each slot beside it, so its memory is the window, not the sequence.
- ``LatentCache``: MLA's compressed latent ``[B, S_max, L]`` and RoPE key
  ``[B, S_max, R]``; preallocated like ``KVCache``.
- ``PagedKVCache`` and ``PagedLatentCache``: the same tokens kept in pages of a pool shared by
  every sequence, ``[P, page, ...]``, found through each sequence's page table (vLLM's
  PagedAttention, Kwon et al. 2023, arXiv 2309.06180), so that a sequence holds memory
  for the tokens it has, page by page, and sequences can share the pages of a common
  prefix. Which sequence owns which page is decided outside the compiled step (the serving
  engine, ``jaxattn.lm.engine``); the cache reads and writes through the table.

Every cache can keep its entries in **int8** instead (``create(..., dtype=jnp.int8)``): each
buffer is then an ``Int8Tokens``, int8 values with one scale per token and head,

    scale = max_d |x_d| / 127        x_d ~ scale * round(x_d / scale)        (per token, per head)

written when the tokens enter (``quantize_tokens``) and undone by the decode kernel one block of
keys at a time (``dequantize_tokens``), never for the whole buffer. Per token and head it holds
D + 2 bytes where a bfloat16 cache holds 2 D (0.52x at D = 64); serving engines keep their caches
so (an "fp8/int8 KV cache"), since at long contexts a decode step reads mostly the cache.

The two ways of keeping tokens, writing at each row's length (``_append``) and writing
round a ring (``_write_round``), and one policy for what may be written
(``_check_new_tokens``: the cache's shapes and exactly its dtype; any float for int8 entries,
which are quantized), are shared by all of them. At the end: how many numbers each kind stores
per token (DeepSeek-V2, Table 1), and how many bytes a given cache holds per token.

Shape letters: B batch, T new tokens, S_max capacity, W window, K key/value heads,
D key width, E value width, L latent width, R RoPE width.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxattn.functional.checks import check_int
from jaxattn.functional.masks import next_positions

# A position larger than any query position: a key slot holding it is never visible.
EMPTY_POSITION = jnp.iinfo(jnp.int32).max


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
    (T > 1) and a decode step (T = 1) are the same operation. ``buffer`` and ``new`` may be
    ``Int8Tokens`` (values and scales are written alike).
    """

    def write(row, new_row, start):  # [S_max, ...], [T, ...], [] -> [S_max, ...]
        return lax.dynamic_update_slice(row, new_row, (start,) + (0,) * (row.ndim - 1))

    return jax.tree.map(lambda b, x: jax.vmap(write)(b, x, lengths), buffer, new)


# ------------------------------------------------------------------- int8 entries


INT8_SCALE_DTYPE = jnp.bfloat16  # 2 bytes per token and head; the values are quantized against the stored scale


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int8Tokens:
    """A cache buffer kept in int8, one scale per token and head: ``x ~ values * scale[..., None]``.

    values int8 ``[B, S, K, D]`` (a pool: ``[P, page, K, D]``; MLA's latents: ``[B, S, L]``),
    scale bfloat16 ``[B, S, K]`` (``[B, S]``): the shape of values without its last axis.
    ``shape`` and ``ndim`` are the values'; a kernel reads blocks of it with
    ``dequantize_tokens``. A pytree (not a tuple: a kernel tells it from a tuple of key parts).
    """

    values: jax.Array
    scale: jax.Array

    @property
    def shape(self) -> tuple:
        return self.values.shape

    @property
    def ndim(self) -> int:
        return self.values.ndim

    @classmethod
    def zeros(cls, shape: tuple) -> "Int8Tokens":
        return cls(jnp.zeros(shape, jnp.int8), jnp.zeros(shape[:-1], INT8_SCALE_DTYPE))


def quantize_tokens(x) -> Int8Tokens:
    """Float entries ``[..., D]`` -> ``Int8Tokens``: symmetric, one scale per vector of D numbers,
    ``scale = max |x| / 127`` (rounded to bfloat16 first, so that ``values * scale`` is what was
    quantized against), ``values = round(x / scale)`` clipped to [-127, 127]. An all-zero vector
    gets scale 0 and values 0 (never a division by zero)."""
    xf = x.astype(jnp.float32)
    scale = (jnp.max(jnp.abs(xf), axis=-1) / 127).astype(INT8_SCALE_DTYPE)  # [...]
    stored = scale.astype(jnp.float32)[..., None]
    values = jnp.round(xf / jnp.where(stored > 0, stored, 1))
    return Int8Tokens(jnp.clip(values, -127, 127).astype(jnp.int8), scale)


def dequantize_tokens(x, dtype):
    """``Int8Tokens`` -> ``values * scale`` in ``dtype`` (any other array: cast to ``dtype``)."""
    if isinstance(x, Int8Tokens):
        return x.values.astype(dtype) * x.scale.astype(dtype)[..., None]
    return x.astype(dtype)


def _as_entries(buffer, x):
    """New tokens in the form of ``buffer``: quantized for an ``Int8Tokens`` buffer, as they are otherwise."""
    return quantize_tokens(x) if isinstance(buffer, Int8Tokens) else x


def _zeros(shape: tuple, dtype):
    """An empty buffer: zeros of ``dtype``, or ``Int8Tokens`` for ``dtype=int8``."""
    return Int8Tokens.zeros(shape) if jnp.dtype(dtype) == jnp.int8 else jnp.zeros(shape, dtype)


# ------------------------------------------------------------- shared by every cache


def _check_new_tokens(kind: str, buffers: dict, new: tuple, batch: int | None = None):
    """The one policy for what may enter a cache: entries ``[B, T, ...]`` with the
    buffers' B (or ``batch``, for pools) and trailing axes, and exactly their dtype (no
    silent cast); an int8 buffer (``Int8Tokens``) takes floats of any width and quantizes
    them. Returns (B, T)."""
    names = tuple(buffers)
    if len(new) != len(buffers):
        raise ValueError(f"{kind}.update takes {len(buffers)} arrays ({', '.join(names)}), got {len(new)}")
    first = next(iter(buffers.values()))
    B = first.shape[0] if batch is None else batch
    T = new[0].shape[1] if new[0].ndim >= 2 else None
    for (name, buffer), x in zip(buffers.items(), new):
        expected = (B, T) + buffer.shape[2:]
        if x.shape != expected:
            described = ", ".join(f"{n} {b.shape}" for n, b in buffers.items())
            got = ", ".join(f"{n} {a.shape}" for n, a in zip(names, new))
            raise ValueError(
                f"new {got} do not fit the {kind} ({described}): "
                f"need {name} [B={B}, T, {', '.join(map(str, buffer.shape[2:]))}]"
            )
        if isinstance(buffer, Int8Tokens):
            if not jnp.issubdtype(x.dtype, jnp.floating):
                raise TypeError(f"new {name} has dtype {x.dtype}; an int8 {kind} quantizes float entries")
        elif x.dtype != buffer.dtype:
            raise ValueError(
                f"new {name} has dtype {x.dtype} but the {kind} holds {buffer.dtype}; "
                f"cast it (x.astype({buffer.dtype})) or create the cache with dtype={x.dtype}"
            )
    return B, T


def _append(cache, new: tuple, num_new):
    """Writes the new tokens at each row's length of a preallocated cache (a NamedTuple:
    its buffers, then ``lengths``). Returns ``(buffers, positions [B, S_max], lengths)``."""
    buffers = dict(zip(cache._fields[:-1], cache[:-1]))
    B, T = _check_new_tokens(type(cache).__name__, buffers, new)
    capacity = cache[0].shape[1]
    if T > capacity:
        shapes = ", ".join(f"{n} {b.shape}" for n, b in buffers.items())
        raise ValueError(f"cannot write {T} tokens into a {type(cache).__name__} of capacity {capacity} ({shapes})")
    num_new = check_num_new(num_new, B, T)
    written = tuple(write_at_lengths(buffer, _as_entries(buffer, x), cache.lengths)
                    for buffer, x in zip(buffers.values(), new))
    return written, slot_positions(B, capacity), cache.lengths + num_new


def _write_round(buffers: tuple, new: tuple, lengths):
    """Writes token t of row b at slot ``(lengths[b] + t) % capacity`` of each ``[B, S, ...]``
    buffer: one scatter per buffer, in place when the buffers are donated."""
    capacity = buffers[0].shape[1]
    T = new[0].shape[1]
    slots = next_positions(lengths, T) % capacity  # [B, T]
    rows = jnp.arange(slots.shape[0])[:, None]  # [B, 1]
    return tuple(jax.tree.map(lambda b, x: b.at[rows, slots].set(x, unique_indices=True), buffer, _as_entries(buffer, x))
                 for buffer, x in zip(buffers, new))


def _overflowed(cache):
    return cache.lengths > cache[0].shape[1]


# ------------------------------------------------------------------- the caches


class KVView(NamedTuple):
    """What the queries of one call attend to.

    k ``[B, S, K, D]``, v ``[B, S, K, E]``, positions int32 ``[B, S]`` (absolute token
    position of each slot; ``EMPTY_POSITION`` for a slot that holds nothing), lengths
    int32 ``[B]``: slots ``>= lengths[b]`` of row b hold nothing, so a kernel may stop
    there (``decode_attention`` does). pages int32 ``[B, N]`` for a paged cache (k and v are
    then its pools ``[P, page, ...]``, slot j of row b in page ``pages[b, j // page]``), else ``None``.
    """

    k: jax.Array
    v: jax.Array
    positions: jax.Array
    lengths: jax.Array
    pages: jax.Array | None = None

    @property
    def int8(self) -> bool:
        """Are the entries int8 (``Int8Tokens``)?"""
        return isinstance(self.k, Int8Tokens)


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
        """Zero buffers ``[batch, max_length, kv_heads, head_dim]`` and lengths 0. ``dtype`` is the
        entries' (what ``update`` must be given), or ``jnp.int8``: ``Int8Tokens`` buffers that
        quantize whatever floats ``update`` is given (every cache's ``create`` takes it)."""
        value_dim = head_dim if value_dim is None else value_dim
        return cls(
            k=_zeros((batch, max_length, kv_heads, head_dim), dtype),
            v=_zeros((batch, max_length, kv_heads, value_dim), dtype),
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


@partial(jax.tree_util.register_dataclass, data_fields=["k", "v", "positions", "lengths"],
         meta_fields=["window", "chunk"])
@dataclasses.dataclass(frozen=True)
class SlidingKVCache:
    """The keys/values a sliding-window layer can still see, in a ring buffer.

    k ``[B, S_w, K, D]``, v ``[B, S_w, K, E]``, positions int32 ``[B, S_w]`` (the absolute
    position held by each slot; ``EMPTY_POSITION`` while it holds nothing), lengths int32
    ``[B]`` (tokens seen so far). Token p of a row lives in slot ``p % S_w``. The capacity
    ``S_w = window + chunk - 1`` (static ``window`` W and ``chunk``, the most tokens one call
    may add): a call of T <= chunk tokens overwrites only tokens older than the window of
    its first query, so no query of the call loses a key it needs. Memory is ``S_w`` tokens
    whatever the sequence length; a decode step (chunk 1) keeps exactly the window.
    """

    k: jax.Array
    v: jax.Array
    positions: jax.Array
    lengths: jax.Array
    window: int
    chunk: int

    @classmethod
    def create(cls, *, batch: int, window: int, kv_heads: int, head_dim: int, value_dim=None, chunk: int = 1,
               max_length: int | None = None, dtype=jnp.float32):
        """Empty buffers of ``window + chunk - 1`` slots (at most ``max_length``, the longest
        sequence the cache will hold: a cache that never wraps needs no more)."""
        value_dim = head_dim if value_dim is None else value_dim
        check_int("window", window)
        check_int("chunk", chunk)
        capacity = window + chunk - 1 if max_length is None else min(window + chunk - 1, max_length)
        return cls(
            k=_zeros((batch, capacity, kv_heads, head_dim), dtype),
            v=_zeros((batch, capacity, kv_heads, value_dim), dtype),
            positions=jnp.full((batch, capacity), EMPTY_POSITION, jnp.int32),
            lengths=jnp.zeros((batch,), jnp.int32),
            window=window,
            chunk=chunk,
        )

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    def overflowed(self):
        """A sliding cache never overflows: old tokens leave the window."""
        return jnp.zeros(self.lengths.shape, bool)

    def update(self, k_new, v_new, num_new=None):
        """Writes T <= ``chunk`` new tokens in place; returns ``(KVView, new_cache)``.

        Slots are written round the ring, ``position % capacity`` (one scatter, no
        concatenation: with the cache donated the step updates it in place). The padding
        of a ragged prompt (tokens past ``num_new[b]``) is written with ``EMPTY_POSITION``:
        no query sees it, and the next call overwrites it.
        """
        B, T = _check_new_tokens("SlidingKVCache", {"k": self.k, "v": self.v}, (k_new, v_new))
        if T > self.chunk:
            raise ValueError(
                f"a call of T={T} tokens into a SlidingKVCache made for at most chunk={self.chunk} per call (window "
                f"{self.window}, capacity {self.capacity}) could overwrite keys its own queries need; create the cache "
                f"with chunk >= {T} (capacity window + chunk - 1)"
            )
        num_new = check_num_new(num_new, B, T)
        positions = next_positions(self.lengths, T)  # [B, T]
        positions = jnp.where(jnp.arange(T)[None] < num_new[:, None], positions, EMPTY_POSITION)
        k, v, held = _write_round((self.k, self.v, self.positions), (k_new, v_new, positions), self.lengths)
        lengths = self.lengths + num_new
        view = KVView(k, v, held, jnp.minimum(lengths, self.capacity))
        return view, dataclasses.replace(self, k=k, v=v, positions=held, lengths=lengths)


class LatentView(NamedTuple):
    """What MLA's queries attend to: c_kv ``[B, S, L]``, k_rope ``[B, S, R]``, positions
    ``[B, S]``, lengths ``[B]`` and pages (as in ``KVView``)."""

    c_kv: jax.Array
    k_rope: jax.Array
    positions: jax.Array
    lengths: jax.Array
    pages: jax.Array | None = None

    @property
    def int8(self) -> bool:
        """Are the entries int8 (``Int8Tokens``)?"""
        return isinstance(self.c_kv, Int8Tokens)


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
            c_kv=_zeros((batch, max_length, latent_dim), dtype),
            k_rope=_zeros((batch, max_length, rope_dim), dtype),
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


# ------------------------------------------------------------------- paged caches

# Page 0 of every pool is never given to a sequence: the padding of a ragged call is written
# there, and the unused entries of a page table point to it (what it holds is never visible).
TRASH_PAGE = 0


def _write_pages(pools: tuple, new: tuple, page_table, lengths, num_new):
    """Writes token t of row b (position ``lengths[b] + t``) into slot ``position % page`` of
    page ``page_table[b, position // page]`` of each pool ``[P, page, ...]``; tokens past
    ``num_new[b]`` go to the trash page. One scatter per pool, in place when donated."""
    T = new[0].shape[1]
    N, page_size = page_table.shape[1], pools[0].shape[1]
    positions = next_positions(lengths, T)  # [B, T]
    real = jnp.arange(T)[None] < num_new[:, None]  # [B, T]
    index = jnp.minimum(positions // page_size, N - 1)
    pages = jnp.where(real, jnp.take_along_axis(page_table, index, axis=1), TRASH_PAGE)  # [B, T]
    slots = positions % page_size  # [B, T]
    return tuple(jax.tree.map(lambda p, x: p.at[pages, slots].set(x), pool, _as_entries(pool, x))
                 for pool, x in zip(pools, new))


def _paged_update(cache, new: tuple, num_new):
    """``(pools, positions [B, N * page], lengths)`` after writing a call's tokens into a paged cache."""
    pools = dict(zip(cache._fields[:-2], cache[:-2]))
    B, T = _check_new_tokens(type(cache).__name__, pools, new, batch=cache.page_table.shape[0])
    num_new = check_num_new(num_new, B, T)
    written = _write_pages(tuple(pools.values()), new, cache.page_table, cache.lengths, num_new)
    return written, slot_positions(B, cache.capacity), cache.lengths + num_new


def _check_pool(pages: int, page_size: int, pages_per_sequence: int):
    for name, value in (("pages", pages), ("page_size", page_size), ("pages_per_sequence", pages_per_sequence)):
        check_int(name, value)
    if pages < 2:
        raise ValueError(f"a pool needs at least 2 pages (page {TRASH_PAGE} is the trash page), got pages={pages}")


class PagedKVCache(NamedTuple):
    """Keys and values in pages of a pool shared by every sequence.

    k ``[P, page, K, D]``, v ``[P, page, K, E]``: P pages of ``page`` tokens; page_table int32
    ``[B, N]``: row b's pages in order, token p of the row in slot ``p % page`` of page
    ``page_table[b, p // page]`` (so a row holds at most ``N x page`` tokens); lengths int32
    ``[B]``. Page ``TRASH_PAGE`` (0) is never a sequence's. Every layer has its own pools and
    the same table and lengths. A call reads the pages through the table (``KVView.pages``:
    the decode kernel visits the pages in use, a block of pages per step).
    """

    k: jax.Array
    v: jax.Array
    page_table: jax.Array
    lengths: jax.Array

    @classmethod
    def create(cls, *, batch: int, pages: int, page_size: int, pages_per_sequence: int, kv_heads: int, head_dim: int,
               value_dim=None, dtype=jnp.float32):
        """Zero pools of ``pages`` pages, every table entry on the trash page, lengths 0."""
        _check_pool(pages, page_size, pages_per_sequence)
        value_dim = head_dim if value_dim is None else value_dim
        return cls(
            k=_zeros((pages, page_size, kv_heads, head_dim), dtype),
            v=_zeros((pages, page_size, kv_heads, value_dim), dtype),
            page_table=jnp.full((batch, pages_per_sequence), TRASH_PAGE, jnp.int32),
            lengths=jnp.zeros((batch,), jnp.int32),
        )

    @property
    def capacity(self) -> int:
        """The most tokens one row can hold: ``N x page``."""
        return self.page_table.shape[1] * self.k.shape[1]

    def overflowed(self):
        return _overflowed_pages(self)

    def update(self, k_new, v_new, num_new=None):
        """Writes T new tokens of each row through its page table (the caller has given row b
        pages for positions up to ``lengths[b] + num_new[b] - 1``); returns ``(KVView, new_cache)``,
        the view's k and v being the pools and its pages the table."""
        (k, v), positions, lengths = _paged_update(self, (k_new, v_new), num_new)
        view = KVView(k, v, positions, jnp.minimum(lengths, self.capacity), self.page_table)
        return view, PagedKVCache(k, v, self.page_table, lengths)


class PagedLatentCache(NamedTuple):
    """MLA's latents in pages: c_kv ``[P, page, L]``, k_rope ``[P, page, R]``, page_table
    ``[B, N]`` and lengths ``[B]``, as in ``PagedKVCache``."""

    c_kv: jax.Array
    k_rope: jax.Array
    page_table: jax.Array
    lengths: jax.Array

    @classmethod
    def create(cls, *, batch: int, pages: int, page_size: int, pages_per_sequence: int, latent_dim: int, rope_dim: int,
               dtype=jnp.float32):
        _check_pool(pages, page_size, pages_per_sequence)
        return cls(
            c_kv=_zeros((pages, page_size, latent_dim), dtype),
            k_rope=_zeros((pages, page_size, rope_dim), dtype),
            page_table=jnp.full((batch, pages_per_sequence), TRASH_PAGE, jnp.int32),
            lengths=jnp.zeros((batch,), jnp.int32),
        )

    @property
    def capacity(self) -> int:
        return self.page_table.shape[1] * self.c_kv.shape[1]

    def overflowed(self):
        return _overflowed_pages(self)

    def update(self, c_kv_new, k_rope_new, num_new=None):
        """As ``PagedKVCache.update``, for ``c_kv_new [B, T, L]`` and ``k_rope_new [B, T, R]``."""
        (c_kv, k_rope), positions, lengths = _paged_update(self, (c_kv_new, k_rope_new), num_new)
        view = LatentView(c_kv, k_rope, positions, jnp.minimum(lengths, self.capacity), self.page_table)
        return view, PagedLatentCache(c_kv, k_rope, self.page_table, lengths)


def _overflowed_pages(cache):
    return cache.lengths > cache.capacity


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


def stored_bytes_per_token(cache) -> float:
    """Bytes one cache (a layer's, as created) holds per token slot, counted from its buffers:
    the entries and, for an int8 cache, their scales (not lengths, positions or page tables).
    ``K (D + E)`` times the dtype's size for a float ``KVCache``; ``K (D + E + 2 x 2)`` for int8."""
    entries = [value for name, value in cache._asdict().items() if name not in ("lengths", "page_table")] \
        if hasattr(cache, "_asdict") else [cache.k, cache.v]
    slots = entries[0].shape[0] * entries[0].shape[1]
    return sum(leaf.nbytes for leaf in jax.tree.leaves(entries)) / slots
