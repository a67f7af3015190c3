"""Decoding whose cost follows the tokens present: the dense path, the flash kernel and decode_attention.

    python -m benchmarks.decode [--quick] [--only position capacity generation threshold cache]

Two models, batch 1, float32, random weights (speed does not depend on training):
"GQA" (width 256, 4 layers, 8 query / 4 key-value heads of width 32, SwiGLU 704, RoPE) and
"MLA" (the same, with multi-head latent attention: 8 heads, L = 64, R = 16, absorbed
decode). Three ways to run a decode step through each, in this one process:

- ``dense``:  ``decode_max_tokens=0``, ``attention_kernel="dense"`` (every step scores,
  masks and averages the whole preallocated buffer: the landed behaviour);
- ``flash``:  ``decode_max_tokens=0``, ``attention_kernel="flash"`` (blockwise, but its
  layout transposes and pads the whole buffer every step);
- ``decode``: the default, ``decode_attention`` for steps (the cache is read up to its
  longest row), the flash kernel for a prompt.

Parts: ``position`` (one step at positions 1 ... 32k in a 32k-slot cache), ``capacity`` (one
step at position 100 in caches of 256 ... 32k slots), ``generation`` (tokens/s of
``generate``: a 1,000-token prompt, 1,000 new tokens, capacity 32k), ``threshold`` (a call of
T new tokens into a filled cache, decode kernel vs the others: where decode stops paying),
``cache`` (the compiled decode step aliases the donated cache: no copy). Steps update a
donated cache in place, as inside ``generate``. Prints tables with a summary, writes
``benchmarks/results/decode-<device>-<date>.json`` and ``img/decode-*.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.timing import device_kind, time_calls, write_results
from jaxattn import viz
from jaxattn.lm.generate import generate, make_decode_step
from jaxattn.nn import TransformerConfig, TransformerLM

RESULTS = Path(__file__).parent / "results"
PATHS = {
    "dense": dict(decode_max_tokens=0, attention_kernel="dense"),
    "flash": dict(decode_max_tokens=0, attention_kernel="flash"),
    "decode": dict(attention_kernel="flash"),  # decode_attention for steps, flash for prompts
}


def model_configs(max_length: int, *, heads: int = 8, head_dim: int = 32, layers: int = 4) -> dict[str, TransformerConfig]:
    """The GQA and MLA models of this benchmark (by default width 256, 4 layers, 8 heads)."""
    width = heads * head_dim
    common = dict(width=width, layers=layers, heads=heads, head_dim=head_dim, mlp_hidden=width * 11 // 4,
                  max_length=max_length)
    return {
        "GQA": TransformerConfig(**common, kv_heads=max(1, heads // 2)),
        "MLA": TransformerConfig(**common, attention="mla", latent_dim=2 * head_dim, rope_dim=max(2, head_dim // 2)),
    }


def make_model(config: TransformerConfig, path: str, **overrides) -> TransformerLM:
    return TransformerLM(dataclasses.replace(config, **{**PATHS[path], **overrides}), rngs=nnx.Rngs(0))


def time_generation(model, prompt, new_tokens, *, use_cache, repeats=3, cache_length=None):
    """Min and median seconds of a whole compiled generation (prefill + decode loop)."""
    timing = time_calls(lambda: generate(model, [prompt], max_new_tokens=new_tokens, use_cache=use_cache,
                                         cache_length=cache_length), repeats=repeats)
    return timing.min_s, timing.median_s


def step_seconds(model, *, position: int, capacity: int, tokens: int = 1, repeats: int, cache_dtype=None) -> float:
    """Median seconds of one call of ``tokens`` new tokens with ``position`` tokens already
    in a cache of ``capacity`` slots (of ``cache_dtype``: the model's, or ``"int8"``); the
    cache is donated (updated in place)."""
    graphdef, params = nnx.split(model)

    def call(params, token, cache):
        return nnx.merge(graphdef, params)(token, cache=cache)

    step = jax.jit(call, donate_argnums=2)
    token = jnp.full((1, tokens), 65, jnp.int32)
    state = {"cache": model.init_cache(1, max_length=capacity, dtype=cache_dtype)}

    def reset():
        state["cache"] = tuple(layer._replace(lengths=jnp.full((1,), position, jnp.int32)) for layer in state["cache"])
        return state["cache"]

    def run():
        logits, state["cache"] = step(params, token, state["cache"])
        return logits

    return time_calls(run, repeats=repeats, before=reset).median_s


def position_part(configs, args, say):
    capacity = args.capacity
    positions = [p for p in (1, 100, 1000, 4000, 8000, 16000, capacity - 1) if p < capacity]
    say(f"[position] one decode step, cache of {capacity} slots, median ms")
    say(f"{'model':>5} {'path':>7} " + " ".join(f"{p:>8}" for p in positions))
    rows = []
    for name, config in configs.items():
        for path in PATHS:
            model = make_model(config, path)
            times = [step_seconds(model, position=p, capacity=capacity, repeats=args.repeats) for p in positions]
            rows.append(dict(model=name, path=path, capacity=capacity, positions=positions, seconds=times))
            say(f"{name:>5} {path:>7} " + " ".join(f"{t * 1e3:>8.2f}" for t in times), flush=True)
    return rows


def capacity_part(configs, args, say):
    capacities = [c for c in (256, 1024, 4096, 16384, 32768) if c <= args.capacity]
    say("[capacity] one decode step at position 100, median ms")
    say(f"{'model':>5} {'path':>7} " + " ".join(f"{c:>8}" for c in capacities))
    rows = []
    for name, config in configs.items():
        for path in PATHS:
            model = make_model(config, path)
            times = [step_seconds(model, position=100, capacity=c, repeats=args.repeats) for c in capacities]
            rows.append(dict(model=name, path=path, position=100, capacities=capacities, seconds=times))
            say(f"{name:>5} {path:>7} " + " ".join(f"{t * 1e3:>8.2f}" for t in times), flush=True)
    return rows


def generation_part(configs, args, say):
    prompt = np.random.default_rng(0).integers(32, 127, args.prompt).astype(np.int32)
    say(f"[generation] prompt {args.prompt}, {args.new} new tokens, cache of {args.capacity} slots, greedy")
    rows = []
    for name, config in configs.items():
        for path in PATHS:
            model = make_model(config, path)
            repeats = args.repeats if path == "decode" else 1
            seconds = time_generation(model, prompt, args.new, use_cache=True, repeats=repeats, cache_length=args.capacity)[0]
            rows.append(dict(model=name, path=path, seconds=seconds, tokens_per_s=args.new / seconds))
            say(f"  {name} {path:>7}: {args.new / seconds:8.1f} tokens/s ({seconds:.1f} s)", flush=True)
    return rows


def threshold_part(configs, args, say):
    """A call of T new tokens into a cache that holds 2,000 of 4,096 slots."""
    sizes = (1, 4, 16, 64, 256)
    say("[threshold] a call of T new tokens, 2000 tokens already in a 4096-slot cache, median ms")
    say(f"{'model':>5} {'path':>7} " + " ".join(f"{t:>8}" for t in sizes))
    rows = []
    for name, config in configs.items():
        for path in PATHS:
            # the decode path here sends every size to decode_attention
            model = make_model(config, path, **(dict(decode_max_tokens=max(sizes)) if path == "decode" else {}))
            times = [step_seconds(model, position=2000, capacity=4096, tokens=t, repeats=args.repeats) for t in sizes]
            rows.append(dict(model=name, path=path, tokens=list(sizes), seconds=times))
            say(f"{name:>5} {path:>7} " + " ".join(f"{t * 1e3:>8.2f}" for t in times), flush=True)
    return rows


def cache_part(configs, args, say):
    """The compiled decode step with a donated cache: does it alias the cache, and do its
    temporaries stay flat as the capacity grows (no copy of the buffer)?"""
    rows = []
    for name, config in configs.items():
        model = make_model(config, "decode")
        graphdef, params = nnx.split(model)
        step = jax.jit(make_decode_step(graphdef), donate_argnums=2)
        token = jnp.zeros((1,), jnp.int32)
        for capacity in (1024, args.capacity):
            cache = model.init_cache(1, max_length=capacity)
            compiled = step.lower(params, token, cache).compile()
            cache_bytes = sum(leaf.nbytes for layer in cache for leaf in layer[:2])
            temp = compiled.memory_analysis().temp_size_in_bytes
            aliased = "input_output_alias" in compiled.as_text()
            rows.append(dict(model=name, capacity=capacity, cache_bytes=cache_bytes, temp_bytes=temp, aliased=aliased))
            say(f"[cache] {name} capacity {capacity}: cache {cache_bytes / 2**20:.1f} MiB, step temporaries "
                f"{temp / 2**20:.2f} MiB, donated cache aliased to the output: {aliased}")
    return rows


def plots(results, img: Path) -> list[str]:
    kind = results["device_kind"]
    paths = []
    if results.get("position"):
        series = {f"{r['model']} {r['path']}": (r["positions"], [t * 1e3 for t in r["seconds"]]) for r in results["position"]}
        paths.append(str(viz.line_chart(series, img / "decode-position.png", logx=True, logy=True,
                                        title=f"One decode step vs position, {results['position'][0]['capacity']}-slot cache ({kind})",
                                        xlabel="tokens already in the cache", ylabel="milliseconds")))
    if results.get("capacity"):
        series = {f"{r['model']} {r['path']}": (r["capacities"], [t * 1e3 for t in r["seconds"]]) for r in results["capacity"]}
        paths.append(str(viz.line_chart(series, img / "decode-capacity.png", logx=True, logy=True,
                                        title=f"One decode step at position 100 vs cache capacity ({kind})",
                                        xlabel="cache capacity (slots)", ylabel="milliseconds")))
    return paths


def summary(results) -> list[str]:
    lines = []

    def find(part, model, path):
        return next(r for r in results.get(part, []) if r["model"] == model and r["path"] == path)

    for model in ("GQA", "MLA"):
        if results.get("capacity"):
            row = find("capacity", model, "decode")
            dense = find("capacity", model, "dense")
            lines.append(f"{model}: step at position 100 with {row['capacities'][-1]} vs {row['capacities'][0]} slots: "
                         f"decode {row['seconds'][-1] / row['seconds'][0]:.2f}x (dense "
                         f"{dense['seconds'][-1] / dense['seconds'][0]:.0f}x)")
        if results.get("position") and 16000 in find("position", model, "decode")["positions"]:
            row = find("position", model, "decode")
            at = dict(zip(row["positions"], row["seconds"]))
            if results.get("capacity") and 16384 in find("capacity", model, "dense")["capacities"]:
                dense16k = dict(zip(find("capacity", model, "dense")["capacities"], find("capacity", model, "dense")["seconds"]))[16384]
                lines.append(f"{model}: decode at position 16000 / dense at capacity 16384: {at[16000] / dense16k:.2f}x; "
                             f"at position 8000: {at[8000] / dense16k:.2f}x")
        if results.get("generation"):
            rates = {r["path"]: r["tokens_per_s"] for r in results["generation"] if r["model"] == model}
            lines.append(f"{model}: generation " + ", ".join(f"{path} {rate:.0f} tokens/s" for path, rate in rates.items()))
    return lines


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="capacity 4096, a 100-token prompt and 100 new tokens")
    parser.add_argument("--only", nargs="+", choices=["position", "capacity", "generation", "threshold", "cache"])
    parser.add_argument("--capacity", type=int, default=None)
    parser.add_argument("--prompt", type=int, default=None)
    parser.add_argument("--new", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--img", default="img")
    args = parser.parse_args(argv)
    args.capacity = args.capacity or (4096 if args.quick else 32768)
    args.prompt = args.prompt or (100 if args.quick else 1000)
    args.new = args.new or (100 if args.quick else 1000)
    parts = args.only or ["position", "capacity", "generation", "threshold", "cache"]
    configs = model_configs(max(args.capacity, 32768))
    print(f"device: {device_kind()}  jax {jax.__version__}; parts {parts}")
    results = {"device_kind": device_kind(), "date": datetime.date.today().isoformat(), "jax": jax.__version__,
               "models": {name: dataclasses.asdict(config) for name, config in configs.items()}}
    for part in parts:
        results[part] = globals()[f"{part}_part"](configs, args, print)
    results["plots"] = plots(results, Path(args.img))
    path = write_results(results, "decode", args.results)
    print("\nSummary:")
    for line in summary(results):
        print("  " + line)
    print(f"  results {path}; plots {', '.join(results['plots'])}")
    return results


if __name__ == "__main__":
    main()
