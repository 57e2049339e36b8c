"""Format kinds as data: what each ``Format.kind`` means for rounding, range, scales and codes.

``Format`` reads its derived facts (``is_quantized``, ``has_scale``, ``is_blocked``, ``grid``,
``qmin`` / ``qmax``, ``uses_zero_point``, ``grid_max``) from the entry of its kind here, so a new
kind is one ``register_kind`` call plus its rounding in ``quant._GRID_ROUNDING`` (keyed by
``grid``), not an edit of every exporter. Imports nothing from fliqs (``formats`` imports it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

__all__ = ["Kind", "KINDS", "get_kind", "register_kind"]


@dataclass(frozen=True)
class Kind:
    """The rules one kind of format follows.

    ``grid``: how an unscaled element is rounded — ``'levels'`` (integer levels ``k`` times the
    format's step, round half even, clamped to [qmin, qmax]), ``'float'`` (round to nearest even
    onto a binary floating-point grid, saturating at ±max_finite), or None (no element grid of
    its own: MX uses its element format's, ``float`` passes through).
    ``range_margin``: how far (in grid units) beyond [qmin, qmax] an input still lands on the end
    of the range instead of saturating (0.5 for levels: it rounds onto qmax; 0 for floats).
    """

    name: str
    quantizes: bool  # False: the identity (fp32)
    has_scale: bool  # a calibrated / learned per-tensor or per-channel scale
    blocked: bool  # shared E8M0 scales per block of ``block_size`` along a block axis (MX)
    grid: Optional[str]
    range_margin: float = 0.0


KINDS: dict[str, Kind] = {}


def register_kind(kind: Kind) -> Kind:
    """Add a kind (its name must be new)."""
    if kind.name in KINDS:
        raise ValueError(f"format kind {kind.name!r} is already registered")
    KINDS[kind.name] = kind
    return kind


def get_kind(name: str) -> Kind:
    if name not in KINDS:
        raise KeyError(f"unknown format kind {name!r}; known kinds: {', '.join(KINDS)}")
    return KINDS[name]


register_kind(Kind("int", quantizes=True, has_scale=True, blocked=False, grid="levels",
                   range_margin=0.5))
register_kind(Kind("fp", quantizes=True, has_scale=True, blocked=False, grid="float"))
register_kind(Kind("mx", quantizes=True, has_scale=False, blocked=True, grid=None))
register_kind(Kind("float", quantizes=False, has_scale=False, blocked=False, grid=None))
