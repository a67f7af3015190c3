"""What a Pallas kernel must know about the chip it is lowered for: block sizes, the compiler's
parameters, and how many bytes one program may hold on the chip.

A Pallas kernel is written once, as the work of one *program* (one block of queries of one
head); ``pallas_call`` runs a grid of programs. Two compilers take it from there:

  GPU (Triton)   a program is a thread block; its tiles live in registers and shared memory
                 (H100: 227 KiB of shared memory per block). Every array a program computes
                 has power-of-two sides; refs stay in HBM and a load brings one tile in.
  TPU (Mosaic)   a program is one step of a sequential loop per TensorCore; every block a
                 ``BlockSpec`` names is copied into VMEM (double-buffered) before the step.
                 Blocks are tiled (8, 128): the last two sides of a block are multiples of
                 8 and 128, or the whole axis. Scalars read at a traced index live in SMEM.

Which one a call gets is decided when it is lowered (``jax.lax.platform_dependent``), never
from ``jax.default_backend()``: the same jitted function lowers for ``cuda`` and ``tpu``. On
neither (a CPU), the kernel runs in Pallas' interpret mode.

Lowering catches block-shape, dtype and unsupported-operation errors; it does not catch a
program that holds more than the chip has. ``Target.footprint`` counts those bytes from the
block sizes (every tile a program loads or keeps, f32 for what the kernel computes), and a
call over its target's budget is refused before it is lowered.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

H100_SHARED_MEMORY = 227 * 1024  # bytes of shared memory one thread block may use (sm_90)
TPU_VMEM_BUDGET = 64 * 1024 * 1024  # what these kernels let themselves use of VMEM (v5e, v5p, v6e have 95-128 MiB)
TPU_LANES = 128


def padded_width(D: int) -> int:
    """A head width both compilers tile: the next power of two, at least 16 (Triton's
    smallest dot). 64, 128 and 256 stay; 80 and 96 become 128 (zero columns add nothing to
    ``q . k``, and the extra output columns are cut off)."""
    return max(16, 1 << (D - 1).bit_length())


def next_power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def divide(x, n: int):
    """``x // n`` of a non-negative traced integer, as a truncating division: the floor division
    of signed integers lowers to more than Mosaic's index maps and scalar units take."""
    return lax.div(x, jnp.asarray(n, x.dtype))


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class Footprint:
    """Bytes one program holds on the chip, by what holds them, against the target's budget."""

    target: str
    parts: tuple[tuple[str, int], ...]
    budget: int

    @property
    def total(self) -> int:
        return sum(size for _, size in self.parts)

    @property
    def fits(self) -> bool:
        return self.total <= self.budget

    def check(self, what: str) -> None:
        if not self.fits:
            parts = ", ".join(f"{name} {size / 1024:.0f} KiB" for name, size in self.parts)
            raise ValueError(f"{what} needs {self.total / 1024:.0f} KiB on the chip per program ({parts}), over the "
                             f"{self.target}'s {self.budget / 1024:.0f} KiB: use smaller blocks or a shorter sequence")


@dataclasses.dataclass(frozen=True)
class Target:
    """One compiler's rules: ``name`` "gpu" (Triton) or "tpu" (Mosaic)."""

    name: str

    # ----------------------------------------------------------------- blocks

    def blocks(self, T: int, S: int, Dp: int, *, backward: bool = False) -> tuple[int, int]:
        """Default ``(block_q, block_kv)`` for T queries and S keys of padded width Dp.

        GPU: 64 x 64 (32 keys at width 256, and 32 x 32 for its backward, so that a program's
        tiles fit in shared memory), never more than the sequence rounded up to a power of two.
        TPU: 128 x 128, queries rounded to 8 for short calls (a key block is a whole lane row).
        """
        if self.name == "gpu":
            bq, bk = (32, 32) if backward and Dp > 128 else (64, 32 if Dp > 128 else 64)
            return min(bq, max(16, next_power_of_two(T))), min(bk, max(16, next_power_of_two(S)))
        return min(128, round_up(T, 8)), TPU_LANES

    def check_blocks(self, block_q: int, block_kv: int) -> None:
        """Block sizes this compiler tiles, or a ``ValueError`` naming the rule."""
        if self.name == "gpu":
            for name, size in (("block_q", block_q), ("block_kv", block_kv)):
                if size < 16 or size & (size - 1):
                    raise ValueError(f"{name}={size}: Triton blocks are powers of two, at least 16")
        elif block_q % 8 or block_kv % TPU_LANES:
            raise ValueError(f"block_q={block_q}, block_kv={block_kv}: TPU blocks are tiled (8, 128): block_q a "
                             "multiple of 8, block_kv a multiple of 128")

    # ------------------------------------------------------------ what it holds

    @property
    def budget(self) -> int:
        return H100_SHARED_MEMORY if self.name == "gpu" else TPU_VMEM_BUDGET

    def footprint(self, kernel: str, *, bq: int, bk: int, Dp: int, Ep: int, T: int, S: int, itemsize: int,
                  stages: int = 2) -> Footprint:
        """Bytes on the chip per program of ``kernel`` ("forward", "dq", "dkv", "decode").

        GPU: the tiles a program loads (``stages`` of them in flight for the streamed side) and
        the float32 blocks it computes (logits, weights, accumulators). TPU: every block its
        ``BlockSpec``s name, twice (double-buffered; the streamed side is a whole head of the
        sequence, T or S rows), its token rows padded to 8 sublanes x 128 lanes, and the same
        float32 blocks.
        """
        f32 = 4
        own, other, width_own, width_other, computed = {
            "forward": (bq, S, Dp, Dp + Ep, bq * bk * 2 + bq * Ep),
            "decode": (bq, S, Dp, Dp + Ep, bq * bk * 2 + bq * Ep),
            "dq": (bq, S, Dp + Ep, Dp + Ep, bq * bk * 4 + bq * Dp),
            "dkv": (bk, T, Dp + Ep, Dp + Ep, bq * bk * 4 + bk * (Dp + Ep)),
        }[kernel]
        streamed_block = bk if kernel in ("forward", "dq", "decode") else bq
        if self.name == "gpu":
            parts = (("own tile", own * width_own * itemsize),
                     ("streamed tiles", stages * streamed_block * width_other * itemsize),
                     ("float32 blocks", computed * f32))
        else:
            rows = (other // streamed_block) * 8 * streamed_block * f32 * 3  # up to 3 token rows
            parts = (("own block x2", 2 * own * width_own * itemsize),
                     ("streamed side x2", 2 * other * width_other * itemsize),
                     ("token rows x2", 2 * rows),
                     ("token columns x2", 2 * own * TPU_LANES * f32 * 2),
                     ("float32 blocks", computed * f32))
        return Footprint(self.name, parts, self.budget)

    # ------------------------------------------------------------- the compiler

    def scalars(self) -> pl.BlockSpec:
        """Where a small int32 table read at traced indices lives: SMEM on TPU, HBM on GPU."""
        return pl.BlockSpec(memory_space=pltpu.SMEM) if self.name == "tpu" else pl.BlockSpec()

    def compiler_params(self, footprint: Footprint, Dp: int, n_grid: int):
        """Triton: 4 warps up to width 64, else 8, two stages. Mosaic: every grid axis
        independent (``parallel``), and a VMEM limit that holds the footprint."""
        if self.name == "gpu":
            return pltriton.CompilerParams(num_warps=4 if Dp <= 64 else 8, num_stages=2)
        limit = min(self.budget, max(32 * 1024 * 1024, round_up(footprint.total * 5 // 4, 1024 * 1024)))
        return pltpu.CompilerParams(dimension_semantics=("parallel",) * n_grid, vmem_limit_bytes=limit)


GPU, TPU = Target("gpu"), Target("tpu")
TARGETS = {"gpu": GPU, "tpu": TPU}


def pad_last(x, width: int):
    """x with its last axis zero-padded to ``width``."""
    extra = width - x.shape[-1]
    return x if extra == 0 else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])
