"""Looking inside a model: captured weights are the model's, the ordinary pass is untouched,
the head roles measure what they say, and `jaxattn inspect` prints and draws them."""

from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn.cli import main
from flax import nnx
from jaxattn.lm.hf import load_hf_model
from jaxattn.functional import attention_weights
from jaxattn.lm.inspection import (
    capture_attention,
    describe_heads,
    head_roles,
    induction_scores,
    induction_test,
    induction_tokens,
    top_next_tokens,
)
from jaxattn.nn import TransformerConfig, TransformerLM

GPT2 = Path(__file__).parent.parent / "data" / "hf" / "gpt2"


def test_captured_weights_belong_to_the_forward_pass_and_leave_it_unchanged():
    model, tokenizer = load_hf_model(GPT2)
    tokens = tokenizer.encode("The next day is bright")[None]
    plain = jax.jit(model)(tokens)
    logits, weights = capture_attention(model, tokens)
    L, H, T = model.config.layers, model.config.heads, tokens.shape[1]
    chex.assert_shape(weights, (L, 1, H, T, T))
    weights = weights[:, 0]
    chex.assert_trees_all_close(logits, plain, atol=1e-5, rtol=0)
    chex.assert_trees_all_close(weights.sum(-1), np.ones((L, H, T)), atol=1e-5)
    np.testing.assert_array_equal(np.triu(np.asarray(weights), 1), 0.0)  # causal
    chex.assert_trees_all_close(jax.jit(model)(tokens), plain, atol=0, rtol=0)  # the model is left as it was
    # Layer 0's weights from its own queries and keys, recomputed by hand (float64).
    x = np.asarray(model.embed(jnp.asarray(tokens)) + model.position_embed(jnp.arange(T)), np.float64)
    h = np.asarray(model.blocks[0].attn_norm(jnp.asarray(x, jnp.float32)), np.float64)
    params = model.blocks[0].attn.params()
    q = np.einsum("btc,chd->bthd", h, np.asarray(params.w_q)) + np.asarray(params.b_q)
    k = np.einsum("btc,ckd->btkd", h, np.asarray(params.w_k)) + np.asarray(params.b_k)
    scores = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)
    expected = np.exp(scores - scores.max(-1, keepdims=True))
    np.testing.assert_allclose(weights[0], (expected / expected.sum(-1, keepdims=True))[0], atol=1e-5)


@pytest.mark.parametrize("attention", ["standard", "mla"])
def test_recording_a_ragged_batch_gives_the_plain_logits_and_each_rows_weights(attention):
    extra = dict(attention="mla", latent_dim=10, rope_dim=4, query_latent_dim=8) if attention == "mla" else dict(kv_heads=2)
    model = TransformerLM(TransformerConfig(vocab_size=61, width=24, layers=2, heads=4, head_dim=6, mlp_hidden=40,
                                            max_length=32, **extra), rngs=nnx.Rngs(3))
    lengths = [9, 4, 6]  # three ragged rows, right-padded with zeros
    rows = [np.random.default_rng(row).integers(1, 61, n) for row, n in enumerate(lengths)]
    tokens = np.zeros((3, 9), np.int32)
    for row, values in enumerate(rows):
        tokens[row, : len(values)] = values
    logits, weights = capture_attention(model, tokens)  # [B, T, V], [L, B, H, T, T]
    chex.assert_shape(weights, (2, 3, 4, 9, 9))
    plain = jax.jit(model)(jnp.asarray(tokens))
    for row, n in enumerate(lengths):
        chex.assert_trees_all_close(logits[row, :n], plain[row, :n], atol=1e-5, rtol=1e-5)
        alone_logits, alone = capture_attention(model, rows[row][None])  # the row on its own: the same weights
        chex.assert_trees_all_close(weights[:, row, :, :n, :n], alone[:, 0], atol=1e-5, rtol=1e-5)
        chex.assert_trees_all_close(alone_logits[0], plain[row, :n], atol=1e-5, rtol=1e-5)


def test_head_roles_measure_first_previous_and_self():
    T = 6
    sink = np.zeros((T, T))
    sink[:, 0] = 1.0
    previous = np.eye(T, k=-1)
    previous[0, 0] = 1.0
    itself = np.eye(T)
    roles = head_roles(np.stack([np.stack([sink, previous, itself])]))  # [L=1, H=3, T, T]
    np.testing.assert_allclose(roles.first, [[1, 0, 0]])
    np.testing.assert_allclose(roles.previous, [[0, 1, 0]])
    np.testing.assert_allclose(roles.itself, [[0, 0, 1]])
    text = "\n".join(describe_heads(roles, strongest=1))
    assert "attention sink" in text and "layer 0 head 0 (100%)" in text and "layer 0 head 1 (100%)" in text
    with pytest.raises(ValueError, match="at least 3 tokens"):
        head_roles(np.ones((1, 1, 2, 2)))


def test_top_next_tokens_are_the_softmax_of_the_last_logits():
    logits = jnp.log(jnp.array([[[0.5, 0.2, 0.3], [0.1, 0.6, 0.3]]]))

    class Labels:
        def label(self, token):
            return "abc"[token]

    assert [(label, token) for label, token, _ in top_next_tokens(logits, Labels(), 2)] == [("b", 1), ("c", 2)]
    np.testing.assert_allclose([p for *_, p in top_next_tokens(logits, Labels(), 3)], [0.6, 0.3, 0.1], atol=1e-6)


def test_cli_inspect_prints_probabilities_and_roles_and_draws_the_grid(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["inspect", str(GPT2), "The next day is bright", "--out", str(out), "--top-k", "3"]) == 0
    printed = capsys.readouterr().out
    assert "Most likely next tokens" in printed and printed.count("%") > 3 * 2
    assert "Strongest attention sink" in printed and "Strongest previous-token heads" in printed
    assert out.stat().st_size > 20_000
    assert main(["inspect", str(GPT2), "The next day is bright", "--out", str(tmp_path / "one.png"),
                 "--layer", "1", "--head", "3"]) == 0
    assert (tmp_path / "one.png").stat().st_size > 5_000
    assert main(["inspect", str(GPT2), "The next day", "--layer", "7"]) == 2
    assert "layer 7 does not exist: the model has 2 layers" in capsys.readouterr().err


def test_cli_generate_decodes_a_real_model_with_its_tokenizer(capsys):
    assert main(["generate", "--model", str(GPT2), "--prompt", "The sky", "--max-new-tokens", "6",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("The sky")


# ------------------------------------------------------------------ induction heads


def hand_built_induction_model(tokens, *, vocab: int, random_weights=None):
    """A 2-layer, 2-head attention-only model whose layer 1 head 0 is an induction head by
    construction: weights [L=2, B, H=2, T, T] from jaxattn's own one-head kernel.

    The residual stream is [token one-hot | position one-hot | previous token]. Layer 0 head 0
    attends from position i to i - 1 and writes that token into the "previous token" part;
    layer 1 head 0 matches its own token against the previous-token part of every key, so it
    attends to the token after the current token's earlier occurrence. The other two heads
    look at themselves and at the previous position. ``random_weights``: a seed for random
    projections of the same shapes instead (an untrained model)."""
    B, T = tokens.shape
    beta = 20.0
    token_part, position_part = np.eye(vocab)[tokens], np.broadcast_to(np.eye(T), (B, T, T))  # [B, T, V], [B, T, T]
    shift = np.eye(T, k=-1)  # position j -> j + 1
    rng = np.random.default_rng(random_weights)

    def head_weights(q, k):
        if random_weights is not None:  # random projections of the stream instead
            stream = np.concatenate([token_part, position_part, previous], -1)
            w_q, w_k = rng.standard_normal((2, stream.shape[-1], 8)) / np.sqrt(stream.shape[-1])
            q, k = stream @ w_q, stream @ w_k
        return np.stack([np.asarray(attention_weights(jnp.asarray(q[b], jnp.float32), jnp.asarray(k[b], jnp.float32),
                                                      scale=1.0, mask=jnp.tril(jnp.ones((T, T), bool))))
                         for b in range(B)])  # [B, T, T]

    previous = np.zeros_like(token_part)
    layer0 = [head_weights(beta * position_part, position_part @ shift.T), head_weights(beta * position_part, position_part)]
    previous = layer0[0] @ token_part  # what head 0 of layer 0 wrote: the previous token
    layer1 = [head_weights(beta * token_part, previous), head_weights(beta * position_part, position_part @ shift.T)]
    return np.stack([np.stack(layer0, 1), np.stack(layer1, 1)])  # [L, B, H, T, T]


def test_the_induction_score_finds_the_planted_head_and_not_random_ones():
    tokens = induction_tokens(np.arange(1, 12), length=8, batch=3, prefix=[0], seed=4)  # [3, 1 + 16]
    assert tokens.shape == (3, 17) and np.array_equal(tokens[:, 1:9], tokens[:, 9:])
    weights = hand_built_induction_model(tokens, vocab=12)
    scores = induction_scores(weights, start=1, length=8)
    assert np.unravel_index(np.argmax(scores), scores.shape) == (1, 0) and scores[1, 0] > 0.99
    assert np.all(np.delete(scores.ravel(), 2) < 0.2)  # the other heads: self, previous token
    untrained = induction_scores(hand_built_induction_model(tokens, vocab=12, random_weights=3), start=1, length=8)
    assert untrained.max() < 0.3 and untrained.max() < scores[1, 0] / 3
    # The score against a loop over the definition: token j's second occurrence -> the token after its first.
    loop = np.zeros((2, 2))
    for layer in range(2):
        for head in range(2):
            loop[layer, head] = np.mean([weights[layer, b, head, 1 + 8 + j, 1 + j + 1] for b in range(3) for j in range(8)])
    np.testing.assert_allclose(scores, loop, rtol=1e-12)


def test_the_induction_test_on_a_model_and_its_errors():
    model = TransformerLM(TransformerConfig(vocab_size=61, width=24, layers=2, heads=4, head_dim=6, mlp_hidden=40,
                                            max_length=32), rngs=nnx.Rngs(3))

    class Labels:
        vocab_size = 61
        special_ids = (0,)

        def encode(self, text):
            return np.array([0], np.int32)  # a BOS

    tokens, weights, scores = induction_test(model, Labels(), batch=2)
    assert tokens.shape == (2, 1 + 2 * 15) and tokens[:, 0].tolist() == [0, 0] and 0 not in tokens[:, 1:]
    np.testing.assert_allclose(scores, induction_scores(weights, start=1, length=15))
    assert scores.max() < 0.3  # random weights: no induction head
    with pytest.raises(ValueError, match="exceed the model's context of 32"):
        induction_test(model, Labels(), length=16)
    with pytest.raises(ValueError, match="at least 2 random tokens"):
        induction_tokens(np.arange(5), length=1)
    with pytest.raises(ValueError, match=r"must be \[L, B, H, T, T\]"):
        induction_scores(np.ones((2, 3, 4, 4)), start=0, length=2)
