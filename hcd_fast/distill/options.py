"""Declared options: a dataclass field that carries its help text and its valid range, so a flag's range is
written once, next to its default, and checked before the first step (exit code 2, the flag named)."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

from hcd_fast.distill.errors import UserError


def option(default: Any = dataclasses.MISSING, help: str = "", *, ge: Optional[float] = None,
           gt: Optional[float] = None, le: Optional[float] = None, lt: Optional[float] = None,
           **metadata) -> Any:
    """A dataclass field with ``help`` and the bounds ``ge`` (>=), ``gt`` (>), ``le`` (<=), ``lt`` (<) of its
    value (None values are always allowed: "off"). Extra ``metadata`` is the command line's (see cli.py)."""
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    meta = dict(metadata, help=help, bounds=bounds)
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


_WORDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
_TESTS = {"ge": lambda v, b: v >= b, "gt": lambda v, b: v > b, "le": lambda v, b: v <= b, "lt": lambda v, b: v < b}


def describe_bounds(bounds: dict) -> str:
    return " and ".join(f"{_WORDS[k]} {v}" for k, v in bounds.items())


def check_value(name: str, value: Any, bounds: dict) -> None:
    """UserError naming the flag when ``value`` is not a finite number within ``bounds``."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{flag_name(name)} {value}: expected a finite number")
    if not all(_TESTS[k](value, b) for k, b in bounds.items()):
        raise UserError(f"{flag_name(name)} {value}: expected a value {describe_bounds(bounds)}")


def check_ranges(obj) -> None:
    """Every declared field of the dataclass ``obj`` within its bounds (finite, for floats)."""
    for f in dataclasses.fields(obj):
        check_value(f.name, getattr(obj, f.name), f.metadata.get("bounds", {}))
