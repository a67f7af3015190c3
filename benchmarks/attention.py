"""The one-head kernel vmapped over heads vs jax.nn.dot_product_attention (XLA).

    python -m benchmarks.attention [--seq-lens 256 512 1024]

Batch 1, H = 8, D = 64, float32, causal; forward time and compiled temp memory of
both, in one process, same shapes.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import device_kind, measure
from jaxattn.functional import multi_head_attention


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    args = parser.parse_args(argv)

    print(f"device: {device_kind()}  jax {jax.__version__}  float32, B=1, H={args.heads}, D={args.head_dim}, causal")
    print(f"{'T':>6} {'jaxattn ms':>11} {'jax.nn ms':>10} {'jaxattn MiB':>12} {'jax.nn MiB':>11}")
    rng = np.random.default_rng(0)
    for T in args.seq_lens:
        q, k, v = (jnp.asarray(rng.standard_normal((1, T, args.heads, args.head_dim)), jnp.float32) for _ in range(3))
        ours = measure(multi_head_attention, q, k, v, is_causal=True)
        theirs = measure(jax.nn.dot_product_attention, q, k, v, is_causal=True, implementation="xla")
        print(
            f"{T:>6} {ours.median_s * 1e3:>11.2f} {theirs.median_s * 1e3:>10.2f} "
            f"{ours.temp_bytes / 2**20:>12.1f} {theirs.temp_bytes / 2**20:>11.1f}"
        )


if __name__ == "__main__":
    main()
