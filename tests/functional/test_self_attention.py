"""The functional attention layer against a float64 NumPy layer, and its position rules."""

from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from jaxattn.functional import AttentionParams, AttentionSettings, KVCache, Rope, SlidingKVCache, causal_self_attention
from jaxattn.functional.positions import RopeScaling
from tests.reference import normal, reference_layer

# Odd, distinct sizes: C model width, H query heads, K key/value heads, D/E key/value widths.
B, T, C, H, K, D, E = 2, 7, 13, 6, 3, 4, 5


def make_params(*, biases=True, seed=0):
    w = lambda shape, i: normal(shape, seed=seed + i, scale=0.4)  # noqa: E731
    params = AttentionParams(w_q=w((C, H, D), 0), w_k=w((C, K, D), 1), w_v=w((C, K, E), 2), w_o=w((H, E, C), 3))
    if biases:
        params = params._replace(b_q=w((H, D), 4), b_k=w((K, D), 5), b_v=w((K, E), 6), b_o=w((C,), 7))
    return params


class LayerTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        ("rope_half_biases", 10000.0, "half", True, None),
        ("rope_interleaved_window", 500.0, "interleaved", False, 3),
        ("no_rope", None, "half", True, None),
    )
    def test_equals_float64_layer(self, theta, style, biases, window):
        params = make_params(biases=biases)
        x = normal((B, T, C), seed=10)
        positions = jnp.array([[0, 1, 2, 3, 4, 5, 6], [3, 4, 5, 6, 7, 8, 9]])
        settings = AttentionSettings(rope=None if theta is None else Rope(theta, style), window=window)
        run = self.variant(lambda p, x, pos: causal_self_attention(p, x, pos, settings=settings))
        expected = reference_layer(params, x, np.asarray(positions), rope_theta=theta, style=style, window=window)
        chex.assert_trees_all_close(run(params, x, positions), expected, rtol=1e-5, atol=1e-5)

    def test_shifting_every_position_changes_nothing_with_rope(self):
        # RoPE makes q.k depend only on m - n, so a constant shift of all positions is
        # invisible, but only if queries *and* keys are rotated.
        params = make_params()
        x = normal((B, T, C), seed=11)
        layer = jax.jit(lambda p, x, pos: causal_self_attention(p, x, pos, settings=AttentionSettings(rope=Rope())))
        base = layer(params, x, jnp.arange(T))
        chex.assert_trees_all_close(layer(params, x, jnp.arange(T) + 37), base, rtol=2e-4, atol=2e-5)
        spread = layer(params, x, jnp.arange(T) * 3)  # other distances: other outputs
        assert float(jnp.max(jnp.abs(spread - base))) > 1e-3

    def test_cached_calls_equal_the_full_pass_and_derive_positions(self):
        params = make_params()
        x = normal((B, T, C), seed=12)
        for cache, window in ((KVCache.create(batch=B, max_length=9, kv_heads=K, head_dim=D, value_dim=E), None),
                              (SlidingKVCache.create(batch=B, window=3, kv_heads=K, head_dim=D, value_dim=E, chunk=4), 3)):
            layer = jax.jit(partial(causal_self_attention, settings=AttentionSettings(rope=Rope(), window=window)))
            full = layer(params, x)
            outputs = []
            for start, size in ((0, 4), (4, 1), (5, 2)):
                out, cache = layer(params, x[:, start : start + size], cache=cache)
                outputs.append(out)
            chex.assert_trees_all_close(jnp.concatenate(outputs, axis=1), full, rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(cache.lengths, [T, T])

    def test_positions_with_a_cache_are_an_error(self):
        params = make_params()
        cache = KVCache.create(batch=B, max_length=9, kv_heads=K, head_dim=D, value_dim=E)
        with pytest.raises(ValueError, match="come from cache.lengths"):
            causal_self_attention(params, normal((B, 1, C)), jnp.array([[3], [3]]), cache=cache)

    def test_bad_weights_and_inputs(self):
        params = make_params()
        with pytest.raises(ValueError, match=r"w_o is \(6, 4, 13\), expected \(6, 5, 13\)"):
            causal_self_attention(params._replace(w_o=jnp.zeros((H, D, C))), normal((B, T, C)))
        with pytest.raises(ValueError, match=r"b_k is \(2, 4\), expected \(3, 4\)"):
            causal_self_attention(params._replace(b_k=jnp.zeros((2, D))), normal((B, T, C)))
        with pytest.raises(ValueError, match=r"H=6 must be a multiple of key/value heads K=4"):
            bad = params._replace(w_k=jnp.zeros((C, 4, D)), w_v=jnp.zeros((C, 4, E)), b_k=None, b_v=None)
            causal_self_attention(bad, normal((B, T, C)))
        with pytest.raises(ValueError, match=r"x \[B, T, C=13\], got \(2, 7, 12\)"):
            causal_self_attention(params, normal((B, T, 12)))


class TodaysLayersTest(chex.TestCase):
    """QK-norm, partial rotary, RoPE scaling, NoPE, soft-capping, sinks and a scale of its own,
    in the layer, against the float64 layer."""

    @parameterized.named_parameters(
        ("qk_norm_per_head_llama3", dict(qk_norm="head"),
         dict(rope=Rope(500.0, scaling=RopeScaling("llama3", factor=8.0, original_max_length=8)))),
        ("qk_norm_projection_softcap", dict(qk_norm="projection", logit_softcap=2.0), dict(rope=Rope())),
        ("partial_rotary_sinks_scale", dict(sinks=True, scale=0.3), dict(rope=Rope(rotary_fraction=0.5))),
        ("nope_window_yarn_style", dict(window=3), dict(rope=None)),
        ("yarn_sinks_softcap", dict(sinks=True, logit_softcap=1.5),
         dict(rope=Rope(scaling=RopeScaling("yarn", factor=4.0, original_max_length=4)))),
    )
    def test_equals_float64_layer(self, features, rope_settings):
        params = make_params()
        rng = np.random.default_rng(20)
        qk_norm = features.get("qk_norm")
        if qk_norm is not None:
            shape_q, shape_k = ((H, D), (K, D)) if qk_norm == "projection" else ((D,), (D,))
            params = params._replace(q_norm=jnp.asarray(1 + 0.3 * rng.standard_normal(shape_q), jnp.float32),
                                     k_norm=jnp.asarray(1 + 0.3 * rng.standard_normal(shape_k), jnp.float32))
        if features.get("sinks"):
            params = params._replace(sinks=jnp.asarray(rng.standard_normal(H), jnp.float32))
        settings = AttentionSettings(window=features.get("window"), scale=features.get("scale"),
                                     logit_softcap=features.get("logit_softcap"), qk_norm=qk_norm, **rope_settings)
        x = normal((B, T, C), seed=21)
        positions = np.array([[0, 1, 2, 3, 4, 5, 6], [9, 10, 11, 12, 13, 14, 15]])
        out = jax.jit(lambda p, x, pos: causal_self_attention(p, x, pos, settings=settings))(params, x, positions)
        r = settings.rope
        frequencies, factor, rotary = None, 1.0, None
        if r is not None:
            from jaxattn.functional.positions import rope_frequencies, rotary_width

            rotary = rotary_width(D, r.rotary_dim, r.rotary_fraction)
            frequencies, factor = rope_frequencies(rotary, r.theta, r.scaling)
        expected = reference_layer(params, x, positions, rope_theta=None if r is None else r.theta, window=settings.window,
                                   rotary_dim=rotary, inv_freq=frequencies, rope_factor=factor, qk_norm=qk_norm,
                                   scale=settings.scale, logit_softcap=settings.logit_softcap)
        chex.assert_trees_all_close(out, expected, rtol=1e-5, atol=1e-5)

    def test_qk_norm_needs_its_scales(self):
        with pytest.raises(ValueError, match="qk_norm='head' needs q_norm and k_norm"):
            causal_self_attention(make_params(), normal((B, T, C)), settings=AttentionSettings(qk_norm="head"))
        with pytest.raises(ValueError, match="qk_norm must be one of"):
            AttentionSettings(qk_norm="layer")
