"""The benchmark suite: every attention variant side by side, on whatever device JAX sees.

    python -m benchmarks [--quick] [--only NAME] [--dtype DTYPE] [--seq-lens ...] [--batch B] [--heads H]

Parts (``--only``): ``ceiling`` (a matmul's FLOP/s and a large copy's bytes/s),
``prefill`` (forward and forward+backward of the dense, flash and jax.nn kernels),
``families`` (MHA, GQA, MQA, sliding window and MLA at equal model width: forward time,
decode-step time and cache size vs context), ``parallel`` (ring attention over 1-8 devices on
the sequence axis: memory per device, step time per layout), ``decoding`` (one decode step vs the cache's
capacity for the dense path, the flash kernel and ``decode_attention``, and tokens/s of the default
TransformerLM with and without its cache), ``accelerator`` (``benchmarks/accelerator.py``: jaxattn's
Pallas kernels beside jax.nn, cuDNN and JAX's own Pallas kernels; on a CPU its rows say "needs a
GPU/TPU"). Writes
``benchmarks/results/<device-kind>-<date>.json`` and PNG plots into ``img/``;
``python -m benchmarks.table FILE`` turns a results file into Markdown.
Method: ``benchmarks/timing.py`` (compile, warm up, min and median of several runs).
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from benchmarks import accelerator
from benchmarks.decode import capacity_part, model_configs, time_generation
from benchmarks.flash import KERNELS, jax_nn_cudnn, logit_cost, matmul_flops_per_second, prefill_rows
from benchmarks.mla import time_step, with_lengths
from benchmarks.timing import device_kind, measure
from jaxattn import viz
from jaxattn.functional import (
    AttentionParams,
    AttentionSettings,
    KVCache,
    LatentCache,
    MLAParams,
    Rope,
    SlidingKVCache,
    causal_self_attention,
    kv_cache_elements_per_token,
    latent_cache_elements_per_token,
    mla_absorbed,
    mla_decompressed,
    mla_naive,
)
from jaxattn.lm.train import default_model_config, init_model

PARTS = ("ceiling", "prefill", "logits", "families", "decoding", "parallel", "accelerator")
RESULTS = Path(__file__).parent / "results"


def copy_bytes_per_second(megabytes: int) -> float:
    """Bytes moved per second by an elementwise pass over a large array (read + write)."""
    x = jnp.ones((megabytes * 2**20 // 4,), jnp.float32)
    timing = measure(lambda x: x * 1.0001, x, repeats=5)
    return 2 * x.nbytes / timing.min_s


def ceiling(mode) -> dict:
    return {
        "matmul_flops_per_s": matmul_flops_per_second(512 if mode.quick else 2048),
        "copy_bytes_per_s": copy_bytes_per_second(64 if mode.quick else 512),
    }


def families(mode, dtype, say) -> list[dict]:
    """Attention families at equal model width C = H·D (GQA: K = H/4, MQA: K = 1, window
    W = S_min/2, MLA: L = 4·D, R = D/2 as in DeepSeek-V2)."""
    B, H, D = mode.batch, mode.heads, mode.head_dim
    C, L, R = H * D, 4 * D, D // 2
    window = max(1, min(mode.seq_lens) // 2)
    rng = np.random.default_rng(0)
    w = lambda *shape: jnp.asarray(rng.standard_normal(shape) / np.sqrt(shape[0]), dtype)  # noqa: E731
    standard = {
        "MHA": dict(K=H, window=None),
        "GQA": dict(K=max(1, H // 4), window=None),
        "MQA": dict(K=1, window=None),
        f"sliding window {window} (GQA)": dict(K=max(1, H // 4), window=window),
    }
    mla = MLAParams(w_dkv=w(C, L), w_kr=w(C, R), w_uk=w(L, H, D), w_uv=w(L, H, D), w_o=w(H, D, C),
                    w_q=w(C, H, D), w_qr=w(C, H, R), kv_norm=jnp.ones((L,), dtype))
    say(f"{'S':>6} {'family':>26} {'forward ms':>11} {'decode ms':>10} {'cache B/token':>14} {'cache MiB at S':>15}")
    rows = []
    for S in mode.seq_lens:
        h = jnp.asarray(rng.standard_normal((B, S, C)), dtype)
        x = h[:, :1]
        filled = jnp.full((B,), S - 1, jnp.int32)
        for name, spec in standard.items():
            K, win = spec["K"], spec["window"]
            weights = AttentionParams(w_q=w(C, H, D), w_k=w(C, K, D), w_v=w(C, K, D), w_o=w(H, D, C))
            if win is None:
                empty = stepping = KVCache.create(batch=B, max_length=S, kv_heads=K, head_dim=D, dtype=dtype)
            else:  # a prefill of S tokens needs window + S - 1 slots; decode steps only the window
                empty = SlidingKVCache.create(batch=B, window=win, kv_heads=K, head_dim=D, chunk=S, dtype=dtype)
                stepping = SlidingKVCache.create(batch=B, window=win, kv_heads=K, head_dim=D, dtype=dtype)

            def layer(p, h, c, win=win):
                return causal_self_attention(p, h, cache=c, settings=AttentionSettings(rope=Rope(), window=win))

            # forward: a prefill of all S tokens through the layer, into an empty cache
            forward = measure(lambda p, h, c: layer(p, h, c)[0], weights, h, empty, repeats=mode.repeats)
            decode = time_step(layer, weights, x, with_lengths(stepping, filled), repeats=mode.repeats)
            per_token = kv_cache_elements_per_token(kv_heads=K, head_dim=D) * jnp.dtype(dtype).itemsize
            cache_bytes = per_token * (S if win is None else win) * B
            rows.append(dict(S=S, family=name, forward_s=forward.median_s, decode_s=decode[1],
                             cache_bytes_per_token=per_token, cache_bytes=cache_bytes))
        latent = LatentCache.create(batch=B, max_length=S, latent_dim=L, rope_dim=R, dtype=dtype)
        per_token = latent_cache_elements_per_token(latent_dim=L, rope_dim=R) * jnp.dtype(dtype).itemsize
        naive_forward = measure(mla_naive, mla, h, repeats=mode.repeats)
        absorbed_forward = measure(lambda p, h, c: mla_absorbed(p, h, c)[0], mla, h, latent, repeats=mode.repeats)
        for name, step, fwd in (("MLA naive (latent cache)", mla_decompressed, naive_forward),
                                ("MLA absorbed", mla_absorbed, absorbed_forward)):
            decode = time_step(lambda p, x, c, step=step: step(p, x, c), mla, x, with_lengths(latent, filled),
                               repeats=mode.repeats)
            rows.append(dict(S=S, family=name, forward_s=fwd.median_s, decode_s=decode[1],
                             cache_bytes_per_token=per_token, cache_bytes=per_token * S * B))
        for row in rows[-len(standard) - 2:]:
            say(f"{S:>6} {row['family']:>26} {row['forward_s'] * 1e3:>11.2f} {row['decode_s'] * 1e3:>10.3f} "
                f"{row['cache_bytes_per_token']:>14} {row['cache_bytes'] / 2**20:>15.2f}", flush=True)
    return rows


def decoding(mode, say) -> dict:
    model = init_model(default_model_config(), 0)
    prompt = np.random.default_rng(0).integers(32, 127, mode.prompt).astype(np.int32)
    cached = time_generation(model, prompt, mode.new_tokens, use_cache=True, repeats=mode.repeats)
    full = time_generation(model, prompt, mode.new_tokens, use_cache=False, repeats=1)
    result = dict(prompt=mode.prompt, new_tokens=mode.new_tokens, cached_tokens_per_s=mode.new_tokens / cached[0],
                  full_recompute_tokens_per_s=mode.new_tokens / full[0])
    say(f"default TransformerLM, batch 1, prompt {mode.prompt}, {mode.new_tokens} new tokens: "
        f"{result['cached_tokens_per_s']:.0f} tokens/s with the cache, {result['full_recompute_tokens_per_s']:.0f} without")
    steps = argparse.Namespace(capacity=max(256, min(4 * max(mode.seq_lens), 32768)), repeats=mode.repeats)
    configs = model_configs(steps.capacity, heads=mode.heads, head_dim=mode.head_dim // 2, layers=2 if mode.quick else 4)
    result["steps"] = capacity_part(configs, steps, say)
    return result


def parallel(mode, say) -> dict:
    """``benchmarks/parallel.py`` in a process of its own (on a CPU it needs 8 virtual
    devices, which can only be made before JAX starts)."""
    with tempfile.TemporaryDirectory() as folder:
        slug = re.sub(r"[^a-z0-9]+", "-", device_kind().lower()).strip("-")
        command = [sys.executable, "-m", "benchmarks.parallel", "--json", f"{folder}/parallel.json", "--repeats",
                   str(mode.repeats), "--plot", str(Path(mode.img) / f"bench-{slug}-parallel-memory.png"), "--seq-lens",
                   *[str(T) for T in (mode.seq_lens if not mode.quick else mode.seq_lens[:2])],
                   "--devices", *[str(n) for n in mode.parallel_devices]]
        result = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).parent.parent)
        if result.returncode != 0:
            raise RuntimeError(f"benchmarks.parallel failed:\n{result.stderr[-3000:]}")
        say(result.stdout.rstrip())
        return json.loads(Path(f"{folder}/parallel.json").read_text())


def plots(results: dict, out: Path) -> list[str]:
    """Log-log plots of time and memory vs length; returns their paths."""
    kind = results["device_kind"]
    slug = re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-")
    paths = []
    prefill = results.get("prefill") or []
    if prefill:
        for pass_name in ("forward", "fwd+bwd"):
            series = {}
            for row in prefill:
                if row["pass_"] == pass_name:
                    label = f"{row['kernel']}, {'causal' if row['causal'] else 'full'}"
                    xs, ys = series.setdefault(label, ([], []))
                    xs.append(row["T"])
                    ys.append(row["median_s"] * 1e3)
            if series:
                name = "forward" if pass_name == "forward" else "forward-backward"
                paths.append(str(viz.line_chart(series, out / f"bench-{slug}-prefill-{name}.png",
                                                title=f"Prefill attention {pass_name} ({kind}, {results['dtype']})",
                                                xlabel="sequence length T", ylabel="milliseconds", logx=True, logy=True)))
        series = {}
        for row in prefill:
            if row["pass_"] == "forward" and row["causal"] and row["temp_bytes"] is not None:
                xs, ys = series.setdefault(row["kernel"], ([], []))
                xs.append(row["T"])
                ys.append(row["temp_bytes"] / 2**20)
        if series:
            paths.append(str(viz.line_chart(series, out / f"bench-{slug}-prefill-memory.png",
                                            title=f"Compiled temporary memory, causal forward ({kind})",
                                            xlabel="sequence length T", ylabel="MiB", logx=True, logy=True)))
    family_rows = results.get("families") or []
    for key, label in (("decode_s", "decode step"), ("cache_bytes", "cache size")):
        series = {}
        for row in family_rows:
            xs, ys = series.setdefault(row["family"], ([], []))
            xs.append(row["S"])
            ys.append(row[key] * 1e3 if key == "decode_s" else row[key] / 2**20)
        if series:
            paths.append(str(viz.line_chart(
                series, out / f"bench-{slug}-families-{key.split('_')[0]}.png",
                title=f"Attention families: {label} ({kind})", xlabel="context length S",
                ylabel="milliseconds" if key == "decode_s" else "MiB per layer", logx=True, logy=True)))
    return paths


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes: under 3 minutes on 2 CPU cores")
    parser.add_argument("--only", choices=PARTS, action="append", help="run only this part (repeatable)")
    parser.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: bf16 on GPU/TPU, f32 on CPU)")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=None)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--prompt", type=int, default=None, help="decoding: prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=None, help="decoding: new tokens")
    parser.add_argument("--parallel-devices", dest="parallel_devices", type=int, nargs="+", default=[1, 2, 4, 8],
                        help="parallel: device counts on the sequence axis")
    parser.add_argument("--results", default=str(RESULTS), help="folder for the results JSON")
    parser.add_argument("--img", default="img", help="folder for the plots")
    args = parser.parse_args(argv)
    platform = jax.devices()[0].platform
    args.dtype = args.dtype or ("float32" if platform == "cpu" else "bfloat16")
    if args.seq_lens is None:
        args.seq_lens = [256, 512, 1024] if args.quick else [1024, 2048, 4096, 8192]
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.prompt = args.prompt or (32 if args.quick else 128)
    args.new_tokens = args.new_tokens or (64 if args.quick else 512)
    args.grad_max = 4096
    return args


def main(argv=None) -> dict:
    mode = parse_args(argv)
    start = time.perf_counter()
    dtype = jnp.dtype(mode.dtype)
    platform = jax.devices()[0].platform
    parts = mode.only or list(PARTS)
    results = {
        "device_kind": device_kind(),
        "platform": platform,
        "versions": {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__},
        "dtype": mode.dtype,
        "shapes": {"batch": mode.batch, "heads": mode.heads, "head_dim": mode.head_dim, "seq_lens": mode.seq_lens},
        "mode": "quick" if mode.quick else "full",
        "date": datetime.date.today().isoformat(),
        "parts": parts,
        "left_out": [],
    }
    print(f"jaxattn benchmarks on {results['device_kind']} ({platform}), {mode.dtype}, jax {jax.__version__}; parts: {parts}")
    peak = None
    if "ceiling" in parts or "prefill" in parts:
        print("\n[ceiling]")
        results["ceiling"] = ceiling(mode)
        peak = results["ceiling"]["matmul_flops_per_s"]
        print(f"matmul {peak / 1e9:.1f} GFLOP/s, copy {results['ceiling']['copy_bytes_per_s'] / 1e9:.1f} GB/s")
    if "prefill" in parts:
        print("\n[prefill]")
        kernels = dict(KERNELS)
        if platform == "gpu":
            kernels["jax.nn (cudnn)"] = jax_nn_cudnn
        else:
            results["left_out"].append("jax.nn (cudnn): needs an NVIDIA GPU")
        results["prefill"] = prefill_rows(mode.seq_lens, batch=mode.batch, heads=mode.heads, head_dim=mode.head_dim,
                                          dtype=dtype, repeats=mode.repeats, grad_max=mode.grad_max, kernels=kernels,
                                          peak=peak)
    if "logits" in parts:
        print("\n[logits: soft-capping and sinks in the causal flash kernel]")
        T = 4096 if max(mode.seq_lens) >= 4096 else max(mode.seq_lens)
        results["logits"] = logit_cost(T, heads=mode.heads, head_dim=mode.head_dim, repeats=mode.repeats, dtype=dtype)
    if "families" in parts:
        print("\n[families]")
        results["families"] = families(mode, dtype, print)
    if "decoding" in parts:
        print("\n[decoding]")
        results["decoding"] = decoding(mode, print)
    if "parallel" in parts:
        print("\n[parallel]")
        results["parallel"] = parallel(mode, print)
    results_dir = Path(mode.results)
    results_dir.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", results["device_kind"].lower()).strip("-")
    if "accelerator" in parts:
        print("\n[accelerator: the Pallas kernels beside JAX's own]")
        results["accelerator"] = accelerator.main([*(["--quick"] if mode.quick else []), "--out",
                                                   str(results_dir / f"accelerator-{slug}-{results['date']}.json")])
    results["seconds"] = round(time.perf_counter() - start, 1)
    path = results_dir / f"{slug}-{results['date']}.json"
    ring = results.get("parallel") or {}
    results["plots"] = plots(results, Path(mode.img)) + [ring[key] for key in ("plot", "diagram") if key in ring]
    path.write_text(json.dumps(results, indent=1))
    from benchmarks.table import markdown

    print()
    print(markdown(results))
    print(f"\nSummary: {len(parts)} parts in {results['seconds']:.0f} s on {results['device_kind']}; results {path}; "
          f"plots {', '.join(results['plots'])}" + (f"; left out: {'; '.join(results['left_out'])}" if results["left_out"] else ""))
    return results
