"""The call context: the one place where an attention call is described, and where "may
query i see key j?" is decided.

Every mask in jaxattn is boolean with ``True`` meaning *may attend*. Masks are built
from what each token *is* (its absolute position, its segment, whether it holds
data), never from array indices, so one rule serves a full forward pass, a chunk of a
prefill, a single decode step, one block of the flash kernel and a block that ring
attention received from another device:

    key j is visible to query i  iff  kv_pos[j] <= q_pos[i]            (causal)
                                 and  q_pos[i] - kv_pos[j] < window     (sliding window)
                                 and  j < kv_length                     (padding; a cache's empty slots)
                                 and  q_seg[i] == kv_seg[j]             (packed sequences)
                                 and  mask[i, j]                        (anything else, given by the caller)

and how the scores of the visible keys become logits:

    s = scale * q . k                      (scale: 1/sqrt(D) unless set)
    s = cap * tanh(s / cap)                (logit soft-capping, when a cap is set; Gemma 2)
    softmax over the visible keys and, when set, one learned sink logit per head (gpt-oss)

The chapter: the rule's pieces (``causal_mask``, ``padding_mask``, ``segment_mask``), then
``AttentionContext``, which holds all of this for one call as per-token arrays and a few
numbers, applies the rule to any block of queries and keys, and tells a blockwise kernel
which blocks it may skip (``block_visibility``). Every kernel takes ``(q, k, v, context)``;
keyword arguments (``is_causal=``, ``window=``, ...) exist only at the public edge and
become a context in one function, ``AttentionContext.from_keywords``. A model builds the
token side of a context once per forward (``for_tokens``: positions, segments) and each
layer completes it with its keys (``self_keys`` or ``with_keys``, from its cache view) and
its own settings (``for_layer``: window, scale, soft-cap, sinks).

Adding a kind of mask (a prefix-LM mask, say) is a change to this file: a field of the
context, its term in ``token_mask`` and its bound in ``block_visibility``.

Shape letters: B batch, T queries, S keys, H query heads (see docs/shape-letters.md).
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from jaxattn.functional.checks import check_bool_mask, check_integer_array, check_positive, check_window
from jaxattn.functional.heads import group_heads

# A finite stand-in for -inf: exp(MASK_VALUE - max) underflows to exactly 0 in float32,
# while MASK_VALUE - MASK_VALUE stays 0 instead of NaN. Internal to the kernels.
MASK_VALUE = -1e30

# Position given to padding queries of a blockwise kernel: earlier than every key.
PAD_QUERY_POSITION = -(2**30)
_INT_MAX = jnp.iinfo(jnp.int32).max


def default_scale(D: int, scale: float | None = None) -> float:
    """The logits' multiplier: ``1/sqrt(D)`` unless ``scale`` is given (the one place it is chosen)."""
    return 1.0 / math.sqrt(D) if scale is None else float(scale)


def next_positions(lengths, T: int):
    """int32 ``[B, T]``: the positions of T tokens that continue sequences of ``lengths [B]``."""
    return jnp.asarray(lengths, jnp.int32)[:, None] + jnp.arange(T, dtype=jnp.int32)


# ------------------------------------------------------------------- the rule, by parts


def visible_keys(q_positions=None, kv_positions=None, *, window=None, kv_valid=None, q_segment_ids=None,
                 kv_segment_ids=None, user_mask=None):
    """The whole rule on per-token arrays already laid out to broadcast into a block: bool, or
    ``None`` when no term applies.

    A query-side array is a column (``[..., T, 1]``) and a key-side one a row (``[..., 1, S]``),
    or the other way round for a kernel that works on the transposed block ``[S, T]``; the
    result has the broadcast shape. ``AttentionContext.token_mask`` lays out a call's arrays
    and calls this; a Pallas kernel calls it on the rows and columns of one block it loaded.
    Positions set means causal (and ``window`` applies); kv_valid may be int (nonzero = valid).
    """
    terms = [None if kv_valid is None else kv_valid != 0, None if user_mask is None else user_mask != 0]
    if q_positions is not None:
        terms.append(kv_positions <= q_positions)
        if window is not None:
            terms.append(q_positions - kv_positions < window)
    if q_segment_ids is not None:
        terms.append(q_segment_ids == kv_segment_ids)
    return combine_masks(*terms)


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
    check_integer_array("q_positions", q_positions)
    check_integer_array("kv_positions", kv_positions)
    check_window(window)
    q_pos = jnp.asarray(q_positions)[..., :, None]  # [..., T, 1]
    kv_pos = jnp.asarray(kv_positions)[..., None, :]  # [..., 1, S]
    return visible_keys(q_pos, kv_pos, window=window)  # [..., T, S]


def padding_mask(kv_lengths, S: int, *, start: int | jax.Array = 0):
    """Mask of the valid prefix of each sequence.

    Args:
      kv_lengths: int ``[B]``, the number of valid keys of each sequence.
      S: how many key slots to describe.
      start: index of the first of them (a block of keys starting at ``start``).

    Returns:
      bool ``[B, S]``: ``True`` at ``start + j < kv_lengths[b]``.
    """
    check_integer_array("kv_lengths", kv_lengths)
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
    check_integer_array("q_segment_ids", q_segment_ids)
    check_integer_array("kv_segment_ids", kv_segment_ids)
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


# --------------------------------------------------------------- one call, described


def token_array(name: str, value, length: int, letter: str, B: int | None = None):
    """The one form of per-token arrays (positions, segment ids): int ``[length]`` (shared by
    the batch) or ``[B, length]`` (``[1, length]`` too) -> int32 ``[B|1, length]``."""
    value = jnp.asarray(value)
    if not jnp.issubdtype(value.dtype, jnp.integer):
        raise TypeError(f"{name} must be integers, got dtype {value.dtype}")
    rows_ok = value.ndim == 2 and value.shape[1] == length and (B is None or value.shape[0] in (1, B))
    if not (value.shape == (length,) or rows_ok):
        batch = "B" if B is None else f"B={B}"
        raise ValueError(f"{name} must be [{letter}={length}] or [{batch}, {letter}={length}], got {value.shape}")
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
    data_fields=["q_positions", "kv_positions", "kv_lengths", "kv_pages", "q_segment_ids", "kv_segment_ids",
                 "user_mask", "sinks"],
    meta_fields=["T", "S", "window", "scale", "logit_softcap", "record_weights", "kv_int8"],
)
@dataclasses.dataclass(frozen=True)
class AttentionContext:
    """Everything about one attention call except q, k and v: which keys each query may see,
    and how the scores become logits. A pytree (the arrays are its leaves, the numbers static),
    so it passes through ``jit``, ``vmap``, ``shard_map`` and ``custom_vjp`` like any argument.

    Which keys (``None``: that part of the rule does not apply; a leading axis of size 1 is
    shared by the batch):
      q_positions ``[B|1, T]``, kv_positions ``[B|1, S]``: int32 absolute positions; set = causal.
      kv_lengths ``[B|1]``: int32, row b's keys at index ``>= kv_lengths[b]`` are padding: the one
        representation of padding (a caller's ragged batch, a cache's empty slots), valid keys
        being a prefix of each row. A kernel may stop there (the decode kernel does); one that
        needs a flag per key derives it (``key_validity``).
      kv_pages ``[B, N]``: int32, set when the keys live in a paged cache (``PagedKVCache``): key
        j of row b is slot ``j % page`` of page ``kv_pages[b, j // page]`` of the pools that stand
        for k and v (``[P, page, ...]``); the decode kernel reads them a block of pages at a time.
      q_segment_ids ``[B|1, T]``, kv_segment_ids ``[B|1, S]``: int32, packed sequences.
      user_mask ``[B|1, H|1, T, S]``: bool, the caller's own mask.
      window: the causal sliding window (static).
    How the logits are formed:
      scale: the scores' multiplier; ``None`` means ``1/sqrt(D)`` (``logit_scale``).
      logit_softcap: ``s -> cap * tanh(s / cap)`` after scaling, before masking; ``None``: off.
      sinks ``[H]``: float, one learned logit per query head that joins every row's softmax
        denominator once and is then dropped (its weight goes nowhere); ``None``: off.
    And: T, S (static) the numbers of queries and keys (S is None until keys are attached);
    record_weights (static): the layer should hand the weights to ``nnx.capture``
    (``jaxattn.lm.inspection``); kernels ignore it; kv_int8 (static): the keys and values are a
    cache's int8 entries (``Int8Tokens``). With ``kv_pages``, it says how the keys are stored
    (``cache_kind``), set once by ``with_view`` from the cache's view.
    """

    T: int
    S: int | None = None
    q_positions: jax.Array | None = None
    kv_positions: jax.Array | None = None
    kv_lengths: jax.Array | None = None
    kv_pages: jax.Array | None = None
    q_segment_ids: jax.Array | None = None
    kv_segment_ids: jax.Array | None = None
    user_mask: jax.Array | None = None
    sinks: jax.Array | None = None
    window: int | None = None
    scale: float | None = None
    logit_softcap: float | None = None
    record_weights: bool = False
    kv_int8: bool = False

    # --------------------------------------------------------------- building one

    @classmethod
    def from_keywords(
        cls,
        q,
        k,
        *,
        mask=None,
        is_causal: bool = False,
        q_positions=None,
        kv_positions=None,
        kv_lengths=None,
        window=None,
        q_segment_ids=None,
        kv_segment_ids=None,
        scale=None,
        logit_softcap=None,
        sinks=None,
    ) -> "AttentionContext":
        """The context of a call given as keywords: the public edge of every kernel.

        ``q [B, T, H, D]`` and ``k [B, S, K, D]`` (or tuples of parts, the first of which is
        read) give the sizes. Keywords:

          mask: bool, broadcastable to ``[B, H, T, S]``; ``True`` = may attend.
          is_causal: key j is visible to query i iff ``kv_pos[j] <= q_pos[i]``.
          q_positions: int ``[B, T]`` or ``[T]``; default (with ``is_causal``) ``arange(T) + S - T``,
            the last T positions (bottom-right: right for a full pass, a chunk of a prefill and
            a decode step alike).
          kv_positions: int ``[B, S]`` or ``[S]``; default ``arange(S)``.
          kv_lengths: int ``[B]``; only keys ``j < kv_lengths[b]`` are valid (padding).
          window: causal sliding window; keeps keys with ``q_pos - kv_pos < window``.
          q_segment_ids, kv_segment_ids: int ``[B, T]``/``[T]`` and ``[B, S]``/``[S]``: sequences
            packed in one row; a query sees only keys with its own segment id.
          scale: the logits' multiplier, ``1/sqrt(D)`` when ``None``.
          logit_softcap: ``cap`` of ``s -> cap * tanh(s / cap)`` on the scaled scores.
          sinks: float ``[H]``, one learned logit per query head in every softmax denominator.

        Errors name the offending shapes.
        """
        first_q = q[0] if isinstance(q, (tuple, list)) else q
        first_k = k[0] if isinstance(k, (tuple, list)) else k
        B, T, H = first_q.shape[0], first_q.shape[1], first_q.shape[2]
        S = first_k.shape[1]
        if not is_causal:
            if window is not None:
                raise ValueError(f"window={window} is a causal sliding window: pass is_causal=True with it")
            if q_positions is not None or kv_positions is not None:
                raise ValueError("q_positions/kv_positions decide causality: pass is_causal=True with them")
        context = cls(T=T)
        if is_causal:
            if q_positions is not None:
                q_positions = token_array("q_positions", q_positions, T, "T", B)
            context = cls.for_tokens(T, q_positions, start=S - T, B=B)
            kv_positions = jnp.arange(S) if kv_positions is None else kv_positions
            kv_positions = token_array("kv_positions", kv_positions, S, "S", B)
        if (q_segment_ids is None) != (kv_segment_ids is None):
            raise ValueError("pass both q_segment_ids and kv_segment_ids, or neither")
        if q_segment_ids is not None:
            q_segment_ids = token_array("q_segment_ids", q_segment_ids, T, "T", B)
            kv_segment_ids = token_array("kv_segment_ids", kv_segment_ids, S, "S", B)
        if kv_lengths is not None:
            check_integer_array("kv_lengths", kv_lengths)
            kv_lengths = jnp.asarray(kv_lengths, jnp.int32)
            if kv_lengths.shape != (B,):
                raise ValueError(f"kv_lengths must be [B={B}], got {kv_lengths.shape}")
        if mask is not None:
            mask = check_bool_mask(mask)
            if mask.ndim > 4:
                raise ValueError(f"mask must broadcast to [B, H, T, S] = {(B, H, T, S)}, got {mask.shape}")
            mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)  # [B|1, H|1, T|1, S|1]
            try:
                jnp.broadcast_shapes(mask.shape, (B, H, T, S))
            except ValueError as error:
                raise ValueError(f"mask {mask.shape} does not broadcast to [B, H, T, S] = {(B, H, T, S)}") from error
            mask = jnp.broadcast_to(mask, mask.shape[:2] + (T, S))  # [B|1, H|1, T, S]
        context = dataclasses.replace(
            context, S=S, kv_positions=kv_positions, kv_lengths=kv_lengths,
            q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, user_mask=mask,
        )
        return context.for_layer(window=window, scale=scale, logit_softcap=logit_softcap, sinks=sinks, H=H)

    @classmethod
    def for_tokens(cls, T: int, positions=None, *, lengths=None, segment_ids=None, start: int = 0, B: int | None = None,
                   record_weights: bool = False) -> "AttentionContext":
        """The token side of a causal call: where the T queries are, and their segments.

        ``positions`` int ``[B, T]`` or ``[T]``; default ``start + arange(T)``. With a cache,
        pass its ``lengths [B]`` instead: the T tokens then continue each row
        (``lengths[:, None] + arange(T)``), and passing positions as well is an error, so a
        call cannot make the queries and the cache disagree. Complete it with ``self_keys``
        (the keys are these tokens) or ``with_keys`` (a cache's view).
        """
        if lengths is not None:
            if positions is not None:
                raise ValueError(
                    "with a cache the positions of the new tokens come from cache.lengths "
                    "(cache.lengths[:, None] + arange(T)); do not pass positions as well"
                )
            if segment_ids is not None:
                raise ValueError("segment ids (packed sequences) are for calls without a cache")
            positions = next_positions(lengths, T)  # [B, T]
        elif positions is None:
            positions = start + jnp.arange(T, dtype=jnp.int32)  # [T]
        positions = token_array("positions", positions, T, "T", B)  # [B|1, T]
        if segment_ids is not None:
            segment_ids = token_array("segment_ids", segment_ids, T, "T", B)
        return cls(T=T, q_positions=positions, q_segment_ids=segment_ids, record_weights=record_weights)

    def self_keys(self) -> "AttentionContext":
        """Keys that are the queries' own tokens (a full pass without a cache)."""
        return dataclasses.replace(self, S=self.T, kv_positions=self.q_positions, kv_segment_ids=self.q_segment_ids)

    def with_keys(self, kv_positions, kv_lengths=None, kv_pages=None) -> "AttentionContext":
        """Keys at ``kv_positions [B|1, S]`` (a cache view's, where an empty slot sits at a
        position no query reaches) of which row b holds ``kv_lengths[b]`` (the slots after them
        are padding, and the decode kernel stops there), in the pages ``kv_pages [B, N]`` of a
        paged cache (or ``None``)."""
        if self.q_segment_ids is not None:
            raise ValueError("segment ids (packed sequences) are for calls without a cache")
        S = kv_positions.shape[-1]
        return dataclasses.replace(self, S=S, kv_positions=token_array("kv_positions", kv_positions, S, "S"),
                                   kv_lengths=kv_lengths, kv_pages=kv_pages)

    def with_view(self, view) -> "AttentionContext":
        """Keys that are a cache's view (``KVView`` or ``LatentView``): its positions, its
        lengths, its pages, and whether its entries are int8. The one step from a cache to the
        context, for every layer."""
        return dataclasses.replace(self.with_keys(view.positions, view.lengths, view.pages), kv_int8=view.int8)

    @property
    def cache_kind(self) -> str:
        """How the keys are stored: ``"float"``, ``"int8"``, ``"paged"`` or ``"paged int8"``
        (a float array, or a cache view's buffers). Only the decode kernel reads pages or int8."""
        kinds = [name for name, is_so in (("paged", self.kv_pages is not None), ("int8", self.kv_int8)) if is_so]
        return " ".join(kinds) or "float"

    def for_layer(self, *, window=None, scale=None, logit_softcap=None, sinks=None, H: int | None = None):
        """The context completed with one layer's settings (each ``None`` leaves the context's)."""
        check_window(window)
        check_positive("scale", scale)
        check_positive("logit_softcap", logit_softcap)
        if sinks is not None:
            sinks = jnp.asarray(sinks)
            if sinks.ndim != 1 or (H is not None and sinks.shape[0] != H):
                raise ValueError(f"sinks must be [H{'' if H is None else f'={H}'}], one logit per query head, got {sinks.shape}")
            if not jnp.issubdtype(sinks.dtype, jnp.floating):
                raise TypeError(f"sinks must be floating point, got dtype {sinks.dtype}")
        pick = lambda new, old: old if new is None else new  # noqa: E731
        return dataclasses.replace(
            self, window=pick(window, self.window), scale=pick(scale, self.scale),
            logit_softcap=pick(logit_softcap, self.logit_softcap), sinks=pick(sinks, self.sinks),
        )

    def check(self, B: int, T: int, S: int, H: int) -> None:
        """That this context describes a call of these sizes (a kernel's first line)."""
        if self.T != T or self.S != S:
            raise ValueError(f"the context describes T={self.T} queries and S={self.S} keys, the call has T={T}, S={S}")
        for name in ("q_positions", "kv_positions", "kv_lengths", "q_segment_ids", "kv_segment_ids"):
            value = getattr(self, name)
            if value is not None and value.shape[0] not in (1, B):
                raise ValueError(f"the context's {name} {value.shape} is for another batch than B={B}")
        if self.sinks is not None and self.sinks.shape != (H,):
            raise ValueError(f"sinks must be [H={H}], one logit per query head, got {self.sinks.shape}")
        if self.user_mask is not None and self.user_mask.shape[1] not in (1, H):
            raise ValueError(f"the context's mask {self.user_mask.shape} is for another number of heads than H={H}")

    def sinks_cotangent(self, d_sinks) -> "AttentionContext":
        """The cotangent of this context in a ``custom_vjp``: nothing for the masking arrays
        (integers and booleans), ``d_sinks`` for the sinks."""
        empty = {name: None for name in ("q_positions", "kv_positions", "kv_lengths", "kv_pages",
                                         "q_segment_ids", "kv_segment_ids", "user_mask")}
        return dataclasses.replace(self, sinks=None if self.sinks is None else d_sinks.astype(self.sinks.dtype), **empty)

    # ------------------------------------------------------------------ reading one

    @property
    def is_causal(self) -> bool:
        return self.q_positions is not None

    def logit_scale(self, D: int) -> float:
        """The scores' multiplier: ``1/sqrt(D)`` unless the context sets one (the one place it is chosen)."""
        return default_scale(D, self.scale)

    def head_sinks(self, K: int):
        """The sinks as ``[K, G]`` (query head h = (h // G, h % G)), float32; or ``None``."""
        return None if self.sinks is None else self.sinks.astype(jnp.float32).reshape(K, -1)

    def key_validity(self):
        """bool ``[B|1, S]``: which keys hold data (``j < kv_lengths[b]``), or ``None`` without
        padding. For the kernels that need a flag per key (a block's extremes, a Pallas
        kernel's rows); the context itself keeps the lengths."""
        return None if self.kv_lengths is None else padding_mask(self.kv_lengths, self.S)  # [B|1, S]

    def token_mask(self):
        """The rule over the token axes: bool ``[B|1, T, S]``, or ``None`` when nothing is masked."""
        column = lambda x: None if x is None else x[:, :, None]  # [B|1, T, 1]  # noqa: E731
        row = lambda x: None if x is None else x[:, None, :]  # [B|1, 1, S]  # noqa: E731
        return visible_keys(column(self.q_positions), row(self.kv_positions), window=self.window,
                            kv_valid=row(self.key_validity()), q_segment_ids=column(self.q_segment_ids),
                            kv_segment_ids=row(self.kv_segment_ids))

    def full_mask(self):
        """Everything together: bool ``[B|1, H|1, T, S]``, or ``None`` when nothing is masked."""
        tokens = self.token_mask()
        if tokens is None and self.user_mask is None:
            return None
        tokens = None if tokens is None else tokens[:, None]  # [B|1, 1, T, S]
        combined = combine_masks(tokens, self.user_mask)
        return jnp.broadcast_to(combined, combined.shape[:2] + (self.T, self.S))

    # ------------------------------------------------------------- blocks of a call

    def block(self, q_start, block_q: int, kv_start, block_kv: int) -> "AttentionContext":
        """The context of queries ``q_start .. q_start + block_q`` and keys
        ``kv_start .. kv_start + block_kv`` (starts may be traced; the lengths then count from
        ``kv_start``, so that a block's key j is padding where key ``kv_start + j`` of the call is).
        The logit side is unchanged."""
        return dataclasses.replace(
            self,
            T=block_q,
            S=block_kv,
            q_positions=_slice(self.q_positions, q_start, block_q, 1),
            kv_positions=_slice(self.kv_positions, kv_start, block_kv, 1),
            kv_lengths=None if self.kv_lengths is None else self.kv_lengths - kv_start,
            kv_pages=None,  # a block's keys are given as they are, not as pages
            q_segment_ids=_slice(self.q_segment_ids, q_start, block_q, 1),
            kv_segment_ids=_slice(self.kv_segment_ids, kv_start, block_kv, 1),
            user_mask=_slice(_slice(self.user_mask, q_start, block_q, 2), kv_start, block_kv, 3),
        )

    def grouped_block_mask(self, K: int, q_start, block_q: int, kv_start, block_kv: int):
        """bool ``[B|1, K|1, G|1, bq, bk]``: the mask of one block with the query heads grouped by
        the K key/value head they share (``heads.group_heads``); ``None`` when nothing is masked."""
        mask = self.block(q_start, block_q, kv_start, block_kv).full_mask()
        return None if mask is None else group_heads(mask, K)

    def keys(self, kv_start, block_kv: int) -> "AttentionContext":
        """The context of all queries and keys ``kv_start .. kv_start + block_kv``."""
        return self.block(0, self.T, kv_start, block_kv)

    def padded(self, T: int, S: int) -> "AttentionContext":
        """The context extended to T queries and S keys for a blockwise kernel: padding
        keys are invalid, padding queries sit before every key (they see nothing when
        causal; their outputs are discarded either way) and repeat the last segment id
        (so that they widen no block's range of segments)."""
        kv_lengths = self.kv_lengths
        if S != self.S:  # the keys added are padding
            kv_lengths = jnp.full((1,), self.S, jnp.int32) if kv_lengths is None else jnp.minimum(kv_lengths, self.S)
        return dataclasses.replace(
            self,
            T=T,
            S=S,
            q_positions=_pad(self.q_positions, T, 1, PAD_QUERY_POSITION),
            kv_positions=_pad(self.kv_positions, S, 1, _INT_MAX),
            kv_lengths=kv_lengths,
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

        kv_live = self.key_validity()
        kv_live = jnp.ones((1, S), bool) if kv_live is None else kv_live  # [B|1, S]
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
        if self.kv_lengths is not None:  # no padding key in the block
            complete = complete & self.key_validity().reshape(-1, nk, block_kv).all(axis=(0, 2))[None]
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
