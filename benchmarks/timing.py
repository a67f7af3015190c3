"""How every benchmark measures: compile first, warm up, then time compiled calls.

Method (DESIGN.md, "Measuring"): ``jax.jit(f).lower(...).compile()``, one warm-up
call, then ``repeats`` timed calls each ended by ``jax.block_until_ready``; report the
minimum and the median. Memory is the compiled program's temporary buffers,
``compiled.memory_analysis().temp_size_in_bytes``. ``time_calls`` is the one timing
loop; ``measure`` compiles a function and times it with that loop.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import jax

from jaxattn.tour.page import cpu_model  # noqa: F401  (the benchmarks' machine line; the tour prints it too)


@dataclass(frozen=True)
class Timing:
    min_s: float
    median_s: float
    temp_bytes: int | None = None


def time_calls(call, *, repeats: int = 5, before=None, warm_up: bool = True) -> Timing:
    """Times ``call()`` (a function of no arguments): one warm-up call, then ``repeats``
    timed calls, each waited for with ``jax.block_until_ready``. ``before()``, if given,
    runs untimed before every call (e.g. to reset a donated cache), and whatever it
    returns is waited for too, so that none of its work spills into the timed call.
    ``warm_up=False`` for a call that is already compiled and too long to run twice."""

    def prepare():
        if before is not None:
            jax.block_until_ready(before())

    if warm_up:
        prepare()
        jax.block_until_ready(call())  # compile (if needed) and warm up
    times = []
    for _ in range(repeats):
        prepare()
        start = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - start)
    return Timing(min(times), statistics.median(times))


def measure(fn, *args, repeats: int = 5, **static_kwargs) -> Timing:
    """Compiles ``fn(*args, **static_kwargs)``, reads its temporary memory, and times it."""
    compiled = jax.jit(lambda *a: fn(*a, **static_kwargs)).lower(*args).compile()
    analysis = compiled.memory_analysis()
    temp_bytes = None if analysis is None else int(analysis.temp_size_in_bytes)
    timing = time_calls(lambda: compiled(*args), repeats=repeats)
    return Timing(timing.min_s, timing.median_s, temp_bytes)


def device_kind() -> str:
    return jax.devices()[0].device_kind


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes per second this process reads from memory: the best of ``repeats`` jitted
    ``jnp.sum`` over ``gib`` GiB of float32 (a reduction reads each byte once and writes nothing)."""
    import jax.numpy as jnp

    data = jnp.ones((int(gib * 2**30) // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    seconds = time_calls(lambda: total(data), repeats=repeats).min_s
    return gib * 2**30 / seconds


def write_results(results: dict, name: str, folder) -> Path:
    """Writes ``results`` as ``<folder>/<name>-<device kind>-<results["date"]>.json``; returns the path."""
    path = Path(folder) / f"{name}-{device_kind().lower().replace(' ', '-')}-{results['date']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
    return path
