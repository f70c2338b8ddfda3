"""Argument checks with the library's error style, in one place.

`TypeError` for a value of the wrong type, `ValueError` for a value of the
right type outside its range; both name the argument and the value
received. NumPy integers and floats are accepted where Python ones are
(bools are not numbers here).

Example:

>>> import numpy as np
>>> check_int("num_bits", np.int64(4), minimum=2, maximum=8)
4
>>> check_int("num_bits", 9, minimum=2, maximum=8)
Traceback (most recent call last):
...
ValueError: `num_bits` must be an integer in [2, 8]. Received: num_bits=9
"""

import math
import numbers

import numpy as np


def _is_bool(value):
    return isinstance(value, (bool, np.bool_))


def _range_text(minimum, maximum, inclusive=True):
    if minimum is not None and maximum is not None:
        return f" in [{minimum}, {maximum}]"
    if minimum is not None:
        return f" {'>=' if inclusive else '>'} {minimum}"
    if maximum is not None:
        return f" <= {maximum}"
    return ""


def check_int(name, value, minimum=None, maximum=None, allow_none=False):
    """Returns `value` as a Python int if it is an integer in range.

    Args:
        name: str, the argument's name (for the message).
        value: the value received.
        minimum, maximum: optional inclusive bounds.
        allow_none: bool; `None` passes through when `True`.
    """
    if value is None and allow_none:
        return None
    expected = f"`{name}` must be an integer{_range_text(minimum, maximum)}"
    if allow_none:
        expected += " or None"
    if _is_bool(value) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{expected}. Received: {name}={value!r}")
    value = int(value)
    if (minimum is not None and value < minimum) or (
            maximum is not None and value > maximum):
        raise ValueError(f"{expected}. Received: {name}={value!r}")
    return value


def check_float(name, value, minimum=None, maximum=None, inclusive=True,
                allow_none=False):
    """Returns `value` as a finite Python float within its bounds.

    Args:
        name: str, the argument's name.
        value: the value received (any real number but a bool).
        minimum: optional lower bound, inclusive unless `inclusive=False`.
        maximum: optional upper bound, exclusive (`[minimum, maximum)`).
        allow_none: bool; `None` passes through when `True`.
    """
    if value is None and allow_none:
        return None
    expected = f"`{name}` must be a finite number"
    if minimum is not None and maximum is not None:
        expected += f" in {'[' if inclusive else '('}{minimum}, {maximum})"
    else:
        expected += _range_text(minimum, None, inclusive)
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise TypeError(f"{expected}. Received: {name}={value!r}")
    number = float(value)
    bad = not math.isfinite(number)
    if minimum is not None:
        bad = bad or (number < minimum if inclusive else number <= minimum)
    if maximum is not None:
        bad = bad or number >= maximum
    if bad:
        raise ValueError(f"{expected}. Received: {name}={value!r}")
    return number


def check_bool(name, value):
    """Returns `value` as a Python bool; `TypeError` for anything else."""
    if not _is_bool(value):
        raise TypeError(f"`{name}` must be a bool. Received: "
                        f"{name}={value!r}")
    return bool(value)


def check_choice(name, value, choices):
    """Returns `value` if it is one of `choices` (a tuple)."""
    if not any(value is c or (isinstance(value, str) and value == c)
               for c in choices):
        raise ValueError(f"`{name}` must be one of {choices}. "
                         f"Received: {name}={value!r}")
    return value
