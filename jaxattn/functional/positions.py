"""Telling attention where tokens are: sinusoidal positions, RoPE and its scalings.

Attention itself is permutation-invariant: shuffle the keys and values together and
the output does not change. Position information therefore has to be added, either
to the input embedding (sinusoidal, Vaswani et al. 2017, section 3.5) or by rotating
queries and keys (RoPE, Su et al. 2021, arXiv 2104.09864), which makes ``q . k``
depend only on the distance between the two tokens.

The chapter: the sinusoidal table; RoPE's frequencies, ``theta^(-2i/R)`` for the R rotated
dimensions of a head, and the ways models rescale them to read past the context they were
trained on (``RopeScaling``: linear, dynamic NTK, Llama 3, YaRN, LongRoPE); then ``rope``,
which rotates the first R dimensions of each head (R = D, or a part of it: GPT-NeoX rotates
a quarter), and ``Rope``, a layer's settings.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

from jaxattn.functional.masks import token_array

ROPE_STYLES = ("half", "interleaved")
SCALINGS = ("linear", "dynamic", "llama3", "yarn", "longrope")


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


# ------------------------------------------------------------- frequencies and scalings


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """How a model stretches RoPE past the context it was trained on (static, hashable).

    ``kind``:
      ``"linear"`` (Chen et al. 2023, position interpolation): every frequency divided by ``factor``.
      ``"dynamic"`` (NTK-aware, /u/bloc97 and /u/emozilla 2023): once the sequence is longer
        than ``max_length``, the base grows to
        ``theta (factor L / max_length - (factor - 1))^(R / (R - 2))``, L the current length
        (the largest position of the call + 1). Keys already in a cache keep the rotation of
        the base they were written with, so cached and uncached passes differ past ``max_length``.
      ``"llama3"`` (Llama 3.1 model card): wavelengths longer than
        ``original_max_length / low_freq_factor`` are divided by ``factor``, shorter than
        ``original_max_length / high_freq_factor`` kept, and those between blended smoothly.
      ``"yarn"`` (Peng et al. 2023, arXiv 2309.00071): frequencies that turn fewer than
        ``beta_slow`` times over ``original_max_length`` are interpolated (divided by
        ``factor``), more than ``beta_fast`` times kept, a linear ramp between; and cos, sin
        are multiplied by ``attention_factor`` (default ``0.1 ln(factor) + 1``, or the ratio of
        ``mscale`` to ``mscale_all_dim`` forms), so the logits grow by its square.
      ``"longrope"`` (Ding et al. 2024, arXiv 2402.13753; Phi-3): one rescale factor per
        frequency, ``short_factor`` while the sequence fits ``original_max_length`` and
        ``long_factor`` past it (like ``dynamic``, cached keys keep theirs), and cos, sin
        multiplied by ``sqrt(1 + ln(factor) / ln(original_max_length))`` with
        ``factor = max_length / original_max_length``.
    """

    kind: str
    factor: float | None = None
    original_max_length: int | None = None
    max_length: int | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.kind not in SCALINGS:
            raise ValueError(f"rope scaling must be one of {SCALINGS}, got {self.kind!r}")
        for name in ("short_factor", "long_factor"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(float(f) for f in getattr(self, name)))
        needs = {"linear": ("factor",), "dynamic": ("factor", "max_length"),
                 "llama3": ("factor", "original_max_length"), "yarn": ("original_max_length",),
                 "longrope": ("original_max_length", "short_factor", "long_factor")}[self.kind]
        missing = [name for name in needs if getattr(self, name) is None]
        if self.kind == "yarn" and self.factor is None and self.max_length is None:
            missing.append("factor (or max_length)")
        if missing:
            raise ValueError(f"rope scaling {self.kind!r} needs {', '.join(missing)}")
        if self.factor is not None and not self.factor > 0:
            raise ValueError(f"rope scaling factor must be > 0, got {self.factor}")

    def stretch(self) -> float:
        """The factor of YaRN and LongRoPE (given, or ``max_length / original_max_length``)."""
        return self.factor if self.factor is not None else self.max_length / self.original_max_length

    def yarn_mscale(self, mscale: float = 1.0) -> float:
        """YaRN's ``0.1 mscale ln(factor) + 1`` (1 for a factor <= 1)."""
        factor = self.stretch()
        return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0

    def cos_sin_factor(self) -> float:
        """The number cos and sin are multiplied by (YaRN, LongRoPE; 1 otherwise)."""
        if self.attention_factor is not None:
            return float(self.attention_factor)
        if self.kind == "yarn":
            if self.mscale and self.mscale_all_dim:
                return self.yarn_mscale(self.mscale) / self.yarn_mscale(self.mscale_all_dim)
            return self.yarn_mscale()
        if self.kind == "longrope":
            factor = self.stretch()
            return 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(self.original_max_length))
        return 1.0


def rope_frequencies(R: int, theta: float, scaling: RopeScaling | None = None, seq_len=None):
    """The ceil(R / 2) angular frequencies of RoPE, float32 ``[ceil(R/2)]``: ``theta^(-2i/R)``, rescaled.

    ``seq_len`` (the current length, may be traced) matters only to ``dynamic`` and
    ``longrope``. Returns ``(inv_freq, cos_sin_factor)``.
    """
    exponents = np.arange(0, R, 2, dtype=np.float64) / R  # 2i / R
    base = jnp.asarray(theta ** -exponents, jnp.float32)  # theta^(-2i/R)
    if scaling is None:
        return base, 1.0
    kind, factor = scaling.kind, scaling.factor
    if kind == "linear":
        return base / factor, 1.0
    if kind == "dynamic":
        length = jnp.maximum(jnp.asarray(seq_len, jnp.float32), scaling.max_length)
        grown = theta * (factor * length / scaling.max_length - (factor - 1)) ** (R / (R - 2))
        return grown ** -jnp.asarray(exponents, jnp.float32), 1.0
    if kind == "llama3":
        old = scaling.original_max_length
        wavelength = 2 * np.pi * theta ** exponents  # of each frequency
        smooth = (old / wavelength - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        inv_freq = theta ** -exponents
        scaled = np.where(wavelength > old / scaling.low_freq_factor, inv_freq / factor,  # long: interpolated
                          np.where(wavelength < old / scaling.high_freq_factor, inv_freq,  # short: kept
                                   (1 - smooth) * inv_freq / factor + smooth * inv_freq))  # between: blended
        return jnp.asarray(scaled, jnp.float32), 1.0
    if kind == "yarn":
        def correction_dim(rotations):  # the dimension whose frequency turns `rotations` times over the context
            return R * math.log(scaling.original_max_length / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
        if scaling.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, R - 1)
        high = high + 0.001 if low == high else high
        ramp = np.clip((np.arange(R // 2) - low) / (high - low), 0, 1)  # 0: keep, 1: interpolate
        inv_freq = theta ** -exponents
        mixed = inv_freq / scaling.stretch() * ramp + inv_freq * (1 - ramp)
        return jnp.asarray(mixed, jnp.float32), scaling.cos_sin_factor()
    # longrope
    for name in ("short_factor", "long_factor"):
        if len(getattr(scaling, name)) != R // 2:
            raise ValueError(f"longrope's {name} has {len(getattr(scaling, name))} numbers; R={R} needs R/2={R // 2}")
    short = theta ** -exponents / np.asarray(scaling.short_factor)
    long = theta ** -exponents / np.asarray(scaling.long_factor)
    past = jnp.asarray(seq_len) > scaling.original_max_length
    return jnp.where(past, jnp.asarray(long, jnp.float32), jnp.asarray(short, jnp.float32)), scaling.cos_sin_factor()


# ------------------------------------------------------------------------- RoPE


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


def rotary_width(D: int, rotary_dim: int | None = None, rotary_fraction: float | None = None) -> int:
    """R, the rotary width of a head of D dimensions: all, ``rotary_dim``, or
    ``int(D * rotary_fraction)`` (GPT-NeoX/Pythia: 0.25; Phi-4-mini: 0.75).

    RoPE rotates pairs, so an odd R rotates ``2 * ceil(R / 2)`` dimensions with the
    frequencies ``theta^(-2i/R)``, i < ceil(R / 2), as transformers does (GPT-NeoX with head
    width 12 and a quarter rotary: R = 3, 4 dimensions turned); that width must fit in D."""
    if rotary_dim is not None and rotary_fraction is not None:
        raise ValueError("give rotary_dim or rotary_fraction, not both")
    if rotary_fraction is not None:
        if not 0 < rotary_fraction <= 1:
            raise ValueError(f"rotary_fraction must be in (0, 1], got {rotary_fraction}")
        rotary_dim = int(D * rotary_fraction)
    R = D if rotary_dim is None else rotary_dim
    if R < 1 or 2 * -(-R // 2) > D:
        raise ValueError(f"RoPE rotates pairs: a rotary width of {R} turns {2 * -(-R // 2)} dimensions, which must be "
                         f"in [2, D={D}]")
    return R


def rope(x, positions, *, theta: float = 10000.0, style: str = "half", rotary_dim: int | None = None,
         rotary_fraction: float | None = None, scaling: RopeScaling | None = None):
    """Rotary position embedding (Su et al. 2021, RoFormer, section 3.4.2).

    Splits the first R dimensions of ``x`` (all D unless ``rotary_dim``/``rotary_fraction``
    say fewer) into R/2 pairs and rotates pair ``i`` of the token at position ``m`` by the
    angle ``m * f_i``, ``f_i = theta^(-2i/R)`` (rescaled by ``scaling``); the other D - R
    dimensions pass unchanged. Because rotations compose, ``rope(q, m) . rope(k, n)`` depends
    only on ``m - n``. YaRN and LongRoPE also multiply cos and sin by their attention factor.

    Args:
      x: ``[B, T, H, D]`` (queries or keys of H heads), ``[B, S, R]`` (MLA's shared RoPE
        key) or ``[T, D]``.
      positions: int, indexing the token axes: ``[B, T]`` or ``[T]`` for ``x [B, T, H, D]``
        (every head of a token shares its position) and for ``[B, S, R]``; ``[T]`` for ``[T, D]``.
      theta: the base of the frequencies.
      style: which elements of the rotated part form a pair. ``"half"``: ``(i, i + R/2)``
        (GPT-NeoX, Hugging Face Llama, Qwen2, Mistral); ``"interleaved"``: ``(2i, 2i+1)``
        (GPT-J, the original Llama, DeepSeek).
      rotary_dim, rotary_fraction: partial rotary (``rotary_width``).
      scaling: a ``RopeScaling``, or ``None``.

    Returns:
      ``x`` rotated, same shape and dtype (the rotation is computed in float32).
    """
    if style not in ROPE_STYLES:
        raise ValueError(f"rope style must be one of {ROPE_STYLES}, got {style!r}")
    D = x.shape[-1]
    if D % 2 and rotary_dim is None and rotary_fraction is None:
        raise ValueError(f"rope needs an even last axis, got x.shape={x.shape}")
    R = rotary_width(D, rotary_dim, rotary_fraction)
    if R % 2 and scaling is not None and scaling.kind in ("yarn", "longrope"):
        raise ValueError(f"{scaling.kind} RoPE scaling sizes its ramp or factors by R // 2 = {R // 2}, one short of the "
                         f"{-(-R // 2)} frequencies of an odd rotary width R = {R} (transformers cannot run it either)")
    positions = _token_positions(x, positions)
    seq_len = None if scaling is None or scaling.kind not in ("dynamic", "longrope") else jnp.max(positions) + 1
    inv_freq, factor = rope_frequencies(R, theta, scaling, seq_len)  # [ceil(R/2)]
    W = 2 * inv_freq.shape[0]  # the dimensions turned: R, or R + 1 for an odd R
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [..., W/2]
    cos, sin = jnp.cos(angles) * factor, jnp.sin(angles) * factor
    xf = x.astype(jnp.float32)
    rotated, passed = xf[..., :W], xf[..., W:]
    if style == "half":
        x1, x2 = rotated[..., : W // 2], rotated[..., W // 2 :]
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    else:
        x1, x2 = rotated[..., 0::2], rotated[..., 1::2]
        out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)  # [..., R/2, 2]
        out = out.reshape(rotated.shape)
    return jnp.concatenate([out, passed], axis=-1).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class Rope:
    """The RoPE of one layer (static, hashable): base ``theta``, pairing ``style``, the part
    of each head it rotates (``rotary_dim`` or ``rotary_fraction``; all by default) and its
    ``scaling``. ``Rope(...)(x, positions)`` is ``rope(x, positions, ...)`` with these; a layer
    with ``rope=None`` has no position encoding of its own (learned or sinusoidal positions, NoPE).
    """

    theta: float = 10000.0
    style: str = "half"
    rotary_dim: int | None = None
    rotary_fraction: float | None = None
    scaling: RopeScaling | None = None

    def __post_init__(self):
        if self.style not in ROPE_STYLES:
            raise ValueError(f"rope style must be one of {ROPE_STYLES}, got {self.style!r}")
        if not self.theta > 0:
            raise ValueError(f"rope theta must be > 0, got {self.theta}")
        if self.rotary_dim is not None and self.rotary_fraction is not None:
            raise ValueError("give rotary_dim or rotary_fraction, not both")

    def __call__(self, x, positions):
        return rope(x, positions, theta=self.theta, style=self.style, rotary_dim=self.rotary_dim,
                    rotary_fraction=self.rotary_fraction, scaling=self.scaling)
