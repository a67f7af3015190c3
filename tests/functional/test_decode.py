"""The decode kernel equals multi_head_attention and visits only what the cache holds."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized
from flax import nnx

from jaxattn.functional import decode_attention, multi_head_attention
from jaxattn.lm.generate import make_decode_step
from jaxattn.nn import TransformerConfig, TransformerLM
from tests.reference import normal

BLOCK = 4
CAPACITY = 11  # not a multiple of the block: the last block is slid back
# lengths 0, 1, block - 1, block, block + 1, capacity
LENGTHS = np.array([0, 1, BLOCK - 1, BLOCK, BLOCK + 1, CAPACITY], np.int32)


def decode_inputs(T, H, K, *, D=5, E=7, dtype=jnp.float32):
    B = len(LENGTHS)
    q = normal((B, T, H, D), dtype, seed=1)
    k = normal((B, CAPACITY, K, D), dtype, seed=2)
    v = normal((B, CAPACITY, K, E), dtype, seed=3)
    masking = dict(is_causal=True, q_positions=jnp.asarray(LENGTHS[:, None] - T + np.arange(T)),
                   kv_positions=jnp.arange(CAPACITY), kv_lengths=jnp.asarray(LENGTHS))
    return q, k, v, masking


class DecodeTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        ("t1_gqa", 1, 6, 3, None), ("t3_gqa", 3, 6, 3, None), ("t1_mqa", 1, 4, 1, None),
        ("t3_mha_window", 3, 2, 2, 3), ("t1_mqa_window", 1, 4, 1, 2),
    )
    def test_equals_multi_head_attention_on_ragged_rows(self, T, H, K, window):
        q, k, v, masking = decode_inputs(T, H, K)
        masking = dict(masking, window=window)
        out = self.variant(lambda q, k, v: decode_attention(q, k, v, block_kv=BLOCK, **masking))(q, k, v)
        expected = multi_head_attention(q, k, v, **masking)
        chex.assert_trees_all_close(out, expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(out[0], 0.0)  # an empty row sees nothing: zeros, not NaN

    def test_bfloat16_keeps_dtype_and_float32_statistics(self):
        q, k, v, masking = decode_inputs(3, 6, 2, dtype=jnp.bfloat16)
        out = jax.jit(lambda q, k, v: decode_attention(q, k, v, block_kv=BLOCK, **masking))(q, k, v)
        assert out.dtype == jnp.bfloat16
        expected = multi_head_attention(*(x.astype(jnp.float32) for x in (q, k, v)), **masking)
        chex.assert_trees_all_close(out.astype(jnp.float32), expected, rtol=2e-2, atol=2e-2)

    def test_key_parts_and_shared_latent_keys_equal_one_concatenated_key(self):
        # MLA's absorbed path: the key is [c_kv; k_r], given as two parts; the buffers have no head axis.
        B, T, H, L, R = len(LENGTHS), 1, 5, 6, 4
        q_latent, q_rope = normal((B, T, H, L), seed=4), normal((B, T, H, R), seed=5)
        c_kv, k_rope = normal((B, CAPACITY, L), seed=6), normal((B, CAPACITY, R), seed=7)
        masking = dict(is_causal=True, q_positions=jnp.asarray(LENGTHS[:, None] - 1), kv_positions=jnp.arange(CAPACITY),
                       kv_lengths=jnp.asarray(LENGTHS), scale=0.3)
        out = jax.jit(lambda *a: decode_attention((a[0], a[1]), (a[2], a[3]), a[2], block_kv=BLOCK, **masking))(
            q_latent, q_rope, c_kv, k_rope)
        expected = multi_head_attention(jnp.concatenate([q_latent, q_rope], -1),
                                        jnp.concatenate([c_kv, k_rope], -1)[:, :, None], c_kv[:, :, None], **masking)
        chex.assert_trees_all_close(out, expected, rtol=1e-5, atol=1e-5)

    def test_blocks_visited_follow_the_longest_row_not_the_capacity(self):
        def visits(lengths, capacity):
            q, k, v = normal((2, 1, 4, 8)), normal((2, capacity, 2, 8)), normal((2, capacity, 2, 8))
            lengths = jnp.asarray(lengths)
            run = jax.jit(lambda q, k, v, n: decode_attention(q, k, v, block_kv=16, is_causal=True,
                                                               q_positions=n[:, None] - 1, kv_positions=jnp.arange(capacity),
                                                               kv_lengths=n, return_visits=True))
            return int(run(q, k, v, lengths)[1])

        assert visits([1, 5], 4096) == visits([1, 5], 64) == 1
        assert visits([17, 3], 4096) == 2
        assert visits([100, 300], 4096) == visits([100, 300], 1024) == 19  # ceil(300 / 16)
        assert visits([0, 0], 4096) == 0

    def test_bad_parts(self):
        q, k, v, masking = decode_inputs(1, 6, 3)
        with self.assertRaisesRegex(ValueError, "as many parts"):
            decode_attention((q, q), k, v, **masking)
        with self.assertRaisesRegex(ValueError, "with a head axis .* or both without one"):
            decode_attention(q, k[:, :, 0], v, **masking)


def test_a_decode_step_updates_the_donated_cache_in_place():
    # The compiled step aliases the cache it is given to the cache it returns, and its
    # temporaries grow with the capacity by the per-slot positions and validity (an int32
    # and a bool per slot and layer, 4% of this cache's 128 bytes per slot), never by a
    # copy of the buffer (which would be 100%).
    model = TransformerLM(TransformerConfig(width=32, layers=2, heads=4, kv_heads=2, head_dim=8, mlp_hidden=48,
                                            max_length=8192), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    step = jax.jit(make_decode_step(graphdef), donate_argnums=2)
    temporaries = {}
    for capacity in (256, 8192):
        cache = model.init_cache(1, max_length=capacity)
        compiled = step.lower(params, jnp.zeros((1,), jnp.int32), cache).compile()
        assert "input_output_alias" in compiled.as_text()
        temporaries[capacity] = compiled.memory_analysis().temp_size_in_bytes
    cache_bytes = sum(leaf.nbytes for layer in model.init_cache(1, max_length=8192) for leaf in layer[:2])
    assert temporaries[8192] - temporaries[256] < 0.1 * cache_bytes, (temporaries, cache_bytes)


def test_a_sliding_window_decode_step_writes_its_ring_buffer_in_place():
    # The compiled step of a sliding-window model (window 4096, one token per call): every cache
    # buffer it returns aliases the one it was given, and no temporary is as large as one
    # window buffer (the cache of release 0.2.0 concatenated W + T slots every step).
    model = TransformerLM(TransformerConfig(width=32, layers=2, heads=4, kv_heads=2, head_dim=8, mlp_hidden=48,
                                            max_length=8192, window=4096), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    cache = model.init_cache(1, max_length=8192, chunk=1)
    assert cache[0].k.shape == (1, 4096, 2, 8)  # exactly the window
    compiled = jax.jit(make_decode_step(graphdef), donate_argnums=2).lower(params, jnp.zeros((1,), jnp.int32), cache).compile()
    aliases = compiled.as_text().split("input_output_alias={")[1].split("}, entry")[0]
    assert aliases.count("alias") == len(jax.tree.leaves(cache)), aliases  # k, v, positions, lengths of each layer
    assert compiled.memory_analysis().temp_size_in_bytes < cache[0].k.nbytes
