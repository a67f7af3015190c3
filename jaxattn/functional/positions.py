"""Telling attention where tokens are: sinusoidal positions and RoPE.

Attention itself is permutation-invariant: shuffle the keys and values together and
the output does not change. Position information therefore has to be added, either
to the input embedding (sinusoidal, Vaswani et al. 2017, section 3.5) or by rotating
queries and keys (RoPE, Su et al. 2021, arXiv 2104.09864), which makes ``q . k``
depend only on the distance between the two tokens.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxattn.functional.masks import token_array

ROPE_STYLES = ("half", "interleaved")


def sinusoidal_positions(T: int, C: int, *, base: float = 10000.0):
    """Fixed sinusoidal position table (Vaswani et al. 2017, section 3.5).

    ``PE[t, 2i] = sin(t / base^(2i/C))``, ``PE[t, 2i+1] = cos(t / base^(2i/C))``.

    Returns:
      float32 ``[T, C]``.
    """
    if T < 0 or C < 1:
        raise ValueError(f"sinusoidal_positions needs T >= 0 and C >= 1, got T={T}, C={C}")
    pairs = (C + 1) // 2
    inv_freq = base ** (-2.0 * jnp.arange(pairs, dtype=jnp.float32) / C)  # [C/2]
    angles = jnp.arange(T, dtype=jnp.float32)[:, None] * inv_freq[None, :]  # [T, C/2]
    table = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1)  # [T, C/2, 2]
    return table.reshape(T, 2 * pairs)[:, :C]  # [T, C]


def _token_positions(x, positions):
    """Positions index the token axes of ``x``; heads broadcast.

    ``x [B, T, ...]`` (``[B, T, H, D]`` queries or keys, ``[B, S, R]`` MLA's RoPE key) takes
    ``[B, T]`` or ``[T]`` (the one form of ``masks.token_array``); ``x [T, D]`` takes ``[T]``.
    Returns int32 positions shaped to broadcast against ``x.shape[:-1]``.
    """
    if x.ndim == 2:
        return token_array("positions", positions, x.shape[0], "T")[0]  # [T]
    if x.ndim < 2:
        raise ValueError(f"rope takes x [..., T, D] with tokens on an axis, got x.shape={x.shape}")
    positions = token_array("positions", positions, x.shape[1], "T", x.shape[0])  # [B|1, T]
    return positions.reshape(positions.shape + (1,) * (x.ndim - 3))  # [B|1, T, 1...]: heads share it


def rope(x, positions, *, theta: float = 10000.0, style: str = "half"):
    """Rotary position embedding (Su et al. 2021, RoFormer, section 3.4.2).

    Splits the last axis of ``x`` into ``D/2`` pairs and rotates pair ``i`` of the
    token at position ``m`` by the angle ``m * theta^(-2i/D)``. Because rotations
    compose, ``rope(q, m) . rope(k, n)`` depends only on ``m - n``.

    Args:
      x: ``[B, T, H, D]`` (queries or keys of H heads), or any ``[..., D]`` such as
        MLA's shared RoPE key ``[B, S, R]``; D even.
      positions: int, indexing the token axes: ``[B, T]`` or ``[T]`` for
        ``x [B, T, H, D]`` (every head of a token shares its position) and for ``[B, S, R]``;
        ``[T]`` for ``x [T, D]``.
      theta: the base of the frequencies.
      style: which elements form a pair.
        ``"half"``: ``(i, i + D/2)``, the two halves of the head (GPT-NeoX,
        Hugging Face Llama, Qwen2, Mistral); ``"interleaved"``: ``(2i, 2i+1)`` (GPT-J,
        the original Llama, DeepSeek).

    Returns:
      ``x`` rotated, same shape and dtype (the rotation is computed in float32).
    """
    if style not in ROPE_STYLES:
        raise ValueError(f"rope style must be one of {ROPE_STYLES}, got {style!r}")
    D = x.shape[-1]
    if D % 2:
        raise ValueError(f"rope needs an even last axis, got x.shape={x.shape}")
    positions = _token_positions(x, positions)

    inv_freq = theta ** (-2.0 * jnp.arange(D // 2, dtype=jnp.float32) / D)  # [D/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [..., D/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    xf = x.astype(jnp.float32)
    if style == "half":
        x1, x2 = xf[..., : D // 2], xf[..., D // 2 :]
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    else:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)  # [..., D/2, 2]
        out = out.reshape(xf.shape)
    return out.astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class Rope:
    """The RoPE of one layer (static, hashable): base ``theta`` and pairing ``style``.

    ``Rope(...)(x, positions)`` is ``rope(x, positions, theta=..., style=...)``; a layer with
    ``rope=None`` has no position encoding of its own (learned or sinusoidal positions, NoPE).
    """

    theta: float = 10000.0
    style: str = "half"

    def __post_init__(self):
        if self.style not in ROPE_STYLES:
            raise ValueError(f"rope style must be one of {ROPE_STYLES}, got {self.style!r}")
        if not self.theta > 0:
            raise ValueError(f"rope theta must be > 0, got {self.theta}")

    def __call__(self, x, positions):
        return rope(x, positions, theta=self.theta, style=self.style)
