"""Where a decode step's time goes, against the limit that memory bandwidth sets.

    python -m benchmarks.decode_profile [--new 128] [--prompt 64] [--repeats 3]

Decoding one token at batch 1 must read every weight once, so a step cannot take less
than ``weight bytes / read bandwidth``: the **limit** in tokens/s is the bandwidth (the best
of 5 jitted ``jnp.sum`` over 1 GiB, measured in this process) over the model's weight
bytes (a tied embedding counted once). Every decode figure here is printed as a fraction of
that limit, with the CPU's model name, because machines of one kind differ.

Then the profile: one ``generate`` call is traced with ``jax.profiler``; every compiled op
(thunk) of the decode loop is timed and put in the category of the named scope its
instructions came from (``projections``, ``attention_kernel``, ``cache_write``, ``mlp``,
``unembed``, ``sampling``: the model and ``generate`` name them). What the ops do not
account for, of the loop's own time, is the loop and thread overhead (dispatch between
thunks, the while loop's condition, waiting for the worker threads).

Models, random weights in the shapes of: GPT-2 small (12 x 768, 12 heads, vocabulary 50257,
tied) and a Llama-shaped GQA model (8 x 512, 8/2 heads, SwiGLU 1536, vocabulary 32000).
Weight formats: float32, bfloat16 and int8 (``jaxattn.lm.quantize``). First, GPT-2's products one at a
time in both weight layouts (``product_speeds``): which layout this CPU reads at speed. Writes
benchmarks/results/decode-profile-<device>-<date>.json.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import re
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from benchmarks.timing import cpu_model, device_kind, read_bandwidth, time_calls, write_results
from jaxattn.lm.generate import generate
from jaxattn.lm.hf import transformer_config
from jaxattn.lm.quantize import convert_weights, weight_bytes
from jaxattn.nn import TransformerLM

RESULTS = Path(__file__).parent / "results"

MODELS = {
    "GPT-2 small (12 x 768, 12 heads)": dict(model_type="gpt2", n_layer=12, n_embd=768, n_head=12, vocab_size=50257,
                                             n_positions=1024),
    "Llama-shaped GQA (8 x 512, 8/2 heads)": dict(
        model_type="llama", hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
        intermediate_size=1536, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False),
}

# Named scope -> category, the first that an op's name stack holds.
CATEGORIES = (
    ("cache_write", "cache writes"),
    ("attention_kernel", "attention kernel (decode)"),
    ("sampling", "sampling"),
    ("unembed", "output layer (final norm, logits)"),
    ("projections", "attention projections (q, k, v, o)"),
    ("mlp", "MLP (matmuls, activation, residual)"),
    ("attention", "attention: norm, RoPE, residual"),
)
OTHER = "other ops (embedding, positions, loop state)"
OVERHEAD = "loop and thread overhead (not in any op)"


def op_scopes(hlo_text: str) -> dict[str, str]:
    """Instruction name -> the JAX name stack it came from (``metadata op_name``), from a compiled
    program's HLO text. An instruction XLA made without metadata (a dot it rewrote, say) takes the
    stack of the instruction scheduled before it in its computation."""
    scopes, last = {}, ""
    for line in hlo_text.splitlines():
        if not line.startswith(" "):  # a computation starts (or ends)
            last = ""
            continue
        instruction = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = ", line)
        if instruction is None:
            continue
        stack = re.search(r'metadata=\{op_name="([^"]*)"', line)
        last = stack.group(1) if stack else last
        scopes[instruction.group(1)] = last
    return scopes


@contextlib.contextmanager
def name_stacks_in_metadata():
    """Lowering in this context keeps each op's JAX name stack in its HLO metadata (``op_name``),
    which ``op_scopes`` reads: JAX writes it there only with full tracebacks in the locations,
    its default, which a user (or the test suite, for speed) may have turned off."""
    flag = "jax_include_full_tracebacks_in_locations"
    before = getattr(jax.config, flag)
    jax.config.update(flag, True)
    try:
        yield
    finally:
        jax.config.update(flag, before)


def category(name_stack: str) -> str:
    parts = name_stack.split("/")
    for scope, label in CATEGORIES:
        if scope in parts:
            return label
    return OTHER


PROFILE_OPTIONS = jax.profiler.ProfileOptions()
PROFILE_OPTIONS.python_tracer_level = 0  # the compiled ops only: Python tracing would slow the calls down
PROFILE_OPTIONS.host_tracer_level = 1


def traced_op_times(call) -> tuple[dict[str, float], float]:
    """Runs ``call()`` under ``jax.profiler`` -> ({op name: total seconds over its thunk events},
    wall seconds). Loops (``while``) are left out: their bodies' ops are counted one by one."""
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        with jax.profiler.trace(folder, profiler_options=PROFILE_OPTIONS):
            jax.block_until_ready(call())
        wall = time.perf_counter() - start
        data = jax.profiler.ProfileData.from_file(str(next(Path(folder).rglob("*.xplane.pb"))))
    times = collections.defaultdict(float)
    for plane in data.planes:
        for line in plane.lines:
            for event in line.events:
                stats = dict(event.stats)
                name = stats.get("hlo_op")
                if name is not None and "generate" in str(stats.get("hlo_module", "")) and not name.startswith("while"):
                    times[name] += event.duration_ns * 1e-9
    return dict(times), wall


def decode_profile(model, prompt, new_tokens: int, untraced: dict[int, float]) -> dict:
    """Milliseconds per decode step by category, from ``generate`` traced twice (``new_tokens``
    and 1 new token: the difference is the decode loop). ``untraced``: the seconds of the same
    two calls without the profiler, which slows the ops down (``traced_step_ms`` against
    ``step_ms``); the shares are what to read."""
    from jaxattn.lm import generate as generation

    def call(n):
        return lambda: generate(model, [prompt], max_new_tokens=n)

    graphdef, params = nnx.split(model)
    with name_stacks_in_metadata():
        lowered = generation._generate_cached.lower(
            graphdef, params, jax.numpy.asarray(prompt[None]), jax.numpy.asarray([len(prompt)], np.int32),
            jax.random.key(0), generation.Stopping(), max_new_tokens=new_tokens, sampling=generation.Sampling(),
            cache_length=len(prompt) + new_tokens, cache_dtype=None)
    scopes = op_scopes(lowered.compile().as_text())
    steps = new_tokens - 1
    _, wall_one = traced_op_times(call(1))
    times, wall = traced_op_times(call(new_tokens))
    per_step = collections.defaultdict(float)
    for name, seconds in times.items():
        stack = scopes.get(name, "")
        if "while" in stack.split("/")[:2]:  # jit(_generate_cached)/while/...: the decode loop, not the prefill
            per_step[category(stack)] += seconds * 1e3 / steps
    traced_step = (wall - wall_one) * 1e3 / steps
    per_step[OVERHEAD] = max(traced_step - sum(per_step.values()), 0.0)
    return dict(step_ms=(untraced[new_tokens] - untraced[1]) * 1e3 / steps, traced_step_ms=traced_step,
                categories=dict(per_step))


def run_model(name, hf, *, formats, prompt_tokens, new_tokens, repeats, bandwidth, say):
    config = transformer_config(hf)
    base = TransformerLM(config, rngs=nnx.Rngs(0))
    prompt = np.random.default_rng(0).integers(0, config.vocab_size, prompt_tokens).astype(np.int32)
    rows = []
    reference = None
    for weights in formats:
        model = convert_weights(base, weights)
        nbytes = weight_bytes(model)
        limit = bandwidth / nbytes
        tokens = np.asarray(generate(model, [prompt], max_new_tokens=new_tokens))
        reference = tokens if reference is None else reference
        untraced = {n: time_calls(lambda n=n: generate(model, [prompt], max_new_tokens=n), repeats=repeats).min_s
                    for n in (1, new_tokens)}
        tokens_per_s = new_tokens / untraced[new_tokens]
        profile = decode_profile(model, prompt, new_tokens, untraced)
        row = dict(model=name, weights=weights, weight_bytes=nbytes, limit_tokens_per_s=limit,
                   tokens_per_s=tokens_per_s, fraction_of_limit=tokens_per_s / limit,
                   step_ms=profile["step_ms"], step_fraction_of_limit=1e3 / profile["step_ms"] / limit,
                   traced_step_ms=profile["traced_step_ms"], profile_ms=profile["categories"],
                   greedy_agreement=float(np.mean(tokens == reference)))
        rows.append(row)
        say(f"{name}, {weights} weights: {nbytes / 1e6:.0f} MB -> limit {limit:.1f} tokens/s; generate "
            f"{tokens_per_s:.1f} tokens/s = {row['fraction_of_limit']:.0%} of the limit (decode step alone "
            f"{row['step_ms']:.2f} ms = {row['step_fraction_of_limit']:.0%}); greedy tokens as float32: "
            f"{row['greedy_agreement']:.0%}", flush=True)
        say(f"  profile of a step (traced: {row['traced_step_ms']:.2f} ms, untraced {row['step_ms']:.2f} ms):")
        for label, ms in sorted(row["profile_ms"].items(), key=lambda item: -item[1]):
            say(f"    {label:45s} {ms:7.3f} ms  {ms / row['traced_step_ms']:5.1%}")
    return rows


# GPT-2 small's products of one decode step, (inputs K, outputs N): q/k/v, MLP up, MLP down, output layer.
PRODUCT_SHAPES = ((768, 2304), (768, 3072), (3072, 768), (768, 50257))


def product_speeds(formats, *, repeats: int, say) -> list[dict]:
    """One product ``x [1, K] @ W`` at a time, compiled alone, for each weight format and both
    layouts: ``[K, N]`` (``x @ W``, as a model holds its kernels) and ``[N, K]`` (``x @ W^T``, as
    ``PackedWeight`` stores them), the weight converted to float32 inside the product. The
    microseconds say which layout XLA on this CPU reads at speed; the model's loop adds the rest."""
    rng = np.random.default_rng(0)
    rows = []
    for K, N in PRODUCT_SHAPES:
        x = jax.numpy.asarray(rng.standard_normal((1, K)), np.float32)
        weight = jax.numpy.asarray(rng.standard_normal((K, N)), np.float32)
        for weights in formats:
            for layout, stored, product in (
                    ("[K, N]", weight, lambda x, w: x @ w.astype(x.dtype)),
                    ("[N, K]", weight.T.copy(), lambda x, w: x @ w.T.astype(x.dtype))):
                stored = stored.astype(weights)
                compiled = jax.jit(product).lower(x, stored).compile()
                seconds = time_calls(lambda: compiled(x, stored), repeats=repeats).min_s
                rows.append(dict(K=K, N=N, weights=weights, layout=layout, us=seconds * 1e6,
                                 gb_per_s=stored.nbytes / seconds / 1e9))
        say(f"  {K:>5} x {N:<6} " + "  ".join(f"{row['weights']} {row['layout']} {row['us']:6.0f} us"
                                             for row in rows if (row["K"], row["N"]) == (K, N)), flush=True)
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--formats", nargs="+", default=["float32", "bfloat16", "int8"])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args(argv)
    bandwidth = read_bandwidth()
    cpu = cpu_model()
    print(f"CPU: {cpu}; {device_kind()}; jax {jax.__version__}; read bandwidth {bandwidth / 1e9:.1f} GB/s "
          f"(best of 5 jnp.sum over 1 GiB)")
    print("One product of a decode step at a time (weights converted to float32 inside the product):", flush=True)
    products = product_speeds(args.formats, repeats=20, say=print)
    print(f"batch 1, prompt {args.prompt}, {args.new} new tokens, greedy, KV cache", flush=True)
    rows = []
    for name in args.models:
        rows += run_model(name, MODELS[name], formats=args.formats, prompt_tokens=args.prompt, new_tokens=args.new,
                          repeats=args.repeats, bandwidth=bandwidth, say=print)
    print()
    print("| model | weights | MB | limit tokens/s | tokens/s | of the limit | same greedy tokens as f32 |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['model']} | {row['weights']} | {row['weight_bytes'] / 1e6:.0f} | {row['limit_tokens_per_s']:.1f} | "
              f"{row['tokens_per_s']:.1f} | {row['fraction_of_limit']:.0%} | {row['greedy_agreement']:.0%} |")
    date = datetime.date.today().isoformat()
    results = dict(device_kind=device_kind(), cpu=cpu, read_bandwidth_bytes_per_s=bandwidth, date=date,
                   versions={"jax": jax.__version__}, prompt=args.prompt, new_tokens=args.new, rows=rows,
                   products=products)
    path = write_results(results, "decode-profile", args.results)
    print(f"\nSummary: {len(rows)} rows; results {path}")
    return results


if __name__ == "__main__":
    main()
