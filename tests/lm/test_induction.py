"""Watching an induction circuit form: an attention-only model, its data, the measure recorded
while training, head ablation, and the short version of ``jaxattn train --preset induction``."""

import dataclasses
import math

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxattn.cli import main
from jaxattn.lm.checkpoint import RunFolder
from jaxattn.lm.data import PRINTABLE, REPEATED_TOKENS, open_corpus, repeated_stream
from jaxattn.lm.inspection import ablate_heads, induction_measure, repeated_half_loss
from jaxattn.lm.tokenizer import ByteTokenizer
from jaxattn.lm.train import preset
from jaxattn.nn import TransformerConfig, TransformerLM


def test_an_attention_only_model_has_no_mlp_and_adds_only_its_heads():
    config = TransformerConfig(width=16, layers=2, heads=2, head_dim=8, attention_only=True, max_length=16, norm="layer")
    model = TransformerLM(config, rngs=nnx.Rngs(0))
    names = {"/".join(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(model))}
    assert not any("mlp" in name for name in names)
    tokens = jnp.asarray([[3, 1, 4, 1, 5, 9, 2]])
    # Every head zeroed: each block adds nothing, so the logits are the embeddings through the final norm.
    silent = ablate_heads(model, [(layer, head) for layer in range(2) for head in range(2)])
    x = np.asarray(model.embed.embedding.get_value())[np.asarray(tokens)]  # [1, T, C]
    scale, bias = np.asarray(model.final_norm.scale.get_value()), np.asarray(model.final_norm.bias.get_value())
    normed = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + config.norm_epsilon) * scale + bias
    chex.assert_trees_all_close(silent(tokens), normed @ np.asarray(model.embed.embedding.get_value()).T, atol=1e-5)
    assert not np.allclose(model(tokens), silent(tokens), atol=1e-3)  # the original keeps its heads
    with pytest.raises(ValueError, match="no head 2"):
        ablate_heads(model, [(0, 2)])
    with pytest.raises(ValueError, match="attention_only has no MLP"):
        dataclasses.replace(config, parallel_residual=True)


def test_repeated_stream_writes_each_stretch_the_given_number_of_times():
    stream = repeated_stream(2000, lengths=(3, 9), seed=5, copies=3)
    assert stream.dtype == np.int32 and len(stream) == 2000 and set(np.unique(stream)) <= set(PRINTABLE.tolist())
    position, stretches = 0, 0
    while position + 27 <= len(stream):  # walk it: find each stretch's length from where it first repeats
        n = next(n for n in range(3, 10) if np.array_equal(stream[position : position + n], stream[position + n : position + 2 * n])
                 and np.array_equal(stream[position : position + n], stream[position + 2 * n : position + 3 * n]))
        position, stretches = position + 3 * n, stretches + 1
    assert stretches > 50
    corpus = open_corpus(REPEATED_TOKENS)
    assert corpus.name == REPEATED_TOKENS and len(corpus.validation) > 0


def test_repeated_half_loss_against_a_float64_loop():
    rng = np.random.default_rng(0)
    logits, tokens = rng.standard_normal((2, 9, 7)), rng.integers(0, 7, (2, 9))
    start, n = 1, 4
    expected = np.mean([-(logits[b, p - 1, tokens[b, p]] - np.log(np.exp(logits[b, p - 1]).sum()))
                        for b in range(2) for p in range(start + n + 1, start + 2 * n)])
    assert repeated_half_loss(logits, tokens, start=start, length=n) == pytest.approx(expected, rel=1e-12)


def test_the_induction_preset_trains_measures_and_reports(tmp_path, capsys):
    """The short version CI runs (100 steps, 12-14 s in CI with its report, not the preset's 8,000): every evaluation
    records the induction score and the loss on the repeated half, step 0 first; the untrained
    model has no induction head (< 0.1) and does worse than guessing among the 94 bytes; after
    100 steps it guesses among them (the loss falls by more than 0.5 nats), which is all this
    check asks: the phase change comes thousands of steps later, and the tour's test checks the
    shipped full run's circuit (an induction head scoring at least 0.5, under 0.1 once its
    previous-token heads are zeroed)."""
    chosen = preset("induction")
    assert chosen.config.attention_only and chosen.config.layers == 2 and chosen.corpus.name == REPEATED_TOKENS
    out = tmp_path / "run"
    steps = SHORT_STEPS
    assert main(["train", "--preset", "induction", "--out", str(out), "--steps", str(steps), "--eval-every",
                 str(steps // 4), "--checkpoint-every", str(steps)]) == 0
    printed = capsys.readouterr().out
    assert "Loss on the repeated half (nats) by step: 0:" in printed and (out / "induction.png").stat().st_size > 10_000
    assert "Copying head: layer 1" in printed and "It reads layer 0" in printed
    measured = RunFolder(out).history()["measured"]
    assert measured["step"] == [0, steps // 4, steps // 2, 3 * steps // 4, steps]
    assert measured["induction_score"][0] < 0.1
    assert abs(measured["repeated_half_loss"][0] - math.log(94)) < 1.5
    assert measured["repeated_half_loss"][-1] < measured["repeated_half_loss"][0] - SHORT_LOSS_DROP
    model = RunFolder(out).load_model()
    again = induction_measure(ByteTokenizer())(model)  # the recorded numbers are the saved model's
    assert again["induction_score"] == pytest.approx(measured["induction_score"][-1], abs=1e-5)
    with pytest.raises(SystemExit):
        main(["train", "--preset", "nothing", "--out", str(tmp_path / "x")])
    assert main(["train", "--preset", "induction", "--data", "README.md", "--out", str(tmp_path / "y")]) == 2
    assert "takes no --data" in capsys.readouterr().err


SHORT_STEPS = 100
SHORT_LOSS_DROP = 0.5
