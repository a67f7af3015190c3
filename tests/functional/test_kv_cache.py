"""Caches: what they store, and attention over them equals attention over everything."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from jaxattn.functional import (
    EMPTY_POSITION,
    KVCache,
    LatentCache,
    SlidingKVCache,
    decode_attention,
    kv_cache_elements_per_token,
    latent_cache_elements_per_token,
    multi_head_attention,
    next_positions,
)
from tests.reference import normal as _normal

B, H, K, D, E = 2, 6, 3, 5, 7


def normal(shape, seed):
    return _normal(shape, seed=seed)


def attend_through_cache(cache, q, k, v, chunks, window=None):
    """Feeds the sequence through ``cache`` in chunks; returns the outputs and the cache."""
    outputs, start = [], 0
    for size in chunks:
        sl = slice(start, start + size)
        q_positions = cache.lengths[:, None] + jnp.arange(size)
        view, cache = cache.update(k[:, sl], v[:, sl])
        outputs.append(
            multi_head_attention(
                q[:, sl], view.k, view.v, is_causal=True, q_positions=q_positions,
                kv_positions=view.positions, window=window,
            )
        )
        start += size
    return jnp.concatenate(outputs, axis=1), cache


class KVCacheTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_prefill_then_decode_equals_full_causal_attention(self):
        T = 9
        q, k, v = normal((B, T, H, D), 0), normal((B, T, K, D), 1), normal((B, T, K, E), 2)
        cache = KVCache.create(batch=B, max_length=12, kv_heads=K, head_dim=D, value_dim=E)
        run = self.variant(lambda c, q, k, v: attend_through_cache(c, q, k, v, [4, 1, 1, 3]))
        out, cache = run(cache, q, k, v)
        chex.assert_trees_all_close(out, multi_head_attention(q, k, v, is_causal=True), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(cache.lengths, [T, T])
        np.testing.assert_array_equal(cache.k[:, :T], k)  # stored where the positions say
        np.testing.assert_array_equal(cache.k[:, T:], 0.0)

    def test_ragged_rows_write_at_their_own_length(self):
        cache = KVCache.create(batch=2, max_length=6, kv_heads=1, head_dim=1)
        new = jnp.arange(1, 4, dtype=jnp.float32).reshape(1, 3, 1, 1).repeat(2, 0)  # tokens 1, 2, 3
        _, cache = cache.update(new, new, num_new=jnp.array([1, 3]))
        np.testing.assert_array_equal(cache.lengths, [1, 3])
        _, cache = cache.update(new[:, :1] * 10, new[:, :1] * 10)
        np.testing.assert_array_equal(cache.k[:, :, 0, 0], [[1, 10, 3, 0, 0, 0], [1, 2, 3, 10, 0, 0]])
        np.testing.assert_array_equal(cache.lengths, [2, 4])

    def test_writing_more_than_capacity_is_a_value_error(self):
        cache = KVCache.create(batch=1, max_length=4, kv_heads=1, head_dim=2)
        with self.assertRaisesRegex(ValueError, r"cannot write 5 tokens into a KVCache of capacity 4"):
            cache.update(jnp.zeros((1, 5, 1, 2)), jnp.zeros((1, 5, 1, 2)))
        with self.assertRaisesRegex(ValueError, r"do not fit the KVCache.*need k \[B=1, T, 1, 2\]"):
            cache.update(jnp.zeros((1, 2, 2, 2)), jnp.zeros((1, 2, 2, 2)))

    def test_traced_overflow_is_clamped_and_reported(self):
        # Documented behaviour when lengths are traced: the write is clamped to end at
        # the last slot, lengths keep counting, overflowed() reports the row.
        cache = KVCache.create(batch=1, max_length=4, kv_heads=1, head_dim=1)
        ones = jnp.ones((1, 3, 1, 1))

        @jax.jit
        def write(cache, new):
            return cache.update(new, new)[1]

        cache = write(cache, ones)
        cache = write(cache, 2 * ones)
        np.testing.assert_array_equal(cache.k[0, :, 0, 0], [1, 2, 2, 2])
        np.testing.assert_array_equal(cache.lengths, [6])
        np.testing.assert_array_equal(cache.overflowed(), [True])


class SlidingKVCacheTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        ("one_token_steps", [1] * 11, 1),  # capacity = the window
        ("prefill_longer_than_the_window", [5, 1, 1, 4], 5),
        ("chunks_shorter_than_the_window", [2, 2, 2, 2, 2, 1], 2),
    )
    def test_equals_windowed_attention_and_keeps_window_plus_chunk(self, chunks, chunk):
        T, W = 11, 3
        q, k, v = normal((B, T, H, D), 3), normal((B, T, K, D), 4), normal((B, T, K, E), 5)
        cache = SlidingKVCache.create(batch=B, window=W, kv_heads=K, head_dim=D, value_dim=E, chunk=chunk)
        run = self.variant(lambda c, q, k, v: attend_through_cache(c, q, k, v, chunks, window=W))
        out, cache = run(cache, q, k, v)
        expected = multi_head_attention(q, k, v, is_causal=True, window=W)
        chex.assert_trees_all_close(out, expected, rtol=1e-5, atol=1e-5)
        capacity = W + chunk - 1
        chex.assert_shape(cache.k, (B, capacity, K, D))  # memory is the window (and one call), not the sequence
        last = np.arange(T - capacity, T)  # token p lives in slot p % capacity
        np.testing.assert_array_equal(cache.k[:, last % capacity], k[:, last])
        np.testing.assert_array_equal(cache.positions[:, last % capacity], np.broadcast_to(last, (B, capacity)))

    def test_short_sequences_hide_empty_slots_and_padding(self):
        cache = SlidingKVCache.create(batch=2, window=4, kv_heads=1, head_dim=2, chunk=3)  # 6 slots
        view, cache = cache.update(jnp.ones((2, 3, 1, 2)), jnp.ones((2, 3, 1, 2)), num_new=jnp.array([3, 2]))
        E_ = EMPTY_POSITION
        np.testing.assert_array_equal(view.positions, [[0, 1, 2, E_, E_, E_], [0, 1, E_, E_, E_, E_]])
        np.testing.assert_array_equal(cache.lengths, [3, 2])
        view, cache = cache.update(2 * jnp.ones((2, 1, 1, 2)), 2 * jnp.ones((2, 1, 1, 2)))  # overwrites the padding
        np.testing.assert_array_equal(view.positions, [[0, 1, 2, 3, E_, E_], [0, 1, 2, E_, E_, E_]])

    def test_a_call_longer_than_its_chunk_is_refused(self):
        cache = SlidingKVCache.create(batch=1, window=4, kv_heads=1, head_dim=2, chunk=2)
        with self.assertRaisesRegex(ValueError, r"T=3 tokens into a SlidingKVCache made for at most chunk=2.*chunk >= 3"):
            cache.update(jnp.ones((1, 3, 1, 2)), jnp.ones((1, 3, 1, 2)))


def test_a_donated_sliding_window_step_writes_in_place():
    # The compiled step writes one slot of the ring: its cache outputs alias its inputs and no
    # temporary is as large as one window buffer (the old cache concatenated W + T slots).
    W, K, D = 4096, 2, 16
    cache = SlidingKVCache.create(batch=1, window=W, kv_heads=K, head_dim=D)

    def step(cache, q, k, v):  # a decode step of a sliding-window layer, as the model runs it
        view, cache = cache.update(k, v)
        return decode_attention(q, view.k, view.v, is_causal=True, q_positions=cache.lengths[:, None] - 1,
                                kv_positions=view.positions, kv_lengths=view.lengths, window=W), cache

    args = (cache, normal((1, 1, 2, D), 0), normal((1, 1, K, D), 1), normal((1, 1, K, D), 2))
    compiled = jax.jit(step, donate_argnums=0).lower(*args).compile()
    aliases = compiled.as_text().split("input_output_alias=")[1].split("\n")[0]
    assert aliases.count("may-alias") + aliases.count("must-alias") >= 3, aliases  # k, v, positions
    assert compiled.memory_analysis().temp_size_in_bytes < cache.k.nbytes


@pytest.mark.parametrize(
    "cache, names",
    [
        (KVCache.create(batch=1, max_length=4, kv_heads=1, head_dim=2), ("k", "v")),
        (SlidingKVCache.create(batch=1, window=3, kv_heads=1, head_dim=2, chunk=2), ("k", "v")),
        (LatentCache.create(batch=1, max_length=4, latent_dim=3, rope_dim=2), ("c_kv", "k_rope")),
    ],
    ids=["kv", "sliding", "latent"],
)
def test_every_cache_has_one_dtype_and_shape_policy(cache, names):
    buffers = [getattr(cache, name) for name in names]
    new = [jnp.zeros((1, 2) + buffer.shape[2:]) for buffer in buffers]
    view, updated = cache.update(*new)
    np.testing.assert_array_equal(updated.lengths, [2])
    assert view.positions.shape == (1, view[0].shape[1])
    wrong_dtype = [x.astype(jnp.bfloat16) for x in new]
    with pytest.raises(ValueError, match=f"new {names[0]} has dtype bfloat16 but the {type(cache).__name__} holds float32"):
        cache.update(*wrong_dtype)
    wrong_shape = [new[0][..., :1]] + new[1:]
    with pytest.raises(ValueError, match=f"do not fit the {type(cache).__name__}"):
        cache.update(*wrong_shape)
    with pytest.raises(ValueError, match=r"num_new must be \[B=1\]"):
        cache.update(*new, num_new=jnp.array([1, 2]))


def test_latent_cache_writes_at_each_rows_length():
    cache = LatentCache.create(batch=2, max_length=5, latent_dim=1, rope_dim=2)
    tokens = jnp.arange(1, 4, dtype=jnp.float32).reshape(1, 3, 1).repeat(2, 0)  # [B, T, L]
    view, cache = cache.update(tokens, tokens.repeat(2, -1), num_new=jnp.array([3, 1]))
    _, cache = cache.update(tokens[:, :1] * 10, tokens[:, :1].repeat(2, -1) * 10)
    np.testing.assert_array_equal(cache.c_kv[..., 0], [[1, 2, 3, 10, 0], [1, 10, 3, 0, 0]])
    np.testing.assert_array_equal(cache.lengths, [4, 2])
    np.testing.assert_array_equal(view.positions, [list(range(5))] * 2)


def test_next_positions_continue_each_row():
    np.testing.assert_array_equal(next_positions(jnp.array([0, 4]), 3), [[0, 1, 2], [4, 5, 6]])


def test_cache_accounting_equals_the_arrays():
    kv = KVCache.create(batch=2, max_length=11, kv_heads=3, head_dim=5, value_dim=4)
    assert (kv.k.size + kv.v.size) / (2 * 11) == kv_cache_elements_per_token(kv_heads=3, head_dim=5, value_dim=4) == 27
    latent = LatentCache.create(batch=2, max_length=11, latent_dim=9, rope_dim=4)
    per_token = (latent.c_kv.size + latent.k_rope.size) / (2 * 11)
    assert per_token == latent_cache_elements_per_token(latent_dim=9, rope_dim=4) == 13


def test_table_1_at_deepseek_v2_dimensions():
    H, D, L, R = 128, 128, 512, 64
    assert kv_cache_elements_per_token(kv_heads=H, head_dim=D) == 2 * H * D == 32768  # MHA
    assert kv_cache_elements_per_token(kv_heads=8, head_dim=D) == 2 * 8 * D  # GQA, 8 groups
    assert kv_cache_elements_per_token(kv_heads=1, head_dim=D) == 2 * D  # MQA
    assert latent_cache_elements_per_token(latent_dim=L, rope_dim=R) == 576 == 4.5 * D  # MLA: (9/2) d_h
