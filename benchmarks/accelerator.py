"""jaxattn's Pallas kernels beside JAX's own attention on a GPU or TPU, in one process.

    python -m benchmarks.accelerator [--quick] [--out FILE]

Prefill (causal, GQA H 32 / K 8, D 128, bfloat16, batch 1), forward and forward+backward at
T = 1k .. 32k, in TFLOP/s (analytic: 4 T^2 H D / 2 for a causal forward, 2.5x that with the
backward) and % of the device's peak:

    jax.nn (xla), jax.nn (cudnn)                              every GPU
    jax Pallas gpu.attention (Triton), gpu.attention_mgpu     GPU (mgpu: Hopper and later)
    jax Pallas tpu splash attention                           TPU
    jaxattn pallas                                            both

Paged decode (K 8, H 32, D 128, bfloat16, 32k tokens a row, pages of 16) at batch 1 and 8, in
tokens/s and % of HBM bandwidth (the bytes of K and V each step reads, over its time): jaxattn's
Pallas decode kernel, JAX's Pallas paged attention (GPU or TPU), and jaxattn's XLA decode kernel.

On a CPU every row says "needs a GPU/TPU". Each row is written to ``--out`` as soon as it is
measured, so a run cut short keeps what it had. A kernel that fails records its error and the
run goes on. Method: ``benchmarks/timing.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import re
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import cpu_model, device_kind, time_calls
from jaxattn.functional import AttentionContext, decode_kernel, pallas_attention, pallas_decode_kernel

RESULTS = Path(__file__).parent / "results"
H, K, D = 32, 8, 128
# Dense bfloat16 peak and HBM bandwidth from the vendors' data sheets (SXM parts), by device kind
PEAKS = {"H100": (989e12, 3.35e12), "H200": (989e12, 4.8e12), "A100": (312e12, 2.0e12),
         "TPU v5 lite": (197e12, 819e9), "TPU v5p": (459e12, 2.76e12), "TPU v6": (918e12, 1.64e12)}


def peaks(kind: str):
    for name, values in PEAKS.items():
        if name.lower() in kind.lower():
            return values
    return None, None


# ----------------------------------------------------------------------- the kernels


def jax_nn(implementation):
    def attend(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)
    return attend


def jax_pallas_triton(q, k, v):
    from jax.experimental.pallas.ops.gpu import attention

    G = q.shape[2] // k.shape[2]  # its kernel takes as many K/V heads as query heads
    k, v = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
    return attention.mha(q, k, v, None, sm_scale=q.shape[-1] ** -0.5, causal=True)


def jax_pallas_mgpu(q, k, v):
    from jax.experimental.pallas.ops.gpu import attention_mgpu

    config = attention_mgpu.TuningConfig(block_q=64, block_kv=64, max_concurrent_steps=2, causal=True)
    return attention_mgpu.attention(q * q.shape[-1] ** -0.5, k, v, config)


def jax_splash(q, k, v):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    B, T, heads, _ = q.shape
    mask = masks.MultiHeadMask([masks.CausalMask((T, T)) for _ in range(heads)])
    kernel = splash.make_splash_mqa_single_device(mask) if k.shape[2] == 1 else splash.make_splash_mha_single_device(mask)
    G = heads // k.shape[2]
    one = lambda q, k, v: kernel(q * q.shape[-1] ** -0.5, k, v)  # noqa: E731: [H, T, D] per row
    k, v = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
    return jax.vmap(one)(q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2)).swapaxes(1, 2)


def jaxattn_pallas(q, k, v):
    return pallas_attention(q, k, v, is_causal=True)


def prefill_kernels(platform: str) -> dict:
    kernels = {"jax.nn (xla)": jax_nn("xla")}
    if platform == "gpu":
        kernels.update({"jax.nn (cudnn)": jax_nn("cudnn"), "jax pallas gpu.attention": jax_pallas_triton,
                        "jax pallas gpu.attention_mgpu": jax_pallas_mgpu})
    if platform == "tpu":
        kernels["jax pallas tpu splash"] = jax_splash
    kernels["jaxattn pallas"] = jaxattn_pallas
    return kernels


# ------------------------------------------------------------------------- measuring


@dataclasses.dataclass
class Recorder:
    """Rows written to ``path`` as they come, with the device they were measured on."""

    path: Path
    header: dict
    rows: list = dataclasses.field(default_factory=list)

    def add(self, row: dict, say=print) -> None:
        self.rows.append(row)
        self.path.write_text(json.dumps({**self.header, "rows": self.rows}, indent=1))
        say("  ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
                      for key, value in row.items()), flush=True)


def timed(fn, *args, repeats: int):
    """(median seconds, error text): compiled first, then ``time_calls``."""
    try:
        compiled = jax.jit(fn).lower(*args).compile()
        return time_calls(lambda: compiled(*args), repeats=repeats).median_s, None
    except Exception as error:  # a kernel that cannot run here is a row that says so
        return None, f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"


def prefill(recorder: Recorder, platform: str, lengths, repeats: int, peak_flops) -> None:
    rng = np.random.default_rng(0)
    for T in lengths:
        q = jnp.asarray(rng.standard_normal((1, T, H, D)), jnp.bfloat16)
        k, v = (jnp.asarray(rng.standard_normal((1, T, K, D)), jnp.bfloat16) for _ in range(2))
        flops = 4 * T * T * H * D / 2  # causal forward
        for name, kernel in prefill_kernels(platform).items():
            if name == "jax.nn (xla)" and T > 8192:
                recorder.add(dict(part="prefill", kernel=name, T=T, error="skipped: materialises the T x T scores"))
                continue
            backward = jax.grad(lambda q, k, v, kernel=kernel: kernel(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2))
            for pass_name, fn, work in (("forward", kernel, flops), ("fwd+bwd", backward, 3.5 * flops)):
                seconds, error = timed(fn, q, k, v, repeats=repeats)
                row = dict(part="prefill", kernel=name, T=T, pass_=pass_name)
                if error:
                    row["error"] = error
                else:
                    row.update(ms=seconds * 1e3, tflops=work / seconds / 1e12)
                    if peak_flops:
                        row["percent_of_peak"] = 100 * work / seconds / peak_flops
                recorder.add(row)


def paged_decode(recorder: Recorder, platform: str, batches, tokens: int, repeats: int, peak_bytes) -> None:
    page = 16
    N = tokens // page
    rng = np.random.default_rng(1)
    for B in batches:
        pool = lambda: jnp.asarray(rng.standard_normal((B * N, page, K, D)), jnp.bfloat16)  # noqa: E731
        k_pool, v_pool = pool(), pool()
        table = jnp.asarray(rng.permutation(B * N).reshape(B, N), jnp.int32)
        lengths = jnp.full((B,), tokens, jnp.int32)
        q = jnp.asarray(rng.standard_normal((B, 1, H, D)), jnp.bfloat16)
        context = AttentionContext.for_tokens(1, lengths=lengths - 1).with_keys(jnp.arange(N * page)[None], lengths,
                                                                                 table)
        kernels = {"jaxattn pallas decode": functools.partial(pallas_decode_kernel, context=context),
                   "jaxattn xla decode": functools.partial(decode_kernel, context=context)}
        if platform == "gpu":
            from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention

            heads_first = lambda x: x.transpose(2, 0, 1, 3)  # noqa: E731: [K, P, page, D]
            kernels["jax pallas gpu paged_attention"] = lambda q, k, v: paged_attention(
                q[:, 0], heads_first(k), heads_first(v), table, lengths)
        if platform == "tpu":
            from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention

            heads_first = lambda x: x.transpose(2, 0, 1, 3)  # noqa: E731
            kernels["jax pallas tpu paged_attention"] = lambda q, k, v: paged_attention(
                q[:, 0], heads_first(k), heads_first(v), lengths, table, pages_per_compute_block=8)
        read = 2 * B * tokens * K * D * 2  # K and V bytes one step reads
        for name, kernel in kernels.items():
            seconds, error = timed(kernel, q, k_pool, v_pool, repeats=repeats)
            row = dict(part="paged decode", kernel=name, batch=B, tokens=tokens)
            if error:
                row["error"] = error
            else:
                row.update(ms=seconds * 1e3, tokens_per_s=B / seconds, hbm_gb_per_s=read / seconds / 1e9)
                if peak_bytes:
                    row["percent_of_bandwidth"] = 100 * read / seconds / peak_bytes
            recorder.add(row)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="T 1k and 8k only, 3 repeats")
    parser.add_argument("--out", default=None, help="results file (default benchmarks/results/accelerator-<device>-<date>.json)")
    args = parser.parse_args(argv)
    platform = jax.devices()[0].platform
    platform = "gpu" if platform in ("cuda", "rocm") else platform
    kind = device_kind()
    slug = re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-")
    out = Path(args.out) if args.out else RESULTS / f"accelerator-{slug}-{datetime.date.today()}.json"
    peak_flops, peak_bytes = peaks(kind)
    header = dict(device_kind=kind, platform=platform, cpu=cpu_model(), jax=jax.__version__, date=str(datetime.date.today()),
                  shapes=f"H {H}, K {K}, D {D}, bfloat16, causal", peak_flops=peak_flops, peak_bytes_per_s=peak_bytes)
    recorder = Recorder(out, header)
    started = time.perf_counter()
    if platform not in ("gpu", "tpu"):
        for part in ("prefill", "paged decode"):
            recorder.add(dict(part=part, kernel="every row", error=f"needs a GPU/TPU (this is a {kind})"))
        print(f"wrote {out}")
        return recorder.rows
    lengths = (1024, 8192) if args.quick else (1024, 2048, 4096, 8192, 16384, 32768)
    repeats = 3 if args.quick else 5
    print(f"{kind} ({platform}), jax {jax.__version__}: prefill, then paged decode; rows as they come", flush=True)
    prefill(recorder, platform, lengths, repeats, peak_flops)
    paged_decode(recorder, platform, (1, 8), 32768, repeats, peak_bytes)
    errors = sum("error" in row for row in recorder.rows)
    print(f"{len(recorder.rows)} rows ({errors} with an error or skipped) in {time.perf_counter() - started:.0f} s; "
          f"wrote {out}")
    return recorder.rows


if __name__ == "__main__":
    main()
