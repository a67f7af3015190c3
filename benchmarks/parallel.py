"""Ring attention over 1, 2, 4 and 8 devices on the sequence axis.

    python -m benchmarks.parallel [--quick] [--seq-lens 1024 2048 4096 8192] [--json FILE]

On a CPU it makes 8 virtual devices (they share the machine's cores). Batch 1, H = 8,
D = 64, float32, forward+backward of ``ring_attention`` (the training step of one
attention layer), in this one process, for each number of devices n on the ``seq`` axis:

- per-device compiled temporary memory (``memory_analysis`` of the SPMD program);
- step time, causal in the contiguous layout, causal in ``zigzag_order``, and not causal;
- the critical path: the key sub-blocks the busiest device computes (forward), which is
  what bounds the step when devices really run in parallel: with contiguous chunks the
  last device works n times as long as the first, zigzag evens it out;
- what one ring step sends (each device's K and V chunk) and the attention FLOPs it
  overlaps with.

Virtual CPU devices share the cores, so there the step time shows the total work, not
the critical path; on a GPU/TPU mesh it shows both. Prints a table with a summary,
writes ``img/parallel-memory.png`` and, with ``--json``, the rows.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax

if jax.config.jax_platforms in (None, "", "cpu"):
    jax.config.update("jax_num_cpu_devices", 8)  # must come before JAX starts; ignored by accelerators

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.flash import attention_flops, forward_and_backward  # noqa: E402
from benchmarks.timing import device_kind, measure  # noqa: E402
from jaxattn import viz  # noqa: E402
from jaxattn.functional.ring import ring_attention, ring_work_per_device, zigzag_order  # noqa: E402
from jaxattn.lm.parallel import mesh_from_spec  # noqa: E402

H, D = 8, 64
LAYOUTS = ("causal, contiguous", "causal, zigzag", "not causal")


BLOCK = {"size": 256}  # set from --block


def sub_block(T: int, n: int) -> int:
    """The ring's sub-block here: half a device's chunk (the two zigzag halves), at most --block."""
    return min(BLOCK["size"], max(1, T // n // 2))


def work_per_device(T: int, n: int, layout: str) -> list[int]:
    """(query, key) sub-block pairs each device computes over the n ring steps (forward),
    from the same masks and block plan as the kernel."""
    return ring_work_per_device(T, n, block=sub_block(T, n), zigzag=layout == "causal, zigzag",
                                causal=layout != "not causal")


def critical_path(T: int, n: int, layout: str) -> int:
    """The busiest device's sub-block pairs: what bounds the step when devices run in parallel."""
    return max(work_per_device(T, n, layout))


def rows_for(T: int, n: int, repeats: int, say) -> list[dict]:
    mesh = mesh_from_spec(f"seq={n}", devices=jax.devices()[:n])
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((1, T, H, D)), jnp.float32) for _ in range(3))
    rows = []
    for layout in LAYOUTS:
        causal = layout != "not causal"
        order = zigzag_order(T, n) if layout == "causal, zigzag" else jnp.arange(T)
        positions = dict(q_positions=order, kv_positions=order) if causal else {}

        def kernel(q, k, v, **_):
            return ring_attention(q, k, v, mesh=mesh, is_causal=causal, block_q=sub_block(T, n),
                                  block_kv=sub_block(T, n), **positions)

        timing = measure(forward_and_backward(kernel), q[:, order], k[:, order], v[:, order], repeats=repeats)
        chunk_bytes = 2 * (T // n) * H * D * 4  # K and V of one device's chunk
        row = dict(T=T, devices=n, layout=layout, seconds=timing.min_s, median_s=timing.median_s,
                   temp_bytes_per_device=timing.temp_bytes, critical_path_blocks=critical_path(T, n, layout),
                   ring_step_bytes=chunk_bytes if n > 1 else 0,
                   ring_step_flops=attention_flops(1, H, T // n, D, False))  # one chunk against another
        rows.append(row)
        say(f"{T:>6} {n:>3} {layout:>20} {timing.min_s * 1e3:>9.1f} {timing.temp_bytes / 2**20:>11.1f} "
            f"{row['critical_path_blocks']:>9} {row['ring_step_bytes'] / 2**20:>11.2f} {row['ring_step_flops'] / 1e9:>10.2f}",
            flush=True)
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="T = 512 and 1024 only")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--block", type=int, default=256,
                        help="sub-block size (queries and keys); per-device memory is a part linear in T/n plus "
                             "a fixed part for the sub-block tiles")
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8], help="device counts on the seq axis")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--plot", default="img/parallel-memory.png")
    args = parser.parse_args(argv)
    seq_lens = args.seq_lens or ([512, 1024] if args.quick else [1024, 2048, 4096, 8192])
    BLOCK["size"] = args.block
    counts = [n for n in args.devices if n <= jax.device_count()]
    print(f"device: {device_kind()} x {jax.device_count()}; jax {jax.__version__}; ring attention forward+backward, "
          f"B=1, H={H}, D={D}, float32, min of {args.repeats}")
    print(f"{'T':>6} {'n':>3} {'layout':>20} {'step ms':>9} {'MiB/device':>11} {'critical':>9} "
          f"{'MiB/ring step':>11} {'GFLOP/step':>10}")
    rows = [row for T in seq_lens for n in counts for row in rows_for(T, n, args.repeats, print)]
    series = {}
    for row in rows:
        if row["layout"] == "causal, zigzag":
            xs, ys = series.setdefault(f"T = {row['T']}", ([], []))
            xs.append(row["devices"])
            ys.append(row["temp_bytes_per_device"] / 2**20)
    plot = viz.line_chart(series, args.plot, title=f"Ring attention: compiled memory per device ({device_kind()})",
                          xlabel="devices on the seq axis", ylabel="MiB per device", logx=True, logy=True)
    n, T = max(counts), max(seq_lens)
    plot_path = Path(args.plot)
    diagram = viz.ring_diagram(n, {layout: work_per_device(T, n, layout) for layout in LAYOUTS},
                               plot_path.with_name(plot_path.name.replace("memory", "ring")))
    print("\nSummary:")
    for T in seq_lens:
        at = {(r["devices"], r["layout"]): r for r in rows if r["T"] == T}
        most = max(counts)
        memory = " -> ".join(f"{at[(n, 'causal, zigzag')]['temp_bytes_per_device'] / 2**20:.1f}" for n in counts)
        balance = at[(most, "causal, zigzag")]["seconds"] / at[(most, "not causal")]["seconds"]
        path = at[(most, "causal, contiguous")]["critical_path_blocks"], at[(most, "causal, zigzag")]["critical_path_blocks"]
        print(f"  T={T}: memory per device {memory} MiB on {' -> '.join(map(str, counts))} devices (one device "
              f"needs no ring buffers); on {most} devices the zigzag causal step is {balance:.2f}x the non-causal one "
              f"and the busiest device computes {path[1]} sub-block pairs (contiguous: {path[0]})")
    print(f"  plots {plot}, {diagram}")
    result = {"device_kind": device_kind(), "devices": jax.device_count(), "rows": rows, "plot": str(plot),
              "diagram": str(diagram)}
    if args.json:
        with open(args.json, "w") as file:
            json.dump(result, file, indent=1)
    return result


if __name__ == "__main__":
    main()
