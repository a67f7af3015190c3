"""Decoding speed against Hugging Face transformers, on the same random weights.

    python -m benchmarks.hf_decode [--new 128] [--prompt 64] [--repeats 3]

Needs the ``parity`` extra (PyTorch CPU + transformers). For each model a random
checkpoint is made with transformers, saved with ``save_pretrained`` and loaded into
jaxattn with ``jaxattn.lm.hf.load_hf_model``, so both sides hold identical weights. Then,
in this one process: batch 1, a random prompt, greedy decoding of N new tokens with the
KV cache, timed end to end (prefill included), minimum and median of several runs,
float32 on the CPU. Both continuations are checked to be the same tokens.

Models: GPT-2 small (12 layers, width 768, 12 heads, vocabulary 50257); a small
Llama-shaped GQA model (8 layers, width 512, 8 query / 2 key-value heads, SwiGLU 1536,
vocabulary 32000); a Llama-3-shaped one (the same shape with Llama 3's vocabulary of
128256, rope_theta 500000 and its ``llama3`` RoPE scaling); and a Gemma-2-shaped one (8
layers alternating a 64-token window and global attention, width 512, 8/4 heads of 64,
GeGLU 1536, soft-capped attention and final logits, four norms a layer, Gemma's
vocabulary of 256000 tied to the embedding; transformers runs it with eager attention,
which soft-capping needs). Also: the read bandwidth measured in this process, each float32 figure
as a fraction of ``bandwidth / weight bytes``, and the same checkpoints decoded with their
weights stored in bfloat16 and int8 (``--formats``). Prints a table with the ratio; writes
benchmarks/results/hf-decode-<device>-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import tempfile
from pathlib import Path

import jax
import numpy as np

from benchmarks.timing import cpu_model, device_kind, read_bandwidth, time_calls, write_results
from jaxattn.lm.generate import generate
from jaxattn.lm.hf import load_hf_model
from jaxattn.lm.quantize import convert_weights, weight_bytes

RESULTS = Path(__file__).parent / "results"


def hf_models():
    import transformers

    return {
        "GPT-2 small (12 x 768, 12 heads)": transformers.GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257),
        "Llama-shaped GQA (8 x 512, 8/2 heads)": transformers.LlamaConfig(
            hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2, intermediate_size=1536,
            vocab_size=32000, max_position_embeddings=2048),
        "Llama-3-shaped (8 x 512, 8/2 heads, llama3 RoPE)": transformers.LlamaConfig(
            hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2, intermediate_size=1536,
            vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
            rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                              original_max_position_embeddings=8192)),
        "Gemma-2-shaped (8 x 512, 8/4 heads, local/global, soft-caps)": transformers.Gemma2Config(
            hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
            intermediate_size=1536, vocab_size=256000, max_position_embeddings=8192, sliding_window=64,
            query_pre_attn_scalar=64, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
            attn_implementation="eager"),
    }


def run_one(name, config, *, prompt_tokens, new_tokens, repeats, bandwidth, formats, say):
    import torch
    import transformers

    torch.manual_seed(0)
    reference = transformers.AutoModelForCausalLM.from_config(config).eval()
    reference.generation_config.eos_token_id = None
    reference.generation_config.pad_token_id = 0
    prompt = np.random.default_rng(0).integers(0, config.vocab_size, prompt_tokens).astype(np.int32)
    with tempfile.TemporaryDirectory() as folder:
        reference.save_pretrained(folder)
        model, _ = load_hf_model(folder)
    parameters = sum(p.numel() for p in reference.parameters())
    say(f"{name}: {parameters / 1e6:.0f}M parameters, loaded into jaxattn from the same safetensors")

    def theirs():
        with torch.no_grad():
            return reference.generate(torch.tensor(prompt[None], dtype=torch.long), max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, do_sample=False)[0, prompt_tokens:].numpy()

    def ours():
        return generate(model, [prompt], max_new_tokens=new_tokens)

    same = np.array_equal(np.asarray(ours()[0]), theirs())
    ours_timing = time_calls(ours, repeats=repeats)
    theirs_timing = time_calls(theirs, repeats=repeats)
    limit = bandwidth / weight_bytes(model)
    row = dict(model=name, parameters=parameters, jaxattn_tokens_per_s=new_tokens / ours_timing.min_s,
               transformers_tokens_per_s=new_tokens / theirs_timing.min_s, jaxattn_median_s=ours_timing.median_s,
               transformers_median_s=theirs_timing.median_s, same_tokens=bool(same), limit_tokens_per_s=limit)
    row["ratio"] = row["jaxattn_tokens_per_s"] / row["transformers_tokens_per_s"]
    row["fraction_of_limit"] = row["jaxattn_tokens_per_s"] / limit
    say(f"  jaxattn {row['jaxattn_tokens_per_s']:.1f} tokens/s ({row['fraction_of_limit']:.0%} of the limit, "
        f"{limit:.1f}), transformers {row['transformers_tokens_per_s']:.1f} tokens/s -> {row['ratio']:.2f}x; "
        f"identical greedy tokens: {same}", flush=True)
    reference = np.asarray(ours()[0])
    row["weights"] = {}
    for weights in formats:  # the same checkpoint with its matrices stored in fewer bytes
        small = convert_weights(model, weights)

        def narrow():
            return generate(small, [prompt], max_new_tokens=new_tokens)

        agreement = float(np.mean(np.asarray(narrow()[0]) == reference))
        tokens_per_s = new_tokens / time_calls(narrow, repeats=repeats).min_s
        row["weights"][weights] = dict(tokens_per_s=tokens_per_s, vs_float32=tokens_per_s / row["jaxattn_tokens_per_s"],
                                       greedy_agreement=agreement)
        say(f"  jaxattn, {weights} weights: {tokens_per_s:.1f} tokens/s = {tokens_per_s / row['jaxattn_tokens_per_s']:.2f}x "
            f"float32; greedy tokens as float32's: {agreement:.0%}", flush=True)
    return row


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--formats", nargs="*", default=["bfloat16", "int8"],
                        help="also decode with the weights stored in these formats (jaxattn.lm.quantize)")
    args = parser.parse_args(argv)
    import torch
    import transformers

    versions = {"jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__}
    bandwidth = read_bandwidth()
    print(f"device: {device_kind()}; CPU: {cpu_model()}; read bandwidth {bandwidth / 1e9:.1f} GB/s (best of 5 "
          f"jnp.sum over 1 GiB); torch threads {torch.get_num_threads()}; {versions}")
    print(f"batch 1, prompt {args.prompt}, {args.new} new tokens, greedy, float32, KV cache on both sides")
    rows = [run_one(name, config, prompt_tokens=args.prompt, new_tokens=args.new, repeats=args.repeats,
                    bandwidth=bandwidth, formats=args.formats, say=print)
            for name, config in hf_models().items()]
    print()
    formats = "".join(f" {weights} tokens/s (x float32) |" for weights in args.formats)
    print(f"| model | jaxattn tokens/s | of the limit | transformers tokens/s | jaxattn / transformers | same tokens |{formats}")
    print("| --- | ---: | ---: | ---: | ---: | --- |" + " ---: |" * len(args.formats))
    for row in rows:
        narrow = "".join(f" {row['weights'][w]['tokens_per_s']:.1f} ({row['weights'][w]['vs_float32']:.2f}x) |"
                         for w in args.formats)
        print(f"| {row['model']} | {row['jaxattn_tokens_per_s']:.1f} | {row['fraction_of_limit']:.0%} | "
              f"{row['transformers_tokens_per_s']:.1f} | {row['ratio']:.2f}x | {'yes' if row['same_tokens'] else 'no'} |"
              f"{narrow}")
    results = {"device_kind": device_kind(), "cpu": cpu_model(), "read_bandwidth_bytes_per_s": bandwidth,
               "versions": versions, "date": datetime.date.today().isoformat(), "prompt": args.prompt,
               "new_tokens": args.new, "rows": rows}
    path = write_results(results, "hf-decode", args.results)
    print(f"\nSummary: {len(rows)} models; results {path}")
    return results


if __name__ == "__main__":
    main()
