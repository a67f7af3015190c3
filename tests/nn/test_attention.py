"""The NNX attention module: its weights, its kernel and its positions."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxattn.functional import AttentionSettings, Kernels, KVCache, Rope, dense_kernel, flash_kernel
from jaxattn.nn import MultiHeadAttention
from tests.reference import normal, reference_layer

C, H, K, D = 24, 4, 2, 6
ROPE = AttentionSettings(rope=Rope(10000.0))


def module_weights(layer):
    """The module's parameters, which it keeps in the layer's head shapes ([C, H, D], [H, D, C])."""
    names = ("w_q", "w_k", "w_v", "w_o", "b_q", "b_k", "b_v", "b_o")
    return {name: np.asarray(getattr(layer, name)[...]) for name in names if getattr(layer, name) is not None}


@pytest.mark.parametrize("biases", [False, True])
def test_module_equals_the_float64_layer_on_its_own_weights(biases):
    layer = MultiHeadAttention(C, heads=H, kv_heads=K, head_dim=D, settings=ROPE, qkv_bias=biases,
                               out_bias=biases, rngs=nnx.Rngs(0))
    assert layer.w_q.shape == (C, H, D) and layer.w_o.shape == (H, D, C)  # made in their head shapes
    if biases:  # biases start at zero: give them values, so that a misplaced one shows
        for seed, bias in enumerate((layer.b_q, layer.b_k, layer.b_v, layer.b_o)):
            bias[...] = normal(bias.shape, seed=seed)
    x = normal((2, 5, C), seed=3)
    positions = jnp.array([[0, 1, 2, 3, 4], [2, 3, 4, 5, 6]])
    expected = reference_layer(module_weights(layer), x, np.asarray(positions), rope_theta=10000.0)
    chex.assert_trees_all_close(layer(x, positions), expected, rtol=1e-5, atol=1e-5)


def test_shifting_every_position_changes_nothing_with_rope():
    # RoPE makes q.k depend only on m - n: invisible to a constant shift, but only if the
    # module rotates queries *and* keys.
    layer = MultiHeadAttention(C, heads=H, kv_heads=K, head_dim=D, settings=ROPE, rngs=nnx.Rngs(1))
    for weight in (layer.w_q, layer.w_k):
        weight[...] = weight[...] * 25  # from the small initialisation to peaked attention
    x = normal((2, 6, C), seed=4)
    base = layer(x, jnp.arange(6))
    chex.assert_trees_all_close(layer(x, jnp.arange(6) + 100), base, rtol=1e-4, atol=1e-5)
    assert float(jnp.max(jnp.abs(layer(x, jnp.arange(6) * 2) - base))) > 1e-2 * float(jnp.max(jnp.abs(base)))


def test_kernels_are_swappable_and_an_explicit_kernel_serves_cached_calls_too():
    calls = []

    def recording_kernel(q, k, v, context):
        calls.append((q.shape, k.shape))
        return dense_kernel(q, k, v, context)

    def make(**kernels):  # decode_max_tokens=2: the 3-token prefill below is a full call, the steps are not
        return MultiHeadAttention(C, heads=H, kv_heads=K, head_dim=D, settings=ROPE,
                                  kernels=Kernels.choose(**kernels, decode_max_tokens=2), rngs=nnx.Rngs(0))

    reference = make()
    x = normal((2, 5, C), seed=0)
    chex.assert_trees_all_close(make(attention_fn=recording_kernel)(x, jnp.arange(5)), reference(x, jnp.arange(5)),
                                rtol=1e-6)
    chex.assert_trees_all_close(jax.jit(make(attention_fn=flash_kernel))(x), reference(x), rtol=1e-5, atol=1e-6)
    assert calls == [((2, 5, 4, 6), (2, 5, 2, 6))]

    def steps(layer):  # a prefill of 3 tokens, then 2 one-token steps
        cache = KVCache.create(batch=2, max_length=8, kv_heads=K, head_dim=D)
        outputs = []
        for start, size in ((0, 3), (3, 1), (4, 1)):
            out, cache = layer(x[:, start : start + size], cache=cache)
            outputs.append(out)
        return jnp.concatenate(outputs, 1)

    calls.clear()
    chex.assert_trees_all_close(steps(make(attention_fn=recording_kernel)), reference(x), rtol=1e-5, atol=1e-6)
    assert [q for q, _ in calls] == [(2, 3, 4, 6), (2, 1, 4, 6), (2, 1, 4, 6)]  # the decode steps too: no silent bypass
    calls.clear()
    decoded = steps(make(attention_fn=flash_kernel, decode_fn=recording_kernel))  # decode_fn: the steps only
    chex.assert_trees_all_close(decoded, reference(x), rtol=1e-5, atol=1e-6)
    assert [q for q, _ in calls] == [(2, 1, 4, 6), (2, 1, 4, 6)]


def test_with_a_cache_positions_come_from_the_cache():
    layer = MultiHeadAttention(C, heads=H, kv_heads=K, head_dim=D, settings=ROPE, rngs=nnx.Rngs(2))
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
        MultiHeadAttention(C, heads=4, head_dim=5, settings=ROPE, rngs=nnx.Rngs(0))
