"""Blockwise (flash) attention vs the dense paths, forward and backward.

    python -m benchmarks.flash [--seq-lens 1024 2048 4096 8192] [--long 65536]

Batch 1, H = 8, D = 64, float32, in one process, same shapes: forward time and compiled
temporary memory of ``flash_attention``, ``multi_head_attention`` and
``jax.nn.dot_product_attention(implementation="xla")``, causal and not; forward+backward
for T <= 4096 (``--grad-max``); achieved FLOP/s (useful FLOPs ``4·B·H·T·S·D``, halved
for causal; the backward counts 2.5x the forward) as a fraction of a float32 matmul's
FLOP/s measured in the same run. Both sides use the fastest of their runs (on a shared
machine, interference only ever adds time), the tables show the median too. ``--long T`` also runs one causal forward+backward of
flash attention at length T and reports its time and the process's peak memory.
``--profile T`` traces one causal forward and one forward+backward of flash attention at
length T with ``jax.profiler`` and splits their time by what each compiled operation does
(matmuls, exponentials, masks, copies and layout, reductions, softmax bookkeeping, loop
and thread overhead), reading each operation's origin from the compiled program.
Writes a table and ``img/flash.png``.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import resource
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import device_kind, measure, time_calls
from jaxattn import viz
from jaxattn.functional import flash_attention, multi_head_attention


def jax_nn(q, k, v, *, is_causal):
    return jax.nn.dot_product_attention(q, k, v, is_causal=is_causal, implementation="xla")


def jax_nn_cudnn(q, k, v, *, is_causal):
    return jax.nn.dot_product_attention(q, k, v, is_causal=is_causal, implementation="cudnn")


KERNELS = {"flash_attention": flash_attention, "multi_head_attention": multi_head_attention, "jax.nn (xla)": jax_nn}


def matmul_flops_per_second(n: int = 2048) -> float:
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
    timing = measure(lambda a: a @ a, a, repeats=5)
    return 2 * n**3 / timing.min_s


def forward_and_backward(kernel, **kwargs):
    def loss(q, k, v):
        return jnp.sum(kernel(q, k, v, **kwargs))

    grad = jax.grad(loss, argnums=(0, 1, 2))
    return lambda q, k, v: grad(q, k, v)


def attention_flops(B, H, T, D, causal: bool) -> float:
    return 4 * B * H * T * T * D / (2 if causal else 1)


def prefill_rows(seq_lens, *, batch, heads, head_dim, dtype, repeats, grad_max, kernels, peak, say=print) -> list[dict]:
    """Times every kernel, causal and not, forward (and forward+backward up to ``grad_max``)."""
    B, H, D = batch, heads, head_dim
    say(f"{'T':>6} {'causal':>6} {'pass':>8} {'kernel':>22} {'min ms':>8} {'median ms':>10} {'temp MiB':>9} "
        f"{'GFLOP/s':>8} {'of peak':>8}")
    rows = []
    rng = np.random.default_rng(0)
    for T in seq_lens:
        q, k, v = (jnp.asarray(rng.standard_normal((B, T, H, D)), dtype) for _ in range(3))
        for causal in (True, False):
            passes = [("forward", 1.0)] + ([("fwd+bwd", 3.5)] if T <= grad_max else [])
            for name, kernel in kernels.items():
                for pass_name, flop_factor in passes:
                    fn = kernel if pass_name == "forward" else forward_and_backward(kernel, is_causal=causal)
                    kwargs = {"is_causal": causal} if pass_name == "forward" else {}
                    timing = measure(fn, q, k, v, repeats=repeats, **kwargs)
                    flops = flop_factor * attention_flops(B, H, T, D, causal)
                    row = dict(T=T, causal=causal, pass_=pass_name, kernel=name, median_s=timing.median_s,
                               min_s=timing.min_s, temp_bytes=timing.temp_bytes, flops_per_s=flops / timing.min_s,
                               fraction_of_matmul=flops / timing.min_s / peak)
                    rows.append(row)
                    temp = "n/a" if timing.temp_bytes is None else f"{timing.temp_bytes / 2**20:.1f}"
                    say(f"{T:>6} {str(causal):>6} {pass_name:>8} {name:>22} {timing.min_s * 1e3:>8.1f} {timing.median_s * 1e3:>10.1f} "
                        f"{temp:>9} {row['flops_per_s'] / 1e9:>8.1f} {row['fraction_of_matmul']:>8.1%}", flush=True)
    return rows


LOGIT_VARIANTS = {"plain": {}, "soft-cap": dict(logit_softcap=50.0), "sinks": dict(sinks=True),
                  "soft-cap + sinks": dict(logit_softcap=50.0, sinks=True)}


def logit_cost(T: int, *, heads: int, head_dim: int, repeats: int, dtype=jnp.float32, say=print) -> list[dict]:
    """What soft-capping and learned sinks cost the causal flash kernel at length T: forward
    and forward+backward (d sinks included), each variant's median against the plain kernel's,
    in this one process, same shapes; and their compiled temporaries."""
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((1, T, heads, head_dim)), dtype) for _ in range(3))
    sinks = jnp.asarray(rng.standard_normal(heads), jnp.float32)
    rows = []
    for name, variant in LOGIT_VARIANTS.items():
        extra = dict(variant, sinks=sinks) if variant.get("sinks") else variant

        def forward(q, k, v, extra=extra):
            return flash_attention(q, k, v, is_causal=True, **extra)

        def gradients(q, k, v, sinks, variant=variant):
            def loss(q, k, v, sinks):
                keywords = dict(variant, sinks=sinks) if variant.get("sinks") else variant
                return jnp.sum(flash_attention(q, k, v, is_causal=True, **keywords).astype(jnp.float32))
            return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, sinks)

        for pass_name, timing in (("forward", measure(forward, q, k, v, repeats=repeats)),
                                  ("fwd+bwd", measure(gradients, q, k, v, sinks, repeats=repeats))):
            rows.append(dict(T=T, variant=name, pass_=pass_name, median_s=timing.median_s, min_s=timing.min_s,
                             temp_bytes=timing.temp_bytes))
    for row in rows:
        plain = next(r for r in rows if r["variant"] == "plain" and r["pass_"] == row["pass_"])
        row["vs_plain"] = row["median_s"] / plain["median_s"]
        say(f"T={T} causal flash {row['pass_']:>8} {row['variant']:>17}: {row['median_s'] * 1e3:8.1f} ms "
            f"({row['vs_plain']:.2f}x plain), temp {row['temp_bytes'] / 2**20:.1f} MiB", flush=True)
    return rows


def long_run(T: int, heads: int, head_dim: int) -> dict:
    """One causal forward+backward of flash attention at length T."""
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((1, T, heads, head_dim)), jnp.float32) for _ in range(3))
    fn = jax.jit(forward_and_backward(flash_attention, is_causal=True))
    compiled = fn.lower(q, k, v).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    seconds = time_calls(lambda: compiled(q, k, v), repeats=1, warm_up=False).min_s
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {"T": T, "seconds": seconds, "temp_bytes": temp, "peak_rss_bytes": peak}


CATEGORIES = ("matmuls", "exponentials", "masks", "copies and layout", "reductions", "softmax bookkeeping",
              "loop and threads")


def _category(name: str, origin: str | None) -> str:
    """What a compiled operation (its name and the JAX op it came from) spends time on."""
    origin = origin or ""
    if "exponential" in name or origin.endswith("/exp"):
        return "exponentials"
    if "reduce_max" in origin or "reduce_sum" in origin or name.startswith("ynn_fusion") and "reduce" in origin:
        return "reductions"
    if name.startswith(("copy", "wrapped_copy", "bitcast_transpose", "dynamic-slice", "bitcast_copy", "transpose")) or \
            "dynamic_slice" in origin or "dynamic_update_slice" in origin or "pad" in origin:
        return "copies and layout"
    if name.startswith(("ynn_fusion", "dot")):
        return "matmuls"
    if "select_n" in origin or "_where" in origin or origin.endswith(("/lt", "/le", "/ge", "/gt", "/and", "/eq")):
        return "masks"
    if name.startswith(("while", "SlinkyThreadPool", "wrapped_compare")):
        return "loop and threads"
    return "softmax bookkeeping"


def profile(fn, *args) -> dict:
    """Seconds per category (see ``CATEGORIES``) of one call of the jitted ``fn``, and the wall time."""
    jitted = jax.jit(fn)
    text = jitted.lower(*args).compile().as_text()
    origins = {m.group(1): (re.search(r'op_name="([^"]+)"', m.group(0)) or [None, None])[1]
               for m in re.finditer(r"^\s*(?:ROOT )?%([\w.\-]+) = [^\n]*", text, re.M)}
    jax.block_until_ready(jitted(*args))
    with tempfile.TemporaryDirectory() as folder:
        jax.profiler.start_trace(folder, create_perfetto_trace=True)
        start = time.perf_counter()
        jax.block_until_ready(jitted(*args))
        wall = time.perf_counter() - start
        jax.profiler.stop_trace()
        trace = json.load(gzip.open(glob.glob(f"{folder}/**/*.trace.json.gz", recursive=True)[0]))
    seconds = collections.Counter()
    for event in trace["traceEvents"]:
        name = event.get("name", "")
        if event.get("ph") != "X" or name.startswith(("ThunkExecutor", "$")):
            continue
        seconds[_category(name, origins.get(name))] += event["dur"] / 1e6
    return {"wall_s": wall, **{category: seconds[category] for category in CATEGORIES}}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--grad-max", type=int, default=4096, help="longest T for forward+backward")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--long", type=int, default=None, help="also run causal fwd+bwd of flash at this T")
    parser.add_argument("--profile", type=int, default=None, help="also profile causal flash at this T")
    parser.add_argument("--plot", default="img/flash.png")
    args = parser.parse_args(argv)

    H, D = args.heads, args.head_dim
    peak = matmul_flops_per_second()
    print(f"device: {device_kind()}  jax {jax.__version__}  float32, B=1, H={H}, D={D}")
    print(f"float32 matmul (2048^3): {peak / 1e9:.1f} GFLOP/s")
    rows = prefill_rows(args.seq_lens, batch=1, heads=H, head_dim=D, dtype=jnp.float32, repeats=args.repeats,
                        grad_max=args.grad_max, kernels=KERNELS, peak=peak)

    def lookup(T, causal, pass_name, kernel):
        return next(r for r in rows if (r["T"], r["causal"], r["pass_"], r["kernel"]) == (T, causal, pass_name, kernel))

    series = {}
    for name in KERNELS:
        for causal in (True, False):
            points = [lookup(T, causal, "forward", name) for T in args.seq_lens]
            series[f"{name}, {'causal' if causal else 'full'}"] = ([p["T"] for p in points], [p["median_s"] * 1e3 for p in points])
    path = viz.line_chart(series, args.plot, title=f"Attention forward, B=1, H={H}, D={D} ({device_kind()})",
                          xlabel="sequence length T = S", ylabel="milliseconds", logx=True, logy=True)
    print(f"plot: {path}")
    if 4096 in args.seq_lens:
        for causal, pass_name in ((True, "forward"), (False, "forward"), (True, "fwd+bwd")):
            if pass_name == "fwd+bwd" and args.grad_max < 4096:
                continue
            ours, theirs = lookup(4096, causal, pass_name, "flash_attention"), lookup(4096, causal, pass_name, "jax.nn (xla)")
            print(f"Summary T=4096 {'causal' if causal else 'full'} {pass_name}: flash {theirs['median_s'] / ours['median_s']:.2f}x "
                  f"the speed of jax.nn, temp memory 1/{theirs['temp_bytes'] / ours['temp_bytes']:.0f} of it")
    result = {"matmul_flops_per_s": peak, "rows": rows}
    if args.profile:
        rng = np.random.default_rng(0)
        q, k, v = (jnp.asarray(rng.standard_normal((1, args.profile, H, D)), jnp.float32) for _ in range(3))
        result["profile"] = {}
        for pass_name, fn in (("forward", lambda q, k, v: flash_attention(q, k, v, is_causal=True)),
                              ("fwd+bwd", forward_and_backward(flash_attention, is_causal=True))):
            shares = profile(fn, q, k, v)
            result["profile"][pass_name] = shares
            busy = sum(shares[c] for c in CATEGORIES)
            print(f"Profile T={args.profile} causal {pass_name}: {shares['wall_s'] * 1e3:.0f} ms wall; of the time inside "
                  "compiled operations: " + ", ".join(f"{c} {shares[c] / busy:.0%}" for c in CATEGORIES))
    if args.long:
        long = long_run(args.long, H, D)
        print(f"Long: causal forward+backward of flash_attention at T={long['T']}: {long['seconds']:.1f} s, "
              f"compiled temp {long['temp_bytes'] / 2**20:.0f} MiB, process peak RSS {long['peak_rss_bytes'] / 2**30:.2f} GiB")
        result["long"] = long
    return result


if __name__ == "__main__":
    main()
