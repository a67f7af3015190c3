"""The blockwise kernel and its gradients equal multi_head_attention and the float64 reference."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from jaxattn.functional import AttentionContext, flash_attention, flash_block_map, multi_head_attention
from tests.reference import normal, packed_segments, reference_attention, value_and_grads

B, H = 2, 6


def qkv(T, S, K, D=5, E=7, dtype=jnp.float32):
    return normal((B, T, H, D), dtype, 0), normal((B, S, K, D), dtype, 1), normal((B, S, K, E), dtype, 2)




# Block sizes 4 and 3 make every case below span several blocks, none of them full.
CASES = [
    ("causal_t_equals_s", dict(T=13, S=13, K=6), dict(is_causal=True)),
    ("non_causal", dict(T=11, S=13, K=3), dict()),
    ("causal_t_less_than_s", dict(T=5, S=13, K=2), dict(is_causal=True)),
    ("mqa_window", dict(T=13, S=13, K=1), dict(is_causal=True, window=4)),
    ("gqa_padding", dict(T=9, S=13, K=3), dict(kv_lengths=np.array([6, 13]))),
    ("causal_padding_window", dict(T=13, S=13, K=2), dict(is_causal=True, kv_lengths=np.array([2, 10]), window=5)),
]


class FlashTest(chex.TestCase):
    # Compiled only: the kernel's loops compile either way, and the eager variant is
    # covered by test_explicit_mask_and_positions.
    @chex.variants(with_jit=True)
    @parameterized.named_parameters(*CASES)
    def test_values_and_gradients_equal_reference(self, sizes, kwargs):
        q, k, v = qkv(**sizes)
        run = self.variant(lambda q, k, v: value_and_grads(flash_attention, q, k, v, block_q=4, block_kv=3, **kwargs))
        out, grads = run(q, k, v)
        expected_out, expected_grads = value_and_grads(multi_head_attention, q, k, v, **kwargs)
        chex.assert_trees_all_close(out, expected_out, rtol=1e-5, atol=1e-5)
        chex.assert_trees_all_close(grads, expected_grads, rtol=1e-5, atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_explicit_mask_and_positions(self):
        q, k, v = qkv(T=3, S=10, K=2)
        mask = jnp.asarray(np.random.default_rng(5).random((B, H, 3, 10)) < 0.7)
        q_pos = jnp.array([[4, 5, 6], [7, 8, 9]])
        kwargs = dict(mask=mask, is_causal=True, q_positions=q_pos, kv_positions=jnp.arange(10))
        out, grads = self.variant(lambda q, k, v: value_and_grads(flash_attention, q, k, v, block_q=2, block_kv=4, **kwargs))(q, k, v)
        expected_out, expected_grads = value_and_grads(multi_head_attention, q, k, v, **kwargs)
        chex.assert_trees_all_close(out, expected_out, rtol=1e-5, atol=1e-5)
        chex.assert_trees_all_close(grads, expected_grads, rtol=1e-5, atol=1e-5)

    @parameterized.named_parameters(("f32", jnp.float32), ("bf16", jnp.bfloat16))
    def test_fully_masked_rows_give_zeros_and_zero_gradients(self, dtype):
        q, k, v = qkv(T=7, S=7, K=3, dtype=dtype)
        mask = jnp.ones((B, H, 7, 7), bool).at[:, :, 3].set(False)
        kwargs = dict(mask=mask, kv_lengths=jnp.array([0, 7]))
        out, grads = jax.jit(lambda q, k, v: value_and_grads(flash_attention, q, k, v, block_q=2, block_kv=3, **kwargs))(q, k, v)
        self.assertEqual(out.dtype, dtype)
        for array in (out, *grads):
            self.assertFalse(bool(jnp.any(jnp.isnan(array.astype(jnp.float32)))))
        np.testing.assert_array_equal(np.asarray(out[:, :, :][:, 3], np.float32), 0.0)
        np.testing.assert_array_equal(np.asarray(out[0], np.float32), 0.0)
        np.testing.assert_array_equal(np.asarray(grads[0][:, 3], np.float32), 0.0)
        np.testing.assert_array_equal(np.asarray(grads[1][0], np.float32), 0.0)
        np.testing.assert_array_equal(np.asarray(grads[2][0], np.float32), 0.0)

    def test_bf16_close_to_reference(self):
        q, k, v = qkv(T=13, S=13, K=2, dtype=jnp.bfloat16)
        out, grads = jax.jit(lambda q, k, v: value_and_grads(flash_attention, q, k, v, block_q=4, block_kv=4, is_causal=True))(q, k, v)
        f32 = [x.astype(jnp.float32) for x in (q, k, v)]
        expected_out, expected_grads = value_and_grads(multi_head_attention, *f32, is_causal=True)
        chex.assert_trees_all_close(out.astype(jnp.float32), expected_out, rtol=2e-2, atol=2e-2)
        chex.assert_trees_all_close(
            [g.astype(jnp.float32) for g in grads], list(expected_grads), rtol=2e-2, atol=5e-2
        )

    def test_compiled_memory_grows_linearly(self):
        def temp_bytes(T):
            shape = jax.ShapeDtypeStruct((1, T, 2, 16), jnp.float32)
            fn = jax.jit(lambda q, k, v: flash_attention(q, k, v, is_causal=True, block_q=64, block_kv=64))
            return fn.lower(shape, shape, shape).compile().memory_analysis().temp_size_in_bytes

        def reference_bytes(T):
            shape = jax.ShapeDtypeStruct((1, T, 2, 16), jnp.float32)
            fn = jax.jit(lambda q, k, v: multi_head_attention(q, k, v, is_causal=True))
            return fn.lower(shape, shape, shape).compile().memory_analysis().temp_size_in_bytes

        small, large = temp_bytes(1024), temp_bytes(4096)
        self.assertLess(large / small, 5.0)  # 4x the length: linear is 4x, quadratic 16x
        self.assertGreater(reference_bytes(4096) / reference_bytes(1024), 12.0)  # the reference is quadratic

    @parameterized.named_parameters(("causal", True), ("bidirectional", False))
    def test_segment_ids_values_and_gradients_equal_float64_reference(self, causal):
        T = 19  # packed sequences of odd lengths; block size 4 splits them unevenly
        segments = np.stack([packed_segments([5, 3, 7, 4]), packed_segments([9, 10])])
        q, k, v = qkv(T=T, S=T, K=3)
        cotangent = normal((B, T, H, 7), seed=12)
        kwargs = dict(q_segment_ids=segments, kv_segment_ids=segments, is_causal=causal)
        out, grads = jax.jit(lambda q, k, v: value_and_grads(
            flash_attention, q, k, v, cotangent, block_q=4, block_kv=4, **kwargs))(q, k, v)
        positions = np.arange(T) if causal else None
        expected = reference_attention(q, k, v, q_positions=positions, kv_positions=positions,
                                       q_segment_ids=segments, kv_segment_ids=segments, cotangent=cotangent)
        chex.assert_trees_all_close(out, expected[0], rtol=1e-5, atol=1e-5)
        chex.assert_trees_all_close(grads, expected[1:], rtol=1e-4, atol=1e-5)

    def test_segments_skip_the_blocks_of_other_sequences(self):
        T = 64
        segments = packed_segments([16, 16, 16, 16])  # four sequences, one per 16-token stretch
        q, k, v = qkv(T=T, S=T, K=3)
        blocks = dict(block_q=8, block_kv=8)
        causal = flash_block_map(q, k, v, is_causal=True, **blocks)
        packed = flash_block_map(q, k, v, is_causal=True, q_segment_ids=segments, kv_segment_ids=segments, **blocks)
        full = flash_block_map(q, k, v, **blocks)
        assert int(full.sum()) == 64 and int(causal.sum()) == 36  # 8x8 blocks; causal: the lower triangle
        assert int(packed.sum()) == 4 * 3  # each sequence: 2 query blocks see 1 and 2 of its own key blocks
        # The map is never False where a key is visible: compare with the token-level mask.
        spec = AttentionContext.from_keywords(q, k, is_causal=True, q_segment_ids=segments, kv_segment_ids=segments)
        token_level = np.asarray(spec.full_mask()).any(axis=(0, 1)).reshape(8, 8, 8, 8).any(axis=(1, 3))
        np.testing.assert_array_equal(np.asarray(packed), token_level)

    def test_block_map_with_padding_window_and_mask(self):
        q, k, v = qkv(T=12, S=12, K=2)
        blocks = dict(block_q=4, block_kv=4)
        lengths = np.array([5, 8])
        plan = flash_block_map(q, k, v, is_causal=True, window=3, kv_lengths=lengths, **blocks)
        # key block 2 (positions 8..11) is padding in both rows; the window hides block 0 from query block 2
        np.testing.assert_array_equal(plan, [[1, 0, 0], [1, 1, 0], [0, 1, 0]])
        mask = np.ones((B, H, 12, 12), bool)
        mask[..., 4:8] = False  # nobody may see key block 1
        plan = flash_block_map(q, k, v, mask=mask, **blocks)
        np.testing.assert_array_equal(plan, [[1, 0, 1]] * 3)

    def test_bad_input(self):
        q, k, v = qkv(T=4, S=4, K=4)
        with self.assertRaisesRegex(ValueError, "H=6 must be a multiple of key/value heads K=4"):
            flash_attention(q, k, v)
        q, k, v = qkv(T=4, S=4, K=3)
        with self.assertRaisesRegex(TypeError, "mask must be boolean"):
            flash_attention(q, k, v, mask=jnp.ones((4, 4)))
        with self.assertRaisesRegex(ValueError, "block sizes must be >= 1"):
            flash_attention(q, k, v, block_q=0)
