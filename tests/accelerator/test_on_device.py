"""The Pallas kernels compiled for the device they run on (not interpreted), against the XLA
kernels on the same device: run by ``benchmarks/accelerator.sh`` on a GPU or TPU. Plain asserts
and NumPy only, so that it runs where only jax and jaxattn are installed
(``python tests/accelerator/test_on_device.py`` without pytest)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.functional import (
    AttentionContext,
    decode_kernel,
    multi_head_attention,
    pallas_attention,
    pallas_decode_kernel,
)
from jaxattn.functional.kernels import Kernels, choose_kernel, cudnn_kernel


def close(a, b, tolerance):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    error = float(np.max(np.abs(a - b)))
    assert error <= tolerance, f"max |difference| {error} > {tolerance}"
    return error


def arrays(shape, dtype, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def test_pallas_flash_forward_and_backward_match_xla_on_device():
    for dtype, tolerance in ((jnp.bfloat16, 3e-2), (jnp.float32, 1e-2)):  # float32 dots may run as TF32
        q, k, v = arrays((2, 1000, 8, 128), dtype, 0), arrays((2, 1000, 2, 128), dtype, 1), arrays((2, 1000, 2, 128), dtype, 2)
        keywords = dict(is_causal=True, window=300, logit_softcap=30.0, sinks=jnp.linspace(-1, 1, 8))
        for kernel in (pallas_attention, multi_head_attention):
            assert kernel(q, k, v, **keywords).dtype == dtype
        close(jax.jit(lambda q, k, v: pallas_attention(q, k, v, **keywords))(q, k, v),
              multi_head_attention(q, k, v, **keywords), tolerance)

        def loss(kernel):
            return jax.jit(jax.grad(lambda q, k, v: kernel(q, k, v, **keywords).astype(jnp.float32).sum(), argnums=(0, 1, 2)))

        for got, expected in zip(loss(pallas_attention)(q, k, v), loss(multi_head_attention)(q, k, v)):
            close(got, expected, tolerance * 4)


def test_pallas_decode_reads_a_paged_cache_as_xla_does_on_device():
    B, S, K, D, page = 8, 4096, 8, 128, 16
    q = arrays((B, 1, 32, D), jnp.bfloat16, 3)
    pools = [arrays((B * S // page, page, K, D), jnp.bfloat16, seed) for seed in (4, 5)]
    table = jnp.asarray(np.random.default_rng(6).permutation(B * S // page).reshape(B, S // page), jnp.int32)
    lengths = jnp.asarray(np.random.default_rng(7).integers(1, S, B), jnp.int32)
    context = AttentionContext.for_tokens(1, lengths=lengths - 1).with_keys(jnp.arange(S)[None], lengths, table)
    context = dataclasses.replace(context, logit_softcap=50.0)
    close(jax.jit(pallas_decode_kernel)(q, *pools, context), jax.jit(decode_kernel)(q, *pools, context), 3e-2)


def test_the_platform_table_runs_on_device():
    platform = jax.devices()[0].platform
    q, k = arrays((1, 512, 8, 64), jnp.bfloat16, 8), arrays((1, 512, 2, 64), jnp.bfloat16, 9)
    context = AttentionContext.from_keywords(q, k, is_causal=True)
    choice = choose_kernel(platform, "full", q, k, k, context)
    assert choice.name == ("cudnn" if platform in ("gpu", "cuda") else "pallas tpu"), choice.name
    close(jax.jit(Kernels.named("auto").full)(q, k, k, context), multi_head_attention(q, k, k, is_causal=True), 3e-2)
    if platform in ("gpu", "cuda"):
        close(jax.jit(cudnn_kernel)(q, k, k, context), multi_head_attention(q, k, k, is_causal=True), 3e-2)


if __name__ == "__main__":
    import time
    import traceback

    failed = 0
    for name, test in [(name, value) for name, value in globals().items() if name.startswith("test_")]:
        start = time.perf_counter()
        try:
            test()
            print(f"PASSED {name} ({time.perf_counter() - start:.1f} s)", flush=True)
        except Exception:
            failed += 1
            print(f"FAILED {name}\n{traceback.format_exc()}", flush=True)
    raise SystemExit(1 if failed else 0)
