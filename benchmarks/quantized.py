"""Fewer bytes per token, and what they cost: bfloat16 and int8 weights, the int8 KV cache.

    python -m benchmarks.quantized [--run runs/default] [--windows 16] [--new 200] [--llama-steps 600]

**Quality**, on held-out text (the last 10% of the default corpus, the standard library's
``pydoc_data.topics``, never trained on), for two trained byte-level models:

- the default model of ``jaxattn train`` (the run folder ``--run``; trained with the defaults
  when it is missing, about 5 minutes here);
- a *loaded checkpoint*: a Llama of the same size (width 128, 4 layers, 4/2 heads, SwiGLU
  352, tied embeddings) trained here with transformers (PyTorch, ``--llama-steps`` steps of 16 x
  128 bytes, AdamW) on the same 90%, saved with ``save_pretrained`` and loaded from its
  safetensors by ``load_hf_model``.

Each is run four ways: float32 (weights and cache), bfloat16 weights, int8 weights (one scale
per output channel, ``jaxattn.lm.quantize``), and an int8 cache (a scale per token and head).
Reported: bits per byte over ``--windows`` windows of 128 bytes (the length both models were
trained on), every window prefilled through the cache with logits at every position (so an int8 cache's keys are read back
quantized, as in decoding); how far the logits moved from float32's, in units of their spread
over the vocabulary (their standard deviation at that position): the most any logit of a
position moved, as the median, 99th percentile and maximum over positions; and
greedy agreement over ``--new`` new tokens from four 64-byte prompts of the held-out text
(the share of positions where the variant writes float32's token, and where it first differs).

**The cache**: bytes per token (``stored_bytes_per_token``, scales included) of float32,
bfloat16 and int8 caches, and one decode step at 1,000 and 16,000 tokens held with the float32
and the int8 cache, for three shapes (4 layers each): the decode benchmark's GQA (8/4 heads of
32) and MLA (L = 64, R = 16) models and an MHA with GPT-2's heads (12 of 64, width 768).

Writes ``benchmarks/results/quantized-<device>-<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from benchmarks.decode import step_seconds
from benchmarks.timing import cpu_model, device_kind, write_results
from jaxattn.functional import KVCache, LatentCache, stored_bytes_per_token
from jaxattn.lm.data import batch_at, evaluation_windows, load_corpus
from jaxattn.lm.generate import generate
from jaxattn.lm.quantize import convert_weights
from jaxattn.nn import TransformerConfig, TransformerLM

RESULTS = Path(__file__).parent / "results"
BITS_PER_NAT = 1 / np.log(2)
WINDOW = 128  # the length both models were trained on
VARIANTS = ("float32", "bfloat16 weights", "int8 weights", "int8 cache")


def variant(model, name: str):
    """``(model, cache dtype)`` of one of ``VARIANTS``."""
    if name.endswith("weights"):
        return convert_weights(model, name.split()[0]), None
    return model, ("int8" if name == "int8 cache" else None)


def window_logits(model, windows: np.ndarray, cache_dtype, batch: int = 4):
    """Cross entropy in bits of every next byte of ``windows [N, T + 1]`` and the logits
    ``[N, T, V]``: each window prefilled into an empty cache of ``cache_dtype``."""
    graphdef, params = nnx.split(model)
    T = windows.shape[1] - 1

    @jax.jit
    def run(params, tokens):  # [b, T + 1] -> bits [b, T], logits [b, T, V]
        net = nnx.merge(graphdef, params)
        logits, _ = net(tokens[:, :-1], cache=net.init_cache(tokens.shape[0], max_length=T, dtype=cache_dtype))
        logits = logits.astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]) * BITS_PER_NAT, logits

    bits, logits = zip(*(run(params, jnp.asarray(windows[i : i + batch])) for i in range(0, len(windows), batch)))
    return np.concatenate([np.asarray(b) for b in bits]), np.concatenate([np.asarray(x) for x in logits])


def quality(name: str, model, validation: np.ndarray, *, windows: int, new_tokens: int, say,
            variants=VARIANTS) -> list[dict]:
    """One row per variant (float32 first: the others are compared with it)."""
    held_out = evaluation_windows(validation, length=WINDOW, max_windows=windows)
    starts = np.linspace(0, len(validation) - 64, 4).astype(int)
    prompts = [validation[s : s + 64] for s in starts]
    rows, reference = [], {}
    for way in variants:
        started = time.perf_counter()
        net, cache_dtype = variant(model, way)
        bits, logits = window_logits(net, held_out, cache_dtype)
        greedy = np.asarray(generate(net, prompts, max_new_tokens=new_tokens, cache_dtype=cache_dtype))
        if not reference:
            reference = dict(bits=bits, logits=logits, greedy=greedy)
        spread = reference["logits"].std(axis=-1, keepdims=True)  # [N, T, 1]
        moved = (np.abs(logits - reference["logits"]) / spread).max(axis=-1)  # [N, T]: the most any logit moved
        same = greedy == reference["greedy"]
        first = [int(np.argmin(row)) if not row.all() else new_tokens for row in same]
        row = dict(model=name, variant=way, bits_per_byte=float(bits.mean()),
                   relative_change=float(bits.mean() / reference["bits"].mean() - 1),
                   logits_max_moved=float(moved.max()), logits_median_moved=float(np.median(moved)),
                   logits_p99_moved=float(np.percentile(moved, 99)),
                   greedy_agreement=float(same.mean()), first_difference=first, windows=len(held_out),
                   seconds=time.perf_counter() - started)
        rows.append(row)
        say(f"  {way:>16}: {row['bits_per_byte']:.4f} bits/byte ({row['relative_change']:+.2%}), logits moved (units "
            f"of their spread; the most at a position: median {row['logits_median_moved']:.4f}, 99th percentile "
            f"{row['logits_p99_moved']:.4f}, max {row['logits_max_moved']:.4f}), "
            f"greedy agreement {row['greedy_agreement']:.1%} over {new_tokens} tokens (first difference {first})",
            flush=True)
    return rows


def default_model(run: Path, say):
    from jaxattn.lm.checkpoint import RUN_FILE, RunFolder

    if not (run / RUN_FILE).is_file():
        from jaxattn.lm.train import TrainConfig, default_model_config, train

        say(f"{run} has no trained model: training the default one (jaxattn train's defaults)", flush=True)
        train(default_model_config(), TrainConfig(), load_corpus(), RunFolder(run))
    return RunFolder(run).load_model()


def trained_llama(train_tokens: np.ndarray, *, steps: int, folder: str, say):
    """A Llama the size of the default model, trained with transformers on the training bytes and
    saved with ``save_pretrained`` into ``folder``; returns the final train loss in bits/byte."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=352, max_position_embeddings=1024,
                                      rms_norm_eps=1e-6, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-3, weight_decay=0.1)
    warmup = 50
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * step / steps))))
    started, losses = time.perf_counter(), []
    for step in range(steps):
        batch = torch.tensor(batch_at(train_tokens, step, batch=16, length=128, seed=1), dtype=torch.long)
        loss = model(input_ids=batch, labels=batch).loss  # transformers shifts the labels by one
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item() * BITS_PER_NAT)
        if (step + 1) % 100 == 0 or step + 1 == steps:
            say(f"  transformers Llama, step {step + 1}/{steps}: train {np.mean(losses[-50:]):.3f} bits/byte "
                f"({time.perf_counter() - started:.0f} s)", flush=True)
    model.save_pretrained(folder)
    return float(np.mean(losses[-50:]))


CACHE_SHAPES = {
    "GQA (8/4 heads of 32)": dict(width=256, heads=8, kv_heads=4, head_dim=32, mlp_hidden=704),
    "MHA (12 heads of 64, GPT-2's)": dict(width=768, heads=12, head_dim=64, mlp_hidden=2048),
    "MLA (L = 64, R = 16)": dict(width=256, heads=8, head_dim=32, mlp_hidden=704, attention="mla", latent_dim=64,
                                 rope_dim=16),
}


def cache_part(*, positions, repeats: int, say) -> list[dict]:
    capacity = max(positions) + 64
    rows = []
    for name, shape in CACHE_SHAPES.items():
        config = TransformerConfig(layers=4, max_length=capacity, **shape)
        if config.attention == "mla":
            make = lambda dtype: LatentCache.create(batch=1, max_length=8, latent_dim=config.latent_dim,  # noqa: E731
                                                    rope_dim=config.rope_dim, dtype=dtype)
        else:
            make = lambda dtype: KVCache.create(batch=1, max_length=8, kv_heads=config.kv_heads,  # noqa: E731
                                                head_dim=config.head_dim, dtype=dtype)
        sizes = {str(jnp.dtype(d)): stored_bytes_per_token(make(d)) for d in (jnp.float32, jnp.bfloat16, jnp.int8)}
        model = TransformerLM(config, rngs=nnx.Rngs(0))
        steps = {dtype or "float32": [step_seconds(model, position=p, capacity=capacity, repeats=repeats,
                                                    cache_dtype=dtype) for p in positions]
                 for dtype in (None, "int8")}
        row = dict(model=name, bytes_per_token_per_layer=sizes, int8_over_bfloat16=sizes["int8"] / sizes["bfloat16"],
                   positions=list(positions), step_seconds=steps,
                   int8_speedup=[f / i for f, i in zip(steps["float32"], steps["int8"])])
        rows.append(row)
        say(f"  {name}: bytes/token/layer f32 {sizes['float32']:.0f}, bf16 {sizes['bfloat16']:.0f}, int8 "
            f"{sizes['int8']:.0f} ({row['int8_over_bfloat16']:.3f}x bf16); step ms at "
            + ", ".join(f"{p:,}: f32 {f * 1e3:.2f} int8 {i * 1e3:.2f} ({f / i:.2f}x)"
                        for p, f, i in zip(positions, steps["float32"], steps["int8"])), flush=True)
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/default", help="the default model's run folder (trained if missing)")
    parser.add_argument("--windows", type=int, default=64, help="held-out windows of 128 bytes")
    parser.add_argument("--new", type=int, default=200, help="new tokens of the greedy agreement")
    parser.add_argument("--llama-steps", dest="llama_steps", type=int, default=600)
    parser.add_argument("--positions", type=int, nargs="+", default=[1000, 16000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", nargs="+", choices=["quality", "cache"], default=["quality", "cache"])
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args(argv)
    say = print
    cpu = cpu_model()
    say(f"CPU: {cpu}; {device_kind()}; jax {jax.__version__}")
    results = dict(device_kind=device_kind(), cpu=cpu, date=datetime.date.today().isoformat(),
                   versions={"jax": jax.__version__}, quality=[], cache=[])
    if "quality" in args.only:
        corpus = load_corpus()
        say(f"[quality] held-out text: {len(corpus.validation):,} bytes of {corpus.name}; {args.windows} windows of "
            f"{WINDOW}; greedy agreement over {args.new} tokens from 4 prompts")
        say(f"The default model ({args.run}):", flush=True)
        results["quality"] += quality("default model", default_model(Path(args.run), say), corpus.validation,
                                      windows=args.windows, new_tokens=args.new, say=say)
        from jaxattn.lm.hf import load_hf_model

        with tempfile.TemporaryDirectory() as folder:
            say("A Llama trained with transformers, loaded from its safetensors:", flush=True)
            results["llama_train_bits_per_byte"] = trained_llama(corpus.train, steps=args.llama_steps, folder=folder,
                                                                 say=say)
            model, _ = load_hf_model(folder)
        results["quality"] += quality("loaded Llama checkpoint", model, corpus.validation, windows=args.windows,
                                      new_tokens=args.new, say=say)
    if "cache" in args.only:
        say(f"[cache] bytes per token and one decode step, batch 1, {args.repeats} repeats (median)", flush=True)
        results["cache"] = cache_part(positions=args.positions, repeats=args.repeats, say=say)
    path = write_results(results, "quantized", args.results)
    say("\nSummary:")
    for row in results["quality"]:
        say(f"  {row['model']}, {row['variant']}: {row['bits_per_byte']:.4f} bits/byte ({row['relative_change']:+.2%}), "
            f"logits moved median {row['logits_median_moved']:.4f} / p99 {row['logits_p99_moved']:.4f} / max "
            f"{row['logits_max_moved']:.4f}, greedy agreement {row['greedy_agreement']:.1%}")
    for row in results["cache"]:
        say(f"  {row['model']}: int8 cache {row['int8_over_bfloat16']:.3f}x the bf16 cache's bytes; step at "
            f"{row['positions'][-1]:,} tokens {row['int8_speedup'][-1]:.2f}x the float32 cache's speed")
    say(f"results {path}")
    return results


if __name__ == "__main__":
    main()
