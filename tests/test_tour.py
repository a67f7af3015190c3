import numpy as np
import pytest

from jaxattn.lm.checkpoint import RunFolder
from jaxattn.lm.data import Corpus
from jaxattn.lm.tokenizer import encode
from jaxattn.lm.train import TrainConfig, train
from jaxattn.nn import TransformerConfig
from jaxattn.tour import run_tour


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A briefly trained tiny model, so the tour's model steps never train a real one here."""
    tokens = encode("The next day is bright and the sky is clear. " * 30)
    path = tmp_path_factory.mktemp("tour") / "run"
    config = TransformerConfig(width=16, layers=1, heads=2, kv_heads=1, head_dim=8, mlp_hidden=32, max_length=320)
    tc = TrainConfig(steps=3, batch_size=2, seq_len=16, eval_windows=1)
    train(config, tc, Corpus(tokens[:1000], tokens[1000:], "sky"), RunFolder(path), progress=False, say=lambda *_: None)
    return path


def test_tour_numbers_follow_from_its_own_inputs(tmp_path, tiny_run):
    lines = []
    result = run_tour(out=tmp_path, checkpoint=tiny_run, say=lines.append)
    q, k = np.asarray(result["q"], np.float64), np.asarray(result["k"], np.float64)
    logits = q @ k.T / np.sqrt(q.shape[1])
    expected = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(result["weights"], expected / expected.sum(1, keepdims=True), rtol=1e-5)
    causal = np.where(np.tril(np.ones_like(logits, bool)), logits, -np.inf)
    expected = np.exp(causal - causal.max(1, keepdims=True))
    np.testing.assert_allclose(result["causal_weights"], expected / expected.sum(1, keepdims=True), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(result["multi_head"][0], result["one_head_loop"], rtol=1e-5, atol=1e-6)
    assert result["words"] == ["The", "next", "day", "is", "bright"]
    assert (tmp_path / "self_attention.png").stat().st_size > 1000
    assert (tmp_path / "causal_attention.png").stat().st_size > 1000
    assert any("Step 3. Causal attention" in line for line in lines)
    assert result["cache_difference"] < 1e-4  # cached decoding reproduces the full pass
    probabilities = [p for _, p in result["top5"]]
    assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1.0 + 1e-6
    assert any("Step 6. The next token" in line for line in lines)
    assert result["mla_difference"] < 1e-4  # the absorbed path gives the naive path's logits
    (T1, dense1, flash1), _, (T3, dense3, flash3) = result["memory"]
    assert dense3 / dense1 > 100 and flash3 / flash1 < 40  # T grows 16x: quadratic vs linear
