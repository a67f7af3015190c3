import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from jaxattn.functional import rope, sinusoidal_positions
from jaxattn.functional.positions import RopeScaling
from tests.reference import reference_rope


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


# ------------------------------------------------ partial rotary and RoPE scaling
#
# Each scaling's frequencies written out from its paper or model card, in float64, as loops
# over the R / 2 frequencies; rope() must rotate by exactly these.

R_TEST, THETA = 16, 10000.0


def base_frequencies(R=R_TEST, theta=THETA):
    return [theta ** (-2 * i / R) for i in range(R // 2)]


def llama3_frequencies(factor, low, high, old_context):
    """The Llama 3.1 model card's apply_scaling, as a loop."""
    out = []
    for freq in base_frequencies():
        wavelength = 2 * np.pi / freq
        if wavelength < old_context / high:
            out.append(freq)
        elif wavelength > old_context / low:
            out.append(freq / factor)
        else:
            smooth = (old_context / wavelength - low) / (high - low)
            out.append((1 - smooth) * freq / factor + smooth * freq)
    return out


def yarn_frequencies(factor, original, beta_fast=32, beta_slow=1):
    """YaRN (Peng et al. 2023), section 3.2 and its reference code: the dimensions whose frequency
    turns more than beta_fast times over the original context keep it, fewer than beta_slow are
    interpolated by the factor, a linear ramp between (bounds rounded outward to whole dimensions)."""
    def dimension(rotations):
        return R_TEST * np.log(original / (rotations * 2 * np.pi)) / (2 * np.log(THETA))

    low, high = max(np.floor(dimension(beta_fast)), 0), min(np.ceil(dimension(beta_slow)), R_TEST - 1)
    out = []
    for i, freq in enumerate(base_frequencies()):
        gamma = min(max((i - low) / (high - low), 0), 1)  # 0: extrapolate (keep), 1: interpolate
        out.append((1 - gamma) * freq + gamma * freq / factor)
    return out, 0.1 * np.log(factor) + 1  # and sqrt(1/t), the factor of cos and sin


class RopeScalingTest(chex.TestCase):
    def rotate(self, positions, **kwargs):
        x = jnp.asarray(np.random.default_rng(5).standard_normal((len(positions), R_TEST)), jnp.float32)
        return x, jax.jit(lambda x, p: rope(x, p, theta=THETA, **kwargs))(x, jnp.asarray(positions))

    def check(self, positions, frequencies, factor=1.0, **kwargs):
        x, out = self.rotate(positions, **kwargs)
        expected = reference_rope(x, np.asarray(positions), "half", inv_freq=frequencies, factor=factor)
        chex.assert_trees_all_close(out, expected, rtol=2e-4, atol=2e-4)

    def test_partial_rotary_rotates_the_first_part_only(self):
        x = jnp.asarray(np.random.default_rng(6).standard_normal((5, 16)), jnp.float32)
        positions = np.array([0, 3, 9, 40, 7])
        for kwargs, R in ((dict(rotary_fraction=0.25), 4), (dict(rotary_dim=12), 12)):
            for style in ("half", "interleaved"):
                out = rope(x, jnp.asarray(positions), style=style, **kwargs)
                expected = reference_rope(x, positions, style, rotary_dim=R)
                chex.assert_trees_all_close(out, expected, rtol=1e-4, atol=1e-4)
                np.testing.assert_array_equal(out[:, R:], x[:, R:])
        # An odd width R turns 2 * ceil(R / 2) dimensions at theta^(-2i/R), as transformers does
        # (GPT-NeoX with head width 12 and a quarter rotary: R = 3 turns 4).
        for style in ("half", "interleaved"):
            out = rope(x, jnp.asarray(positions), style=style, rotary_dim=5)
            expected = reference_rope(x, positions, style, rotary_dim=6, inv_freq=10000.0 ** (-np.arange(0, 5, 2) / 5))
            chex.assert_trees_all_close(out, expected, rtol=1e-4, atol=1e-4)
            np.testing.assert_array_equal(out[:, 6:], x[:, 6:])
        with self.assertRaisesRegex(ValueError, r"a rotary width of 17 turns 18 dimensions, which must be in \[2, D=16\]"):
            rope(x, jnp.arange(5), rotary_dim=17)
        with self.assertRaisesRegex(ValueError, "yarn RoPE scaling sizes its ramp or factors by R // 2 = 2"):
            rope(x, jnp.arange(5), rotary_dim=5, scaling=RopeScaling("yarn", factor=2.0, original_max_length=16))

    def test_linear(self):
        self.check([0, 1, 7, 100, 5000], [f / 4 for f in base_frequencies()], scaling=RopeScaling("linear", factor=4.0))

    def test_dynamic_ntk_grows_the_base_past_the_trained_length(self):
        scaling = RopeScaling("dynamic", factor=2.0, max_length=64)
        self.check([0, 5, 63], base_frequencies(), scaling=scaling)  # L = 64: the base is untouched
        L = 201  # the call's largest position + 1
        grown = THETA * (2.0 * L / 64 - 1) ** (R_TEST / (R_TEST - 2))
        self.check([0, 17, 200], base_frequencies(theta=grown), scaling=scaling)

    def test_llama3(self):
        scaling = RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_length=64)
        expected = llama3_frequencies(8.0, 1.0, 4.0, 64)
        assert expected[0] == base_frequencies()[0] and expected[-1] == base_frequencies()[-1] / 8  # both ends
        assert any(f / 8 < e < f for f, e in zip(base_frequencies(), expected))  # and a blended middle
        self.check([0, 1, 7, 100, 5000], expected, scaling=scaling)

    def test_yarn_and_its_attention_factor(self):
        expected, factor = yarn_frequencies(4.0, 64)
        self.check([0, 1, 7, 100, 5000], expected, factor, scaling=RopeScaling("yarn", factor=4.0, original_max_length=64))
        # DeepSeek's form: mscale and mscale_all_dim equal -> cos and sin untouched (the scale takes it, see MLA).
        self.check([3, 90], expected, 1.0, scaling=RopeScaling("yarn", factor=4.0, original_max_length=64, mscale=1.0,
                                                              mscale_all_dim=1.0))

    def test_longrope_switches_factors_past_the_original_length(self):
        short, long = tuple(1.0 + 0.1 * i for i in range(8)), tuple(2.0 + 0.5 * i for i in range(8))
        scaling = RopeScaling("longrope", short_factor=short, long_factor=long, original_max_length=64, max_length=256)
        factor = np.sqrt(1 + np.log(256 / 64) / np.log(64))
        self.check([0, 9, 63], [f / s for f, s in zip(base_frequencies(), short)], factor, scaling=scaling)
        self.check([0, 9, 64], [f / s for f, s in zip(base_frequencies(), long)], factor, scaling=scaling)

    def test_bad_scalings(self):
        with self.assertRaisesRegex(ValueError, "rope scaling must be one of"):
            RopeScaling("ntk")
        with self.assertRaisesRegex(ValueError, "'llama3' needs original_max_length"):
            RopeScaling("llama3", factor=8.0)
        with self.assertRaisesRegex(ValueError, "longrope's short_factor has 3 numbers; R=16 needs R/2=8"):
            rope(jnp.ones((2, 16)), jnp.arange(2), scaling=RopeScaling("longrope", original_max_length=4,
                                                                       short_factor=(1, 1, 1), long_factor=(1, 1, 1)))
