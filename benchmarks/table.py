"""Turns a benchmark results file into the Markdown tables docs/benchmarks.md shows.

    python -m benchmarks.table benchmarks/results/cpu-2026-11-27.json
"""

from __future__ import annotations

import json
import sys


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}" if seconds >= 0.01 else f"{seconds * 1e3:.3f}"


def _mib(num_bytes) -> str:
    return "n/a" if num_bytes is None else f"{num_bytes / 2**20:.1f}"


def markdown(results: dict) -> str:
    """Markdown for every part present in ``results`` (the JSON that the suite writes)."""
    v = results["versions"]
    shapes = results["shapes"]
    lines = [
        f"Device: **{results['device_kind']}** ({results['platform']}); {results['dtype']}; "
        f"batch {shapes['batch']}, {shapes['heads']} heads of width {shapes['head_dim']}; "
        f"jax {v['jax']}, jaxlib {v['jaxlib']}, flax {v['flax']}; {results['mode']} run on {results['date']}.",
        "",
    ]
    ceiling = results.get("ceiling")
    if ceiling:
        lines += [
            f"Ceiling: float32 matmul {ceiling['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s, "
            f"copy {ceiling['copy_bytes_per_s'] / 1e9:.1f} GB/s.",
            "",
        ]
    if results.get("prefill"):
        lines += [
            "| T | mask | pass | kernel | min ms | median ms | temp MiB | GFLOP/s | of matmul |",
            "| ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for row in results["prefill"]:
            lines.append(
                f"| {row['T']} | {'causal' if row['causal'] else 'full'} | {row['pass_']} | {row['kernel']} | "
                f"{_ms(row['min_s'])} | {_ms(row['median_s'])} | {_mib(row['temp_bytes'])} | {row['flops_per_s'] / 1e9:.1f} | "
                f"{row['fraction_of_matmul']:.0%} |"
            )
        lines.append("")
    if results.get("logits"):
        lines += [
            "Soft-capping and sinks in the causal flash kernel (median ms, against the plain kernel in the same run):",
            "",
            "| T | pass | variant | median ms | vs plain | temp MiB |",
            "| ---: | --- | --- | ---: | ---: | ---: |",
        ]
        for row in results["logits"]:
            lines.append(f"| {row['T']} | {row['pass_']} | {row['variant']} | {_ms(row['median_s'])} | "
                         f"{row['vs_plain']:.2f}x | {_mib(row['temp_bytes'])} |")
        lines.append("")
    if results.get("families"):
        lines += [
            "| S | family | forward ms | decode step ms | cache bytes/token/layer | cache MiB at S |",
            "| ---: | --- | ---: | ---: | ---: | ---: |",
        ]
        for row in results["families"]:
            lines.append(
                f"| {row['S']} | {row['family']} | {_ms(row['forward_s'])} | {_ms(row['decode_s'])} | "
                f"{row['cache_bytes_per_token']} | {_mib(row['cache_bytes'])} |"
            )
        lines.append("")
    decoding = results.get("decoding")
    if decoding:
        lines += [
            f"Decoding (default TransformerLM, batch 1, prompt {decoding['prompt']}, {decoding['new_tokens']} new tokens): "
            f"{decoding['cached_tokens_per_s']:.0f} tokens/s with the KV cache, "
            f"{decoding['full_recompute_tokens_per_s']:.0f} tokens/s recomputing the full pass.",
            "",
        ]
        if decoding.get("steps"):
            capacities = decoding["steps"][0]["capacities"]
            lines += [
                "One decode step at position 100 vs the cache's capacity (ms):",
                "",
                "| model | path | " + " | ".join(str(c) for c in capacities) + " |",
                "| --- | --- | " + " | ".join("---:" for _ in capacities) + " |",
            ]
            for row in decoding["steps"]:
                lines.append(f"| {row['model']} | {row['path']} | " + " | ".join(_ms(t) for t in row["seconds"]) + " |")
            lines.append("")
    ring = results.get("parallel")
    if ring:
        lines += [
            f"Ring attention, forward+backward, B = 1, H = 8, D = 64 ({ring['devices']} {ring['device_kind']} devices): "
            "step time, compiled memory per device, sub-block pairs on the busiest device, bytes one ring step sends.",
            "",
            "| T | devices | layout | min ms | MiB per device | busiest device | MiB per ring step |",
            "| ---: | ---: | --- | ---: | ---: | ---: | ---: |",
        ]
        for row in ring["rows"]:
            lines.append(f"| {row['T']} | {row['devices']} | {row['layout']} | {_ms(row['seconds'])} | "
                         f"{_mib(row['temp_bytes_per_device'])} | {row['critical_path_blocks']} | "
                         f"{_mib(row['ring_step_bytes'])} |")
        lines.append("")
    for item in results.get("left_out", []):
        lines.append(f"Left out: {item}.")
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m benchmarks.table RESULTS.json")
    with open(argv[0]) as file:
        print(markdown(json.load(file)), end="")


if __name__ == "__main__":
    main()
