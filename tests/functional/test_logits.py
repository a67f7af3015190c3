"""Logit soft-capping and learned sinks in every kernel, against the float64 reference.

Order, as the models do it: scale the scores, soft-cap them, then mask; a sink is one
logit per head in every row's denominator, neither scaled nor capped, then dropped.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from jaxattn.functional import (
    decode_attention,
    flash_attention,
    flash_block_map,
    multi_head_attention,
    multi_head_attention_weights,
)
from tests.reference import normal, packed_segments, reference_attention

B, H = 2, 6
SINKS = np.array([0.5, -1.0, 2.0, 0.0, 1.5, -0.3])


def qkv(T, S, K, D=5, E=7, scale=2.0):
    """Inputs large enough (x2) that a cap of 3 bends the logits a lot."""
    return normal((B, T, H, D), seed=0, scale=scale), normal((B, S, K, D), seed=1, scale=scale), normal((B, S, K, E), seed=2)


def values_and_grads(kernel, q, k, v, sinks, **keywords):
    """The kernel's output and the gradients of sum(out * cotangent) w.r.t. q, k, v and the sinks."""
    cotangent = normal((q.shape[0], q.shape[1], H, v.shape[-1]), seed=9)

    def loss(q, k, v, sinks):
        out = kernel(q, k, v, sinks=sinks, **keywords)
        return jnp.sum(out * cotangent), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(q, k, v, sinks)
    return out, grads, cotangent


# Causal and not, GQA and MQA, ragged kv_lengths, a window, packed sequences.
CASES = [
    ("causal_gqa", dict(T=11, S=11, K=3), dict(is_causal=True)),
    ("non_causal_ragged", dict(T=9, S=13, K=2), dict(kv_lengths=np.array([6, 13]))),
    ("causal_window_mqa", dict(T=13, S=13, K=1), dict(is_causal=True, window=4)),
    ("packed_causal", dict(T=12, S=12, K=2), dict(is_causal=True, q_segment_ids=packed_segments([5, 3, 4]),
                                                  kv_segment_ids=packed_segments([5, 3, 4]))),
]


def reference_keywords(keywords, T, S):
    """The kernel's keywords as the reference's (explicit positions when causal)."""
    reference = dict(keywords)
    if reference.pop("is_causal", False):
        reference.update(q_positions=np.arange(T) + S - T, kv_positions=np.arange(S))
    return reference


class SoftCapAndSinksTest(parameterized.TestCase):
    @parameterized.named_parameters(
        *[(f"{name}_{kernel}", sizes, keywords, kernel) for name, sizes, keywords in CASES for kernel in ("dense", "flash")]
    )
    def test_values_and_gradients_equal_the_float64_reference(self, sizes, keywords, kernel):
        q, k, v = qkv(**sizes)
        fn = multi_head_attention if kernel == "dense" else (
            lambda *a, **kw: flash_attention(*a, block_q=4, block_kv=3, **kw))
        out, grads, cotangent = values_and_grads(fn, q, k, v, jnp.asarray(SINKS, jnp.float32), logit_softcap=3.0,
                                                 **keywords)
        expected = reference_attention(q, k, v, logit_softcap=3.0, sinks=SINKS, cotangent=cotangent,
                                       **reference_keywords(keywords, sizes["T"], sizes["S"]))
        chex.assert_trees_all_close(out, expected[0], rtol=1e-5, atol=1e-5)
        chex.assert_trees_all_close(tuple(grads), tuple(expected[1:]), rtol=1e-4, atol=1e-5)

    def test_cap_alone_and_sinks_alone(self):
        q, k, v = qkv(T=7, S=9, K=3)
        for extra in (dict(logit_softcap=2.5), dict(sinks=SINKS)):
            reference = reference_attention(q, k, v, q_positions=np.arange(2, 9), kv_positions=np.arange(9), **extra)
            for fn in (multi_head_attention, lambda *a, **kw: flash_attention(*a, block_q=3, block_kv=4, **kw)):
                chex.assert_trees_all_close(fn(q, k, v, is_causal=True, **extra), reference, rtol=1e-5, atol=1e-5)

    @parameterized.named_parameters(("gqa", 3, None), ("mqa_window", 1, 3))
    def test_decode_kernel_values(self, K, window):
        # Ragged rows in a 11-slot cache: lengths 0 (an empty row), 1, 4, 11.
        lengths = np.array([0, 1, 4, 11])
        q = normal((4, 2, H, 5), seed=3, scale=2.0)
        k, v = normal((4, 11, K, 5), seed=4, scale=2.0), normal((4, 11, K, 7), seed=5)
        keywords = dict(is_causal=True, q_positions=jnp.asarray(lengths[:, None] - 2 + np.arange(2)),
                        kv_positions=jnp.arange(11), kv_lengths=jnp.asarray(lengths), window=window)
        out = jax.jit(lambda q, k, v: decode_attention(q, k, v, block_kv=4, logit_softcap=3.0, sinks=SINKS,
                                                        **keywords))(q, k, v)
        reference_args = {name: keywords[name] for name in ("q_positions", "kv_positions", "kv_lengths", "window")}
        expected = reference_attention(q, k, v, logit_softcap=3.0, sinks=SINKS, **reference_args)
        chex.assert_trees_all_close(out, expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(out[0], 0.0)  # nothing to attend to: the sink takes all, the output is 0

    def test_a_row_with_nothing_to_attend_to_is_zeros_with_zero_gradients(self):
        q, k, v = qkv(T=4, S=6, K=2)
        mask = np.ones((B, H, 4, 6), bool)
        mask[0, :, 1] = False  # row 1 of the first sequence sees nothing
        for fn in (multi_head_attention, lambda *a, **kw: flash_attention(*a, block_q=2, block_kv=3, **kw)):
            out, (dq, dk, dv, dsinks), _ = values_and_grads(fn, q, k, v, jnp.asarray(SINKS, jnp.float32),
                                                           logit_softcap=3.0, mask=mask)
            assert not any(bool(jnp.isnan(x).any()) for x in (out, dq, dk, dv, dsinks))
            np.testing.assert_array_equal(out[0, 1], 0.0)
            np.testing.assert_array_equal(dq[0, 1], 0.0)

    def test_weights_leave_the_sinks_share_out(self):
        q, k, _ = qkv(T=5, S=5, K=3)
        weights = multi_head_attention_weights(q, k, is_causal=True, sinks=SINKS)  # [B, H, T, S]
        sums = np.asarray(weights.sum(-1))
        assert np.all(sums < 1) and np.all(sums > 0)
        # What is missing from each row is exactly the sink's share: e^sink / (e^sink + sum_j e^s_j).
        logits = np.einsum("bthd,bshd->bhts", np.asarray(q, np.float64), np.repeat(np.asarray(k, np.float64), 2, 2))
        logits = np.where(np.tril(np.ones((5, 5), bool)), logits / np.sqrt(5), -np.inf)
        share = np.exp(SINKS[None, :, None]) / (np.exp(SINKS[None, :, None]) + np.exp(logits).sum(-1))
        np.testing.assert_allclose(1 - sums, share, rtol=1e-4, atol=1e-6)


def test_flash_keeps_linear_memory_and_block_skipping_with_cap_and_sinks():
    T, D = 1024, 32
    q, k, v = (normal((1, T, 2, D), seed=s) for s in range(3))
    sinks = jnp.zeros((2,))

    def temporaries(**extra):
        fn = jax.jit(lambda q, k, v: flash_attention(q, k, v, is_causal=True, block_q=128, block_kv=128, **extra))
        return fn.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes

    plain, modern = temporaries(), temporaries(logit_softcap=30.0, sinks=sinks)
    assert modern < 1.25 * plain and modern < T * T * 4, (plain, modern)  # not even one head's [T, T]
    visited = flash_block_map(q, k, v, is_causal=True, block_q=128, block_kv=128, logit_softcap=30.0, sinks=sinks)
    assert int(visited.sum()) == 8 * 9 // 2  # the causal triangle: the logits change nothing in the plan
