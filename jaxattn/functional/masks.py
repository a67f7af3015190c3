"""Boolean attention masks: the one place where "may query i see key j?" is decided.

Every mask in jaxattn is boolean with ``True`` meaning *may attend*. Masks are built
from what each token *is* (its absolute position, its segment, whether it holds
data), never from array indices, so one rule serves a full forward pass, a chunk of a
prefill, a single decode step, one block of the flash kernel and a block that ring
attention received from another device:

    key j is visible to query i  iff  kv_pos[j] <= q_pos[i]            (causal)
                                 and  q_pos[i] - kv_pos[j] < window     (sliding window)
                                 and  kv_valid[j]                       (padding: j < kv_length)
                                 and  q_seg[i] == kv_seg[j]             (packed sequences)
                                 and  mask[i, j]                        (anything else, given by the caller)

The chapter: the rule's pieces (``causal_mask``, ``padding_mask``, ``segment_mask``),
then ``MaskSpec``, which holds the validated masking arguments of one attention call as
per-token arrays and applies the rule to any block of queries and keys, and finally
``MaskSpec.block_visibility``, the same rule at the level of whole blocks, which tells a
blockwise kernel which blocks it may skip.

Adding a kind of mask (a prefix-LM mask, say) is a change to this file: a field of
``MaskSpec``, its term in ``token_mask`` and its bound in ``block_visibility``.

Shape letters: B batch, T queries, S keys, H query heads (see the README glossary).
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

# A finite stand-in for -inf: exp(MASK_VALUE - max) underflows to exactly 0 in float32,
# while MASK_VALUE - MASK_VALUE stays 0 instead of NaN. Internal to the kernels.
MASK_VALUE = -1e30

# Position given to padding queries of a blockwise kernel: earlier than every key.
PAD_QUERY_POSITION = -(2**30)
_INT_MAX = jnp.iinfo(jnp.int32).max


def _check_integer(name: str, x) -> None:
    if not jnp.issubdtype(jnp.asarray(x).dtype, jnp.integer):
        raise TypeError(f"{name} must be an integer array, got dtype {jnp.asarray(x).dtype}")


def check_window(window) -> None:
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be a positive int, got {window!r}")


# ------------------------------------------------------------------- the rule, by parts


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
    check_window(window)
    q_pos = jnp.asarray(q_positions)[..., :, None]  # [..., T, 1]
    kv_pos = jnp.asarray(kv_positions)[..., None, :]  # [..., 1, S]
    mask = kv_pos <= q_pos  # [..., T, S]
    if window is not None:
        mask = mask & (q_pos - kv_pos < window)
    return mask


def padding_mask(kv_lengths, S: int, *, start: int | jax.Array = 0):
    """Mask of the valid prefix of each sequence.

    Args:
      kv_lengths: int ``[B]``, the number of valid keys of each sequence.
      S: how many key slots to describe.
      start: index of the first of them (a block of keys starting at ``start``).

    Returns:
      bool ``[B, S]``: ``True`` at ``start + j < kv_lengths[b]``.
    """
    _check_integer("kv_lengths", kv_lengths)
    kv_lengths = jnp.asarray(kv_lengths)
    if kv_lengths.ndim != 1:
        raise ValueError(f"kv_lengths must have shape [B], got {kv_lengths.shape}")
    return (start + jnp.arange(S))[None, :] < kv_lengths[:, None]  # [B, S]


def segment_mask(q_segment_ids, kv_segment_ids):
    """A query sees only keys of its own segment (several sequences packed in one row).

    Args:
      q_segment_ids: int ``[..., T]``.
      kv_segment_ids: int ``[..., S]``; leading axes broadcast against the queries'.

    Returns:
      bool ``[..., T, S]``: ``q_seg == kv_seg``.
    """
    _check_integer("q_segment_ids", q_segment_ids)
    _check_integer("kv_segment_ids", kv_segment_ids)
    return jnp.asarray(q_segment_ids)[..., :, None] == jnp.asarray(kv_segment_ids)[..., None, :]


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


# ------------------------------------------------- the masking arguments of one call


def _token_array(name: str, value, B: int, length: int, letter: str):
    """int ``[length]`` or ``[B, length]`` -> int32 ``[B|1, length]``."""
    value = jnp.asarray(value)
    if not jnp.issubdtype(value.dtype, jnp.integer):
        raise TypeError(f"{name} must be integers, got dtype {value.dtype}")
    if value.shape not in ((length,), (1, length), (B, length)):
        raise ValueError(f"{name} must be [{letter}={length}] or [B={B}, {letter}={length}], got {value.shape}")
    return value.reshape(-1, length).astype(jnp.int32)


def _block_extremes(values, live, n: int, size: int):
    """Per block of ``size`` tokens, the smallest and largest value among live tokens, over
    the whole batch: ``values``, ``live`` ``[B|1, n * size]`` -> two ``[n]``."""
    live = jnp.broadcast_to(live, jnp.broadcast_shapes(live.shape, values.shape))
    values = jnp.broadcast_to(values, live.shape).reshape(-1, n, size)
    live = live.reshape(-1, n, size)
    return jnp.where(live, values, _INT_MAX).min(axis=(0, 2)), jnp.where(live, values, -_INT_MAX).max(axis=(0, 2))


def _slice(x, start, size: int, axis: int):
    return None if x is None else lax.dynamic_slice_in_dim(x, start, size, axis=axis)


def _pad(x, size: int, axis: int, value=None):
    """Pads axis to ``size`` with ``value``, or by repeating the last entry when ``value`` is None."""
    if x is None or x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    if value is None:
        return jnp.pad(x, widths, mode="edge")
    return jnp.pad(x, widths, constant_values=value)


@partial(
    jax.tree_util.register_dataclass,
    data_fields=["q_positions", "kv_positions", "kv_valid", "q_segment_ids", "kv_segment_ids", "user_mask"],
    meta_fields=["T", "S", "window"],
)
@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """The validated masking arguments of one attention call, as per-token arrays.

    Every field is optional (``None``: that part of the rule does not apply); a leading
    axis of size 1 is shared by the batch.

    q_positions ``[B|1, T]`` and kv_positions ``[B|1, S]``: int32, set when causal.
    kv_valid ``[B|1, S]``: bool, False for padding keys.
    q_segment_ids ``[B|1, T]``, kv_segment_ids ``[B|1, S]``: int32 (packed sequences).
    user_mask ``[B|1, H|1, T, S]``: bool, the caller's own mask.
    T, S: how many queries and keys it describes; window: the causal sliding window.

    A pytree (``T``, ``S`` and ``window`` are static), so it passes through ``jit``,
    ``vmap`` and ``custom_vjp`` like any array argument.
    """

    T: int
    S: int
    q_positions: jax.Array | None = None
    kv_positions: jax.Array | None = None
    kv_valid: jax.Array | None = None
    q_segment_ids: jax.Array | None = None
    kv_segment_ids: jax.Array | None = None
    user_mask: jax.Array | None = None
    window: int | None = None

    @classmethod
    def resolve(
        cls,
        *,
        B: int,
        T: int,
        S: int,
        H: int,
        mask=None,
        is_causal: bool = False,
        q_positions=None,
        kv_positions=None,
        kv_lengths=None,
        window=None,
        q_segment_ids=None,
        kv_segment_ids=None,
    ) -> "MaskSpec":
        """Checks every masking argument of an attention call of sizes B, T, S, H.

        With ``is_causal`` and no positions, the T queries are the last T of the S keys
        (``q_pos = arange(T) + S - T``, bottom-right), right for a full pass, a chunk of
        a prefill and a decode step alike. Errors name the offending shapes.
        """
        if not is_causal:
            if window is not None:
                raise ValueError(f"window={window} is a causal sliding window: pass is_causal=True with it")
            if q_positions is not None or kv_positions is not None:
                raise ValueError("q_positions/kv_positions decide causality: pass is_causal=True with them")
        check_window(window)
        if is_causal:
            q_positions = jnp.arange(T) + (S - T) if q_positions is None else q_positions
            kv_positions = jnp.arange(S) if kv_positions is None else kv_positions
            q_positions = _token_array("q_positions", q_positions, B, T, "T")
            kv_positions = _token_array("kv_positions", kv_positions, B, S, "S")
        kv_valid = None
        if kv_lengths is not None:
            kv_lengths = jnp.asarray(kv_lengths)
            _check_integer("kv_lengths", kv_lengths)
            if kv_lengths.shape != (B,):
                raise ValueError(f"kv_lengths must be [B={B}], got {kv_lengths.shape}")
            kv_valid = padding_mask(kv_lengths, S)  # [B, S]
        if (q_segment_ids is None) != (kv_segment_ids is None):
            raise ValueError("pass both q_segment_ids and kv_segment_ids, or neither")
        if q_segment_ids is not None:
            q_segment_ids = _token_array("q_segment_ids", q_segment_ids, B, T, "T")
            kv_segment_ids = _token_array("kv_segment_ids", kv_segment_ids, B, S, "S")
        if mask is not None:
            mask = jnp.asarray(mask)
            if mask.dtype != jnp.bool_:
                raise TypeError(
                    f"mask must be boolean (True = may attend), got dtype {mask.dtype}; "
                    "for an additive float bias, add it to the logits yourself"
                )
            if mask.ndim > 4:
                raise ValueError(f"mask must broadcast to [B, H, T, S] = {(B, H, T, S)}, got {mask.shape}")
            mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)  # [B|1, H|1, T|1, S|1]
            try:
                jnp.broadcast_shapes(mask.shape, (B, H, T, S))
            except ValueError:
                raise ValueError(f"mask {mask.shape} does not broadcast to [B, H, T, S] = {(B, H, T, S)}") from None
            mask = jnp.broadcast_to(mask, mask.shape[:2] + (T, S))  # [B|1, H|1, T, S]
        return cls(T, S, q_positions, kv_positions, kv_valid, q_segment_ids, kv_segment_ids, mask, window)

    @property
    def is_causal(self) -> bool:
        return self.q_positions is not None

    def token_mask(self):
        """The rule over the token axes: bool ``[B|1, T, S]``, or ``None`` when nothing is masked."""
        causal = None if self.q_positions is None else causal_mask(self.q_positions, self.kv_positions, self.window)
        valid = None if self.kv_valid is None else self.kv_valid[:, None, :]  # [B|1, 1, S]
        segments = None
        if self.q_segment_ids is not None:
            segments = segment_mask(self.q_segment_ids, self.kv_segment_ids)
        return combine_masks(causal, valid, segments)

    def full_mask(self):
        """Everything together: bool ``[B|1, H|1, T, S]``, or ``None`` when nothing is masked."""
        tokens = self.token_mask()
        if tokens is None and self.user_mask is None:
            return None
        tokens = None if tokens is None else tokens[:, None]  # [B|1, 1, T, S]
        combined = combine_masks(tokens, self.user_mask)
        return jnp.broadcast_to(combined, combined.shape[:2] + (self.T, self.S))

    # ------------------------------------------------------------- blocks of a call

    def block(self, q_start, block_q: int, kv_start, block_kv: int) -> "MaskSpec":
        """The spec of queries ``q_start .. q_start + block_q`` and keys
        ``kv_start .. kv_start + block_kv`` (starts may be traced)."""
        return dataclasses.replace(
            self,
            T=block_q,
            S=block_kv,
            q_positions=_slice(self.q_positions, q_start, block_q, 1),
            kv_positions=_slice(self.kv_positions, kv_start, block_kv, 1),
            kv_valid=_slice(self.kv_valid, kv_start, block_kv, 1),
            q_segment_ids=_slice(self.q_segment_ids, q_start, block_q, 1),
            kv_segment_ids=_slice(self.kv_segment_ids, kv_start, block_kv, 1),
            user_mask=_slice(_slice(self.user_mask, q_start, block_q, 2), kv_start, block_kv, 3),
        )

    def keys(self, kv_start, block_kv: int) -> "MaskSpec":
        """The spec of all queries and keys ``kv_start .. kv_start + block_kv``."""
        return self.block(0, self.T, kv_start, block_kv)

    def padded(self, T: int, S: int) -> "MaskSpec":
        """The spec extended to T queries and S keys for a blockwise kernel: padding
        keys are invalid, padding queries sit before every key (they see nothing when
        causal; their outputs are discarded either way) and repeat the last segment id
        (so that they widen no block's range of segments)."""
        kv_valid = self.kv_valid
        if S != self.S and kv_valid is None:
            kv_valid = jnp.ones((1, self.S), bool)
        return dataclasses.replace(
            self,
            T=T,
            S=S,
            q_positions=_pad(self.q_positions, T, 1, PAD_QUERY_POSITION),
            kv_positions=_pad(self.kv_positions, S, 1, _INT_MAX),
            kv_valid=_pad(kv_valid, S, 1, False),
            q_segment_ids=_pad(self.q_segment_ids, T, 1),
            kv_segment_ids=_pad(self.kv_segment_ids, S, 1),
            user_mask=_pad(_pad(self.user_mask, T, 2, False), S, 3, False),
        )

    def block_visibility(self, block_q: int, block_kv: int):
        """bool ``[nq, nk]``: may any query of block i see any key of block j?

        The rule above at the level of whole blocks, from each block's extremes (the
        smallest and largest position and segment id among its real tokens), over the
        whole batch. It may say True for a block pair where the token mask turns out all
        False (then the kernel visits it for nothing), never False where a key is
        visible. T and S must be multiples of the block sizes (see ``padded``).
        """
        T, S = self.T, self.S
        if T % block_q or S % block_kv:
            raise ValueError(f"T={T} and S={S} must be multiples of the blocks ({block_q}, {block_kv}); pad first")
        nq, nk = T // block_q, S // block_kv

        kv_live = jnp.ones((1, S), bool) if self.kv_valid is None else self.kv_valid  # [B|1, S]
        visible = jnp.broadcast_to(kv_live.reshape(-1, nk, block_kv).any(axis=(0, 2))[None], (nq, nk))
        if self.is_causal:
            q_live = self.q_positions != PAD_QUERY_POSITION
            q_min, q_max = _block_extremes(self.q_positions, q_live, nq, block_q)
            kv_min, kv_max = _block_extremes(self.kv_positions, kv_live, nk, block_kv)
            visible = visible & (kv_min[None] <= q_max[:, None])
            if self.window is not None:  # some key with q_pos - kv_pos < window
                visible = visible & (kv_max[None] > q_min[:, None] - self.window)
        if self.q_segment_ids is not None:  # the blocks' ranges of segment ids overlap
            q_low, q_high = _block_extremes(self.q_segment_ids, jnp.ones((1, T), bool), nq, block_q)
            kv_low, kv_high = _block_extremes(self.kv_segment_ids, kv_live, nk, block_kv)
            visible = visible & (kv_low[None] <= q_high[:, None]) & (q_low[:, None] <= kv_high[None])
        if self.user_mask is not None:
            user = self.user_mask.reshape(-1, nq, block_q, nk, block_kv).any(axis=(0, 2, 4))  # [nq, nk]
            visible = visible & user
        return visible

    def block_completeness(self, block_q: int, block_kv: int):
        """bool ``[nq, nk]``: does every real query of block i see every key of block j?

        The same rule at block level, the other way round: True only where the rule holds
        for the block's least favourable pair (its earliest query and latest key, and so
        on), so a kernel may skip building the block's mask there. Padding queries (a
        blockwise kernel's) are left out: their outputs are discarded.
        """
        T, S = self.T, self.S
        nq, nk = T // block_q, S // block_kv

        complete = self.block_visibility(block_q, block_kv)
        if self.kv_valid is not None:  # no padding key in the block
            complete = complete & self.kv_valid.reshape(-1, nk, block_kv).all(axis=(0, 2))[None]
        if self.is_causal:
            q_min, q_max = _block_extremes(self.q_positions, self.q_positions != PAD_QUERY_POSITION, nq, block_q)
            kv_min, kv_max = _block_extremes(self.kv_positions, jnp.ones((1, S), bool), nk, block_kv)
            complete = complete & (kv_max[None] <= q_min[:, None])  # the latest key is not after the earliest query
            if self.window is not None:
                complete = complete & (q_max[:, None] - kv_min[None] < self.window)
        if self.q_segment_ids is not None:  # one segment on both sides
            q_low, q_high = _block_extremes(self.q_segment_ids, jnp.ones((1, T), bool), nq, block_q)
            kv_low, kv_high = _block_extremes(self.kv_segment_ids, jnp.ones((1, S), bool), nk, block_kv)
            complete = complete & ((q_low == q_high)[:, None] & (kv_low == kv_high)[None] & (q_low[:, None] == kv_low[None]))
        if self.user_mask is not None:
            complete = complete & self.user_mask.reshape(-1, nq, block_q, nk, block_kv).all(axis=(0, 2, 4))
        return complete
