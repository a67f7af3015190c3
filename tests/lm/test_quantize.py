"""Weights in fewer bytes: packed products against NumPy, int8 rounding within half a step, and
converted models that decode as the float32 model whose weights are the dequantized ones."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxattn.functional.packed import dense_weight, pack_weight, packed_matmul
from jaxattn.lm.generate import generate
from jaxattn.lm.quantize import convert_weights, weight_bytes
from jaxattn.nn import TransformerConfig, TransformerLM
from jaxattn.nn.transformer import tied_logits


@pytest.mark.parametrize("weights", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("shape, contracted", [((12, 3, 4), 1), ((3, 4, 12), 2)])
def test_packed_products_equal_numpy_on_the_stored_weight(weights, shape, contracted):
    rng = np.random.default_rng(0)
    w = rng.standard_normal(shape).astype(np.float32)
    x = rng.standard_normal((2, 5) + shape[:contracted]).astype(np.float32)
    packed = pack_weight(jnp.asarray(w), contracted, weights)
    assert packed.values.shape == (int(np.prod(shape[contracted:])), int(np.prod(shape[:contracted])))
    stored = np.asarray(dense_weight(packed))  # what the packed weight holds, as [*in, *out]
    axes = list(range(x.ndim - contracted, x.ndim))
    want = np.tensordot(x, stored, axes=(axes, list(range(contracted))))
    np.testing.assert_allclose(np.asarray(packed_matmul(jnp.asarray(x), packed, contracted)), want, rtol=1e-5, atol=1e-5)
    if weights == "int8":  # a scale per output channel; every number within half a step of the weight
        matrix = w.reshape(-1, int(np.prod(shape[contracted:])))  # [K, N]
        step = np.abs(matrix).max(axis=0) / 127
        assert np.all(np.abs(stored.reshape(matrix.shape) - matrix) <= step / 2 + 1e-7)
    if weights == "bfloat16":
        np.testing.assert_allclose(stored, w, rtol=2**-8)


def test_an_all_zero_channel_packs_to_zeros_not_nan():
    w = np.ones((4, 3), np.float32)
    w[:, 1] = 0
    packed = pack_weight(jnp.asarray(w), 1, "int8")
    assert np.all(np.isfinite(np.asarray(dense_weight(packed))))
    np.testing.assert_array_equal(np.asarray(dense_weight(packed)), w)


def test_tied_logits_of_a_decode_step_equal_x_times_the_table():
    rng = np.random.default_rng(1)
    table = rng.standard_normal((50, 8)).astype(np.float32)
    for shape in [(1, 1, 8), (2, 3, 8), (4, 8, 8)]:  # decode-sized, and above 16 tokens
        x = rng.standard_normal(shape).astype(np.float32)
        np.testing.assert_allclose(np.asarray(tied_logits(jnp.asarray(x), jnp.asarray(table))), x @ table.T,
                                   rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def tiny():
    config = TransformerConfig(vocab_size=64, width=32, layers=2, heads=4, kv_heads=2, head_dim=8, mlp_hidden=48,
                               max_length=64, qkv_bias=True)
    return TransformerLM(config, rngs=nnx.Rngs(3))


def dequantized(model, converted):
    """A float32 copy of ``model`` holding the converted model's weights, dequantized."""
    reference = nnx.clone(model)
    nnx.update(reference, nnx.state(converted, nnx.Param))  # PackedWeights, then each made dense
    for path, variable in nnx.to_flat_state(nnx.state(reference, nnx.Param)):
        value = variable.get_value()
        if hasattr(value, "values"):
            table = path[-1] == "embedding"  # stored as the output layer [C, V] it is when tied
            dense = dense_weight(value)
            variable.set_value(dense.T if table else dense)
    return reference


@pytest.mark.parametrize("weights", ["bfloat16", "int8"])
def test_a_converted_model_decodes_as_its_dequantized_float32_twin(tiny, weights):
    converted = convert_weights(tiny, weights)
    assert tiny.embed.embedding.get_value().dtype == jnp.float32  # the original is left as it was
    ratio = weight_bytes(converted) / weight_bytes(tiny)
    assert ratio < {"bfloat16": 0.55, "int8": 0.35}[weights]
    twin = dequantized(tiny, converted)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 12)), jnp.int32)
    np.testing.assert_allclose(np.asarray(converted(tokens)), np.asarray(twin(tokens)), rtol=1e-4, atol=1e-4)
    close = {"bfloat16": 2e-2, "int8": 5e-2}[weights]  # and near the float32 model itself
    full = np.asarray(tiny(tokens))
    assert np.abs(np.asarray(converted(tokens)) - full).max() <= close * np.abs(full).max()
    prompts = [np.arange(1, 9), np.arange(5, 10)]
    np.testing.assert_array_equal(np.asarray(generate(converted, prompts, max_new_tokens=6)),
                                  np.asarray(generate(twin, prompts, max_new_tokens=6)))
    with pytest.raises(ValueError, match="already converted"):
        convert_weights(converted, "int8")
