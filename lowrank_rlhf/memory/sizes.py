"""Byte sizes as people write them: ``"24GiB"`` -> bytes for budgets, bytes -> ``"9.81 GiB"`` for tables."""

from __future__ import annotations

import math
import re

__all__ = ["format_bytes", "parse_bytes"]

_UNITS = {
    "B": 1,
    "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
    "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4,
}
_ALLOWED_UNITS = "B, KB, MB, GB, TB (powers of 1000), KiB, MiB, GiB, TiB (powers of 1024)"
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*$")


def parse_bytes(value: str | int | float) -> int:
    """``"24GiB" -> 25769803776``; plain ints (or digit strings) are bytes."""
    if isinstance(value, bool):
        raise ValueError(f"cannot parse memory size {value!r}: use a number with one of {_ALLOWED_UNITS}")
    if isinstance(value, (int, float)):
        if value < 0 or not math.isfinite(value):
            raise ValueError(f"memory size must be a non-negative number of bytes, got {value!r}")
        return int(value)
    match = _SIZE_RE.match(str(value))
    unit = match.group(2).upper() if match else None
    if match is None or (unit and unit not in _UNITS):
        raise ValueError(
            f"cannot parse memory size {value!r}: use a number with one of {_ALLOWED_UNITS}, e.g. '24GiB'"
        )
    return int(float(match.group(1)) * _UNITS[unit or "B"])


def format_bytes(n: int | float, unit: str | None = None) -> str:
    """``format_bytes(10_533_584_896) -> "9.81 GiB"``; ``unit`` forces B/KiB/MiB/GiB/TiB."""
    steps = [("B", 1), ("KiB", 1024), ("MiB", 1024**2), ("GiB", 1024**3), ("TiB", 1024**4)]
    if unit is None:
        unit, scale = steps[0]
        for name, size in steps:
            if abs(n) >= size:
                unit, scale = name, size
    else:
        scale = dict(steps)[unit]
    if unit == "B":
        return f"{int(n)} B"
    return f"{n / scale:.2f} {unit}"
