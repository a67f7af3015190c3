"""Weights stored for decoding: output-major, in float32, bfloat16 or int8 with per-channel scales.

A decode step multiplies one token's activations ``x [1, K]`` by every weight matrix, so its
speed is the speed at which the weights stream from memory. Two things decide it:

- **Fewer bytes.** bfloat16 halves them; int8 weight-only quantization (a scale per output
  channel, ``w[n, :] = scale[n] * q[n, :]`` with ``q`` in [-127, 127], ``scale = max|w[n, :]| / 127``,
  as LLM.int8 and llama.cpp's Q8_0 do per block) quarters them. Activations stay in the
  compute dtype; the weight is converted inside the product.
- **The layout.** Stored ``[N, K]`` (each output channel's K inputs contiguous, as PyTorch's
  ``Linear`` keeps them), ``x @ values.T`` is a row-by-row matrix-vector product that XLA on the
  CPU fuses with the conversion, while a ``[K, N]`` int8 or bfloat16 weight is converted to a
  float32 copy first and is slower than float32 itself (``benchmarks/decode_profile.py`` times
  both layouts, one product at a time, beside the model).

``PackedWeight`` is that storage, for a weight of any original shape ``[*in, *out]`` (``contracted``
input axes): ``values [prod(out), prod(in)]``, ``scale [prod(out)]`` or ``None``. ``pack_weight``
makes one from a dense weight, ``dense_weight`` turns it back (for paths that need the plain
array), ``packed_matmul`` multiplies. Hand-written rather than taken from a quantization library:
Qwix (read for this) intercepts ``dot_general`` and quantizes the weight in the layout the module
holds it, ``[K, N]``, the layout this CPU reads slowly; the whole method is the three functions
below.

Shape letters: K inputs (the contracted axes, flattened), N outputs (flattened), M rows of x.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

WEIGHT_FORMATS = ("float32", "bfloat16", "int8")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedWeight:
    """``values [N, K]`` (float32, bfloat16 or int8), ``scale [N]`` float32 (int8 only, else
    ``None``); static ``shape`` (the dense weight's, ``[*in, *out]``) and ``contracted`` (how many
    of its leading axes are inputs)."""

    values: jax.Array
    scale: jax.Array | None
    shape: tuple = dataclasses.field(metadata=dict(static=True))
    contracted: int = dataclasses.field(metadata=dict(static=True))

    @property
    def format(self) -> str:
        return jnp.dtype(self.values.dtype).name


def pack_weight(weight, contracted: int, weights: str) -> PackedWeight:
    """A dense ``weight [*in, *out]`` (``contracted`` input axes) stored as ``weights``
    (``"float32"``, ``"bfloat16"`` or ``"int8"``), output-major."""
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {WEIGHT_FORMATS}, got {weights!r}")
    if not 1 <= contracted < weight.ndim:
        raise ValueError(f"a weight of shape {weight.shape} has no {contracted} input axes with outputs after them")
    K = math.prod(weight.shape[:contracted])
    matrix = jnp.asarray(weight, jnp.float32).reshape(K, -1).T  # [N, K]
    if weights != "int8":
        return PackedWeight(matrix.astype(weights), None, tuple(weight.shape), contracted)
    scale = jnp.max(jnp.abs(matrix), axis=1) / 127  # [N]: symmetric, per output channel
    safe = jnp.where(scale > 0, scale, 1.0)
    values = jnp.clip(jnp.round(matrix / safe[:, None]), -127, 127).astype(jnp.int8)
    return PackedWeight(values, scale, tuple(weight.shape), contracted)


def dense_weight(weight, dtype=jnp.float32):
    """The weight as a plain ``[*in, *out]`` array (dequantized), or ``weight`` itself if plain."""
    if not isinstance(weight, PackedWeight):
        return weight.astype(dtype)
    matrix = weight.values.astype(jnp.float32)
    if weight.scale is not None:
        matrix = matrix * weight.scale[:, None]
    return matrix.T.reshape(weight.shape).astype(dtype)


def packed_matmul(x, weight, contracted: int):
    """``x [..., *in]`` times ``weight [*in, *out]`` (plain or ``PackedWeight``) over the
    ``contracted`` input axes: ``[..., *out]`` in the dtype of x. One matrix product of the
    flattened shapes (reshaping a contiguous weight is free); a packed weight is converted to
    x's dtype inside the product and its scale applied to the output channels."""
    shape = weight.shape
    inner, outer = shape[:contracted], shape[contracted:]
    lead = x.shape[: x.ndim - contracted]
    if tuple(x.shape[x.ndim - contracted:]) != tuple(inner):
        raise ValueError(f"x {x.shape} does not end in the weight's input axes {inner} (weight {shape})")
    x2 = x.reshape(-1, math.prod(inner))  # [M, K]
    if isinstance(weight, PackedWeight):
        y = x2 @ weight.values.T.astype(x.dtype)  # [M, N]
        if weight.scale is not None:
            y = y * weight.scale.astype(x.dtype)
    else:
        y = x2 @ weight.reshape(x2.shape[1], -1).astype(x.dtype)
    return y.reshape(*lead, *outer)
