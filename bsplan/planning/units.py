"""Byte sizes as people write them (300MiB, 2GiB, 2GB, 1e9) and as tables show them; token counts
as people write them (4M, 4Mi)."""

from __future__ import annotations

import math
import re
from decimal import Decimal

from bsplan.planning.errors import BadInput

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4,
    "ki": 1024, "kib": 1024, "mi": 1024**2, "mib": 1024**2, "gi": 1024**3, "gib": 1024**3,
    "ti": 1024**4, "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Parse a byte size: decimal (KB, MB, GB) or binary (KiB, MiB, GiB) units, or plain bytes."""
    match = _SIZE.match(str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise BadInput(f"cannot read {text!r} as a memory size: write it like 300MiB, 2GiB, 2GB or 1048576")
    number = float(match.group(1)) * _UNITS[unit]
    if not math.isfinite(number):
        raise BadInput(f"memory size {text!r} is too large to be a memory size")
    size = int(number)
    if size <= 0:
        raise BadInput(f"memory size {text!r} must be more than zero bytes")
    return size


def format_bytes(size: float | None) -> str:
    """Binary units, three significant figures: what nvidia-smi and torch's summaries print."""
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" or abs(value) >= 999.5 else f"{value:.3g} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


# Token counts: K, M, G, T are decimal (SI) and Ki, Mi, Gi, Ti binary, as byte sizes are; the letter's case does not matter.
_COUNT_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4, "ki": 1024, "mi": 1024**2, "gi": 1024**3, "ti": 1024**4}
_COUNT = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-z]{0,2})\s*$", re.IGNORECASE)


def parse_tokens(text: str | int, option: str) -> int:
    """A whole count of tokens: 4M is 4,000,000 and 4Mi 4,194,304, so a power-of-two batch can be
    written as one. Decimal arithmetic, so 1.5M is exactly 1,500,000."""
    match = _COUNT.match(str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _COUNT_UNITS:
        raise BadInput(f"cannot read {option} {text!r} as a count of tokens: write it like 4194304, 4M (4,000,000) or 4Mi (4,194,304)")
    count = Decimal(match.group(1)) * _COUNT_UNITS[unit]
    if count != count.to_integral_value():
        raise BadInput(f"{option} {text!r} is {count} tokens, not a whole number of them")
    if count < 1:
        raise BadInput(f"{option} must be at least 1 token, not {text!r}")
    return int(count)
