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
from jaxattn.lm.inspection import capture_attention, describe_heads, head_roles, top_next_tokens
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
