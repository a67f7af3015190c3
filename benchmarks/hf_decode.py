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
which soft-capping needs). Prints a table with the ratio; writes
benchmarks/results/hf-decode-<device>-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import tempfile
from pathlib import Path

import jax
import numpy as np

from benchmarks.timing import device_kind, time_calls, write_results
from jaxattn.lm.generate import generate
from jaxattn.lm.hf import load_hf_model

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


def run_one(name, config, *, prompt_tokens, new_tokens, repeats, say):
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
    row = dict(model=name, parameters=parameters, jaxattn_tokens_per_s=new_tokens / ours_timing.min_s,
               transformers_tokens_per_s=new_tokens / theirs_timing.min_s, jaxattn_median_s=ours_timing.median_s,
               transformers_median_s=theirs_timing.median_s, same_tokens=bool(same))
    row["ratio"] = row["jaxattn_tokens_per_s"] / row["transformers_tokens_per_s"]
    say(f"  jaxattn {row['jaxattn_tokens_per_s']:.1f} tokens/s, transformers {row['transformers_tokens_per_s']:.1f} "
        f"tokens/s -> {row['ratio']:.2f}x; identical greedy tokens: {same}", flush=True)
    return row


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args(argv)
    import torch
    import transformers

    versions = {"jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__}
    print(f"device: {device_kind()}; torch threads {torch.get_num_threads()}; {versions}")
    print(f"batch 1, prompt {args.prompt}, {args.new} new tokens, greedy, float32, KV cache on both sides")
    rows = [run_one(name, config, prompt_tokens=args.prompt, new_tokens=args.new, repeats=args.repeats, say=print)
            for name, config in hf_models().items()]
    print()
    print("| model | jaxattn tokens/s | transformers tokens/s | jaxattn / transformers | same tokens |")
    print("| --- | ---: | ---: | ---: | --- |")
    for row in rows:
        print(f"| {row['model']} | {row['jaxattn_tokens_per_s']:.1f} | {row['transformers_tokens_per_s']:.1f} | "
              f"{row['ratio']:.2f}x | {'yes' if row['same_tokens'] else 'no'} |")
    results = {"device_kind": device_kind(), "versions": versions, "date": datetime.date.today().isoformat(),
               "prompt": args.prompt, "new_tokens": args.new, "rows": rows}
    path = write_results(results, "hf-decode", args.results)
    print(f"\nSummary: {len(rows)} models; results {path}")
    return results


if __name__ == "__main__":
    main()
