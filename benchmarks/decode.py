"""Decoding speed of the default TransformerLM: KV cache vs full recompute.

    python -m benchmarks.decode [--prompt 128] [--new 512] [--checkpoint runs/default]

Batch 1: a 128-token prompt, 512 new tokens, greedy. Times the whole compiled
generation (prefill + decode loop) with the cache and with full recompute, in one
process; then one cached decode step at several positions. Prints a table and writes
``img/decode.png``. Untrained weights decode at the same speed as trained ones, so a
checkpoint is optional.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.timing import device_kind, time_calls
from jaxattn import viz
from jaxattn.lm.generate import generate, make_decode_step
from jaxattn.lm.train import default_model_config, init_model


def time_generation(model, prompt, new_tokens, *, use_cache, repeats=3):
    """Min and median seconds of a whole compiled generation (prefill + decode loop)."""
    timing = time_calls(lambda: generate(model, [prompt], max_new_tokens=new_tokens, use_cache=use_cache), repeats=repeats)
    return timing.min_s, timing.median_s


def decode_step_times(model, positions, capacity, repeats=20):
    """Median time of one cached decode step with ``p`` tokens already in the cache."""
    graphdef, params = nnx.split(model)
    step = jax.jit(make_decode_step(graphdef))
    token = jnp.array([65], jnp.int32)
    results = {}
    for position in positions:
        cache = model.init_cache(1, max_length=capacity)
        cache = tuple(layer._replace(lengths=jnp.full((1,), position, jnp.int32)) for layer in cache)
        results[position] = time_calls(lambda cache=cache: step(params, token, cache), repeats=repeats).median_s
    return results


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    parser.add_argument("--new", type=int, default=512, help="new tokens")
    parser.add_argument("--checkpoint", default=None, help="run folder with trained weights (optional)")
    parser.add_argument("--plot", default="img/decode.png")
    args = parser.parse_args(argv)

    if args.checkpoint:
        from jaxattn.lm.checkpoint import RunFolder

        model = RunFolder(args.checkpoint).load_model()
    else:
        model = init_model(default_model_config(), 0)
    prompt = np.random.default_rng(0).integers(32, 127, args.prompt).astype(np.int32)
    print(f"device: {device_kind()}  jax {jax.__version__}  default model {model.config}")
    print(f"batch 1, prompt {args.prompt}, {args.new} new tokens, greedy; times include the prefill")
    cached = time_generation(model, prompt, args.new, use_cache=True)
    print(f"  with KV cache:    {args.new / cached[0]:8.0f} tokens/s (min {cached[0]:.3f} s, median {cached[1]:.3f} s)")
    full = time_generation(model, prompt, args.new, use_cache=False, repeats=1)
    print(f"  full recompute:   {args.new / full[0]:8.0f} tokens/s (min {full[0]:.3f} s)")
    print(f"  speed-up: {full[0] / cached[0]:.1f}x")

    capacity = args.prompt + args.new
    positions = [p for p in (1, 128, 256, 384, 512, capacity - 1) if p < capacity]
    steps = decode_step_times(model, positions, capacity)
    print(f"{'position':>9} {'cached step ms':>15}")
    for position, seconds in steps.items():
        print(f"{position:>9} {seconds * 1e3:>15.3f}")
    full_step = full[0] / args.new
    path = viz.line_chart(
        {
            "KV cache: one decode step": (list(steps), [s * 1e3 for s in steps.values()]),
            "full recompute: one step (mean)": (list(steps), [full_step * 1e3] * len(steps)),
        },
        args.plot,
        title=f"Decode step time, default model, batch 1 ({device_kind()})",
        xlabel="tokens already in the context",
        ylabel="milliseconds per token",
        logy=True,
    )
    print(f"Summary: cached {args.new / cached[0]:.0f} tokens/s vs full recompute {args.new / full[0]:.0f} tokens/s "
          f"({full[0] / cached[0]:.1f}x); plot {path}")
    return {"cached_tokens_per_s": args.new / cached[0], "full_tokens_per_s": args.new / full[0], "steps": steps}


if __name__ == "__main__":
    main()
