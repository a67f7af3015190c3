"""Which kernel serves a call: the one place where a layer's attention kernel is chosen.

A layer has two kinds of calls. A *full* call attends over keys it has just computed (a
training step, a prompt): any kernel serves it, ``dense_kernel`` by default or
``flash_kernel`` (memory linear in the sequence), or whatever a user passes as
``attention_fn`` (a ring kernel on a mesh, a recording kernel). A *decode* call adds a few
tokens to a cache and attends over what the cache holds: ``decode_kernel`` serves it,
visiting only the slots in use. ``Kernels`` holds the two and the threshold between them;
MHA and MLA layers use the same value, so the rule is written once:

    kernel = decode   if the cache is paged or int8 (any T: only the decode kernel reads pages,
                      and it dequantizes an int8 cache a block at a time)
             decode   if the call has a cache and T <= decode_max_tokens (and decode is set)
             full     otherwise

A kernel is any function ``kernel(q, k, v, context)``. The decode kernel may receive q and k
as tuples of parts whose scores add (MLA's absorbed path: ``(q_latent, q_rope)`` against
``(c_kv, k_rope)``, each key part ``[B, S, L|R]`` shared by every head); every other kernel
receives them joined (``attend``).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax.numpy as jnp

from jaxattn.functional.attention import dense_kernel, dense_kernel_with_weights
from jaxattn.functional.checks import check_int
from jaxattn.functional.decode import DECODE_MAX_TOKENS, decode_kernel
from jaxattn.functional.masks import AttentionContext


@dataclasses.dataclass(frozen=True)
class Kernels:
    """The kernels of one layer: ``full`` for full calls and long cached calls, ``decode``
    for cached calls of at most ``decode_max_tokens`` new tokens (``None``: ``full`` serves
    them too)."""

    full: Callable = dense_kernel
    decode: Callable | None = decode_kernel
    decode_max_tokens: int = DECODE_MAX_TOKENS

    def __post_init__(self):
        check_int("decode_max_tokens", self.decode_max_tokens, minimum=0)

    @classmethod
    def choose(cls, attention_fn=None, decode_fn=None, *, default: Callable = dense_kernel,
               decode_max_tokens: int = DECODE_MAX_TOKENS) -> "Kernels":
        """The kernels of a layer given what its user asked for.

        No ``attention_fn``: ``default`` for full calls, ``decode_fn`` (default
        ``decode_kernel``) for decode steps. An explicit ``attention_fn`` serves every call,
        cached ones included, unless ``decode_fn`` is given as well.
        """
        if attention_fn is None:
            return cls(default, decode_kernel if decode_fn is None else decode_fn, decode_max_tokens)
        return cls(attention_fn, decode_fn, decode_max_tokens)

    def for_call(self, T: int, cached: bool, cache_kind: str = "float") -> tuple[Callable, bool]:
        """``(kernel, is_decode)`` for a call of T new tokens, with or without a cache, whose
        keys are stored as ``cache_kind`` (``AttentionContext.cache_kind``)."""
        if cache_kind != "float":
            if self.decode is None:
                raise ValueError(f"a {cache_kind} cache is read by a decode kernel, and this layer has none "
                                 "(Kernels.choose(attention_fn) without decode_fn): pass decode_fn as well")
            return self.decode, True
        if cached and self.decode is not None and T <= self.decode_max_tokens:
            return self.decode, True
        return self.full, False


def join_parts(parts):
    """Parts whose scores add, joined into one array along the last axis: query parts
    ``[B, T, H, D_i]``, key parts ``[B, S, K, D_i]``, or ``[B, S, D_i]`` (one head for all,
    given a head axis of 1). A single array is returned as it is (with that head axis)."""
    parts = list(parts) if isinstance(parts, (tuple, list)) else [parts]
    parts = [part[:, :, None] if part.ndim == 3 else part for part in parts]  # [B, S, 1, D_i]
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)


def attend(kernels: Kernels, q, k, v, context: AttentionContext, *, cached: bool, record=None):
    """The attention of a layer: ``[B, T, H, E]`` from the kernel that serves this call.

    q, k may be tuples of parts (see the module docstring); v ``[B, S, K, E]`` or ``[B, S, E]``.
    When ``context.record_weights`` is set, the weights are computed once (dense), handed to
    ``record`` (a layer's ``sow``), and the output is made from them.
    """
    if context.record_weights:
        if context.cache_kind != "float":
            raise ValueError(f"recording the weights reads a float cache as it is; this cache is {context.cache_kind}: "
                             "use init_cache with the model's dtype")
        out, weights = dense_kernel_with_weights(join_parts(q), join_parts(k), join_parts(v), context)
        if record is not None:
            record(weights)
        return out
    T = (q[0] if isinstance(q, (tuple, list)) else q).shape[1]
    kernel, is_decode = kernels.for_call(T, cached, context.cache_kind)
    if is_decode:
        return kernel(q, k, v, context)
    return kernel(join_parts(q), join_parts(k), join_parts(v), context)
