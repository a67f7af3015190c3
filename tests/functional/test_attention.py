"""The attention kernels against jax.nn.dot_product_attention and a float64 loop."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxattn.functional import attention, attention_weights, multi_head_attention, multi_head_attention_weights
from tests.reference import normal, packed_segments, reference_attention, value_and_grads

# Odd, distinct sizes so that a transposed axis cannot hide.
B, T, S, H, D = 2, 5, 7, 6, 11


def make_qkv(T=T, S=S, H=H, K=H, D=D, E=None, dtype=jnp.float32, seed=0):
    E = D if E is None else E
    q = normal((B, T, H, D), dtype, seed)
    k = normal((B, S, K, D), dtype, seed + 1)
    v = normal((B, S, K, E), dtype, seed + 2)
    return q, k, v


class OneHeadTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_weights_are_softmax_of_scaled_scores(self):
        q, k, _ = make_qkv()
        q1, k1 = q[0, :, 0], k[0, :, 0]  # [T, D], [S, D]
        weights = self.variant(attention_weights)(q1, k1)
        logits = np.asarray(q1, np.float64) @ np.asarray(k1, np.float64).T / np.sqrt(D)
        expected = np.exp(logits - logits.max(-1, keepdims=True))
        expected /= expected.sum(-1, keepdims=True)
        chex.assert_trees_all_close(weights, expected, rtol=1e-5, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_attention_is_weighted_sum_of_values(self):
        q, k, v = make_qkv(E=3)
        mask = jnp.tril(jnp.ones((T, S), bool), k=S - T)
        out = self.variant(lambda q, k, v, m: attention(q, k, v, mask=m))(q[1, :, 2], k[1, :, 2], v[1, :, 2], mask)
        expected = reference_attention(
            q[1:2, :, 2:3], k[1:2, :, 2:3], v[1:2, :, 2:3], mask=np.asarray(mask)[None, None]
        )[0, :, 0]
        chex.assert_shape(out, (T, 3))
        chex.assert_trees_all_close(out, expected, rtol=1e-5, atol=1e-5)


class MultiHeadTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        ("mha", 6, 6), ("gqa_k3", 6, 3), ("gqa_k2", 6, 2), ("mqa", 6, 1)
    )
    def test_equals_jax_nn(self, heads, kv_heads):
        q, k, v = make_qkv(H=heads, K=kv_heads)
        out = self.variant(multi_head_attention)(q, k, v)
        expected = jax.nn.dot_product_attention(q, k, v)
        chex.assert_trees_all_close(out, expected, rtol=1e-5, atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("mha", 6), ("gqa", 3), ("mqa", 1))
    def test_causal_t_equals_s(self, kv_heads):
        q, k, v = make_qkv(T=S, K=kv_heads)
        out = self.variant(lambda q, k, v: multi_head_attention(q, k, v, is_causal=True))(q, k, v)
        expected = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        chex.assert_trees_all_close(out, expected, rtol=1e-5, atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_explicit_mask(self):
        q, k, v = make_qkv(K=2)
        mask = jnp.asarray(np.random.default_rng(3).random((B, H, T, S)) < 0.6)
        mask = mask.at[..., 0].set(True)  # jax.nn zero-fills nothing: keep one key per row
        out = self.variant(lambda q, k, v, m: multi_head_attention(q, k, v, mask=m))(q, k, v, mask)
        expected = jax.nn.dot_product_attention(q, k, v, mask=mask)
        chex.assert_trees_all_close(out, expected, rtol=1e-5, atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_broadcast_mask_shared_over_batch_and_heads(self):
        q, k, v = make_qkv(K=3)
        mask = jnp.asarray(np.random.default_rng(4).random((T, S)) < 0.6).at[:, 0].set(True)
        out = self.variant(lambda q, k, v, m: multi_head_attention(q, k, v, mask=m))(q, k, v, mask)
        expected = jax.nn.dot_product_attention(q, k, v, mask=mask[None, None])
        chex.assert_trees_all_close(out, expected, rtol=1e-5, atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_kv_lengths_padding(self):
        q, k, v = make_qkv(K=3)
        lengths = jnp.array([3, 7], jnp.int32)
        out = self.variant(lambda q, k, v, n: multi_head_attention(q, k, v, kv_lengths=n))(q, k, v, lengths)
        expected = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths)
        chex.assert_trees_all_close(out, expected, rtol=1e-5, atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("w1", 1), ("w3", 3), ("w_full", 7))
    def test_sliding_window(self, window):
        q, k, v = make_qkv(T=S, K=2)
        out = self.variant(lambda q, k, v: multi_head_attention(q, k, v, is_causal=True, window=window))(q, k, v)
        expected = jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=(window - 1, 0))
        chex.assert_trees_all_close(out, expected, rtol=1e-5, atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_bottom_right_causal_when_t_less_than_s(self):
        q, k, v = make_qkv(T=T, S=S, K=3, E=4)
        out = self.variant(lambda q, k, v: multi_head_attention(q, k, v, is_causal=True))(q, k, v)
        expected = reference_attention(q, k, v, q_positions=np.arange(T) + S - T, kv_positions=np.arange(S))
        chex.assert_trees_all_close(out, expected, rtol=1e-5, atol=1e-5)

    def test_jax_nn_causal_is_top_left_aligned_and_differs(self):
        # jax.nn.dot_product_attention(is_causal=True) lets query i see keys j <= i
        # (top-left); a decode chunk needs keys j <= i + S - T (bottom-right).
        q, k, v = make_qkv(T=T, S=S, K=3)
        ours = multi_head_attention(q, k, v, is_causal=True)
        theirs = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        top_left = reference_attention(q, k, v, q_positions=np.arange(T), kv_positions=np.arange(S))
        chex.assert_trees_all_close(theirs, top_left, rtol=1e-5, atol=1e-5)
        self.assertGreater(float(jnp.max(jnp.abs(ours - theirs))), 1e-2)

    @chex.variants(with_jit=True, without_jit=True)
    def test_explicit_positions_ragged_batch(self):
        q, k, v = make_qkv(T=2, S=S, K=2)
        q_pos = jnp.array([[3, 4], [5, 6]])
        kv_pos = jnp.broadcast_to(jnp.arange(S), (B, S))
        lengths = jnp.array([5, 7])
        fn = lambda q, k, v, qp, kp, n: multi_head_attention(
            q, k, v, is_causal=True, q_positions=qp, kv_positions=kp, kv_lengths=n, window=4
        )
        out = self.variant(fn)(q, k, v, q_pos, kv_pos, lengths)
        expected = reference_attention(
            q, k, v, q_positions=q_pos, kv_positions=kv_pos, kv_lengths=np.asarray(lengths), window=4
        )
        chex.assert_trees_all_close(out, expected, rtol=1e-5, atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_value_width_differs_from_key_width(self):
        q, k, v = make_qkv(K=3, E=4)
        out = self.variant(lambda q, k, v: multi_head_attention(q, k, v, is_causal=True, scale=0.3))(q, k, v)
        expected = reference_attention(
            q, k, v, q_positions=np.arange(T) + S - T, kv_positions=np.arange(S), scale=0.3
        )
        chex.assert_shape(out, (B, T, H, 4))
        chex.assert_trees_all_close(out, expected, rtol=1e-5, atol=1e-5)


class SegmentIdsTest(chex.TestCase):
    """Packed sequences: a query sees only keys of its own segment."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("causal", True), ("bidirectional", False))
    def test_values_and_gradients_equal_float64_reference(self, causal):
        T = 13  # three sequences of odd lengths in row 0, two in row 1
        segments = np.stack([packed_segments([5, 3, 5]), packed_segments([7, 6])])
        q, k, v = make_qkv(T=T, S=T, K=3, E=4)
        cotangent = normal((B, T, H, 4), seed=11)
        kwargs = dict(q_segment_ids=segments, kv_segment_ids=segments, is_causal=causal)
        run = self.variant(lambda q, k, v: value_and_grads(multi_head_attention, q, k, v, cotangent, **kwargs))
        out, grads = run(q, k, v)
        positions = np.arange(T) if causal else None
        expected = reference_attention(q, k, v, q_positions=positions, kv_positions=positions,
                                       q_segment_ids=segments, kv_segment_ids=segments, cotangent=cotangent)
        chex.assert_trees_all_close(out, expected[0], rtol=1e-5, atol=1e-5)
        chex.assert_trees_all_close(grads, expected[1:], rtol=1e-4, atol=1e-5)

    def test_packed_rows_equal_each_sequence_alone(self):
        lengths = [4, 1, 6]
        segments = packed_segments(lengths)
        q, k, v = make_qkv(T=11, S=11, K=2)
        packed = multi_head_attention(q, k, v, is_causal=True, q_segment_ids=segments, kv_segment_ids=segments)
        start = 0
        for n in lengths:
            alone = multi_head_attention(*(x[:, start : start + n] for x in (q, k, v)), is_causal=True)
            chex.assert_trees_all_close(packed[:, start : start + n], alone, rtol=1e-5, atol=1e-6)
            start += n

    def test_bad_segment_ids(self):
        q, k, v = make_qkv()
        with self.assertRaisesRegex(ValueError, "pass both q_segment_ids and kv_segment_ids"):
            multi_head_attention(q, k, v, q_segment_ids=np.zeros(T, np.int32))
        with self.assertRaisesRegex(ValueError, r"kv_segment_ids must be \[S=7\] or \[B=2, S=7\], got \(5,\)"):
            multi_head_attention(q, k, v, q_segment_ids=np.zeros(T, np.int32), kv_segment_ids=np.zeros(T, np.int32))
        with self.assertRaisesRegex(TypeError, "q_segment_ids must be integers"):
            multi_head_attention(q, k, v, q_segment_ids=np.zeros(T), kv_segment_ids=np.zeros(S, np.int32))


class CausalPropertyTest(chex.TestCase):
    causal = staticmethod(jax.jit(lambda q, k, v: multi_head_attention(q, k, v, is_causal=True)))

    @settings(max_examples=8, deadline=None)
    @given(
        length=st.integers(2, 9),
        kv_heads=st.sampled_from([1, 2, 4]),
        width=st.integers(1, 9),
        changed=st.data(),
    )
    def test_future_tokens_do_not_change_past_outputs(self, length, kv_heads, width, changed):
        position = changed.draw(st.integers(1, length - 1))
        q = normal((1, length, 4, width), seed=length)
        k = normal((1, length, kv_heads, width), seed=length + 1)
        v = normal((1, length, kv_heads, width), seed=length + 2)
        before = self.causal(q, k, v)
        # Replace everything at and after `position` with other numbers.
        noise = normal(q.shape, seed=99)
        q2 = q.at[:, position:].set(noise[:, position:])
        k2 = k.at[:, position:].set(noise[:, position:, :kv_heads] * 3)
        v2 = v.at[:, position:].set(noise[:, position:, :kv_heads] - 1)
        after = self.causal(q2, k2, v2)
        chex.assert_trees_all_close(after[:, :position], before[:, :position], rtol=1e-6, atol=1e-6)
        self.assertGreater(float(jnp.max(jnp.abs(after[:, position:] - before[:, position:]))), 0.0)


class FullyMaskedRowTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("f32", jnp.float32), ("bf16", jnp.bfloat16))
    def test_zeros_and_zero_gradients(self, dtype):
        q, k, v = make_qkv(K=3, dtype=dtype)
        mask = jnp.ones((B, H, T, S), bool).at[:, :, 2, :].set(False)  # query row 2 sees nothing
        lengths = jnp.array([0, 7])  # the whole first sequence is padding

        def loss(q, k, v):
            out = multi_head_attention(q, k, v, mask=mask, kv_lengths=lengths)
            return jnp.sum(out.astype(jnp.float32) ** 2), out

        (_, out), grads = self.variant(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
        self.assertEqual(out.dtype, dtype)
        for array in (out, *grads):
            self.assertFalse(bool(jnp.any(jnp.isnan(array.astype(jnp.float32)))))
        np.testing.assert_array_equal(np.asarray(out[:, 2], np.float32), 0.0)
        np.testing.assert_array_equal(np.asarray(out[0], np.float32), 0.0)
        np.testing.assert_array_equal(np.asarray(grads[0][:, 2], np.float32), 0.0)  # dq of the empty row
        np.testing.assert_array_equal(np.asarray(grads[0][0], np.float32), 0.0)
        np.testing.assert_array_equal(np.asarray(grads[1][0], np.float32), 0.0)  # dk of the padded sequence
        np.testing.assert_array_equal(np.asarray(grads[2][0], np.float32), 0.0)
        self.assertGreater(float(jnp.abs(grads[0][1, 0].astype(jnp.float32)).sum()), 0.0)  # others flow


class LowPrecisionTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("bf16", jnp.bfloat16), ("f16", jnp.float16))
    def test_close_to_float32_and_keeps_dtype(self, dtype):
        q, k, v = make_qkv(K=2)
        fn = self.variant(lambda q, k, v: multi_head_attention(q, k, v, is_causal=True))
        low = fn(q.astype(dtype), k.astype(dtype), v.astype(dtype))
        self.assertEqual(low.dtype, dtype)
        chex.assert_trees_all_close(low.astype(jnp.float32), fn(q, k, v), rtol=2e-2, atol=2e-2)

    def test_softmax_statistics_are_float32(self):
        q, k, _ = make_qkv()
        weights = attention_weights(q[0, :, 0].astype(jnp.bfloat16), k[0, :, 0].astype(jnp.bfloat16))
        self.assertEqual(weights.dtype, jnp.float32)
        chex.assert_trees_all_close(weights.sum(-1), np.ones(T), rtol=1e-6)

    def test_large_logits_do_not_overflow_in_bf16(self):
        q, k, v = make_qkv(K=2, dtype=jnp.bfloat16)
        out = multi_head_attention(q * 300, k * 300, v)
        self.assertTrue(bool(jnp.all(jnp.isfinite(out.astype(jnp.float32)))))


class BadInputTest(chex.TestCase):
    def test_float_mask_is_a_type_error(self):
        q, k, v = make_qkv()
        with self.assertRaisesRegex(TypeError, "mask must be boolean.*float32"):
            multi_head_attention(q, k, v, mask=jnp.ones((T, S)))

    def test_int_mask_is_a_type_error(self):
        q, k, _ = make_qkv()
        with self.assertRaisesRegex(TypeError, "mask must be boolean.*int32"):
            attention_weights(q[0, :, 0], k[0, :, 0], mask=jnp.ones((T, S), jnp.int32))

    def test_heads_that_do_not_divide(self):
        q, k, v = make_qkv(H=6, K=4)
        with self.assertRaisesRegex(ValueError, r"H=6 must be a multiple of key/value heads K=4.*\(2, 5, 6, 11\)"):
            multi_head_attention(q, k, v)

    def test_width_mismatch(self):
        q, k, v = make_qkv()
        with self.assertRaisesRegex(ValueError, r"same head width D.*\(2, 5, 6, 11\).*\(2, 7, 6, 10\)"):
            multi_head_attention(q, k[..., :10], v)

    def test_wrong_rank(self):
        q, k, v = make_qkv()
        with self.assertRaisesRegex(ValueError, r"q \[B, T, H, D\].*got q \(5, 6, 11\)"):
            multi_head_attention(q[0], k, v)

    def test_batch_and_length_mismatch(self):
        q, k, v = make_qkv()
        with self.assertRaisesRegex(ValueError, r"batch sizes differ"):
            multi_head_attention(q[:1], k, v)
        with self.assertRaisesRegex(ValueError, r"same S and K.*\(2, 7, 6, 11\).*\(2, 6, 6, 11\)"):
            multi_head_attention(q, k, v[:, :6])

    def test_dtype_mismatch(self):
        q, k, v = make_qkv()
        with self.assertRaisesRegex(ValueError, "share one dtype.*bfloat16"):
            multi_head_attention(q, k.astype(jnp.bfloat16), v)

    def test_mask_that_does_not_broadcast(self):
        q, k, v = make_qkv()
        with self.assertRaisesRegex(ValueError, r"mask \(1, 1, 4, 7\) does not broadcast to \[B, H, T, S\] = \(2, 6, 5, 7\)"):
            multi_head_attention(q, k, v, mask=jnp.ones((4, S), bool))

    def test_bad_positions_lengths_and_window(self):
        q, k, v = make_qkv()
        with self.assertRaisesRegex(ValueError, r"q_positions must be \[T=5\] or \[B=2, T=5\], got \(3,\)"):
            multi_head_attention(q, k, v, is_causal=True, q_positions=jnp.arange(3))
        with self.assertRaisesRegex(TypeError, "q_positions must be integers"):
            multi_head_attention(q, k, v, is_causal=True, q_positions=jnp.zeros(T))
        with self.assertRaisesRegex(ValueError, r"kv_lengths must be \[B=2\], got \(3,\)"):
            multi_head_attention(q, k, v, kv_lengths=jnp.array([1, 2, 3]))
        with self.assertRaisesRegex(ValueError, "pass is_causal=True"):
            multi_head_attention(q, k, v, window=3)
        with self.assertRaisesRegex(ValueError, "window must be an integer >= 1"):
            multi_head_attention(q, k, v, is_causal=True, window=0)

    def test_one_head_shape_errors(self):
        q, k, v = make_qkv()
        with self.assertRaisesRegex(ValueError, r"q \[T, D\], k \[S, D\]"):
            attention(q[0], k[0, :, 0], v[0, :, 0])
        with self.assertRaisesRegex(ValueError, r"v must be \[S, E\].*k \(7, 11\), v \(5, 11\)"):
            attention(q[0, :, 0], k[0, :, 0], v[0, :5, 0])


class AttentionWeightsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_multi_head_weights_equal_the_float64_softmax(self):
        q, k, _ = make_qkv(K=3)
        lengths = jnp.array([4, 7])
        weights = self.variant(lambda q, k, n: multi_head_attention_weights(q, k, is_causal=True, kv_lengths=n))(q, k, lengths)
        chex.assert_shape(weights, (B, H, T, S))
        qf, kf = np.asarray(q, np.float64), np.asarray(k, np.float64)
        for b in range(B):
            for h in range(H):
                logits = qf[b, :, h] @ kf[b, :, h // 2].T / np.sqrt(D)  # H=6, K=3: G=2
                allowed = (np.arange(S)[None] <= np.arange(T)[:, None] + S - T) & (np.arange(S)[None] < lengths[b])
                expected = np.exp(np.where(allowed, logits, -np.inf) - logits.max(-1, keepdims=True))
                expected /= expected.sum(-1, keepdims=True)
                chex.assert_trees_all_close(weights[b, h], expected, rtol=1e-5, atol=1e-6)


def test_ring_sub_blocks_stay_near_the_target_for_any_chunk_length():
    from jaxattn.functional.ring import sub_block_size

    assert sub_block_size(1031, 512) == 344  # a prime chunk: 3 sub-blocks and 1 token of padding, not 1031 of 1
    assert sub_block_size(7, 3) == 3 and sub_block_size(12, 3) == 3 and sub_block_size(5, 512) == 5
    for size in range(1, 200):
        for block in (1, 3, 16, 64):
            sub = sub_block_size(size, block)
            count = -(-size // sub)
            assert sub <= block and count * sub - size < count, (size, block, sub)  # less than a token per block
