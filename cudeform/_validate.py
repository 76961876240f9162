"""Input validation shared by every op.

Every message reads ``op: argument: expected ..., got ...``: it names the function and the
argument, and says what was expected and what was received, so that a user can fix the call
without reading the source. docs/validation.md lists every check.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence


def integer(op: str, name: str, value: Any, *, minimum: int) -> int:
    """An int (not a bool) of at least ``minimum``."""
    if type(value) is int and value >= minimum:  # the common case, without the ABC checks
        return value
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        fail(op, name, "an int", repr(value), TypeError)
    if value < minimum:
        fail(op, name, f"an int >= {minimum}", repr(value))
    return int(value)


def real(op: str, name: str, value: Any, *, positive: bool = False, nonnegative: bool = False) -> float:
    """A finite real number (not a bool); positive, or at least 0, when asked."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        fail(op, name, "a real number", repr(value), TypeError)
    if not math.isfinite(value) or (positive and value <= 0) or (nonnegative and value < 0):
        expected = ("a finite positive number" if positive else "a finite number >= 0" if nonnegative
                    else "a finite number")
        fail(op, name, expected, repr(value))
    return float(value)


def int_pair(op: str, name: str, value: Any, *, minimum: int) -> tuple[int, int]:
    """An int or an (h, w) pair of ints, each at least ``minimum``."""
    if type(value) is int and value >= minimum:  # the common case, in a fraction of the checks' time
        return value, value
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        pair = (int(value), int(value))
    elif (
        isinstance(value, Sequence)
        and len(value) == 2
        and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value)
    ):
        pair = (int(value[0]), int(value[1]))
    else:
        fail(op, name, "an int or a pair of ints (h, w)", repr(value), TypeError)
    if min(pair) < minimum:
        fail(op, name, f"values >= {minimum}", repr(value))
    return pair


def ndim(op: str, name: str, arr: Any, expected: int, layout: str) -> None:
    if arr.ndim != expected:
        fail(op, name, f"a {expected}-D array {layout}", f"shape {tuple(arr.shape)}")


def shape(op: str, name: str, arr: Any, expected: tuple, layout: str) -> None:
    if tuple(arr.shape) != tuple(expected):
        fail(op, name, f"shape {tuple(expected)} {layout}", tuple(arr.shape))


def on_shapes(checks, op: str, arrays: dict, names: tuple, *args):
    """``checks(op, shapes, *args)`` for the shapes of ``arrays[name]`` (None for a missing
    array), with ``checks`` an ``lru_cache``: validation that depends on shapes alone then
    costs a lookup (an error is raised again on every call: lru_cache keeps no exceptions).
    Symbolic sizes (torch.compile's fake tensors) are not hashable and go uncached."""
    shapes = tuple(None if arrays[k] is None else tuple(arrays[k].shape) for k in names)
    try:
        hash(shapes)
    except TypeError:
        return checks.__wrapped__(op, shapes, *args)
    return checks(op, shapes, *args)


class Dims(tuple):
    """An array's shape standing in for the array in ndim() and shape(): validation that
    depends on shapes alone can then be cached on them."""

    @property
    def ndim(self) -> int:
        return len(self)

    @property
    def shape(self) -> tuple:
        return tuple(self)


def choice(op: str, name: str, value: Any, choices: Sequence[str]) -> None:
    """One of the strings ``choices``."""
    if not isinstance(value, str) or value not in choices:
        fail(op, name, f"one of {', '.join(map(repr, choices))}", repr(value))


def boolean(op: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        fail(op, name, "True or False", repr(value), TypeError)


def fail(op: str, name: str, expected: str, got: Any, error: type = ValueError) -> None:
    """Raise ``error`` (ValueError unless the argument's type is wrong)."""
    raise error(f"{op}: {name}: expected {expected}, got {got}")
