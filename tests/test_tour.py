import numpy as np

from jaxattn.cli import main
from jaxattn.tour import run_tour


def test_tour_numbers_follow_from_its_own_inputs(tmp_path):
    lines = []
    result = run_tour(out=tmp_path, say=lines.append)
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


def test_cli_reports_bad_text(tmp_path, capsys):
    assert main(["tour", "--text", "   ", "--out", str(tmp_path)]) == 2
    assert "at least one word" in capsys.readouterr().err
