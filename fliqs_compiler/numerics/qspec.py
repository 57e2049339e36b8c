"""``QuantSpec``: the one description of a fixed quantizer that every backend reads.

Built once from a materialized quantizer (``QuantSpec.of(FormatQuantizer)``) or from the
arguments of a ``fliqs.fake_quant`` call (``QuantSpec.from_call``), it holds the format, the role,
the scale and zero point (numpy float32), the channel axis of a per-channel scale, the MX block
axis and block size, and derives the rest: the codes a kernel stores (``quantize``), their
values (``dequantize``: equal to ``quant.fake_quant`` bit for bit), the code dtype and the grid
step (one LSB). Exporters and lowerings read these instead of re-deriving rounding, scales,
zero points or axes; the rounding itself is ``quant``'s (``integer_codes``, ``quantize_to_grid``,
``mx_block_scales``).

Codes: integer levels ``k`` (zero point included) as int8 / uint8 for 'levels' formats; grid
values in the format's own ml_dtypes dtype for 'float' formats; for MX the element codes (in the
element's code dtype) plus one E8M0 scale per block (``Quantized.block_scales``, the block axis
holding the blocks). ``float`` codes are the float32 values.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from fliqs_compiler.numerics import formats as F
from fliqs_compiler.numerics.quant import (absmax_scale, fake_quant, integer_codes,
                                           mx_block_scales, quantize_to_grid)

__all__ = ["QuantSpec", "Quantized", "grid_step", "ROLES"]

ROLES = ("weight", "activation")


# ---- per-grid rules (``Format.grid``): codes, their unit, the step at a magnitude --------------
def _levels_codes(v, fmt, zp):
    return integer_codes(v, fmt, zp)


def _float_codes(v, fmt, zp):
    return quantize_to_grid(v, fmt)


def _levels_step(fmt, a):
    return np.full(np.shape(a), fmt.min_subnormal)


def _float_step(fmt, a):
    e = np.clip(np.floor(np.log2(np.maximum(a, fmt.min_normal))), fmt.emin, F.emax_of(fmt))
    return 2.0 ** (e - fmt.mbits)


def _levels_dtype(fmt):
    if fmt.bits > 8:
        raise ValueError(f"{fmt.name}: integer codes wider than 8 bits have no code dtype here")
    return np.dtype(np.int8 if fmt.signed else np.uint8)


_GRID_RULES = {
    # grid: (codes of unscaled v, value of one code unit, step at unscaled magnitude, code dtype)
    "levels": (_levels_codes, lambda f: f.min_subnormal, _levels_step, _levels_dtype),
    "float": (_float_codes, lambda f: 1.0, _float_step, lambda f: f.np_dtype),
}


def _grid_rules(fmt: F.Format):
    if fmt.grid not in _GRID_RULES:
        raise ValueError(f"{fmt.name} has no element grid")
    return _GRID_RULES[fmt.grid]


@dataclass(frozen=True)
class Quantized:
    """Codes of one tensor (see the module docstring) and, for MX, its E8M0 block scales."""

    codes: np.ndarray
    block_scales: Optional[np.ndarray] = None


def _f32(a) -> np.ndarray:
    if torch.is_tensor(a):
        a = a.detach().cpu().numpy()
    return np.array(a, dtype=np.float32).reshape(-1)


def _blocks(t: torch.Tensor, axis: int, blk: int) -> torch.Tensor:
    """[..., n along axis] -> [..., nblocks, blk] with ``axis`` moved last (zero padded)."""
    moved = t.movedim(axis, -1)
    pad = (-moved.shape[-1]) % blk
    if pad:
        moved = torch.nn.functional.pad(moved, (0, pad))
    return moved.reshape(*moved.shape[:-1], -1, blk)


@dataclass(frozen=True, eq=False)
class QuantSpec:
    """A fixed quantizer: ``fmt`` with ``scale`` (float32 [1] or per channel [C] along ``axis``),
    ``zero_point`` (float32 like ``scale``, or None) and, for MX, ``block_axis`` (the reduction
    axis the blocks of ``fmt.block_size`` run along; None: the last axis)."""

    fmt: F.Format
    role: str
    scale: np.ndarray
    zero_point: Optional[np.ndarray] = None
    axis: Optional[int] = None
    block_axis: Optional[int] = None
    searched_format: str = ""

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, not {self.role!r}")
        object.__setattr__(self, "fmt", F.get(self.fmt))
        object.__setattr__(self, "scale", _f32(self.scale))
        if self.zero_point is not None:
            object.__setattr__(self, "zero_point", _f32(self.zero_point))
        if self.scale.size > 1 and self.axis is None and not self.fmt.is_blocked:
            raise ValueError(f"{self.fmt.name}: a per-channel scale needs an axis")
        if not self.searched_format:
            object.__setattr__(self, "searched_format", self.fmt.name)

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def of(cls, quantizer) -> "QuantSpec":
        """The spec of a materialized ``FormatQuantizer``."""
        return cls(quantizer.fmt, quantizer.role, quantizer.scale, quantizer.zero_point,
                   quantizer.axis, quantizer.block_axis, quantizer.searched_format)

    @classmethod
    def from_call(cls, fmt, scale, zero_point=None, axis: Optional[int] = None,
                  role: str = "activation") -> "QuantSpec":
        """The spec of a ``fake_quant(x, fmt, scale, axis, zero_point)`` call, whose ``axis`` is
        the channel axis of a per-channel scale or, for MX, the block axis."""
        fmt = F.get(fmt)
        blocked = fmt.is_blocked
        return cls(fmt, role, scale, zero_point, None if blocked else axis,
                   axis if blocked else None)

    @classmethod
    def calibrated(cls, fmt, value, role: str, axis: Optional[int] = None,
                   block_axis: Optional[int] = None) -> "QuantSpec":
        """A spec with the absmax scale of ``value`` (per channel along ``axis``; weights), zero
        point 0 where the format has one; MX / float: scale 1 (micro-benchmarks, tests)."""
        fmt = F.get(fmt)
        t = torch.as_tensor(np.asarray(value, np.float32))
        per_axis = axis if fmt.has_scale else None
        scale = absmax_scale(t, fmt, per_axis) if fmt.has_scale else torch.ones(1)
        zp = np.zeros_like(_f32(scale)) if fmt.uses_zero_point else None
        return cls(fmt, role, scale, zp, per_axis, block_axis)

    def to_quantizer(self):
        """The ``FormatQuantizer`` this spec describes."""
        from fliqs_compiler.numerics.quantizers import FormatQuantizer
        zp = None if self.zero_point is None else torch.from_numpy(self.zero_point.copy())
        return FormatQuantizer(self.fmt.name, torch.from_numpy(self.scale.copy()), axis=self.axis,
                               zero_point=zp, role=self.role, block_axis=self.block_axis,
                               searched_format=self.searched_format)

    # -- derived facts --------------------------------------------------------------------------
    @property
    def per_channel(self) -> bool:
        return self.scale.size > 1

    @property
    def block_size(self) -> Optional[int]:
        return self.fmt.block_size if self.fmt.is_blocked else None

    @property
    def element(self) -> F.Format:
        """The format one element is rounded in (MX: its element format; others: fmt)."""
        return self.fmt.element_format()

    @property
    def quant_axis(self) -> Optional[int]:
        """The ``axis`` argument of the equivalent ``fake_quant`` call."""
        return self.block_axis if self.fmt.is_blocked else self.axis

    @property
    def code_unit(self) -> float:
        """The value of one element code before scaling (levels: the step; float grids: 1)."""
        return _grid_rules(self.element)[1](self.element) if self.fmt.is_quantized else 1.0

    @property
    def code_dtype(self) -> np.dtype:
        """The numpy dtype ``quantize`` returns codes in."""
        if not self.fmt.is_quantized:
            return np.dtype(np.float32)
        return np.dtype(_grid_rules(self.element)[3](self.element))

    @property
    def code_format(self) -> F.Format:
        """The registered format whose values are exactly the codes (``mxint8``'s k/64 element:
        int8; every other element format: itself)."""
        el = self.element
        if el.has_integer_levels and el.min_subnormal != 1.0:
            return F.get(f"{'' if el.signed else 'u'}int{el.bits}")
        return el

    def _axis(self, rank: int, axis: Optional[int]) -> Optional[int]:
        return None if axis is None else axis % rank

    def block_axis_of(self, rank: int) -> int:
        """MX: the block axis of a rank-``rank`` tensor (default: the last)."""
        return rank - 1 if self.block_axis is None else self.block_axis % rank

    def broadcast(self, values: np.ndarray, rank: int) -> np.ndarray:
        """``values`` (the scale or the zero point) shaped to broadcast against a tensor of
        ``rank``: a scalar per tensor, [1, .., C, .., 1] per channel along ``axis``."""
        v = np.asarray(values, np.float32).reshape(-1)
        if v.size == 1:
            return v.reshape(())
        shape = [1] * rank
        shape[self._axis(rank, self.axis)] = v.size
        return v.reshape(shape)

    # -- numerics -------------------------------------------------------------------------------
    def quantize(self, x) -> Quantized:
        """The codes of ``x`` (float32 array), rounded exactly as ``fake_quant`` rounds. Integer
        codes need finite inputs (NaN has no integer code)."""
        x32 = torch.from_numpy(np.array(x, np.float32))
        if not self.fmt.is_quantized:
            return Quantized(x32.numpy())
        rank = x32.dim()
        s = torch.from_numpy(self.broadcast(self.scale, rank).copy())
        if self.fmt.is_blocked:
            return self._quantize_blocks(x32 / s)
        zp = None if self.zero_point is None else \
            torch.from_numpy(self.broadcast(self.zero_point, rank).copy())
        codes = _grid_rules(self.fmt)[0](x32 / s, self.fmt, zp)
        return Quantized(codes.numpy().astype(self.code_dtype))

    def _quantize_blocks(self, v: torch.Tensor) -> Quantized:
        el, blk = self.element, self.fmt.block_size
        axis = self.block_axis_of(v.dim())
        blocks = _blocks(v, axis, blk)
        bsc = mx_block_scales(blocks, self.fmt)  # [..., nblocks, 1]
        k = _grid_rules(el)[0](blocks / bsc, el, None)  # levels k / float grid values
        n = v.shape[axis]
        codes = k.flatten(-2)[..., :n].movedim(-1, axis)
        scales = bsc.squeeze(-1).movedim(-1, axis)
        return Quantized(codes.numpy().astype(self.code_dtype), scales.numpy())

    def dequantize(self, q: Quantized) -> np.ndarray:
        """The float32 values of codes ``q``; ``dequantize(quantize(x)) == fake_quant(x)``, bit
        for bit (the same float32 operations in the same order), except that integer codes have
        no -0 (fake_quant's -0.0 comes back as +0.0, as from any integer kernel)."""
        codes = np.asarray(q.codes).astype(np.float32)
        if not self.fmt.is_quantized:
            return codes
        rank = codes.ndim
        s = self.broadcast(self.scale, rank)
        if self.fmt.is_blocked:
            unit = np.float32(self.code_unit)
            axis = self.block_axis_of(rank)
            bsc = np.repeat(np.asarray(q.block_scales, np.float32), self.fmt.block_size,
                            axis=axis).take(np.arange(codes.shape[axis]), axis=axis)
            return ((codes * unit if unit != 1.0 else codes) * bsc) * s
        if self.zero_point is not None:
            codes = codes - self.broadcast(self.zero_point, rank)
        unit = np.float32(self.code_unit)
        return (codes * unit if unit != 1.0 else codes) * s

    def fake_quant(self, x) -> np.ndarray:
        """``quant.fake_quant`` of ``x`` with this spec (float32 numpy; NaN propagates)."""
        zp = None if self.zero_point is None else torch.from_numpy(self.zero_point.copy())
        xt = torch.from_numpy(np.array(x, np.float32))
        scale = torch.from_numpy(self.scale.copy())
        return fake_quant(xt, self.fmt, scale, self.quant_axis, zp).numpy()

    def grid_step(self, magnitude) -> np.ndarray:
        """One step of the grid at each ``magnitude`` (see ``grid_step``)."""
        return grid_step(self.fmt, self.scale, magnitude)


def grid_step(fmt, scale, magnitude) -> np.ndarray:
    """One step of ``fmt``'s grid, scaled by the largest of ``scale``, at each ``magnitude``
    (levels: the scale times the step; float grids: the ulp at that value; MX: one step of the
    block's largest element, an upper bound)."""
    fmt = F.get(fmt)
    s = float(np.max(np.abs(np.asarray(scale, np.float64))))
    a = np.abs(np.asarray(magnitude, np.float64)) / s
    el = fmt.element_format()
    step_at = _grid_rules(el)[2]
    if not fmt.is_blocked:
        return step_at(el, a) * s
    # the block scale puts the largest element in el's top binade [2^emax, 2^(emax+1)), whose
    # step is 2^-top_bits of the binade (float: mbits; mxint8's k/64: 6)
    emax = F.emax_of(el)
    top_bits = emax - float(np.log2(step_at(el, np.float64(2.0 ** emax))))
    a = np.full(a.shape, max(float(np.max(a, initial=0.0)), 1e-30))
    return 2.0 ** (np.floor(np.log2(a)) - top_bits) * s
