"""Field checks for the method configs (``lowbit.act``, ``lowbit.quant``, ``lowbit.explain``).

A config is a frozen dataclass that calls these in ``__post_init__``; each raises ValueError
naming ``Config.field``, what it must be, and the value it got. No torch here: configs are built
before any work starts.
"""
from __future__ import annotations

import math


def where(config: object, field: str) -> str:
    """``"GactConfig.average_bits"``: how errors name a field."""
    return f"{type(config).__name__}.{field}"


def check_int(config: object, field: str, low: int | None = None, high: int | None = None,
              allow_none: bool = False, unit: str = "") -> None:
    """``Config.field`` must be an int (not a bool) in ``low..high`` (None: open); ``unit`` (e.g.
    "elements") is named in the error."""
    v = getattr(config, field)
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, int) or (low is not None and v < low) or (high is not None and v > high):
        if low is not None and high is not None:
            need = f"an integer in {low}..{high}"
        else:
            need = "an integer" + (f" >= {low}" if low is not None else "") + (f" <= {high}" if high is not None else "")
        what = f"{where(config, field)} ({unit})" if unit else where(config, field)
        raise ValueError(f"{what} must be {need}{' or None' if allow_none else ''}, got {v!r}")


def check_number(config: object, field: str, low: float = -math.inf, high: float = math.inf,
                 low_open: bool = False, high_open: bool = False, allow_none: bool = False) -> None:
    """``Config.field`` must be a finite int or float (not a bool) in the interval."""
    v = getattr(config, field)
    if v is None and allow_none:
        return
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        span = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{where(config, field)} must be a finite number in {span}"
                         f"{' or None' if allow_none else ''}, got {v!r}")


def check_choice(config: object, field: str, choices: tuple) -> None:
    """``Config.field`` must be one of ``choices`` (a bool is never taken for 0 or 1)."""
    v = getattr(config, field)
    if isinstance(v, bool) or v not in choices:
        raise ValueError(f"{where(config, field)} must be one of {choices}, got {v!r}")


def check_bool(config: object, field: str) -> None:
    """``Config.field`` must be True or False."""
    v = getattr(config, field)
    if not isinstance(v, bool):
        raise ValueError(f"{where(config, field)} must be True or False, got {v!r}")


def integral(config: object, field: str) -> None:
    """Store an integer-valued float (``4.0``) as an int, so a width given as ``4.0`` means 4."""
    v = getattr(config, field)
    if isinstance(v, float) and v.is_integer():
        object.__setattr__(config, field, int(v))
