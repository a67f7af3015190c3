"""The one validation helper: each message names the parameter, the bound and the value given;
NumPy's scalars are numbers, a bool never is."""

import numpy as np
import pytest

from jaxattn.functional.checks import check_int, check_number


def test_integers_within_their_bounds_pass_and_anything_else_is_named():
    assert check_int("slots", 4) == 4 and check_int("seed", np.int64(0), minimum=0) == 0
    for value, message in ((0, "slots must be an integer >= 1, got 0"), (True, "slots must be an integer >= 1, got True"),
                           (2.0, "slots must be an integer >= 1, got 2.0"), ("8", "slots must be an integer >= 1, got '8'")):
        with pytest.raises(ValueError, match=f"^{message}$"):
            check_int("slots", value)
    with pytest.raises(ValueError, match=r"^seed must be an integer in \[0, 9\], got 10$"):
        check_int("seed", 10, minimum=0, maximum=9)


def test_numbers_within_their_bounds_pass_and_anything_else_is_named():
    assert check_number("top_p", np.float32(0.5), above=0, maximum=1) == np.float32(0.5)
    cases = ((dict(above=0), 0.0, "t must be a number > 0, got 0.0"),
             (dict(above=0, maximum=1), 1.5, "t must be a number > 0 and <= 1, got 1.5"),
             (dict(minimum=0), -1, "t must be a number >= 0, got -1"),
             ({}, float("nan"), "t must be a finite number, got nan"),
             ({}, "hot", "t must be a number, got 'hot'"),
             ({}, False, "t must be a number, got False"))
    for bounds, value, message in cases:
        with pytest.raises(ValueError, match=f"^{message}$"):
            check_number("t", value, **bounds)
