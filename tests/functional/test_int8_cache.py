"""The int8 cache: entries quantized per token and head, every cache kind, and the decode
kernel reading them a block at a time equals dense attention over the same entries
dequantized by NumPy (ragged rows, GQA, a window, sinks, pages, MLA's latent parts)."""

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn.functional import (
    AttentionContext,
    Int8Tokens,
    KVCache,
    LatentCache,
    PagedKVCache,
    PagedLatentCache,
    SlidingKVCache,
    decode_kernel,
    multi_head_attention,
    quantize_tokens,
    stored_bytes_per_token,
)
from jaxattn.functional.kernels import Kernels
from tests.reference import normal

B, K, H, D = 3, 2, 4, 8


def numpy_dequantized(entries: Int8Tokens) -> jnp.ndarray:
    """The reference: ``values * scale`` by NumPy, in float64, then float32."""
    values = np.asarray(entries.values, np.float64)
    scale = np.asarray(entries.scale.astype(jnp.float32), np.float64)
    return jnp.asarray(values * scale[..., None], jnp.float32)


def test_quantization_is_within_half_a_step_and_zeros_stay_zeros():
    x = normal((B, 5, K, D), seed=0) * jnp.array([1e-3, 10.0])[None, None, :, None]  # heads of very different size
    x = x.at[0, 0, 0].set(0.0)  # an all-zero vector
    q = quantize_tokens(x)
    assert q.values.dtype == jnp.int8 and q.values.shape == x.shape and q.scale.shape == x.shape[:-1]
    amax = np.abs(np.asarray(x)).max(-1)
    step = np.asarray(q.scale.astype(jnp.float32))
    chex.assert_trees_all_close(step, amax / 127, rtol=2 ** -8)  # bfloat16's rounding of max|x| / 127
    error = np.abs(np.asarray(numpy_dequantized(q)) - np.asarray(x))
    assert (error <= 0.5 * step[..., None] * (1 + 2 ** -7) + 1e-12).all()  # half a step (the largest may clip)
    assert np.abs(np.asarray(q.values)).max() == 127
    assert not np.asarray(numpy_dequantized(q))[0, 0, 0].any() and np.isfinite(np.asarray(q.scale, np.float32)).all()


def test_bytes_per_token_count_the_scales():
    shape = dict(batch=1, max_length=16, kv_heads=K, head_dim=64)
    int8, bf16 = KVCache.create(**shape, dtype=jnp.int8), KVCache.create(**shape, dtype=jnp.bfloat16)
    assert stored_bytes_per_token(int8) == K * (64 + 64 + 2 * 2)  # values, and a bfloat16 scale for k and for v
    assert stored_bytes_per_token(bf16) == K * 2 * 64 * 2
    assert stored_bytes_per_token(int8) / stored_bytes_per_token(bf16) <= 0.55
    latent = LatentCache.create(batch=2, max_length=8, latent_dim=512, rope_dim=64, dtype=jnp.int8)
    assert stored_bytes_per_token(latent) == 512 + 64 + 2 * 2
    pool = PagedKVCache.create(batch=2, pages=5, page_size=4, pages_per_sequence=2, kv_heads=K, head_dim=64,
                               dtype=jnp.int8)
    assert stored_bytes_per_token(pool) == stored_bytes_per_token(int8)


def test_every_cache_kind_stores_what_it_is_given_quantized():
    k, v = normal((B, 5, K, D), seed=1), normal((B, 5, K, D), seed=2)
    expected = numpy_dequantized(quantize_tokens(k))
    dense = KVCache.create(batch=B, max_length=8, kv_heads=K, head_dim=D, dtype=jnp.int8)
    view, dense = dense.update(k, v)
    chex.assert_trees_all_equal(numpy_dequantized(view.k)[:, :5], expected)
    sliding = SlidingKVCache.create(batch=B, window=4, chunk=5, kv_heads=K, head_dim=D, dtype=jnp.int8)
    view, _ = sliding.update(k, v)
    slots = np.arange(5) % sliding.capacity  # token p in slot p % capacity
    chex.assert_trees_all_equal(numpy_dequantized(view.k)[:, slots], expected)
    paged = PagedKVCache.create(batch=B, pages=10, page_size=2, pages_per_sequence=3, kv_heads=K, head_dim=D,
                                dtype=jnp.int8)
    table = jnp.arange(1, 1 + 3 * B, dtype=jnp.int32).reshape(B, 3)
    view, _ = paged._replace(page_table=table).update(k, v)
    pooled = np.asarray(numpy_dequantized(view.k))[np.asarray(table)].reshape(B, 6, K, D)
    chex.assert_trees_all_equal(pooled[:, :5], expected)


def test_a_float_cache_keeps_its_dtype_rule_and_an_int8_cache_takes_floats_only():
    k = normal((1, 2, K, D), seed=3)
    with pytest.raises(ValueError, match="dtype=bfloat16"):
        KVCache.create(batch=1, max_length=4, kv_heads=K, head_dim=D).update(k.astype(jnp.bfloat16), k.astype(jnp.bfloat16))
    int8 = KVCache.create(batch=1, max_length=4, kv_heads=K, head_dim=D, dtype=jnp.int8)
    with pytest.raises(TypeError, match="quantizes float entries"):
        int8.update(k.astype(jnp.int32), k.astype(jnp.int32))
    with pytest.raises(ValueError, match="do not fit"):
        int8.update(k[..., :4], k)
    view, _ = int8.update(k.astype(jnp.bfloat16), k.astype(jnp.bfloat16))  # any float width is quantized
    chex.assert_trees_all_close(numpy_dequantized(view.k)[:, :2], k, atol=0.02)


@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("window", [None, 6])
def test_decode_over_an_int8_cache_equals_attention_over_its_dequantized_entries(T, window):
    S = 40
    lengths = jnp.array([37, 4, 21])  # tokens held after this call (its T included): several blocks, ragged
    cache = KVCache.create(batch=B, max_length=S, kv_heads=K, head_dim=D, dtype=jnp.int8)
    k, v = normal((B, S, K, D), seed=4), normal((B, S, K, D), seed=5)
    view, _ = cache.update(k, v)  # the whole buffer, then lengths say what is held
    q, sinks = normal((B, T, H, D), seed=6), normal((H,), seed=7)
    context = AttentionContext.for_tokens(T, lengths=lengths - T).with_keys(view.positions, lengths).for_layer(
        window=window, sinks=sinks)
    out = decode_kernel(q, view.k, view.v, context, block_kv=8)
    expected = multi_head_attention(q, numpy_dequantized(view.k), numpy_dequantized(view.v), is_causal=True,
                                    q_positions=lengths[:, None] - T + jnp.arange(T), kv_lengths=lengths,
                                    window=window, sinks=sinks)
    chex.assert_trees_all_close(out, expected, atol=2e-6, rtol=1e-5)


class Int8DecodeVariantsTest(chex.TestCase):
    """Quantizing and reading an int8 cache traced once and run op by op (chex's variants)."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_an_int8_cache_written_and_read_with_and_without_jit(self):
        S, lengths = 24, jnp.array([19, 2, 9])
        k, v, q = normal((B, S, K, D), seed=8), normal((B, S, K, D), seed=9), normal((B, 1, H, D), seed=10)

        def attend(q, k, v):
            view, _ = KVCache.create(batch=B, max_length=S, kv_heads=K, head_dim=D, dtype=jnp.int8).update(k, v)
            context = AttentionContext.for_tokens(1, lengths=lengths - 1).with_keys(view.positions, lengths)
            return decode_kernel(q, view.k, view.v, context, block_kv=8), view

        out, view = self.variant(attend)(q, k, v)
        expected = multi_head_attention(q, numpy_dequantized(view.k), numpy_dequantized(view.v), is_causal=True,
                                        q_positions=lengths[:, None] - 1, kv_lengths=lengths)
        chex.assert_trees_all_close(out, expected, atol=2e-6, rtol=1e-5)
        chex.assert_trees_all_close(numpy_dequantized(view.k), k, atol=0.05)  # within the int8 steps of the floats


def test_decode_over_int8_pages_and_mla_latents_equals_their_dequantized_entries():
    P, page, N, L, R, T = 12, 4, 3, 10, 4, 2
    table = jnp.asarray(np.random.default_rng(0).permutation(np.arange(1, P))[: B * N].reshape(B, N), jnp.int32)
    pools = PagedLatentCache.create(batch=B, pages=P, page_size=page, pages_per_sequence=N, latent_dim=L, rope_dim=R,
                                    dtype=jnp.int8)._replace(page_table=table)
    num_new = jnp.array([9, 6, 3])
    _, pools = pools.update(normal((B, 9, L), seed=8), normal((B, 9, R), seed=9), num_new)
    view, pools = pools.update(normal((B, T, L), seed=10), normal((B, T, R), seed=11))
    q = (normal((B, T, H, L), seed=12), normal((B, T, H, R), seed=13))  # MLA's absorbed query parts
    context = AttentionContext.for_tokens(T, lengths=num_new).with_keys(view.positions, view.lengths, view.pages)
    out = decode_kernel(q, (view.c_kv, view.k_rope), view.c_kv, context, block_kv=page)
    gather = lambda pool: jnp.asarray(np.asarray(numpy_dequantized(pool))[np.asarray(table)].reshape(  # noqa: E731
        (B, N * page) + pool.shape[2:]))
    c_kv, k_rope = gather(view.c_kv), gather(view.k_rope)  # [B, N page, L], [B, N page, R]
    keys = jnp.concatenate([c_kv, k_rope], -1)[:, :, None]  # [B, S, 1, L + R]: one head for all queries
    expected = multi_head_attention(jnp.concatenate(q, -1), keys, c_kv[:, :, None], is_causal=True,
                                    q_positions=num_new[:, None] + jnp.arange(T), kv_lengths=view.lengths)
    chex.assert_trees_all_close(out, expected, atol=2e-6, rtol=1e-5)


def test_a_long_call_into_an_int8_cache_is_served_by_the_decode_kernel():
    """A prompt (T above decode_max_tokens) reads an int8 cache through the decode kernel, which
    dequantizes a block at a time: the full kernel would need the whole buffer dequantized."""
    kernel, is_decode = Kernels().for_call(T=500, cached=True, cache_kind="int8")
    assert is_decode and kernel is decode_kernel
    with pytest.raises(ValueError, match="a paged int8 cache is read by a decode kernel"):
        Kernels.choose(lambda *a: None).for_call(T=1, cached=True, cache_kind="paged int8")
