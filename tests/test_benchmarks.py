"""The benchmark suite runs end to end, and its Markdown table says what the results say."""

import json
import time
from pathlib import Path

from benchmarks.suite import main
from benchmarks.table import markdown

FIXTURE = Path(__file__).parent / "data" / "bench_results.json"


def test_table_from_a_fixed_results_file():
    text = markdown(json.loads(FIXTURE.read_text()))
    assert "Device: **cpu** (cpu); float32; batch 1, 8 heads of width 64; jax 0.10.2, jaxlib 0.10.2, flax 0.12.8" in text
    assert "Ceiling: float32 matmul 116.3 GFLOP/s, copy 9.5 GB/s." in text
    assert "| 1024 | causal | forward | flash_attention | 29.0 | 29.2 | 20.6 | 36.7 | 32% |" in text
    assert "| 1024 | MLA absorbed | 12.3 | 0.450 | 1152 | 1.1 |" in text
    assert "4201 tokens/s with the KV cache, 35 tokens/s recomputing the full pass" in text
    assert "Left out: jax.nn (cudnn): needs an NVIDIA GPU." in text


def test_suite_smoke_run_writes_every_field(tmp_path):
    results = main([
        "--quick", "--seq-lens", "16", "--heads", "2", "--head-dim", "8", "--repeats", "1",
        "--prompt", "4", "--new-tokens", "3", "--results", str(tmp_path), "--img", str(tmp_path),
        "--parallel-devices", "1", "2",  # 4 and 8 devices: tests/parallel
    ])
    saved = json.loads(next(path for path in tmp_path.glob("*.json") if not path.name.startswith("accelerator-")).read_text())
    assert saved["device_kind"] == results["device_kind"]
    for field in ("platform", "versions", "dtype", "shapes", "mode", "date", "ceiling", "prefill", "logits", "families",
                  "decoding", "parallel", "accelerator", "seconds", "plots", "left_out"):
        assert field in saved, field
    assert [row["error"] for row in saved["accelerator"]] == ["needs a GPU/TPU (this is a cpu)"] * 2  # rows written as they come:
    assert json.loads(next(tmp_path.glob("accelerator-*.json")).read_text())["rows"] == saved["accelerator"]
    kernels = {row["kernel"] for row in saved["prefill"]}
    assert {"flash_attention", "multi_head_attention", "jax.nn (xla)"} <= kernels
    families = {row["family"] for row in saved["families"]}
    assert {"MHA", "GQA", "MQA", "MLA naive (latent cache)", "MLA absorbed"} <= families
    assert any(name.startswith("sliding window") for name in families)
    for row in saved["prefill"]:
        assert row["median_s"] > 0 and row["flops_per_s"] > 0
    assert saved["decoding"]["cached_tokens_per_s"] > 0
    variants = {(row["variant"], row["pass_"]) for row in saved["logits"]}
    assert variants == {(v, p) for v in ("plain", "soft-cap", "sinks", "soft-cap + sinks") for p in ("forward", "fwd+bwd")}
    assert "| 16 | forward | soft-cap + sinks |" in markdown(saved)
    ring = saved["parallel"]["rows"]
    assert {row["devices"] for row in ring} == {1, 2}
    assert {row["layout"] for row in ring} == {"causal, contiguous", "causal, zigzag", "not causal"}
    assert all(Path(path).stat().st_size > 1000 for path in saved["plots"])


def test_serve_trace_helpers():
    import os
    import sys

    from benchmarks.serve import choose_end_token, cpu_seconds, cut, make_trace

    if sys.platform.startswith("linux"):  # the CPU a process has used, as /proc counts it
        before, start = cpu_seconds(os.getpid()), time.process_time()
        while time.process_time() - start < 0.3:
            pass
        assert 0.2 <= cpu_seconds(os.getpid()) - before <= 1.0

    assert cut([5, 6, 7, 8], 3, None) == [5, 6, 7]
    assert cut([5, 6, 7, 8], 4, 6) == [5, 6]  # the end token is kept, as generate keeps it
    outputs = [[1, 2, 3, 9, 4], [9, 1, 2, 3, 3], [2, 2, 2, 3, 9]]
    # 9 would end the second request at its first token; 3 ends all three between token 2 and their limits
    assert choose_end_token(outputs, limits=[5, 5, 5], shortest=2) == 3
    assert choose_end_token(outputs, limits=[5, 5, 3], shortest=2) == 3
    lengths = [len(prompt) for prompt, _ in make_trace(200, 50, long_tailed=True)]
    assert 16 <= min(lengths) and max(lengths) <= 512
    assert sum(n < 128 for n in lengths) > 90  # log-uniform: 60% below 128 (uniform lengths: 23%)


def test_serve_calls_times_the_engines_decode_call_both_ways_with_the_same_tokens():
    from benchmarks.serve_calls import main as serve_calls
    from jaxattn.serve.runner import UNSPLIT_MAX_TOKENS

    (row,) = serve_calls(["--quick"])["rows"]  # one row, 2 steps a call
    assert row["rows"] == 1 and row["engine_uses"] == ("unsplit" if 1 <= UNSPLIT_MAX_TOKENS else "split")
    assert row["same_tokens"]  # the two compiled programs sample the same tokens
    assert min(row["split_ms"], row["unsplit_ms"], row["queued_ms"], row["read_each_ms"]) > 0


def test_decode_profile_attributes_ops_to_their_named_scope():
    """Every instruction of a compiled loop gets the scope it was traced in, and its category;
    an instruction without metadata takes the one scheduled before it."""
    import jax
    import jax.numpy as jnp

    from benchmarks.decode_profile import CATEGORIES, OTHER, category, name_stacks_in_metadata, op_scopes

    def step(carry):
        i, x, w = carry
        with jax.named_scope("mlp"):
            x = jnp.tanh(x @ w)
        with jax.named_scope("sampling"):
            x = x - jnp.max(x)
        return i + 1, x, w

    program = jax.jit(lambda x, w: jax.lax.while_loop(lambda c: c[0] < 3, step, (0, x, w))[1])
    with name_stacks_in_metadata():  # tests/conftest.py turns them off
        lowered = program.lower(jnp.ones((1, 8)), jnp.ones((8, 8)))
    scopes = op_scopes(lowered.compile().as_text())
    labels = dict(CATEGORIES)
    found = {category(stack) for stack in scopes.values() if "while" in stack.split("/")[:2]}
    assert {labels["mlp"], labels["sampling"]} <= found
    assert category("jit(f)/while/body/attention/cache_write/scatter") == labels["cache_write"]
    assert category("jit(f)/while/body/attention/rope/mul") == labels["attention"]
    assert category("jit(f)/while/body/iota") == OTHER
    text = 'ENTRY %main {\n  %a = f32[2] add(%x, %y), metadata={op_name="jit(f)/mlp/add"}\n  %b = f32[2] copy(%a)\n}\n'
    assert op_scopes(text) == {"a": "jit(f)/mlp/add", "b": "jit(f)/mlp/add"}


def test_quantized_quality_measures_bits_per_byte_of_the_cached_prefill():
    """``benchmarks.quantized``: the cached prefill's bits per byte equal a plain forward pass's
    cross entropy computed by NumPy; float32 against itself moves nothing; the int8 cache moves the
    logits a little, not nothing."""
    import numpy as np
    from flax import nnx

    from benchmarks.quantized import quality, window_logits
    from jaxattn.nn import TransformerConfig, TransformerLM

    model = TransformerLM(TransformerConfig(vocab_size=256, width=32, layers=2, heads=4, kv_heads=2, head_dim=8,
                                            mlp_hidden=48, max_length=200), rngs=nnx.Rngs(0))
    text = np.frombuffer(b"the quick brown fox jumps over the lazy dog; " * 40, np.uint8).astype(np.int32)
    windows = np.stack([text[i * 128 : i * 128 + 129] for i in range(3)])
    bits, _ = window_logits(model, windows, None)
    logits = np.asarray(model(windows[:, :-1]), np.float64)  # [3, 128, V], no cache
    logits -= logits.max(-1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -np.take_along_axis(log_probs, windows[:, 1:, None], -1)[..., 0] / np.log(2)
    np.testing.assert_allclose(bits, expected, rtol=1e-4, atol=1e-4)
    rows = {row["variant"]: row for row in quality("tiny", model, text, windows=3, new_tokens=8, say=lambda *_, **__: None,
                                                   variants=("float32", "int8 cache"))}
    assert rows["float32"]["logits_max_moved"] == 0 and rows["float32"]["greedy_agreement"] == 1
    assert 0 < rows["int8 cache"]["logits_max_moved"] < 0.1
    assert abs(rows["int8 cache"]["relative_change"]) < 0.01
