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

Which kernels, by platform: one table, ``PLATFORM_KERNELS``, read once when a model is built
(``Kernels.named("auto")``, the platform of ``jax.devices()[0]``). For each platform and kind of
call it lists candidates in order of preference; a call gets the first that serves it:

    platform   full calls                                         decode calls
    cpu        dense_kernel                                       decode_kernel
    gpu        cuDNN (jax.nn, when the call fits), Pallas         Pallas decode, decode_kernel
               flash (Triton, when it fits shared memory),
               flash_kernel
    tpu        Pallas flash (Mosaic, when it fits VMEM),          Pallas decode, decode_kernel
               flash_kernel

What cuDNN serves (``cudnn_serves``): a full call without a cache (its tokens at 0 .. T-1, as a
model's own forward), causal or not, with or without a window, in bfloat16 or float16, head width
at most 128 and a multiple of 8, D = E; not soft-caps, sinks, segment ids, padding or a caller's
mask. What the Pallas decode kernel serves: ``pallas.decode.serves``. A user forces a kernel by
name (``Kernels.named``: "dense", "flash", "pallas", "cudnn"; a model's ``attention_kernel``, the
CLI's ``--kernel``) or by function (``attention_fn``); "pallas" on a CPU runs in interpret mode.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp

from jaxattn.functional.attention import dense_kernel, dense_kernel_with_weights
from jaxattn.functional.checks import check_int
from jaxattn.functional.decode import DECODE_MAX_TOKENS, decode_kernel
from jaxattn.functional.flash import flash_kernel
from jaxattn.functional.masks import AttentionContext
from jaxattn.functional.pallas import decode as pallas_decode
from jaxattn.functional.pallas import flash as pallas_flash

# ------------------------------------------------------------------ kernels by platform


def cudnn_serves(q, k, v, context: AttentionContext) -> str | None:
    """``None`` when ``jax.nn.dot_product_attention(implementation="cudnn")`` computes this call
    as jaxattn does, else why not (static: dtypes, widths and which context fields are set)."""
    parts = isinstance(q, (tuple, list)) or isinstance(k, (tuple, list))
    if parts:
        return "MLA's key parts"
    reasons = [reason for reason, applies in (
        (f"dtype {q.dtype} (cuDNN: bfloat16, float16)", q.dtype not in (jnp.bfloat16, jnp.float16)),
        (f"head width {q.shape[-1]} (at most 128, a multiple of 8)", q.shape[-1] > 128 or q.shape[-1] % 8),
        ("a value width other than the key's", q.shape[-1] != v.shape[-1]),
        ("a cache (cuDNN's causal mask is aligned top-left)", context.T != context.S),
        ("padding (kv_lengths)", context.kv_lengths is not None),
        ("a soft-cap", context.logit_softcap is not None),
        ("sinks", context.sinks is not None),
        ("segment ids", context.q_segment_ids is not None),
        ("a caller's mask", context.user_mask is not None),
        ("a paged or int8 cache", context.cache_kind != "float"),
    ) if applies]
    return ", ".join(reasons) or None


def cudnn_kernel(q, k, v, context: AttentionContext):
    """The call through cuDNN's fused attention (``jax.nn.dot_product_attention``), for calls
    ``cudnn_serves``; any other is a ``ValueError`` naming what cuDNN does not do here."""
    reason = cudnn_serves(q, k, v, context)
    if reason is not None:
        raise ValueError(f"cuDNN attention does not serve this call: {reason}; use the Pallas or XLA kernels")
    window = None if context.window is None else (context.window - 1, 0)  # the query and window - 1 before it
    return jax.nn.dot_product_attention(q, k, v, scale=context.logit_scale(q.shape[-1]), is_causal=context.is_causal,
                                        local_window_size=window, implementation="cudnn")


def serves_always(q, k, v, context):
    return None


def pallas_fits(target: str):
    def serves(q, k, v, context):
        if isinstance(q, (tuple, list)) or context.cache_kind != "float":
            return "MLA's parts or a paged/int8 cache"
        return None if pallas_flash.fits(q, k, v, context, target) else f"blocks over the {target}'s on-chip memory"
    return serves


def pallas_decode_fits(target: str):
    def serves(q, k, v, context):
        reason = pallas_decode.serves(q, k, v, context)
        if reason is None and not pallas_decode.decode_fits(q, k, v, context, target):
            return f"a program over the {target}'s on-chip memory"
        return reason
    return serves


@dataclasses.dataclass(frozen=True)
class Choice:
    """One row of the table: a kernel, its name, and ``serves(q, k, v, context)`` (``None``, or why not)."""

    name: str
    kernel: Callable
    serves: Callable = serves_always


PLATFORM_KERNELS: dict[str, dict[str, tuple[Choice, ...]]] = {
    "cpu": {"full": (Choice("xla dense", dense_kernel),),
            "decode": (Choice("xla decode", decode_kernel),)},
    "gpu": {"full": (Choice("cudnn", cudnn_kernel, cudnn_serves),
                     Choice("pallas gpu", functools.partial(pallas_flash.on_target, target="gpu"), pallas_fits("gpu")),
                     Choice("xla flash", flash_kernel)),
            "decode": (Choice("pallas decode gpu", functools.partial(pallas_decode.on_target, target="gpu"),
                              pallas_decode_fits("gpu")),
                       Choice("xla decode", decode_kernel))},
    "tpu": {"full": (Choice("pallas tpu", functools.partial(pallas_flash.on_target, target="tpu"), pallas_fits("tpu")),
                     Choice("xla flash", flash_kernel)),
            "decode": (Choice("pallas decode tpu", functools.partial(pallas_decode.on_target, target="tpu"),
                              pallas_decode_fits("tpu")),
                       Choice("xla decode", decode_kernel))},
}


def choose_kernel(platform: str, kind: str, q, k, v, context: AttentionContext) -> Choice:
    """The table's kernel for a call of ``kind`` ("full" or "decode") on ``platform`` ("cpu",
    "gpu" — "cuda" and "rocm" read as "gpu" — or "tpu"): the first row that serves it."""
    platform = "gpu" if platform in ("cuda", "rocm") else platform
    if platform not in PLATFORM_KERNELS:
        raise ValueError(f"no kernels for platform {platform!r}: one of {tuple(PLATFORM_KERNELS)}")
    for choice in PLATFORM_KERNELS[platform][kind]:
        if choice.serves(q, k, v, context) is None:
            return choice
    raise AssertionError("the last row of each table serves every call")


@dataclasses.dataclass(frozen=True)
class ByPlatform:
    """A kernel that asks the table (``choose_kernel``) for each call: what ``Kernels.named("auto")``
    holds, with the platform read once when it was made."""

    platform: str
    kind: str

    def __call__(self, q, k, v, context: AttentionContext):
        return choose_kernel(self.platform, self.kind, q, k, v, context).kernel(q, k, v, context)


def pallas_or_xla_decode(q, k, v, context: AttentionContext):
    """The Pallas decode kernel where it serves the call (``pallas.decode.serves``), else
    ``decode_kernel`` (int8 caches, MLA's parts)."""
    if pallas_decode.serves(q, k, v, context) is None:
        return pallas_decode.pallas_decode_kernel(q, k, v, context)
    return decode_kernel(q, k, v, context)


KERNEL_NAMES = ("auto", "dense", "flash", "pallas", "cudnn")


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

    @classmethod
    def named(cls, name: str = "auto", *, decode_max_tokens: int = DECODE_MAX_TOKENS,
              platform: str | None = None) -> "Kernels":
        """The kernels a name stands for (a model's ``attention_kernel``, the CLI's ``--kernel``).

        "auto": the table's (``PLATFORM_KERNELS``) for ``platform``, by default that of
        ``jax.devices()[0]``, read now. "dense", "flash": the XLA kernels. "pallas": the Pallas
        kernels (interpret mode on a CPU), ``decode_kernel`` for what the Pallas decode kernel does
        not serve. "cudnn": cuDNN for full calls (a call it cannot serve is an error), the table's
        decode kernel.
        """
        if name not in KERNEL_NAMES:
            raise ValueError(f"kernel must be one of {KERNEL_NAMES}, got {name!r}")
        platform = jax.devices()[0].platform if platform is None else platform
        by_platform = ByPlatform(platform, "decode")
        full = {"auto": ByPlatform(platform, "full"), "dense": dense_kernel, "flash": flash_kernel,
                "pallas": pallas_flash.pallas_kernel, "cudnn": cudnn_kernel}[name]
        decode = pallas_or_xla_decode if name == "pallas" else (by_platform if name in ("auto", "cudnn") else decode_kernel)
        return cls(full, decode, decode_max_tokens)

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
