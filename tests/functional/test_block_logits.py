"""One rule for the logits: every kernel forms them with ``block_logits`` (float32 products,
then the scale in float32, then the cap), so in bfloat16 a block the flash kernel forms is
bit for bit the same block of the dense kernel's logits, and the two kernels' outputs agree to
within one bfloat16 ulp."""

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn.functional import flash_attention, multi_head_attention
from jaxattn.functional.softmax import block_logits
from tests.reference import normal, reference_attention


def bf16_ulp(x):
    """The spacing of bfloat16 numbers at |x| (8 bits of significand)."""
    x = np.maximum(np.abs(np.asarray(x, np.float64)), np.finfo(np.float32).tiny)
    return 2.0 ** (np.floor(np.log2(x)) - 7)


@pytest.mark.parametrize("cap", [None, 5.0])
def test_a_block_of_logits_is_bitwise_the_same_block_of_the_whole(cap):
    """At head width 64 and blocks of 16 (and at 64/128 with blocks of 64/128, measured): equal
    bit for bit. At head width 16 with blocks of 4-8, XLA:CPU's small-matrix dot sums the 16
    products in another order than its large one and 5% of the logits move by one float32 ulp
    (6e-8); the dtype policy is the same, the summation order is the compiler's."""
    T, S, D, bq, bk = 64, 48, 64, 16, 16
    q, k = normal((T, D), jnp.bfloat16, seed=1), normal((S, D), jnp.bfloat16, seed=2)
    scale = 1 / np.sqrt(D)
    whole = np.asarray(block_logits(q, k, scale=scale, cap=cap))  # what the dense kernel forms: [T, S]
    assert whole.dtype == np.float32
    for i in range(0, T, bq):
        for j in range(0, S, bk):  # what the flash kernel forms, one block pair at a time
            block = np.asarray(block_logits(q[i : i + bq], k[j : j + bk], scale=scale, cap=cap))
            np.testing.assert_array_equal(block, whole[i : i + bq, j : j + bk])
    expected = scale * np.asarray(q, np.float64) @ np.asarray(k, np.float64).T
    expected = expected if cap is None else cap * np.tanh(expected / cap)
    np.testing.assert_allclose(whole, expected, rtol=1e-5, atol=1e-5)  # from the bf16 inputs, in float32


def test_parts_add_as_one_product():
    """MLA's content and RoPE halves: the parts' products add to the whole vectors' product."""
    q, k = normal((3, 10), seed=3), normal((7, 10), seed=4)
    parts = block_logits((q[:, :6], q[:, 6:]), (k[:, :6], k[:, 6:]), scale=0.3, cap=2.0)
    chex.assert_trees_all_close(parts, block_logits(q, k, scale=0.3, cap=2.0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cap", [None, 20.0])
def test_dense_and_flash_outputs_in_bfloat16_are_within_one_ulp(cap):
    B, T, H, K, D = 1, 48, 4, 2, 64
    q, k, v = (normal((B, T, n, D), jnp.bfloat16, seed=s) for n, s in ((H, 5), (K, 6), (K, 7)))
    keywords = dict(is_causal=True, window=20, logit_softcap=cap)
    dense = np.asarray(multi_head_attention(q, k, v, **keywords), np.float64)
    flash = np.asarray(flash_attention(q, k, v, block_q=16, block_kv=16, **keywords), np.float64)
    assert np.all(np.abs(dense - flash) <= bf16_ulp(np.maximum(np.abs(dense), np.abs(flash))))
    positions = np.arange(T)
    reference = reference_attention(q, k, v, q_positions=positions, kv_positions=positions, window=20,
                                    logit_softcap=cap)
    np.testing.assert_allclose(dense, reference, atol=2e-2, rtol=2e-2)
