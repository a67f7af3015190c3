"""The NNX attention module: its weights, its kernel and its positions."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxattn.functional import KVCache, flash_attention, multi_head_attention
from jaxattn.nn import MultiHeadAttention
from tests.conftest import normal, reference_layer

C, H, K, D = 24, 4, 2, 6


def module_weights(layer):
    """The module's nnx.Linear kernels ([in, out]) as the [C, H, D] / [H, D, C] weights of the layer."""
    kernel = lambda linear: np.asarray(linear.kernel[...])  # noqa: E731
    bias = lambda linear: None if linear.bias is None else np.asarray(linear.bias[...])  # noqa: E731
    weights = dict(
        w_q=kernel(layer.q_proj).reshape(C, H, D), w_k=kernel(layer.k_proj).reshape(C, K, D),
        w_v=kernel(layer.v_proj).reshape(C, K, D), w_o=kernel(layer.o_proj).reshape(H, D, C),
    )
    if layer.q_proj.bias is not None:
        weights.update(b_q=bias(layer.q_proj).reshape(H, D), b_k=bias(layer.k_proj).reshape(K, D),
                       b_v=bias(layer.v_proj).reshape(K, D))
    if layer.o_proj.bias is not None:
        weights["b_o"] = bias(layer.o_proj)
    return weights


@pytest.mark.parametrize("biases", [False, True])
def test_module_equals_the_float64_layer_on_its_own_weights(biases):
    layer = MultiHeadAttention(C, heads=H, kv_heads=K, head_dim=D, rope_theta=10000.0, qkv_bias=biases,
                               out_bias=biases, rngs=nnx.Rngs(0))
    if biases:  # biases start at zero: give them values, so that a misplaced one shows
        for linear in (layer.q_proj, layer.k_proj, layer.v_proj, layer.o_proj):
            linear.bias[...] = normal(linear.bias.shape, seed=linear.bias.shape[0])
    x = normal((2, 5, C), seed=3)
    positions = jnp.array([[0, 1, 2, 3, 4], [2, 3, 4, 5, 6]])
    expected = reference_layer(module_weights(layer), x, np.asarray(positions), rope_theta=10000.0)
    chex.assert_trees_all_close(layer(x, positions), expected, rtol=1e-5, atol=1e-5)


def test_shifting_every_position_changes_nothing_with_rope():
    # RoPE makes q.k depend only on m - n: invisible to a constant shift, but only if the
    # module rotates queries *and* keys.
    layer = MultiHeadAttention(C, heads=H, kv_heads=K, head_dim=D, rope_theta=10000.0, rngs=nnx.Rngs(1))
    for linear in (layer.q_proj, layer.k_proj):
        linear.kernel[...] = linear.kernel[...] * 25  # from the small initialisation to peaked attention
    x = normal((2, 6, C), seed=4)
    base = layer(x, jnp.arange(6))
    chex.assert_trees_all_close(layer(x, jnp.arange(6) + 100), base, rtol=1e-4, atol=1e-5)
    assert float(jnp.max(jnp.abs(layer(x, jnp.arange(6) * 2) - base))) > 1e-2 * float(jnp.max(jnp.abs(base)))


def test_attention_fn_is_swappable():
    calls = []

    def recording_kernel(q, k, v, **kwargs):
        calls.append(q.shape)
        return multi_head_attention(q, k, v, **kwargs)

    layer = MultiHeadAttention(C, heads=H, kv_heads=K, head_dim=D, attention_fn=recording_kernel, rngs=nnx.Rngs(0))
    reference = MultiHeadAttention(C, heads=H, kv_heads=K, head_dim=D, rngs=nnx.Rngs(0))
    flash = MultiHeadAttention(C, heads=H, kv_heads=K, head_dim=D, attention_fn=flash_attention, rngs=nnx.Rngs(0))
    x = normal((2, 5, C), seed=0)
    chex.assert_trees_all_close(layer(x, jnp.arange(5)), reference(x, jnp.arange(5)), rtol=1e-6)
    chex.assert_trees_all_close(jax.jit(flash)(x), reference(x), rtol=1e-5, atol=1e-6)
    assert calls == [(2, 5, 4, 6)]


def test_with_a_cache_positions_come_from_the_cache():
    layer = MultiHeadAttention(C, heads=H, kv_heads=K, head_dim=D, rope_theta=10000.0, rngs=nnx.Rngs(2))
    x = normal((1, 4, C), seed=5)
    cache = KVCache.create(batch=1, max_length=6, kv_heads=K, head_dim=D)
    cached = nnx.jit(lambda layer, x, cache: layer(x, cache=cache))
    first, cache = cached(layer, x[:, :3], cache)
    second, cache = cached(layer, x[:, 3:], cache)
    chex.assert_trees_all_close(jnp.concatenate([first, second], 1), layer(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="come from cache.lengths"):
        layer(x[:, :1], jnp.array([[0]]), cache=cache)  # position 0 would contradict the cache (length 4)


def test_bad_head_counts():
    with pytest.raises(ValueError, match="heads=4 must be a positive multiple of kv_heads=3"):
        MultiHeadAttention(C, heads=4, kv_heads=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="RoPE needs an even head_dim"):
        MultiHeadAttention(C, heads=4, head_dim=5, rope_theta=10000.0, rngs=nnx.Rngs(0))
