"""MLA: the naive, decompressed and absorbed paths are one function."""

from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from jaxattn.functional import (
    Kernels,
    LatentCache,
    MLAParams,
    MLASettings,
    Rope,
    flash_kernel,
    mla_absorbed,
    mla_decompressed,
    mla_naive,
)

# Odd, distinct sizes: C model, H heads, D/E key/value head widths, L latent, R rope, P query latent.
C, H, D, E, L, R, P = 20, 3, 5, 7, 9, 4, 6


def normal(shape, seed, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * scale, jnp.float32)


def make_params(*, compressed=True, norms=True, seed=0):
    w = lambda shape, i, fan_in: normal(shape, seed + i, 1 / np.sqrt(fan_in))  # noqa: E731
    common = dict(
        w_dkv=w((C, L), 0, C), w_kr=w((C, R), 1, C), w_uk=w((L, H, D), 2, L), w_uv=w((L, H, E), 3, L),
        w_o=w((H, E, C), 4, H * E), kv_norm=1 + normal((L,), seed + 5, 0.1) if norms else None,
    )
    if compressed:
        return MLAParams(**common, w_dq=w((C, P), 6, C), w_uq=w((P, H, D), 7, P), w_qr=w((P, H, R), 8, P),
                         q_norm=1 + normal((P,), seed + 9, 0.1) if norms else None)
    return MLAParams(**common, w_q=w((C, H, D), 6, C), w_qr=w((C, H, R), 8, C))


def reference_mla(params, h, rope_style):
    """Float64 NumPy MLA, written from equations 9-19 with explicit rotations."""
    p = {k: None if v is None else np.asarray(v, np.float64) for k, v in params._asdict().items()}
    h = np.asarray(h, np.float64)
    B, T, _ = h.shape

    def rms(x, scale):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6) * scale

    def rotate(x, positions):  # [..., T, (H,) R]
        out = x.copy()
        for i in range(R // 2):
            a, b = (2 * i, 2 * i + 1) if rope_style == "interleaved" else (i, i + R // 2)
            angle = positions * 10000.0 ** (-2 * i / R)
            angle = angle.reshape(angle.shape + (1,) * (x.ndim - 3))
            out[..., a] = np.cos(angle) * x[..., a] - np.sin(angle) * x[..., b]
            out[..., b] = np.sin(angle) * x[..., a] + np.cos(angle) * x[..., b]
        return out

    positions = np.arange(T)[None, :]
    c_kv = h @ p["w_dkv"]
    if p["kv_norm"] is not None:
        c_kv = rms(c_kv, p["kv_norm"])
    k_c = np.einsum("bsl,lhd->bshd", c_kv, p["w_uk"])
    v_c = np.einsum("bsl,lhe->bshe", c_kv, p["w_uv"])
    if p["w_dq"] is not None:
        c_q = h @ p["w_dq"]
        if p["q_norm"] is not None:
            c_q = rms(c_q, p["q_norm"])
        q_c, q_r = np.einsum("btp,phd->bthd", c_q, p["w_uq"]), np.einsum("btp,phr->bthr", c_q, p["w_qr"])
    else:
        q_c, q_r = np.einsum("btc,chd->bthd", h, p["w_q"]), np.einsum("btc,chr->bthr", h, p["w_qr"])
    q_r = rotate(q_r, positions)
    k_r = rotate(h @ p["w_kr"], positions)
    logits = (np.einsum("bthd,bshd->bhts", q_c, k_c) + np.einsum("bthr,bsr->bhts", q_r, k_r)) / np.sqrt(D + R)
    logits = np.where(np.tril(np.ones((T, T), bool)), logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    o = np.einsum("bhts,bshe->bthe", weights, v_c)
    return np.einsum("bthe,hec->btc", o, p["w_o"])


def settings(rope_style):
    return MLASettings(rope=Rope(style=rope_style))


def decode_in_chunks(path, params, h, chunks, rope_style, max_length=12):
    cache = LatentCache.create(batch=h.shape[0], max_length=max_length, latent_dim=L, rope_dim=R)
    outputs, start = [], 0
    for size in chunks:
        out, cache = path(params, h[:, start : start + size], cache, settings=settings(rope_style))
        outputs.append(out)
        start += size
    return jnp.concatenate(outputs, axis=1), cache


class MLAPathsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        ("compressed_interleaved", True, True, "interleaved"),
        ("uncompressed_half_no_norms", False, False, "half"),
    )
    def test_naive_equals_float64_reference(self, compressed, norms, rope_style):
        params = make_params(compressed=compressed, norms=norms)
        h = normal((2, 8, C), 42)
        naive = self.variant(lambda p, h: mla_naive(p, h, settings=settings(rope_style)))(params, h)
        chex.assert_trees_all_close(naive, reference_mla(params, h, rope_style), rtol=1e-5, atol=1e-5)

    @parameterized.named_parameters(
        ("compressed_interleaved", True, True, "interleaved"),
        ("compressed_half", True, True, "half"),
        ("uncompressed_interleaved", False, True, "interleaved"),
        ("uncompressed_half_no_norms", False, False, "half"),
    )
    def test_naive_latent_cache_and_absorbed_agree(self, compressed, norms, rope_style):
        params = make_params(compressed=compressed, norms=norms)
        B, T = 2, 8
        h = normal((B, T, C), 42)
        naive = jax.jit(lambda p, h: mla_naive(p, h, settings=settings(rope_style)))(params, h)
        for path in (mla_decompressed, mla_absorbed):
            for chunks in ([T], [3, 1, 1, 1, 2]):  # one full pass; a prefill, then single-token steps
                run = jax.jit(lambda p, h, path=path, chunks=chunks: decode_in_chunks(path, p, h, chunks, rope_style))
                out, cache = run(params, h)
                chex.assert_trees_all_close(out, naive, rtol=1e-5, atol=1e-5)
                np.testing.assert_array_equal(cache.lengths, [T, T])

    def test_ragged_batch(self):
        params = make_params()
        h = normal((2, 6, C), 7)
        lengths = jnp.array([2, 5])
        for path in (mla_decompressed, mla_absorbed):
            path = jax.jit(path)
            cache = LatentCache.create(batch=2, max_length=9, latent_dim=L, rope_dim=R)
            prefill, cache = path(params, h[:, :5], cache, num_new=lengths)
            step, cache = path(params, jnp.stack([h[0, 2], h[1, 5]])[:, None], cache)
            for row, n in enumerate([2, 5]):
                sequence = jnp.concatenate([h[row, :n], h[row, n : n + 1]])[None]
                expected = jax.jit(mla_naive)(params, sequence)[0]
                chex.assert_trees_all_close(prefill[row, :n], expected[:n], rtol=1e-5, atol=1e-5)
                chex.assert_trees_all_close(step[row, 0], expected[n], rtol=1e-5, atol=1e-5)

    def test_absorbed_decode_step_traces_once_over_32_tokens(self):
        params = make_params()
        step = jax.jit(chex.assert_max_traces(lambda p, h, c: mla_absorbed(p, h, c), n=1))
        cache = LatentCache.create(batch=1, max_length=40, latent_dim=L, rope_dim=R)
        h = normal((1, 32, C), 3)
        for t in range(32):
            _, cache = step(params, h[:, t : t + 1], cache)
        np.testing.assert_array_equal(cache.lengths, [32])
        chex.clear_trace_counter()


def test_flash_kernel_gives_the_same_mla():
    params = make_params()
    h = normal((2, 9, C), 5)
    dense = jax.jit(mla_naive)(params, h)
    kernels = Kernels(full=partial(flash_kernel, block_q=4, block_kv=4))
    flash = jax.jit(lambda p, h: mla_naive(p, h, kernels=kernels))(params, h)
    chex.assert_trees_all_close(flash, dense, rtol=1e-5, atol=1e-5)


def test_bad_mla_shapes_are_clear_errors():
    params = make_params()
    h = normal((1, 3, C), 0)
    with pytest.raises(ValueError, match=r"w_uk is \(8, 3, 5\), expected \(9, 3, 5\)"):
        mla_naive(params._replace(w_uk=params.w_uk[:8]), h)
    with pytest.raises(ValueError, match=r"w_o is \(2, 7, 20\), expected \(3, 7, 20\)"):
        mla_naive(params._replace(w_o=params.w_o[:2]), h)
    with pytest.raises(ValueError, match="RoPE width R must be even"):
        odd = params._replace(w_kr=params.w_kr[:, :3], w_qr=params.w_qr[..., :3])
        mla_naive(odd, h)
    with pytest.raises(ValueError, match="either w_dq and w_uq"):
        mla_naive(params._replace(w_q=jnp.zeros((C, H, D))), h)
    with pytest.raises(ValueError, match=r"MLA takes h \[B, T, C=20\], got \(1, 3, 19\)"):
        mla_naive(params, h[..., :19])
    cache = LatentCache.create(batch=1, max_length=4, latent_dim=L + 1, rope_dim=R)
    with pytest.raises(ValueError, match="do not fit the LatentCache"):
        mla_absorbed(params, h, cache)
    cache = LatentCache.create(batch=1, max_length=2, latent_dim=L, rope_dim=R)
    with pytest.raises(ValueError, match="cannot write 3 tokens into a LatentCache of capacity 2"):
        mla_absorbed(params, h, cache)
    cache = LatentCache.create(batch=1, max_length=4, latent_dim=L, rope_dim=R, dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="new c_kv has dtype float32 but the LatentCache holds bfloat16"):
        mla_absorbed(params, h, cache)
