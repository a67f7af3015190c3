"""The checks every public function makes of its plain arguments, written once.

Each raises a ``ValueError`` whose message names the parameter, the bound and the value
given, e.g. ``slots must be an integer >= 1, got 0`` or ``temperature must be a number,
got 'hot'``. NumPy's scalars count as numbers; a ``bool`` never does (``True`` is an int in Python). Then the
checks of the attention call's own arguments: a window, a positive scale or cap, a boolean
mask, integer arrays.
"""

from __future__ import annotations

import math
import numbers

import jax.numpy as jnp


def check_int(name: str, value, *, minimum: int = 1, maximum: int | None = None) -> int:
    """``value`` if it is an integer in ``[minimum, maximum]``; else a ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum \
            or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be an integer {bound}, got {value!r}")
    return value


def check_number(name: str, value, *, above: float | None = None, minimum: float | None = None,
                 maximum: float | None = None) -> float:
    """``value`` if it is a finite real number ``> above``, ``>= minimum`` and ``<= maximum``
    (each bound optional); else a ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if (above is not None and not value > above) or (minimum is not None and value < minimum) \
            or (maximum is not None and value > maximum):
        low = f"> {above}" if above is not None else f">= {minimum}" if minimum is not None else None
        high = None if maximum is None else f"<= {maximum}"
        raise ValueError(f"{name} must be a number {' and '.join(b for b in (low, high) if b)}, got {value!r}")
    return value


def check_positive(name: str, value) -> None:
    """``value`` is None or a finite number > 0 (a scale, a soft-cap)."""
    if value is not None:
        check_number(name, value, above=0)


def check_integer_array(name: str, x) -> None:
    """``x`` is an array of integers (positions, lengths, segment ids); else a ``TypeError``."""
    if not jnp.issubdtype(jnp.asarray(x).dtype, jnp.integer):
        raise TypeError(f"{name} must be an integer array, got dtype {jnp.asarray(x).dtype}")


def check_window(window) -> None:
    """``window`` is None or an integer >= 1 (a causal sliding window)."""
    if window is not None:
        check_int("window", window)


def check_bool_mask(mask):
    """``mask`` as a boolean array (``True`` = may attend); any other dtype is a ``TypeError``."""
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        raise TypeError(
            f"mask must be boolean (True = may attend), got dtype {mask.dtype}; "
            "for an additive float bias, add it to the logits yourself"
        )
    return mask
