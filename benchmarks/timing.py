"""How every benchmark measures: compile first, warm up, then time compiled calls.

Method (DESIGN.md, "Measuring"): ``jax.jit(f).lower(...).compile()``, one warm-up
call, then ``repeats`` timed calls each ended by ``jax.block_until_ready``; report the
minimum and the median. Memory is the compiled program's temporary buffers,
``compiled.memory_analysis().temp_size_in_bytes``.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import jax


@dataclass(frozen=True)
class Timing:
    min_s: float
    median_s: float
    temp_bytes: int | None


def measure(fn, *args, repeats: int = 5, **static_kwargs) -> Timing:
    """Compiles ``fn(*args)``, warms it up, and times ``repeats`` calls."""
    compiled = jax.jit(lambda *a: fn(*a, **static_kwargs)).lower(*args).compile()
    analysis = compiled.memory_analysis()
    temp_bytes = None if analysis is None else int(analysis.temp_size_in_bytes)
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return Timing(min(times), statistics.median(times), temp_bytes)


def device_kind() -> str:
    return jax.devices()[0].device_kind
