import chex
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn.functional import causal_mask, combine_masks, padding_mask, segment_mask
from jaxattn.functional import AttentionContext


def context(*, B, T, S, H, **keywords):
    """The context of a call of these sizes, from the public edge's keywords."""
    return AttentionContext.from_keywords(jnp.zeros((B, T, H, 1)), jnp.zeros((B, S, 1, 1)), **keywords)


def test_causal_mask_from_positions_is_bottom_right_for_a_chunk():
    mask = causal_mask(jnp.arange(2) + 3, jnp.arange(5))  # queries at positions 3 and 4
    expected = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], bool)
    np.testing.assert_array_equal(mask, expected)


def test_causal_window_keeps_the_last_w_keys():
    mask = causal_mask(jnp.arange(6), jnp.arange(6), window=2)
    expected = np.eye(6, dtype=bool) | np.eye(6, k=-1, dtype=bool)
    np.testing.assert_array_equal(mask, expected)


def test_batched_positions_broadcast():
    mask = causal_mask(jnp.array([[2], [0]]), jnp.arange(3))
    chex.assert_shape(mask, (2, 1, 3))
    np.testing.assert_array_equal(mask[:, 0], [[1, 1, 1], [1, 0, 0]])


def test_padding_mask():
    np.testing.assert_array_equal(padding_mask(jnp.array([0, 2]), 3), [[0, 0, 0], [1, 1, 0]])


def test_padding_mask_of_a_block_starts_at_its_first_key():
    np.testing.assert_array_equal(padding_mask(jnp.array([3, 6]), 2, start=4), [[0, 0], [1, 1]])


def test_segment_mask_keeps_each_query_in_its_own_segment():
    segments = jnp.array([0, 0, 1, 1, 1, 2])
    mask = segment_mask(segments, segments)
    expected = np.zeros((6, 6), bool)
    expected[:2, :2] = expected[2:5, 2:5] = expected[5, 5] = True
    np.testing.assert_array_equal(mask, expected)


def test_the_context_applies_every_rule_and_its_blocks_agree():
    rng = np.random.default_rng(0)
    B, T, S, H = 2, 6, 9, 3
    spec = context(
        B=B, T=T, S=S, H=H, is_causal=True, q_positions=jnp.array([[3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6]]),
        kv_lengths=jnp.array([9, 5]), window=4, q_segment_ids=jnp.array([0, 0, 1, 1, 1, 1]),
        kv_segment_ids=jnp.array([0, 0, 0, 0, 0, 1, 1, 1, 1]), mask=jnp.asarray(rng.random((B, H, T, S)) < 0.8),
    )
    full = np.asarray(spec.full_mask())
    assert full.shape == (B, H, T, S)
    for b in range(B):  # the same rule, written per token
        q_pos = [[3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6]][b]
        for i in range(T):
            for j in range(S):
                rule = (j <= q_pos[i] and q_pos[i] - j < 4 and j < [9, 5][b]
                        and [0, 0, 1, 1, 1, 1][i] == [0, 0, 0, 0, 0, 1, 1, 1, 1][j])
                np.testing.assert_array_equal(full[b, :, i, j], rule & np.asarray(spec.user_mask)[b, :, i, j])
    block = spec.block(2, 3, 4, 5).full_mask()  # queries 2..4, keys 4..8
    np.testing.assert_array_equal(block, full[:, :, 2:5, 4:9])
    padded = np.asarray(spec.padded(8, 12).full_mask())  # the keys added are padding, whatever the lengths
    np.testing.assert_array_equal(padded[:, :, :T, :S], full)
    assert not padded[:, :, :, S:].any()


def test_block_visibility_never_hides_a_visible_key():
    rng = np.random.default_rng(1)
    B, T, S = 2, 12, 16
    for trial in range(5):
        q_seg = np.sort(rng.integers(0, 4, (B, T)), axis=1)
        kv_seg = np.sort(rng.integers(0, 4, (B, S)), axis=1)
        spec = context(
            B=B, T=T, S=S, H=1, is_causal=True, q_positions=jnp.asarray(np.sort(rng.integers(0, 20, (B, T)), 1)),
            kv_positions=jnp.asarray(np.sort(rng.integers(0, 20, (B, S)), 1)), window=int(rng.integers(1, 9)),
            kv_lengths=jnp.asarray(rng.integers(0, S + 1, B)), q_segment_ids=q_seg, kv_segment_ids=kv_seg,
        )
        full = np.asarray(spec.full_mask()).any(axis=1).reshape(B, 3, 4, 4, 4)  # [B, nq, bq, nk, bk]
        seen = full.any(axis=(0, 2, 4))
        plan = np.asarray(spec.block_visibility(4, 4))
        assert not np.any(seen & ~plan), trial
        # A block called complete is one where every (row, query, key) pair is visible.
        complete = np.asarray(spec.block_completeness(4, 4))
        assert not np.any(complete & ~full.all(axis=(0, 2, 4))), trial


def test_block_completeness_of_a_causal_call():
    # Blocks of 4, window 9: query 11 sees keys 3..11, query 12 keys 4..12.
    spec = context(B=1, T=16, S=16, H=1, is_causal=True, window=9)
    np.testing.assert_array_equal(spec.block_completeness(4, 4), [[0, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]])
    np.testing.assert_array_equal(spec.block_visibility(4, 4), [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1]])


def test_combine_masks_is_and_and_skips_none():
    a = jnp.array([[True, False, True]])
    b = jnp.array([[True], [False]])
    np.testing.assert_array_equal(combine_masks(a, None, b), [[1, 0, 1], [0, 0, 0]])
    assert combine_masks(None, None) is None
    with pytest.raises(TypeError, match="boolean.*float32"):
        combine_masks(a, jnp.ones(3))


def test_bad_mask_arguments():
    with pytest.raises(TypeError, match="q_positions must be an integer array"):
        causal_mask(jnp.zeros(3), jnp.arange(3))
    with pytest.raises(ValueError, match="window must be an integer >= 1, got 0"):
        causal_mask(jnp.arange(3), jnp.arange(3), window=0)
    with pytest.raises(ValueError, match=r"kv_lengths must have shape \[B\], got \(2, 2\)"):
        padding_mask(jnp.ones((2, 2), jnp.int32), 4)
