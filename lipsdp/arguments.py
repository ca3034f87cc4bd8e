"""The command line's argument types (argparse ``type=``): one clear message for a malformed value."""

from __future__ import annotations

import argparse
import math

from lipsdp.budget import parse_size


def shape(text: str) -> tuple[int, ...]:
    """``--input-shape``: whole numbers >= 1 separated by commas (or ``x``), e.g. ``1,28,28``."""
    try:
        dims = tuple(int(t) for t in text.replace("x", ",").split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a shape: {text!r} (use e.g. 1,28,28 or 784)") from None
    if not dims or any(s <= 0 for s in dims):
        raise argparse.ArgumentTypeError(f"not a shape: {text!r}")
    return dims


def horizon(text: str) -> int | str:
    """``--horizon``: a whole number >= 1, or ``all``."""
    if text.strip().lower() == "all":
        return "all"
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1 or 'all', not {text!r}")
    return value


def positive(text: str) -> float:
    """A number > 0 (``--time-limit``, ``--tol``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def memory_size(text: str) -> int:
    """A memory size with a unit (``--memory-limit 2G``, ``500M``)."""
    try:
        return parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a memory size: {text!r} (use e.g. 2G, 500M)") from None


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (``--workers``, ``--chunk``; the CLI's ``--threads``, ``--split``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def indices(text: str) -> list[int]:
    """``--inputs``, ``--outputs``: whole numbers >= 0 separated by commas, e.g. ``0,3``."""
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of indices: {text!r} (use e.g. 0,3)") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"indices must be whole numbers >= 0: {text!r}")
    return values


def radius(text: str) -> float:
    """``--radius``: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"the radius must be a finite number >= 0: {text!r}")
    return value
