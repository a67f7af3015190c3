"""Step 16: why one-token decoding is bound by memory bandwidth, measured on the machine that
runs the tour (bandwidth, matmul FLOP/s, a roofline), and what an int8 cache saves and costs."""

from __future__ import annotations

import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn import viz
from jaxattn.mathml import block, frac, o, paren, t
from jaxattn.tour.page import cpu_model, heading, show

GPT2_SMALL = {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257,
              "n_positions": 1024, "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new"}  # its config.json


def best_seconds(fn, *args, budget: float = 0.4, runs: int = 7) -> float:
    """The fastest of up to ``runs`` timed calls of compiled ``fn`` (after one to compile and
    warm up), stopping early once ``budget`` seconds are spent."""
    jax.block_until_ready(fn(*args))
    best, spent = math.inf, 0.0
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        elapsed = time.perf_counter() - start
        best, spent = min(best, elapsed), spent + elapsed
        if spent > budget:
            break
    return best


def machine_limits(*, side: int = 2048) -> dict:
    """Measured now, about 2 s in all: ``bandwidth`` (bytes/s: the fastest that a matrix-vector
    product streamed a float32 matrix of 128 MB or of 64 MB, the read a decode step does,
    larger than any cache),
    ``peak_flops`` (the fastest FLOP/s of the matmuls below and a ``side`` x ``side`` one),
    and two matmuls shaped like the two halves of generation, each as ``(FLOPs per byte,
    FLOP/s)``: ``decode`` (one row times a 4096 x 4096 matrix, one token through a layer) and
    ``prefill`` (256 rows times 2048 x 2048)."""
    matrix = jnp.ones((8192, 4096), jnp.float32)
    bandwidth = matrix.nbytes / best_seconds(jax.jit(jnp.matmul), jnp.ones((1, 8192), jnp.float32), matrix)
    del matrix
    a = jnp.ones((side, side), jnp.float32)
    peak = 2 * side**3 / best_seconds(jax.jit(lambda a: a @ a), a)
    points = {}
    for name, (rows, n) in {"decode": (1, 4096), "prefill": (256, 2048)}.items():
        left, right = jnp.ones((rows, n), jnp.float32), jnp.ones((n, n), jnp.float32)
        flops = 2 * rows * n * n
        bytes_moved = 4 * (n * n + 2 * rows * n)
        points[name] = (flops / bytes_moved, flops / best_seconds(jax.jit(jnp.matmul), left, right))
    peak = max(peak, points["prefill"][1])
    bandwidth = max(bandwidth, 2 * points["decode"][1])  # the decode product's own rate: 4 bytes per 2 FLOPs
    return {"bandwidth": bandwidth, "peak_flops": peak, **points}


def parameter_count(config) -> int:
    """How many parameters a ``TransformerLM`` of ``config`` has (shapes only, nothing allocated)."""
    from jaxattn.nn import TransformerLM

    abstract = nnx.eval_shape(lambda: TransformerLM(config, rngs=nnx.Rngs(0)))
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nnx.state(abstract)))


def cache_bytes_per_token(config) -> dict:
    """Bytes one cached token takes over all layers: keys and values, K heads of D, as float32,
    bfloat16, and int8 with a bfloat16 scale per token and head."""
    entries = 2 * config.layers * config.kv_heads * config.head_dim
    return {"float32": 4 * entries, "bfloat16": 2 * entries, "int8 + scales": entries + 2 * 2 * config.layers * config.kv_heads}


def int8_cache_cost(model, tokens) -> dict:
    """The same text through the model with a float cache and an int8 one, every position's
    logits: bits per byte of each (teacher-forced) and the largest change in a log-probability."""
    tokens = jnp.asarray(tokens)[None]  # [1, T + 1]
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    @nnx.jit(static_argnames="dtype")
    def log_probs(model, inputs, dtype):
        logits, _ = model(inputs, cache=model.init_cache(1, max_length=inputs.shape[1], dtype=dtype))
        return jax.nn.log_softmax(logits)  # [1, T, V]

    float_lp, int8_lp = log_probs(model, inputs, None), log_probs(model, inputs, "int8")

    def bits(lp):
        return float(-jnp.take_along_axis(lp, targets[..., None], -1).mean() / math.log(2))

    return {"float_bits": bits(float_lp), "int8_bits": bits(int8_lp),
            "largest_change": float(jnp.max(jnp.abs(float_lp - int8_lp))),
            "same_top_token": float(jnp.mean(jnp.argmax(float_lp, -1) == jnp.argmax(int8_lp, -1)))}


def step_decoding_speed(say, model, text_tokens, *, out: Path) -> dict:
    """Step 16. ``text_tokens``: a held-out text (int ids) for the int8 cache's cost."""
    from jaxattn.lm.hf import transformer_config

    heading(say, "Step 16. Why one-token decoding is bound by memory bandwidth")
    say("To produce one token, a decode step multiplies one row of activations by every weight")
    say("matrix: each parameter is read from memory once and used for one multiply-add (2 FLOPs).")
    say("A float32 parameter is 4 bytes, so the step does 0.5 FLOP per byte it reads, and the")
    say("processor waits for memory. A prompt of T tokens (prefill) reuses each weight T times.")
    limits = machine_limits()
    bandwidth, peak = limits["bandwidth"], limits["peak_flops"]
    device = f"{jax.devices()[0].device_kind}, {cpu_model()}"
    say(f"Measured now on this machine ({device}): memory bandwidth {bandwidth / 1e9:.1f} GB/s (the fastest")
    say(f"read of matrix-vector products over 64 and 128 MB), matmul {peak / 1e9:.0f} GFLOP/s (float32). The")
    say(f"ridge point, where arithmetic catches up with memory, is {peak / bandwidth:.0f} FLOPs per byte (Williams et")
    say("al. 2009, the roofline):")
    say.formula("time ≥ max(FLOPs / peak, bytes / bandwidth)",
                block(t("time"), o("≥"), t("max"), paren(frac(t("FLOPs"), t("peak")), o(","), frac(t("bytes"), t("bandwidth")))))
    for name, (intensity, flops) in (("one row x 4096 x 4096 (a decode step's matmul)", limits["decode"]),
                                     ("256 rows x 2048 x 2048 (a prefill's matmul)", limits["prefill"])):
        say(f"  {name}: {intensity:.1f} FLOP/byte, {flops / 1e9:.1f} GFLOP/s "
            f"({flops / min(peak, bandwidth * intensity):.0%} of its roof)")
    gpt2 = transformer_config(GPT2_SMALL)
    parameters = parameter_count(gpt2)
    weights = 4 * parameters
    per_token = cache_bytes_per_token(gpt2)["float32"]
    context = 1024
    read = weights + per_token * context
    say("")
    say(f"Worked example, GPT-2 small (its config: 12 layers, width 768): {parameters:,} parameters,")
    say(f"{weights / 1e6:,.0f} MB in float32; its KV cache holds {per_token:,} bytes per token (2 x 12 layers x 768 x 4),")
    say(f"{per_token * context / 1e6:.1f} MB at {context} tokens. One decode step at that length reads about")
    say(f"{read / 1e6:,.0f} MB, so on this machine it takes at least {read / bandwidth * 1e3:.0f} ms: at most "
        f"{bandwidth / read:.0f} tokens/s per")
    say("sequence, whatever the processor's FLOP/s. Batching helps because 8 sequences decoding")
    say("together read the weights once for all 8; bfloat16 weights halve the bytes, int8 quarter them.")
    show(say, viz.roofline_figure(peak, bandwidth, {
        "decode-shaped matmul (measured)": limits["decode"],
        "prefill-shaped matmul (measured)": limits["prefill"],
    }, out / "roofline.png"), "the roofline of this machine, with a decode-shaped and a prefill-shaped matmul placed on it")

    tour = cache_bytes_per_token(model.config)
    cost = int8_cache_cost(model, text_tokens)
    say("")
    say("At long contexts a decode step reads mostly the cache. An int8 cache (jaxattn generate --kv-cache")
    say("int8) keeps each key and value vector as int8 numbers and one bfloat16 scale per token and head")
    say("(scale = max|x| / 127), dequantized a block at a time inside the decode kernel. Bytes per token:")
    for name, sizes in (("GPT-2 small", cache_bytes_per_token(gpt2)), ("the tour's model", tour)):
        say(f"  {name}: " + ", ".join(f"{kind} {size:,}" for kind, size in sizes.items()))
    say(f"What it costs, measured on the tour's model over {len(text_tokens) - 1} bytes of held-out text (every position")
    say(f"attends through the cache): {cost['float_bits']:.4f} bits/byte with a float32 cache, {cost['int8_bits']:.4f} with")
    say(f"int8; the largest change in any log-probability is {cost['largest_change']:.3f}, and the most likely next byte")
    say(f"is the same at {cost['same_top_token']:.1%} of the positions.")
    show(say, viz.cache_bytes_figure({"GPT-2 small": cache_bytes_per_token(gpt2), "the tour's model": tour},
                                     out / "int8_cache.png"),
         "KV-cache bytes per token in float32, bfloat16 and int8 (with its scales)")
    return {"limits": limits, "gpt2_parameters": parameters, "gpt2_bytes_per_step": read,
            "gpt2_ms_bound": read / bandwidth * 1e3, "cache_bytes": {"gpt2": cache_bytes_per_token(gpt2), "tour": tour},
            "int8_cost": cost}
