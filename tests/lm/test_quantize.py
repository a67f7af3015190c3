"""Weights in fewer bytes: packed products against NumPy, int8 rounding within half a step, and
converted models that decode as the float32 model whose weights are the dequantized ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxattn.functional import Int8Tokens
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


CACHE_MODELS = {  # untied, so that a wrong cache read cannot hide behind "repeat the last token"
    "local/global GQA": (dict(kv_heads=2, head_dim=16, layer_types=("local", "global"), window=6), 2e-2),
    "MLA": (dict(attention="mla", latent_dim=16, rope_dim=4, head_dim=16), 5e-2),
}


@pytest.mark.parametrize("kind", sorted(CACHE_MODELS))
def test_an_int8_cache_decodes_near_the_float32_cache(kind):
    """Teacher-forced: a ragged prompt, then 12 steps of one token, through an int8 cache and a
    float32 one; logits in units of their spread over the vocabulary differ by <= 2e-2 (GQA).
    MLA's bound is 5e-2: one scale for a token's whole latent, which is both its key and its value,
    moved the logits of this tiny random MLA by 1.9-4.5% of their spread over four seeds (GQA's:
    0.7-1.2%); ``benchmarks/quantized.py`` measures trained and loaded models. Greedy generation
    with each cache gives the same 30 tokens."""
    config = TransformerConfig(vocab_size=64, width=32, layers=2, heads=4, mlp_hidden=48, max_length=64,
                               tied_embeddings=False, **CACHE_MODELS[kind][0])
    model = TransformerLM(config, rngs=nnx.Rngs(4))
    graphdef, params = nnx.split(model)
    call = jax.jit(lambda params, tokens, cache, num_new: nnx.merge(graphdef, params)(
        tokens, cache=cache, num_new=num_new, logits_at=(num_new - 1)[:, None]))  # [B, 1, V] at each row's last token
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 32)), jnp.int32)
    num_new = jnp.array([20, 13])
    runs = {}
    for dtype in (None, "int8"):
        logits, cache = call(params, tokens[:, :20], model.init_cache(2, 40, dtype=dtype), num_new)
        steps = [logits[:, 0]]
        for i in range(12):  # each row's next token of the random sequence
            token = jnp.take_along_axis(tokens, (num_new + i)[:, None], axis=1)  # [2, 1]
            logits, cache = call(params, token, cache, jnp.ones(2, jnp.int32))
            steps.append(logits[:, 0])
        runs[dtype] = np.stack([np.asarray(s) for s in steps])  # [13, 2, V]
    assert isinstance(cache[1].k if kind != "MLA" else cache[1].c_kv, Int8Tokens)
    unit = runs[None].std(axis=-1, keepdims=True)  # the logits' spread, per row and step
    error = np.abs(runs["int8"] - runs[None]) / unit
    assert error.max() <= CACHE_MODELS[kind][1], error.max()
    assert error.max() > 0  # the int8 cache is not the float one under another name
    prompts = [np.arange(1, 12), np.arange(5, 9)]
    np.testing.assert_array_equal(np.asarray(generate(model, prompts, max_new_tokens=30, cache_dtype="int8")),
                                  np.asarray(generate(model, prompts, max_new_tokens=30)))


def test_an_int8_cache_refuses_what_would_dequantize_it_whole(tiny):
    from jaxattn.functional import mla_decompressed

    tokens = jnp.ones((1, 3), jnp.int32)
    with pytest.raises(ValueError, match="reads a float cache as it is; this cache is int8"):
        tiny(tokens, cache=tiny.init_cache(1, 8, dtype="int8"), record_weights=True)
    mla = TransformerLM(TransformerConfig(vocab_size=64, width=32, layers=1, heads=2, head_dim=8, mlp_hidden=48,
                                          max_length=16, attention="mla", latent_dim=8, rope_dim=4), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="a paged or int8 latent cache is read by mla_absorbed"):
        mla_decompressed(mla.blocks[0].attn.params(), jnp.ones((1, 1, 32)), mla.init_cache(1, 4, dtype="int8")[0])
    with pytest.raises(ValueError, match="int8"):
        tiny.init_cache(1, 8, dtype="int4")
    with pytest.raises(ValueError, match="needs use_cache=True"):
        generate(tiny, [np.arange(1, 4)], max_new_tokens=2, use_cache=False, cache_dtype="int8")
