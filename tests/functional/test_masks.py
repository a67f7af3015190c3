import chex
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn.functional import causal_mask, combine_masks, padding_mask


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
    with pytest.raises(ValueError, match="window must be a positive int, got 0"):
        causal_mask(jnp.arange(3), jnp.arange(3), window=0)
    with pytest.raises(ValueError, match=r"kv_lengths must have shape \[B\], got \(2, 2\)"):
        padding_mask(jnp.ones((2, 2), jnp.int32), 4)
