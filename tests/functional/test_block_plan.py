"""The flash kernel's block plan at the window's edge: the plan against a brute-force per-cell
mask, and the kernel's values against the float64 reference where a block ends exactly on the
edge (a plan that calls such a block complete would run it without its mask)."""

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn.functional import AttentionContext, flash_attention
from tests.reference import normal, reference_attention

T = 12


@pytest.mark.parametrize("window", [None, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("block", [1, 2, 3, 4])
def test_the_plan_calls_a_block_complete_only_where_every_cell_may_attend(window, block):
    q, k = jnp.zeros((1, T, 2, 4)), jnp.zeros((1, T, 1, 4))
    context = AttentionContext.from_keywords(q, k, is_causal=True, window=window)
    cells = np.asarray(context.full_mask())[0, 0]  # [T, S]: the rule, cell by cell
    by_block = cells.reshape(T // block, block, T // block, block)
    np.testing.assert_array_equal(np.asarray(context.block_completeness(block, block)), by_block.all(axis=(1, 3)))
    np.testing.assert_array_equal(np.asarray(context.block_visibility(block, block)), by_block.any(axis=(1, 3)))


@pytest.mark.parametrize("window, block", [(5, 2), (4, 2), (3, 3), (6, 3), (2, 1)])
def test_flash_with_a_block_on_the_windows_edge_equals_the_float64_reference(window, block):
    q, k, v = normal((2, T, 4, 8), seed=1), normal((2, T, 2, 8), seed=2), normal((2, T, 2, 8), seed=3)
    out = flash_attention(q, k, v, is_causal=True, window=window, block_q=block, block_kv=block)
    positions = np.arange(T)
    expected = reference_attention(q, k, v, q_positions=positions, kv_positions=positions, window=window)
    chex.assert_trees_all_close(out, jnp.asarray(expected, jnp.float32), atol=2e-5, rtol=2e-5)
