"""Argument checks of the fleet's Python classes: each refuses by name what would be converted
silently (1.5 -> 1, "5" -> 5, True -> 1) or break a run later (NaN, inf)."""

from __future__ import annotations

import math
import numbers
from typing import Optional

import numpy as np


def integer(name: str, value, minimum: int, maximum: Optional[int] = None) -> int:
    """A whole number (Python or numpy integer, not a bool) in [minimum, maximum]."""
    bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int {bound}, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be an int {bound}, got {value!r}")
    return int(value)


def real(name: str, value, minimum: float, *, strict: bool = False) -> float:
    """A finite real number (not a bool), >= minimum (> minimum with ``strict``)."""
    bound = f"a finite number {'>' if strict else '>='} {minimum}"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {bound}, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < minimum or (strict and value == minimum):
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    return value


def flag(name: str, value) -> bool:
    """A bool (a string such as "false" would read as true)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return bool(value)

