"""Models served by the Pallas kernels on a CPU (interpret mode): the same logits and the same
greedy tokens as through the XLA kernels."""

from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxattn.functional.kernels import ByPlatform
from jaxattn.lm.generate import Sampling, generate
from jaxattn.lm.hf import load_hf_model
from jaxattn.nn import TransformerConfig, TransformerLM

FIXTURES = Path(__file__).parent.parent / "data" / "hf"


def test_a_checkpoint_through_the_pallas_kernels_gives_the_xla_logits():
    # Gemma 2: soft-capped logits (cap 2), local layers with a window of 4, GQA 4 / 2, head width 8
    model, tokenizer = load_hf_model(FIXTURES / "gemma2")
    assert model.config.attention_softcap and model.config.window
    tokens = jnp.asarray([tokenizer.encode("The next day is bright and the sea is calm")], jnp.int32)
    expected = model(tokens)
    assert model.blocks[0].attn.kernels.full == ByPlatform("cpu", "full")  # "auto" on a CPU: the XLA kernels
    model.use_kernels("pallas")
    assert model.config.attention_kernel == "pallas"
    chex.assert_trees_all_close(model(tokens), expected, rtol=1e-5, atol=1e-5)


def test_a_model_decodes_the_same_tokens_through_the_pallas_decode_kernel():
    # head width 16 (the Pallas decode kernel reads the cache as it is), a window, a soft-cap, GQA
    config = TransformerConfig(vocab_size=64, width=32, layers=1, heads=4, kv_heads=2, head_dim=16, mlp_hidden=48,
                               max_length=48, window=6, attention_softcap=5.0)
    model = TransformerLM(config, rngs=nnx.Rngs(3))
    prompts = [np.arange(1, 9, dtype=np.int32), np.arange(20, 25, dtype=np.int32)]
    expected = generate(model, prompts, max_new_tokens=4, sampling=Sampling(temperature=0.0))
    model.use_kernels("pallas")
    got = generate(model, prompts, max_new_tokens=4, sampling=Sampling(temperature=0.0))
    assert [list(row) for row in got] == [list(row) for row in expected]
    jax.clear_caches()
