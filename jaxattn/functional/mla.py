"""Multi-head latent attention (DeepSeek-V2, arXiv 2405.04434, section 2.1, eqs. 9-19).

MLA caches one small latent per token instead of H keys and H values:

    c_kv  = h W_dkv                      (9)   [B, S, L]    the cached latent
    k_c   = c_kv W_uk                    (10)  [B, S, H, D]
    v_c   = c_kv W_uv                    (11)  [B, S, H, E]
    c_q   = h W_dq                       (12)  [B, T, P]    (query compression)
    q_c   = c_q W_uq                     (13)  [B, T, H, D]
    q_r   = RoPE(c_q W_qr)               (14)  [B, T, H, R]
    k_r   = RoPE(h W_kr)                 (15)  [B, S, R]    one RoPE key for all heads, cached
    q     = [q_c; q_r],  k = [k_c; k_r]  (16, 17)
    o     = softmax(q k^T / sqrt(D + R)) v_c       (18)
    u     = o W_o                        (19)  [B, T, C]

RoPE cannot live inside the latent (it would sit between W_uk and the query and block
the absorption below), hence the separate, decoupled R-wide key ``k_r``.

Three paths compute the same function, each a plain function:

1. ``mla_naive``: decompress K and V for every head, run ``multi_head_attention``.
2. ``mla_decompressed``: cache only ``c_kv`` and ``k_r`` (a ``LatentCache``, L + R numbers
   per token), decompress the whole cache at every call.
3. ``mla_absorbed``: ``q_c . k_c = (q_c W_uk^T) . c_kv``, so W_uk folds into the query and
   W_uv into the output: attention runs directly over the cached latents, as an MQA with
   key width L + R and value width L. This is the decode path.

Shape letters: B batch, T queries, S keys, C model width, H heads, D/E per-head key/value
width, L latent width (d_c), P query latent width (d_c'), R RoPE width (d_h^R).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxattn.functional.kernels import Kernels, attend
from jaxattn.functional.kv_cache import Int8Tokens, LatentCache
from jaxattn.functional.checks import check_positive
from jaxattn.functional.masks import default_scale
from jaxattn.functional.positions import Rope
from jaxattn.functional.layer import call_context, rms_norm

class MLAParams(NamedTuple):
    """MLA weights, named and shaped as in the paper. Query compression is on when
    ``w_dq`` is set (then ``w_uq``, ``w_qr [P, H, R]``), off when ``w_q`` is set (then
    ``w_qr [C, H, R]`` acts on h directly). ``q_norm``/``kv_norm`` are the optional
    RMSNorm scales on the latents of the released DeepSeek-V2 models."""

    w_dkv: jax.Array  # [C, L]
    w_kr: jax.Array  # [C, R]
    w_uk: jax.Array  # [L, H, D]
    w_uv: jax.Array  # [L, H, E]
    w_o: jax.Array  # [H, E, C]
    w_qr: jax.Array  # [P, H, R] or [C, H, R]
    w_dq: jax.Array | None = None  # [C, P]
    w_uq: jax.Array | None = None  # [P, H, D]
    w_q: jax.Array | None = None  # [C, H, D]
    q_norm: jax.Array | None = None  # [P]
    kv_norm: jax.Array | None = None  # [L]


@dataclasses.dataclass(frozen=True)
class MLASettings:
    """How one MLA layer attends, apart from its weights (static: hashable).

    rope: the decoupled RoPE of ``q_r`` and ``k_r`` (DeepSeek: interleaved pairs).
    epsilon: the latent RMSNorms' epsilon.
    scale: the logits' multiplier, ``None`` for ``1/sqrt(D + R)`` (times YaRN's ``mscale^2`` when
      the RoPE is YaRN-scaled with ``mscale_all_dim``, as DeepSeek-V2/V3 do).
    logit_softcap: ``cap`` of ``s -> cap tanh(s / cap)``, or ``None``.
    """

    rope: Rope = Rope(style="interleaved")
    epsilon: float = 1e-6
    scale: float | None = None
    logit_softcap: float | None = None

    def __post_init__(self):
        check_positive("epsilon", self.epsilon)
        check_positive("scale", self.scale)
        check_positive("logit_softcap", self.logit_softcap)


class MLADims(NamedTuple):
    C: int
    H: int
    D: int
    E: int
    L: int
    R: int
    P: int | None


def check_mla_params(params: MLAParams) -> MLADims:
    """Checks that every weight fits the others; returns the sizes. Errors name the shapes."""
    C, L = params.w_dkv.shape
    L_uk, H, D = params.w_uk.shape
    L_uv, H_uv, E = params.w_uv.shape
    shapes = {name: None if value is None else tuple(value.shape) for name, value in params._asdict().items()}
    R = params.w_kr.shape[-1]
    compressed = params.w_dq is not None
    if compressed == (params.w_q is not None):
        raise ValueError(f"set either w_dq and w_uq (query compression) or w_q (none), got {shapes}")
    P = params.w_dq.shape[1] if compressed else None
    expected = {
        "w_dkv": (C, L),
        "w_kr": (C, R),
        "w_uk": (L, H, D),
        "w_uv": (L, H, E),
        "w_o": (H, E, C),
        "w_qr": (P if compressed else C, H, R),
    }
    if compressed:
        expected.update(w_dq=(C, P), w_uq=(P, H, D))
        if params.q_norm is not None:
            expected["q_norm"] = (P,)
    else:
        expected["w_q"] = (C, H, D)
        if params.q_norm is not None:
            raise ValueError("q_norm normalises the query latent: it needs query compression (w_dq)")
    if params.kv_norm is not None:
        expected["kv_norm"] = (L,)
    wrong = {name: (shapes[name], shape) for name, shape in expected.items() if shapes[name] != shape}
    if wrong or L_uk != L or L_uv != L or H_uv != H:
        details = ", ".join(f"{name} is {got}, expected {want}" for name, (got, want) in wrong.items())
        raise ValueError(f"MLA weights do not fit together (C={C}, L={L}, H={H}, D={D}, E={E}, R={R}, P={P}): {details or shapes}")
    if R % 2:
        raise ValueError(f"the decoupled RoPE width R must be even, got w_kr {params.w_kr.shape}")
    return MLADims(C, H, D, E, L, R, P)


def mla_queries(params: MLAParams, h, positions, settings: MLASettings = MLASettings()):
    """Equations 12-14: h ``[B, T, C]`` -> ``(q_c [B, T, H, D], q_r [B, T, H, R])``.

    ``positions`` int ``[B, T]`` or ``[T]``.
    """
    if params.w_dq is not None:
        c_q = h @ params.w_dq  # [B, T, P]
        if params.q_norm is not None:
            c_q = rms_norm(c_q, params.q_norm, settings.epsilon)
        q_c = jnp.einsum("btp,phd->bthd", c_q, params.w_uq)  # [B, T, H, D]
        q_r = jnp.einsum("btp,phr->bthr", c_q, params.w_qr)  # [B, T, H, R]
    else:
        q_c = jnp.einsum("btc,chd->bthd", h, params.w_q)
        q_r = jnp.einsum("btc,chr->bthr", h, params.w_qr)
    return q_c, settings.rope(q_r, positions)  # [B, T, H, R]


def mla_latents(params: MLAParams, h, positions, settings: MLASettings = MLASettings()):
    """Equations 9 and 15: h ``[B, S, C]`` -> ``(c_kv [B, S, L], k_r [B, S, R])``, what MLA caches."""
    c_kv = h @ params.w_dkv  # [B, S, L]
    if params.kv_norm is not None:
        c_kv = rms_norm(c_kv, params.kv_norm, settings.epsilon)
    return c_kv, settings.rope(h @ params.w_kr, positions)  # [B, S, R]


def mla_scale(dims: MLADims, settings: MLASettings) -> float:
    """``1/sqrt(D + R)``: the query/key width of MLA is the content part plus the RoPE part.

    With YaRN and ``mscale_all_dim`` (DeepSeek-V2/V3), times ``mscale(factor, mscale_all_dim)^2``:
    DeepSeek puts YaRN's temperature into the softmax scale, not into cos and sin.
    """
    if settings.scale is not None:
        return float(settings.scale)
    scaling = settings.rope.scaling
    mscale = 1.0
    if scaling is not None and scaling.kind == "yarn" and scaling.mscale_all_dim:
        mscale = scaling.yarn_mscale(scaling.mscale_all_dim)
    return default_scale(dims.D + dims.R) * mscale * mscale


def _decompressed_attention(params, dims, q_c, q_r, c_kv, k_r, context, kernels, cached, record):
    """Equations 10, 11, 16-19 over latents: decompress K, V per head and attend."""
    B, S = c_kv.shape[:2]
    k_c = jnp.einsum("bsl,lhd->bshd", c_kv, params.w_uk)  # [B, S, H, D]
    v_c = jnp.einsum("bsl,lhe->bshe", c_kv, params.w_uv)  # [B, S, H, E]
    k = jnp.concatenate([k_c, jnp.broadcast_to(k_r[:, :, None, :], (B, S, dims.H, dims.R))], axis=-1)  # [B, S, H, D+R]
    q = jnp.concatenate([q_c, q_r], axis=-1)  # [B, T, H, D+R]
    o = attend(kernels, q, k, v_c, context, cached=cached, record=record)  # [B, T, H, E]
    return jnp.einsum("bthe,hec->btc", o, params.w_o)  # [B, T, C]


def _check_hidden(h, dims: MLADims):
    if h.ndim != 3 or h.shape[-1] != dims.C:
        raise ValueError(f"MLA takes h [B, T, C={dims.C}], got {h.shape}")


def mla_naive(params: MLAParams, h, positions=None, *, settings: MLASettings = MLASettings(),
              kernels: Kernels = Kernels(), context=None, record=None):
    """Path 1: causal MLA over ``h [B, T, C]`` with K and V decompressed for every head.

    ``positions`` int ``[B, T]`` or ``[T]``, default ``arange(T)`` (or the model's ``context``);
    ``kernels`` chooses the kernel (``flash_kernel``, say). Returns ``[B, T, C]``.
    """
    dims = check_mla_params(params)
    _check_hidden(h, dims)
    context = call_context(h, positions, context=context)
    q_c, q_r = mla_queries(params, h, context.q_positions, settings)
    c_kv, k_r = mla_latents(params, h, context.q_positions, settings)
    context = context.self_keys().for_layer(scale=mla_scale(dims, settings), logit_softcap=settings.logit_softcap)
    return _decompressed_attention(params, dims, q_c, q_r, c_kv, k_r, context, kernels, False, record)


# ------------------------------------------------------------ paths that use a cache


def _cached_latents(params, dims, h, cache: LatentCache, num_new, settings, context):
    """Queries and latents of the new tokens at the positions that continue the cache,
    written into it. Returns ``(q_c, q_r, context, LatentView, new_cache)``, the context
    completed with the cache's keys and the scale."""
    context = call_context(h, context=context, cache=cache)
    q_c, q_r = mla_queries(params, h, context.q_positions, settings)
    c_kv, k_r = mla_latents(params, h, context.q_positions, settings)
    with jax.named_scope("cache_write"):
        view, new_cache = cache.update(c_kv, k_r, num_new)
    context = context.with_view(view).for_layer(scale=mla_scale(dims, settings),
                                                                        logit_softcap=settings.logit_softcap)
    return q_c, q_r, context, view, new_cache


def mla_decompressed(params: MLAParams, h, cache: LatentCache, *, num_new=None, settings: MLASettings = MLASettings(),
                     kernels: Kernels = Kernels(), context=None, record=None):
    """Path 2: store only the latents of the T new tokens, decompress the whole cache at use.

    h ``[B, T, C]`` continues each sequence of ``cache`` (a ``LatentCache``).
    Returns ``([B, T, C], new_cache)``.
    """
    dims = check_mla_params(params)
    _check_hidden(h, dims)
    if getattr(cache, "page_table", None) is not None or isinstance(cache.c_kv, Int8Tokens):
        raise ValueError("mla_decompressed decompresses a float cache it can slice; a paged or int8 latent cache "
                         "is read by mla_absorbed (a block at a time)")
    q_c, q_r, context, view, new_cache = _cached_latents(params, dims, h, cache, num_new, settings, context)
    out = _decompressed_attention(params, dims, q_c, q_r, view.c_kv, view.k_rope, context, kernels, True, record)
    return out, new_cache


def mla_absorbed(params: MLAParams, h, cache: LatentCache, *, num_new=None, settings: MLASettings = MLASettings(),
                 kernels: Kernels = Kernels(), context=None, record=None):
    """Path 3: attention directly over the cached latents, with W_uk and W_uv absorbed.

    ``q_c . k_c = q_c . (c_kv W_uk) = (q_c W_uk^T) . c_kv``: each head's query moves into
    the latent space, ``q_lat [B, T, H, L]``, and all heads share one key
    ``[c_kv; k_r]`` (width L + R) and one value ``c_kv`` (width L): an MQA. The heads'
    latent outputs go through W_uv, then W_o. The scale stays ``1/sqrt(D + R)``.

    The key travels as two parts, ``(c_kv, k_r)``, whose scores add: the decode kernel (a
    step of at most ``kernels.decode_max_tokens`` tokens) reads the buffers as they are, up
    to the longest row, never concatenated; any other kernel gets them joined.

    h ``[B, T, C]`` continues each sequence of ``cache``. Returns ``([B, T, C], new_cache)``.
    """
    dims = check_mla_params(params)
    _check_hidden(h, dims)
    q_c, q_r, context, view, new_cache = _cached_latents(params, dims, h, cache, num_new, settings, context)
    q_latent = jnp.einsum("bthd,lhd->bthl", q_c, params.w_uk)  # [B, T, H, L]
    with jax.named_scope("attention_kernel"):
        o_latent = attend(kernels, (q_latent, q_r), (view.c_kv, view.k_rope), view.c_kv, context, cached=True,
                          record=record)  # [B, T, H, L]
    o = jnp.einsum("bthl,lhe->bthe", o_latent, params.w_uv)  # [B, T, H, E]
    return jnp.einsum("bthe,hec->btc", o, params.w_o), new_cache  # [B, T, C]
