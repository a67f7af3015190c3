"""One decode step of MHA (full KV cache) vs MLA (latent cache, with and without absorption).

    python -m benchmarks.mla [--contexts 512 2048 8192]

Batch 1, H = 16, D = E = 64, L = 256, R = 32, C = 1024, float32, DeepSeek-V2-style query
compression off. For each context S the cache holds S - 1 tokens and one new token is
decoded; the cache is donated to the step (updated in place, as inside a decode loop).
Prints time per step and cache bytes per layer, writes ``img/mla.png``.
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import device_kind, time_calls
from jaxattn import viz
from jaxattn.functional import (
    AttentionParams,
    AttentionSettings,
    KVCache,
    LatentCache,
    MLAParams,
    Rope,
    causal_self_attention,
    kv_cache_elements_per_token,
    latent_cache_elements_per_token,
    mla_absorbed,
    mla_decompressed,
)

C, H, D, L, R = 1024, 16, 64, 256, 32


def normal(rng, shape, fan_in):
    return jnp.asarray(rng.standard_normal(shape) / np.sqrt(fan_in), jnp.float32)


def with_lengths(cache, lengths):
    """The cache with other lengths (a NamedTuple cache or the sliding window's dataclass)."""
    return cache._replace(lengths=lengths) if hasattr(cache, "_replace") else dataclasses.replace(cache, lengths=lengths)


def time_step(step, weights, x, cache, *, repeats):
    """Min and median seconds of one decode step ``step(weights, x, cache) -> (out, cache)``
    at a fixed context. The step updates the cache in place (donated), as it would inside
    a decode loop; the lengths are reset before every call."""
    step = jax.jit(step, donate_argnums=2)
    fixed_lengths = np.asarray(cache.lengths)  # a host copy: the device buffer is donated
    state = {"cache": jax.tree.map(jnp.copy, cache)}

    def reset():
        state["cache"] = with_lengths(state["cache"], jnp.asarray(fixed_lengths))
        return state["cache"]

    def call():
        out, state["cache"] = step(weights, x, state["cache"])
        return out, state["cache"]

    timing = time_calls(call, repeats=repeats, before=reset)
    return timing.min_s, timing.median_s


def cache_bytes(cache) -> int:
    return sum(leaf.nbytes for leaf in cache[:2])  # the buffers, not the lengths


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--plot", default="img/mla.png")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    mha_weights = AttentionParams(w_q=normal(rng, (C, H, D), C), w_k=normal(rng, (C, H, D), C), w_v=normal(rng, (C, H, D), C),
                                  w_o=normal(rng, (H, D, C), H * D))
    mla_weights = MLAParams(
        w_dkv=normal(rng, (C, L), C), w_kr=normal(rng, (C, R), C), w_uk=normal(rng, (L, H, D), L),
        w_uv=normal(rng, (L, H, D), L), w_o=normal(rng, (H, D, C), H * D), w_q=normal(rng, (C, H, D), C),
        w_qr=normal(rng, (C, H, R), C), kv_norm=jnp.ones((L,)),
    )
    x = normal(rng, (1, 1, C), 1)
    print(f"device: {device_kind()}  jax {jax.__version__}  float32, B=1, H={H}, D=E={D}, L={L}, R={R}, C={C}")
    print(f"cache per token per layer: MHA {kv_cache_elements_per_token(kv_heads=H, head_dim=D)} elements, "
          f"MLA {latent_cache_elements_per_token(latent_dim=L, rope_dim=R)} elements")
    print(f"{'S':>6} {'MHA ms':>8} {'MLA latent ms':>14} {'MLA absorbed ms':>16} {'MHA cache MiB':>14} {'MLA cache MiB':>14}")
    rows = []
    for S in args.contexts:
        filled = jnp.full((1,), S - 1, jnp.int32)
        kv = KVCache.create(batch=1, max_length=S, kv_heads=H, head_dim=D)
        kv = kv._replace(k=jnp.asarray(rng.standard_normal(kv.k.shape), jnp.float32),
                         v=jnp.asarray(rng.standard_normal(kv.v.shape), jnp.float32), lengths=filled)
        latent = LatentCache.create(batch=1, max_length=S, latent_dim=L, rope_dim=R)
        latent = latent._replace(c_kv=jnp.asarray(rng.standard_normal(latent.c_kv.shape), jnp.float32),
                                 k_rope=jnp.asarray(rng.standard_normal(latent.k_rope.shape), jnp.float32), lengths=filled)
        row = {"S": S, "mha_bytes": cache_bytes(kv), "mla_bytes": cache_bytes(latent)}
        mha_step = lambda p, x, c: causal_self_attention(p, x, cache=c, settings=AttentionSettings(rope=Rope()))  # noqa: E731
        row["mha_s"] = time_step(mha_step, mha_weights, x, kv, repeats=args.repeats)[1]
        row["mla_latent_s"] = time_step(lambda p, x, c: mla_decompressed(p, x, c), mla_weights, x, latent, repeats=args.repeats)[1]
        row["mla_absorbed_s"] = time_step(lambda p, x, c: mla_absorbed(p, x, c), mla_weights, x, latent, repeats=args.repeats)[1]
        rows.append(row)
        print(f"{S:>6} {row['mha_s'] * 1e3:>8.2f} {row['mla_latent_s'] * 1e3:>14.2f} {row['mla_absorbed_s'] * 1e3:>16.2f} "
              f"{row['mha_bytes'] / 2**20:>14.1f} {row['mla_bytes'] / 2**20:>14.1f}")
    contexts = [r["S"] for r in rows]
    path = viz.line_chart(
        {
            "MHA, full KV cache": (contexts, [r["mha_s"] * 1e3 for r in rows]),
            "MLA, latent cache, decompressed": (contexts, [r["mla_latent_s"] * 1e3 for r in rows]),
            "MLA, latent cache, absorbed": (contexts, [r["mla_absorbed_s"] * 1e3 for r in rows]),
        },
        args.plot,
        title=f"One decode step (B=1, H={H}, D={D}, L={L}, R={R}; {device_kind()})",
        xlabel="context length S",
        ylabel="milliseconds per step",
        logx=True,
        logy=True,
    )
    last = rows[-1]
    print(f"Summary at S={last['S']}: absorbed is {last['mla_latent_s'] / last['mla_absorbed_s']:.1f}x faster than the "
          f"decompressing latent path and {last['mha_s'] / last['mla_absorbed_s']:.1f}x faster than MHA, with a "
          f"{last['mha_bytes'] / last['mla_bytes']:.1f}x smaller cache; plot {path}")
    return rows


if __name__ == "__main__":
    main()
