"""Type and range checks of the `sam_*` knobs, shared by the core arguments and the variants' own.

Each raises a ValueError naming the knob, the value and what is expected, and stores the value in its
canonical type (float or int), so a knob that passed is a plain Python number afterwards.
"""

from __future__ import annotations

import math
import numbers


def check_nonnegative(args, name: str) -> None:
    """name must be a finite real number >= 0 (not a bool, not a string)."""
    value = getattr(args, name)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r} ({type(value).__name__}).")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
    setattr(args, name, float(value))


def check_positive_int(args, name: str) -> None:
    value = getattr(args, name)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r} ({type(value).__name__}).")
    setattr(args, name, int(value))


def check_fraction(args, name: str, *, allow_zero: bool = False) -> None:
    """name must be a number in (0, 1] (or [0, 1] with allow_zero)."""
    value = getattr(args, name)
    low_ok = (lambda v: v >= 0) if allow_zero else (lambda v: v > 0)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or not (
        low_ok(value) and value <= 1
    ):
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}.")
    setattr(args, name, float(value))


def check_bool(args, name: str, allow_none: bool = False) -> None:
    value = getattr(args, name)
    if value is None and allow_none:
        return
    if not isinstance(value, bool):
        hint = " (a string is not read as a boolean: write true/false without quotes)" if isinstance(value, str) else ""
        raise ValueError(f"{name} must be True or False, got {value!r} ({type(value).__name__}){hint}.")
