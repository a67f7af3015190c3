"""The Pallas kernels, proven on a CPU: values (and flash's gradients) in interpret mode against
the float64 reference; lowering for ``tpu`` and ``cuda`` at real model shapes, from the public
functions as a user calls them; each program's on-chip bytes against the chips' budgets; and the
platform table. Shapes are tiny where a kernel runs (interpret mode is slow), real where it is
only lowered (lowering compiles nothing)."""

import dataclasses
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn.functional import (
    AttentionContext,
    Kernels,
    multi_head_attention,
    pallas_attention,
    pallas_decode_attention,
    pallas_decode_kernel,
)
from jaxattn.functional.kernels import ByPlatform, choose_kernel
from jaxattn.functional.pallas import decode as pallas_decode
from jaxattn.functional.pallas import flash as pallas_flash
from jaxattn.functional.pallas.platforms import GPU, TPU, padded_width
from tests.reference import normal, packed_segments, reference_attention

TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


def inputs(B, T, S, H, K, D, dtype=jnp.float32, seed=0):
    return (normal((B, T, H, D), dtype, seed), normal((B, S, K, D), dtype, seed + 1), normal((B, S, K, D), dtype, seed + 2))


def reference_keywords(keywords, T, S):
    """The kernel's keywords as the float64 reference takes them (causal: bottom-right positions)."""
    keywords = dict(keywords)
    if keywords.pop("is_causal", False):
        keywords.setdefault("q_positions", np.arange(T) + S - T)
        keywords.setdefault("kv_positions", np.arange(S))
    return keywords


def check_flash(q, k, v, keywords, *, interpret=True, blocks=(8, 8)):
    """pallas_attention's output and gradients (q, k, v, sinks) against the float64 reference."""
    B, T, H, _ = q.shape
    S = k.shape[1]
    tolerance = TOLERANCE[q.dtype.type]
    cotangent = normal((B, T, H, v.shape[-1]), seed=9)
    sinks = keywords.pop("sinks", None)

    def loss(q, k, v, sinks):
        out = pallas_attention(q, k, v, block_q=blocks[0], block_kv=blocks[1], interpret=interpret, sinks=sinks, **keywords)
        return jnp.sum(out.astype(jnp.float32) * cotangent), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(q, k, v, sinks)
    expected = reference_attention(q, k, v, sinks=sinks, cotangent=cotangent, **reference_keywords(keywords, T, S))
    got = (out, *grads[:3]) + (() if sinks is None else (grads[3],))
    names = ("out", "dq", "dk", "dv", "dsinks")
    chex.assert_trees_all_close({name: np.asarray(a, np.float64) for name, a in zip(names, got)},
                                dict(zip(names, expected)), rtol=tolerance, atol=tolerance)


# --------------------------------------------------------------------- flash, values


B, T, H, K, D = 2, 13, 4, 2, 16  # T = 13: not a multiple of the blocks (8)
FEATURES = {
    "plain (no mask)": dict(),
    "causal": dict(is_causal=True),
    "window": dict(is_causal=True, window=4),
    "segment ids": dict(q_segment_ids=packed_segments([5, 8]), kv_segment_ids=packed_segments([5, 8])),
    "lengths": dict(kv_lengths=np.array([13, 6])),
    "scale": dict(is_causal=True, scale=0.37),
    "soft-cap": dict(is_causal=True, logit_softcap=1.5),
    "sinks": dict(is_causal=True, sinks=np.array([0.5, -1.0, 2.0, 0.0], np.float32)),
    "caller's mask": dict(mask=np.random.default_rng(3).random((B, 1, T, T)) < 0.6),
}


@pytest.mark.parametrize("feature", FEATURES)
def test_pallas_flash_each_feature_alone_matches_float64(feature):
    check_flash(*inputs(B, T, T, H, K, D), dict(FEATURES[feature]))


ALL_TOGETHER = dict(is_causal=True, window=9, logit_softcap=3.0, kv_lengths=np.array([21, 15]),
                    sinks=np.linspace(-1, 1, 8).astype(np.float32))


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_pallas_flash_all_together_ragged_gqa_matches_float64(D, dtype):
    # T = 21 queries against S = 21 keys in blocks of 8 x 16 (ragged on both sides), GQA 8 / 2
    check_flash(*inputs(2, 21, 21, 8, 2, D, dtype, seed=D), dict(ALL_TOGETHER), blocks=(8, 16))


def test_pallas_flash_tpu_layout_and_a_chunk_of_a_prefill_match_float64():
    # the TPU's tables (SMEM) and blocks, and T < S: queries aligned bottom-right
    check_flash(*inputs(2, 9, 21, 8, 2, 64, seed=5), dict(ALL_TOGETHER), interpret="tpu")


def test_pallas_flash_width_80_is_padded_and_right():
    q, k, v = inputs(1, 10, 10, 2, 1, 80, seed=4)
    chex.assert_trees_all_close(pallas_attention(q, k, v, is_causal=True, interpret=True, block_q=8, block_kv=8),
                                multi_head_attention(q, k, v, is_causal=True), rtol=2e-5, atol=2e-5)
    assert padded_width(80) == 128 and padded_width(96) == 128 and padded_width(64) == 64


def test_pallas_flash_never_reads_blocks_it_skips():
    # Keys 24..39 lie past the row's length: whole key blocks that no query may see. NaN there
    # must not reach the output or any gradient, so the kernel really skips them.
    q, k, v = inputs(1, 40, 40, 2, 1, 16, seed=6)
    poison = jnp.arange(40)[None, :, None, None] >= 24
    k_nan, v_nan = jnp.where(poison, jnp.nan, k), jnp.where(poison, jnp.nan, v)
    keywords = dict(is_causal=True, kv_lengths=np.array([17]))

    def loss(q, k, v):
        return pallas_attention(q, k, v, interpret=True, block_q=8, block_kv=8, **keywords).sum()

    out = pallas_attention(q, k_nan, v_nan, interpret=True, block_q=8, block_kv=8, **keywords)
    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k_nan, v_nan)
    assert all(bool(jnp.isfinite(x[:, :24]).all()) for x in (out, *grads))
    chex.assert_trees_all_close(out, multi_head_attention(q, k, v, **keywords), rtol=2e-5, atol=2e-5)


# -------------------------------------------------------------------- decode, values


def paged(k, v, page: int, seed: int = 0):
    """Contiguous ``[B, S, K, D]`` keys and values copied into a pool of pages in a random order:
    pools ``[P, page, K, D]`` and the page table ``[B, N]``."""
    B, S = k.shape[:2]
    N = S // page
    table = np.random.default_rng(seed).permutation(B * N + 3)[: B * N].reshape(B, N).astype(np.int32)
    pools = []
    for x in (k, v):
        pool = np.zeros((B * N + 3, page) + x.shape[2:], np.float32)
        pool[table.reshape(-1)] = np.asarray(x, np.float32).reshape(B * N, page, *x.shape[2:])
        pools.append(jnp.asarray(pool, x.dtype))
    return pools, jnp.asarray(table)


DECODE = dict(window=24, logit_softcap=4.0, sinks=np.linspace(-1, 1, 8).astype(np.float32))


def check_decode(q, k, v, keywords, *, interpret=True, page=16):
    """pallas_decode over the contiguous cache and over the same keys in shuffled pages, against float64."""
    T, S = q.shape[1], k.shape[1]
    expected = reference_attention(q, k, v, **reference_keywords(keywords, T, S))
    tolerance = TOLERANCE[q.dtype.type]
    out = pallas_decode_attention(q, k, v, block_kv=16, interpret=interpret, **keywords)
    chex.assert_trees_all_close(np.asarray(out, np.float64), expected, rtol=tolerance, atol=tolerance)
    (k_pool, v_pool), table = paged(k, v, page=page, seed=S)
    context = dataclasses.replace(AttentionContext.from_keywords(q, k, **keywords), kv_pages=table)
    out = pallas_decode_kernel(q, k_pool, v_pool, context, block_kv=32, interpret=interpret)
    chex.assert_trees_all_close(np.asarray(out, np.float64), expected, rtol=tolerance, atol=tolerance)


def rows_holding(lengths, T=3):
    """A causal decode call of T new tokens on rows that hold ``lengths`` tokens (theirs included)."""
    lengths = np.asarray(lengths)
    return dict(is_causal=True, kv_lengths=lengths, q_positions=lengths[:, None] - T + np.arange(T))


DECODE_FEATURES = {
    "lengths": {},
    "window": dict(window=10),
    "soft-cap": dict(logit_softcap=2.0),
    "scale": dict(scale=0.3),
    "sinks": dict(sinks=np.array([0.5, -1.0, 2.0, 0.0], np.float32)),
}


@pytest.mark.parametrize("feature", DECODE_FEATURES)
def test_pallas_decode_each_feature_alone_matches_float64(feature):
    q, k, v = inputs(2, 3, 48, 4, 2, 16, seed=11)
    check_decode(q, k, v, {**rows_holding([45, 20]), **DECODE_FEATURES[feature]})


@pytest.mark.parametrize("dtype,D", [(jnp.float32, 64), (jnp.float32, 128), (jnp.bfloat16, 64), (jnp.bfloat16, 128)])
def test_pallas_decode_all_together_matches_float64_contiguous_and_paged(dtype, D):
    # 3 new tokens of rows holding 45 and 29 of 64 slots, GQA 8 / 2; then the same keys in pages
    q, k, v = inputs(2, 3, 64, 8, 2, D, dtype, seed=D)
    check_decode(q, k, v, {**rows_holding([45, 29]), **DECODE})


def test_pallas_decode_tpu_copies_match_float64_contiguous_and_paged():
    q, k, v = inputs(2, 3, 64, 8, 2, 16, seed=3)
    check_decode(q, k, v, {**rows_holding([45, 29]), **DECODE}, interpret="tpu")


def test_pallas_decode_reads_only_each_rows_blocks():
    # NaN in the blocks past each row's last one (row 0 holds 20 keys: blocks 0-1 of 16; row 1, 35: 0-2)
    q, k, v = inputs(2, 1, 64, 4, 2, 16, seed=7)
    lengths = np.array([20, 35])
    poison = jnp.arange(64)[None, :] >= jnp.array([32, 48])[:, None]  # [B, S]
    k_nan, v_nan = (jnp.where(poison[:, :, None, None], jnp.nan, x) for x in (k, v))
    keywords = dict(is_causal=True, kv_lengths=lengths, q_positions=lengths[:, None] - 1)
    out = pallas_decode_attention(q, k_nan, v_nan, block_kv=16, interpret=True, **keywords)
    chex.assert_trees_all_close(out, multi_head_attention(q, k, v, **keywords), rtol=2e-5, atol=2e-5)


def test_pallas_decode_names_what_it_does_not_serve():
    q, k, v = inputs(1, 1, 16, 2, 1, 16)
    with pytest.raises(ValueError, match="segment ids"):
        pallas_decode_attention(q, k, v, interpret=True, q_segment_ids=np.zeros(1, np.int32),
                                kv_segment_ids=np.zeros(16, np.int32))
    with pytest.raises(ValueError, match="head widths"):
        pallas_decode_attention(*inputs(1, 1, 16, 2, 1, 24), is_causal=True, interpret=True)
    with pytest.raises(ValueError, match="interpret must be"):
        pallas_attention(q, k, v, interpret="cpu")
    with pytest.raises(ValueError, match="Triton blocks are powers of two"):
        GPU.check_blocks(48, 64)
    with pytest.raises(ValueError, match=r"tiled \(8, 128\)"):
        TPU.check_blocks(128, 64)


# ------------------------------------------------------------------ lowering, footprints

# name: (B, T, H, K, D, keywords); T is also the cache length of the decode kernel's calls
MODEL_SHAPES = {
    "gpt2-small": (1, 1024, 12, 12, 64, {}),
    "llama-3-8b": (1, 8192, 32, 8, 128, {}),
    "gemma-2-9b": (1, 8192, 16, 8, 256, dict(logit_softcap=50.0, window=4096)),
    "ragged-1000": (1, 1000, 8, 2, 64, {}),
}


def lowered(fn, platform, *args):
    """The text of fn lowered for one platform, from this CPU."""
    if platform == "tpu":
        return jax.export.export(jax.jit(fn), platforms=["tpu"])(*args).mlir_module()
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


CUSTOM_CALL = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("shape", MODEL_SHAPES)
def test_pallas_kernels_lower_for_tpu_and_cuda_at_model_shapes(shape, platform):
    B, T, H, K, D, keywords = MODEL_SHAPES[shape]
    q = jax.ShapeDtypeStruct((B, T, H, D), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((B, T, K, D), jnp.bfloat16)

    def forward(q, k, v):
        return pallas_attention(q, k, v, is_causal=True, **keywords)

    def backward(q, k, v):
        return jax.grad(lambda q, k, v: forward(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2))(q, k, v)

    text = lowered(forward, platform, q, kv, kv)
    assert text.count(CUSTOM_CALL[platform]) == 1 and "jaxattn_forward" in text
    if platform == "cuda":  # the K/V operands of the Triton call have K heads: GQA copies nothing
        operands = re.search(r"__gpu\$xla\.gpu\.triton\(.*\} : \((.*?)\) ->", text).group(1).split(", ")
        heads = [re.match(rf"tensor<{B}x(\d+)x\d+x{padded_width(D)}xbf16>", operand) for operand in operands[2:5]]
        assert [int(match.group(1)) for match in heads] == [H, K, K]  # q [B, H, Tp, Dp], k and v [B, K, Sp, Dp]
    text = lowered(backward, platform, q, kv, kv)
    assert all(name in text for name in ("jaxattn_forward", "jaxattn_dq", "jaxattn_dkv"))

    lengths = jax.ShapeDtypeStruct((8,), jnp.int32)
    step = jax.ShapeDtypeStruct((8, 1, H, D), jnp.bfloat16)
    cache = jax.ShapeDtypeStruct((8, T, K, D), jnp.bfloat16)

    def decode(q, k, v, lengths):
        return pallas_decode_attention(q, k, v, is_causal=True, kv_lengths=lengths, q_positions=lengths[:, None] - 1,
                                       **keywords)

    assert "jaxattn_decode" in lowered(decode, platform, step, cache, cache, lengths)
    page, N = 16, -(-T // 16)
    pool = jax.ShapeDtypeStruct((8 * N, page, K, D), jnp.bfloat16)
    table = jax.ShapeDtypeStruct((8, N), jnp.int32)

    def decode_paged(q, k_pool, v_pool, table, lengths):
        context = AttentionContext.for_tokens(1, lengths=lengths - 1).with_keys(jnp.arange(N * page)[None], lengths, table)
        return pallas_decode_kernel(q, k_pool, v_pool, context.for_layer(**keywords))

    assert "jaxattn_decode" in lowered(decode_paged, platform, step, pool, pool, table, lengths)


@pytest.mark.parametrize("shape", MODEL_SHAPES)
def test_every_program_fits_the_chip_at_model_shapes(shape):
    B, T, H, K, D, keywords = MODEL_SHAPES[shape]
    q = jax.ShapeDtypeStruct((B, T, H, D), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((B, T, K, D), jnp.bfloat16)
    context = AttentionContext.from_keywords(q, kv, is_causal=True, **keywords)
    for target in ("gpu", "tpu"):
        call = pallas_flash.make_call(q, kv, kv, context, target=target, interpret=False)
        for footprint in call.footprints():
            assert 0 < footprint.total <= footprint.budget, (target, footprint)
        step = jax.ShapeDtypeStruct((8, 1, H, D), jnp.bfloat16)
        cache = jax.ShapeDtypeStruct((8, T, K, D), jnp.bfloat16)
        decode_context = AttentionContext.from_keywords(step, cache, is_causal=True, kv_lengths=jnp.full(8, T),
                                                        **keywords)
        decode_call = pallas_decode.make_decode_call(step, cache, cache, decode_context, block_kv=None,
                                                     interpret=False, target={"gpu": GPU, "tpu": TPU}[target])
        assert decode_call.footprint(2).fits
    # the budgets: H100 shared memory per block, the VMEM these kernels allow themselves
    assert GPU.budget == 227 * 1024 and TPU.budget == 64 * 2**20


def test_a_program_too_big_for_the_chip_is_refused_or_served_by_xla():
    # 256k keys of width 256 in the TPU's VMEM (the streamed side is a whole head): over budget
    q = jax.ShapeDtypeStruct((1, 262144, 2, 256), jnp.bfloat16)
    context = AttentionContext.from_keywords(q, q, is_causal=True)
    footprint = pallas_flash.make_call(q, q, q, context, target="tpu", interpret=False).footprints()[0]
    assert not footprint.fits
    with pytest.raises(ValueError, match="KiB on the chip per program"):
        footprint.check("the forward kernel")
    assert choose_kernel("tpu", "full", q, q, q, context).name == "xla flash"
    text = lowered(lambda q, k, v: pallas_attention(q, k, v, is_causal=True), "tpu", q, q, q)
    assert "tpu_custom_call" not in text  # lowered as flash_kernel instead


# --------------------------------------------------------------------- the platform table


def test_platform_table_gives_each_call_its_kernel():
    bf16 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)  # noqa: E731
    q, kv = bf16(2, 512, 8, 64), bf16(2, 512, 2, 64)
    causal = AttentionContext.from_keywords(q, kv, is_causal=True)
    capped = AttentionContext.from_keywords(q, kv, is_causal=True, logit_softcap=30.0)
    name = lambda platform, kind, q, k, v, context: choose_kernel(platform, kind, q, k, v, context).name  # noqa: E731
    assert name("cpu", "full", q, kv, kv, causal) == "xla dense"
    assert name("gpu", "full", q, kv, kv, causal) == "cudnn"
    assert name("cuda", "full", q, kv, kv, capped) == "pallas gpu"  # cuDNN has no soft-cap
    f32 = jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct(kv.shape, jnp.float32)
    assert name("gpu", "full", f32[0], f32[1], f32[1], causal) == "pallas gpu"  # cuDNN: half precision only
    assert name("tpu", "full", q, kv, kv, causal) == "pallas tpu"
    step, cache = bf16(4, 1, 8, 64), bf16(4, 4096, 2, 64)
    decoding = AttentionContext.for_tokens(1, lengths=jnp.full(4, 99)).with_keys(jnp.arange(4096)[None], jnp.full(4, 100))
    assert name("cpu", "decode", step, cache, cache, decoding) == "xla decode"
    assert name("gpu", "decode", step, cache, cache, decoding) == "pallas decode gpu"
    assert name("tpu", "decode", step, cache, cache, decoding) == "pallas decode tpu"
    int8 = dataclasses.replace(decoding, kv_int8=True)
    assert name("gpu", "decode", step, cache, cache, int8) == "xla decode"
    parts = (step, bf16(4, 1, 8, 16)), (bf16(4, 4096, 64), bf16(4, 4096, 16))
    assert name("tpu", "decode", *parts, bf16(4, 4096, 64), decoding) == "xla decode"  # MLA's absorbed path
    kernels = Kernels.named("auto", platform="tpu")
    assert kernels.full == ByPlatform("tpu", "full") and kernels.decode == ByPlatform("tpu", "decode")
    assert Kernels.named("auto").full == ByPlatform(jax.devices()[0].platform, "full")
    with pytest.raises(ValueError, match="kernel must be one of"):
        Kernels.named("triton")
    with pytest.raises(ValueError, match="no kernels for platform"):
        choose_kernel("metal", "full", q, kv, kv, causal)
