"""The NNX MLA module: naive for full passes, absorbed with a cache, positions from the cache."""

from functools import partial

import chex
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from jaxattn.functional import Kernels, LatentCache, flash_kernel
from jaxattn.nn import MultiHeadLatentAttention
from tests.reference import normal

C = 20


def make(**kwargs):
    return MultiHeadLatentAttention(C, heads=3, head_dim=5, latent_dim=9, rope_dim=4, query_latent_dim=6,
                                    rngs=nnx.Rngs(0), **kwargs)


def test_cached_absorbed_calls_equal_the_naive_full_pass():
    layer = make()
    x = normal((2, 7, C), seed=1)
    cache = LatentCache.create(batch=2, max_length=9, latent_dim=9, rope_dim=4)
    cached = nnx.jit(lambda layer, x, cache: layer(x, cache=cache))
    outputs = []
    for start, size in ((0, 4), (4, 1), (5, 2)):
        out, cache = cached(layer, x[:, start : start + size], cache)
        outputs.append(out)
    chex.assert_trees_all_close(jnp.concatenate(outputs, 1), nnx.jit(lambda layer, x: layer(x))(layer, x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="come from cache.lengths"):
        layer(x[:, :1], jnp.array([[0], [0]]), cache=cache)


def test_the_flash_kernel_serves_mla():
    x = normal((2, 11, C), seed=2)
    flash = make(kernels=Kernels(full=partial(flash_kernel, block_q=4, block_kv=4)))
    chex.assert_trees_all_close(jax.jit(flash)(x), make()(x), rtol=1e-5, atol=1e-5)


def test_bad_sizes():
    with pytest.raises(ValueError, match="rope_dim must be even"):
        MultiHeadLatentAttention(C, heads=3, head_dim=5, latent_dim=9, rope_dim=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="MLA needs latent_dim >= 1, got 0"):
        MultiHeadLatentAttention(C, heads=3, head_dim=5, latent_dim=0, rope_dim=4, rngs=nnx.Rngs(0))
