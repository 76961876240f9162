"""Input validation shared by every op.

Every message names the op and the argument, and says what was expected and what was
received, so that a user can fix the call without reading the source.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence


def integer(op: str, name: str, value: Any, *, minimum: int) -> int:
    """An int (not a bool) of at least ``minimum``."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{op}: {name}: expected an int, got {value!r}")
    if value < minimum:
        fail(op, name, f"an int >= {minimum}", repr(value))
    return int(value)


def real(op: str, name: str, value: Any, *, positive: bool = False) -> float:
    """A finite real number (not a bool), positive when asked."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{op}: {name}: expected a real number, got {value!r}")
    if not math.isfinite(value) or (positive and value <= 0):
        fail(op, name, "a finite positive number" if positive else "a finite number", repr(value))
    return float(value)


def int_pair(op: str, name: str, value: Any, *, minimum: int) -> tuple[int, int]:
    """An int or an (h, w) pair of ints, each at least ``minimum``."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        pair = (int(value), int(value))
    elif (
        isinstance(value, Sequence)
        and len(value) == 2
        and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value)
    ):
        pair = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"{op}: {name}: expected an int or a pair of ints (h, w), got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"{op}: {name}: expected values >= {minimum}, got {value!r}")
    return pair


def ndim(op: str, name: str, arr: Any, expected: int, layout: str) -> None:
    if arr.ndim != expected:
        raise ValueError(
            f"{op}: {name}: expected a {expected}-D array {layout}, got shape {tuple(arr.shape)}"
        )


def shape(op: str, name: str, arr: Any, expected: tuple, layout: str) -> None:
    if tuple(arr.shape) != tuple(expected):
        raise ValueError(
            f"{op}: {name}: expected shape {tuple(expected)} {layout}, got {tuple(arr.shape)}"
        )


def choice(op: str, name: str, value: Any, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{op}: {name}: expected one of {', '.join(map(repr, choices))}, got {value!r}")


def boolean(op: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{op}: {name}: expected True or False, got {value!r}")


def fail(op: str, name: str, expected: str, got: Any) -> None:
    raise ValueError(f"{op}: {name}: expected {expected}, got {got}")
