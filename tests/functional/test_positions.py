import chex
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from jaxattn.functional import rope, sinusoidal_positions
from tests.conftest import reference_rope


def test_sinusoidal_matches_the_formula():
    T, C = 7, 10
    table = sinusoidal_positions(T, C)
    t = np.arange(T)[:, None]
    i = np.arange(C // 2)[None, :]
    angle = t / 10000 ** (2 * i / C)
    expected = np.zeros((T, C))
    expected[:, 0::2], expected[:, 1::2] = np.sin(angle), np.cos(angle)
    chex.assert_trees_all_close(table, expected, rtol=1e-5, atol=1e-5)
    chex.assert_shape(sinusoidal_positions(4, 9), (4, 9))


class RopeTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("half", "half"), ("interleaved", "interleaved"))
    def test_matches_explicit_rotation_and_preserves_norm(self, style):
        x = jnp.asarray(np.random.default_rng(0).standard_normal((9, 12)), jnp.float32)
        positions = jnp.array([0, 1, 2, 5, 17, 100, 3, 4, 2047])
        out = self.variant(lambda x, p: rope(x, p, style=style))(x, positions)
        chex.assert_trees_all_close(out, reference_rope(x, np.asarray(positions), style), rtol=1e-4, atol=1e-4)
        chex.assert_trees_all_close(jnp.linalg.norm(out, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("half", "half"), ("interleaved", "interleaved"))
    def test_score_depends_only_on_relative_position(self, style):
        q, k = jnp.asarray(np.random.default_rng(1).standard_normal((2, 16)), jnp.float32)
        fn = self.variant(lambda x, p: rope(x, p, style=style))

        def score(m, n):
            return float(fn(q[None], jnp.array([m]))[0] @ fn(k[None], jnp.array([n]))[0])

        for offset in (0, 3, -5):
            scores = [score(m, m - offset) for m in (offset if offset > 0 else 0, 11, 40, 300)]
            np.testing.assert_allclose(scores, scores[0], rtol=1e-4, atol=1e-4)
        self.assertNotAlmostEqual(score(5, 2), score(5, 4), places=3)

    def test_styles_agree_after_permuting_the_head_dimension(self):
        x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 5, 3, 8)), jnp.float32)  # [B, T, H, D]
        positions = jnp.arange(5)[None]  # [1, T]
        to_half = np.concatenate([np.arange(0, 8, 2), np.arange(1, 8, 2)])  # (2i, 2i+1) -> (i, i + D/2)
        interleaved = rope(x, positions, style="interleaved")
        half = rope(x[..., to_half], positions, style="half")
        chex.assert_trees_all_close(interleaved[..., to_half], half, rtol=1e-6, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_positions_index_the_token_axes(self):
        x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 5, 3, 8)), jnp.float32)  # [B, T, H, D]
        positions = jnp.array([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]])  # [B, T]
        fn = self.variant(lambda x, p: rope(x, p))
        expected = np.stack([
            np.stack([reference_rope(x[b, :, h], np.asarray(positions[b]), "half") for h in range(3)], axis=1)
            for b in range(2)
        ])
        chex.assert_trees_all_close(fn(x, positions), expected, rtol=1e-4, atol=1e-4)  # [B, T]
        with self.assertRaisesRegex(ValueError, r"positions must be \[T=5\] or \[B=2, T=5\], got \(2, 5, 1\)"):
            rope(x, positions[..., None])  # one form for positions everywhere: [B, T] or [T]
        shared = fn(x, jnp.arange(5))  # [T], shared by the batch
        chex.assert_trees_all_close(shared[0], expected[0], rtol=1e-4, atol=1e-4)
        latent = x[:, :, 0]  # [B, S, R], e.g. MLA's shared RoPE key
        chex.assert_trees_all_close(fn(latent, positions), expected[:, :, 0], rtol=1e-4, atol=1e-4)

    def test_bf16_keeps_dtype(self):
        x = jnp.asarray(np.random.default_rng(3).standard_normal((4, 8)), jnp.bfloat16)
        out = rope(x, jnp.arange(4))
        self.assertEqual(out.dtype, jnp.bfloat16)
        chex.assert_trees_all_close(out.astype(jnp.float32), rope(x.astype(jnp.float32), jnp.arange(4)), atol=2e-2)

    def test_bad_input(self):
        with self.assertRaisesRegex(ValueError, r"even last axis.*\(3, 5\)"):
            rope(jnp.ones((3, 5)), jnp.arange(3))
        with self.assertRaisesRegex(ValueError, "style must be one of"):
            rope(jnp.ones((3, 4)), jnp.arange(3), style="neox")
        with self.assertRaisesRegex(ValueError, r"positions must be \[T=3\] or \[B=2, T=3\], got \(4,\)"):
            rope(jnp.ones((2, 3, 4)), jnp.arange(4))
        with self.assertRaisesRegex(ValueError, r"positions must be \[T=3\] or \[B=2, T=3\], got \(2, 4\)"):
            rope(jnp.ones((2, 3, 5, 4)), jnp.ones((2, 4), jnp.int32))
        with self.assertRaisesRegex(TypeError, "positions must be integers"):
            rope(jnp.ones((3, 4)), jnp.ones(3))
