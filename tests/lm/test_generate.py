"""Generation: cached equals uncached, sampling is seeded, top-k and top-p keep exactly what they say."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxattn.lm.generate import Sampling, generate, sample_token
from jaxattn.lm.tokenizer import encode
from jaxattn.nn import TransformerConfig, TransformerLM


@pytest.fixture(scope="module")
def small_model():
    return TransformerLM(
        TransformerConfig(vocab_size=256, width=24, layers=2, heads=4, kv_heads=2, head_dim=6, mlp_hidden=40, max_length=48),
        rngs=nnx.Rngs(0),
    )


def test_cached_and_uncached_greedy_generation_agree(small_model):
    prompts = [encode("hello"), encode("hi")]
    cached = generate(small_model, prompts, max_new_tokens=12)
    uncached = generate(small_model, prompts, max_new_tokens=12, use_cache=False)
    np.testing.assert_array_equal(cached, uncached)
    # Greedy means each token is the argmax of the full forward pass over what came before.
    sequence = jnp.concatenate([jnp.asarray(prompts[1]), cached[1]])
    logits = small_model(sequence[None, :-1])[0]
    np.testing.assert_array_equal(jnp.argmax(logits[len(prompts[1]) - 1 :], -1), cached[1])


def test_sampling_is_seeded_and_top_k_one_is_greedy(small_model):
    prompts = [encode("abc")]
    sampled = Sampling(temperature=1.0, top_k=20, top_p=0.9)
    a = generate(small_model, prompts, max_new_tokens=10, sampling=sampled, seed=3)
    b = generate(small_model, prompts, max_new_tokens=10, sampling=sampled, seed=3)
    np.testing.assert_array_equal(a, b)
    greedy = generate(small_model, prompts, max_new_tokens=10)
    np.testing.assert_array_equal(generate(small_model, prompts, max_new_tokens=10, sampling=Sampling(1.0, top_k=1)), greedy)


def draws(logits, sampling, n=600):
    keys = jax.random.split(jax.random.key(0), n)
    return np.asarray(jax.vmap(lambda key: sample_token(jnp.asarray(logits), key, sampling))(keys))


def test_temperature_divides_the_logits():
    logits = jnp.log(jnp.array([[1.0, 3.0]]))  # probabilities 1/4, 3/4
    for temperature, expected in ((1.0, 0.75), (2.0, 1 / (1 + 3**-0.5)), (0.5, 0.9)):
        drawn = draws(logits, Sampling(temperature=temperature), n=800)
        assert abs(float((drawn == 1).mean()) - expected) < 0.05, temperature


def test_top_p_keeps_the_smallest_set_reaching_p():
    drawn = draws(jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]])), Sampling(1.0, top_p=0.75))
    assert set(np.unique(drawn).tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.75
    assert 0.55 < float((drawn == 0).mean()) < 0.70  # 0.5 / 0.8 = 0.625


def test_top_p_boundary_is_exact_on_ties():
    # Four equal logits: probabilities exactly 1/4, cumulative sums exactly 1/4, 1/2, 3/4.
    # With p = 1/2 the first two reach p, so exactly two tokens may be drawn (a third
    # would mean the boundary moved from "before < p" to "before <= p").
    drawn = draws(jnp.zeros((1, 4)), Sampling(1.0, top_p=0.5))
    assert set(np.unique(drawn).tolist()) == {0, 1}  # ties ranked by token id
    assert 0.4 < float((drawn == 0).mean()) < 0.6


def test_top_k_keeps_k_tokens_and_their_ties():
    drawn = draws(jnp.array([[2.0, 1.0, 3.0, 0.5, 1.0]]), Sampling(1.0, top_k=2))
    assert set(np.unique(drawn).tolist()) == {0, 2}
    drawn = draws(jnp.array([[2.0, 1.0, 3.0, 0.5, 1.0]]), Sampling(1.0, top_k=3))
    assert set(np.unique(drawn).tolist()) == {0, 1, 2, 4}  # tokens 1 and 4 tie for third place


def test_prompt_longer_than_context_is_a_clear_error(small_model):
    with pytest.raises(ValueError, match="a prompt of 40 tokens plus 10 new tokens exceeds the model's context length max_length=48"):
        generate(small_model, [np.zeros(40, np.int32)], max_new_tokens=10)
    with pytest.raises(ValueError, match="at least one token"):
        generate(small_model, [np.zeros(0, np.int32)], max_new_tokens=1)
    with pytest.raises(ValueError, match="temperature must be a number >= 0, got -1.0"):
        Sampling(temperature=-1.0)


def test_a_larger_cache_changes_nothing(small_model):
    prompts = [encode("hello"), encode("hi")]
    np.testing.assert_array_equal(generate(small_model, prompts, max_new_tokens=8, cache_length=40),
                                  generate(small_model, prompts, max_new_tokens=8))
    with pytest.raises(ValueError, match="cache_length=10 cannot hold a prompt of 5 plus 8 new tokens"):
        generate(small_model, prompts, max_new_tokens=8, cache_length=10)
