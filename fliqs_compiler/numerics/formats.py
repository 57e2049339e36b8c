"""The number-format registry: every format fliqs can search, quantize to, export and lower.

Formats are data. Adding one is adding an entry to ``_REGISTRY`` below; the quantizer
(``fliqs_compiler.numerics.quant``), the cost models, the ONNX exporter and the TVM lowering all read
these fields instead of switching on names. What a kind means (its rounding, range, scale and
zero-point rules) is data too: ``fliqs_compiler.numerics.kinds``.

Conventions
- ``int<b>``: signed two's-complement, *symmetric* (zero point 0), *full range*
  ``[-2^(b-1), 2^(b-1)-1]`` — exactly ONNX QuantizeLinear's int8/int4 semantics, so exported
  graphs match onnxruntime bit for bit. Scales map absmax to ``2^(b-1)-1`` (``qmax``), so
  ``-2^(b-1)`` is reached only by clipped values (not narrow range).
  ``uint<b>``: unsigned ``[0, 2^b-1]`` with an integer zero point (asymmetric quantization).
- ``fp*``: IEEE-like binary formats given by exponent bits, mantissa bits and bias. OCP FP8 E4M3FN
  has no infinities (max 448); FP6/FP4 (OCP MX element types) have neither inf nor NaN.
  Values beyond ``max_finite`` *saturate* to ``±max_finite`` (ONNX ``saturate=1`` semantics);
  ``±inf`` saturates too; NaN stays NaN (even for formats without a NaN encoding: the quantizer
  never invents numbers, it propagates the fault).
- ``mx*``: OCP Microscaling v1.0 — blocks of 32 elements along the reduction axis share one
  E8M0 (power-of-two) scale. Their ``cost_bits`` include the amortised 8 scale bits (e.g.
  MXFP4 = 4 + 8/32 = 4.25 bits per element).
- ``bf16``/``fp16``: plain casts (round to nearest even), saturating like the others.
- ``float``: no quantization (fp32), 32 bits for cost purposes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import ml_dtypes
import numpy as np

from fliqs_compiler.numerics.kinds import Kind, get_kind

__all__ = ["Format", "get", "names", "register", "by_kind"]


@dataclass(frozen=True)
class Format:
    """One number format. All fields are plain data; see the module docstring for conventions."""

    name: str
    kind: str  # 'int' | 'fp' | 'mx' | 'float'
    bits: int  # storage bits of one element (for MX: of one element, scale excluded)
    ebits: int = 0  # exponent bits (fp, mx-fp elements)
    mbits: int = 0  # explicit mantissa bits (fp); for int: bits - 1 (magnitude bits)
    bias: Optional[int] = None  # exponent bias (fp)
    signed: bool = True
    narrow_range: bool = False  # int: symmetric range excluding -2^(b-1)
    max_finite: float = 0.0
    min_normal: float = 0.0  # fp: smallest positive normal; int: 1 (one step)
    min_subnormal: float = 0.0  # fp: smallest positive subnormal; int: 1
    has_inf: bool = False
    has_nan: bool = False
    onnx_type: Optional[int] = None  # onnx.TensorProto element type, where one exists
    np_dtype_name: Optional[str] = None  # ml_dtypes / numpy dtype name, where one exists
    block_size: Optional[int] = None  # mx: elements sharing one scale
    scale_bits: int = 0  # mx: bits of the shared scale (E8M0)
    element: Optional[str] = None  # mx: name of the element format
    description: str = ""
    aliases: tuple = field(default=())

    # -- derived -----------------------------------------------------------------------------
    @property
    def cost_bits(self) -> float:
        """Bits per element for BOPs / size cost models (MX: element bits + amortised scale)."""
        if self.block_size:
            return self.bits + self.scale_bits / self.block_size
        return float(self.bits)

    @property
    def rules(self) -> Kind:
        """The rules of this format's kind (``kinds.KINDS``)."""
        return get_kind(self.kind)

    @property
    def grid(self) -> Optional[str]:
        """How one unscaled element is rounded: 'levels' | 'float' | None (see ``kinds.Kind``)."""
        return self.rules.grid

    @property
    def has_integer_levels(self) -> bool:
        """The grid is integer levels k (times ``min_subnormal``): codes are integers."""
        return self.rules.grid == "levels"

    @property
    def has_scale(self) -> bool:
        """Quantized with a calibrated / learned scale (per tensor or per channel)."""
        return self.rules.has_scale

    @property
    def is_blocked(self) -> bool:
        """MX: blocks of ``block_size`` share an E8M0 scale computed from the data."""
        return self.rules.blocked

    @property
    def uses_zero_point(self) -> bool:
        """Asymmetric: unsigned integer levels with an integer zero point."""
        return self.has_integer_levels and not self.signed

    @property
    def qmin(self) -> float:
        """Smallest representable value on the unscaled grid (levels: an integer level)."""
        if not self.has_integer_levels:
            return -self.max_finite
        if not self.signed:
            return 0.0
        return float(-(2 ** (self.bits - 1)) + (1 if self.narrow_range else 0))

    @property
    def qmax(self) -> float:
        """Largest representable value on the unscaled grid (levels: integer level; fp: max finite)."""
        if not self.has_integer_levels:
            return self.max_finite
        return float(2 ** (self.bits - (1 if self.signed else 0)) - 1)

    @property
    def grid_max(self) -> float:
        """The largest magnitude of the grid in units of the scale (1 where there is no scale:
        MX blocks scale themselves, float is not scaled)."""
        return self.qmax if self.has_scale else 1.0

    @property
    def emin(self) -> Optional[int]:
        """Exponent of the smallest normal (fp only)."""
        return None if self.bias is None else 1 - self.bias

    @property
    def np_dtype(self):
        """The numpy / ml_dtypes dtype that stores this format exactly, or None."""
        if self.np_dtype_name is None:
            return None
        if hasattr(ml_dtypes, self.np_dtype_name):
            return np.dtype(getattr(ml_dtypes, self.np_dtype_name))
        return np.dtype(self.np_dtype_name)

    @property
    def is_quantized(self) -> bool:
        return self.rules.quantizes

    def element_format(self) -> "Format":
        """MX: the element format; others: self."""
        return get(self.element) if self.element else self


_REGISTRY: dict[str, Format] = {}
_ALIASES: dict[str, str] = {}


def register(fmt: Format) -> Format:
    """Add a format to the registry (name and aliases must be new, its kind registered)."""
    get_kind(fmt.kind)
    for key in (fmt.name, *fmt.aliases):
        if key in _REGISTRY or key in _ALIASES:
            raise ValueError(f"format name {key!r} is already registered")
    _REGISTRY[fmt.name] = fmt
    for alias in fmt.aliases:
        _ALIASES[alias] = fmt.name
    return fmt


def get(name) -> Format:
    """Return the format called ``name`` (a Format passes through). Unknown → KeyError listing names."""
    if isinstance(name, Format):
        return name
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        raise KeyError(f"unknown format {name!r}; known formats: {', '.join(names())}")
    return _REGISTRY[key]


def names(kind: Optional[str] = None) -> list[str]:
    """Registered format names, in registry order (optionally only one kind)."""
    return [n for n, f in _REGISTRY.items() if kind in (None, f.kind)]


def by_kind(kind: str) -> list[Format]:
    return [f for f in _REGISTRY.values() if f.kind in (kind,)]


# ---- entries --------------------------------------------------------------------------------
_ONNX = {  # onnx.TensorProto element types (kept as ints so importing onnx is not required here)
    "INT8": 3, "UINT8": 2, "INT4": 22, "UINT4": 21, "FLOAT8E4M3FN": 17, "FLOAT8E5M2": 19,
    "FLOAT16": 10, "BFLOAT16": 16, "FLOAT4E2M1": 23, "FLOAT": 1,
}


def _int(bits: int) -> Format:
    onnx = {8: _ONNX["INT8"], 4: _ONNX["INT4"]}.get(bits)
    return Format(
        name=f"int{bits}", kind="int", bits=bits, mbits=bits - 1, signed=True, narrow_range=False,
        max_finite=float(2 ** (bits - 1) - 1), min_normal=1.0, min_subnormal=1.0, onnx_type=onnx,
        np_dtype_name="int8" if bits == 8 else ("int4" if bits == 4 else None),
        description=f"signed {bits}-bit integer [{-2 ** (bits - 1)}, {2 ** (bits - 1) - 1}], zero point 0",
    )


def _uint(bits: int) -> Format:
    onnx = {8: _ONNX["UINT8"], 4: _ONNX["UINT4"]}.get(bits)
    return Format(
        name=f"uint{bits}", kind="int", bits=bits, mbits=bits, signed=False,
        max_finite=float(2 ** bits - 1), min_normal=1.0, min_subnormal=1.0, onnx_type=onnx,
        np_dtype_name="uint8" if bits == 8 else ("uint4" if bits == 4 else None),
        description=f"unsigned {bits}-bit integer [0, {2 ** bits - 1}] with zero point",
    )


def _fp(name, ebits, mbits, *, max_finite, has_inf, has_nan, onnx=None, np_name=None, desc="",
        aliases=()) -> Format:
    bias = 2 ** (ebits - 1) - 1
    emin = 1 - bias
    return Format(
        name=name, kind="fp", bits=1 + ebits + mbits, ebits=ebits, mbits=mbits, bias=bias,
        max_finite=float(max_finite), min_normal=2.0 ** emin, min_subnormal=2.0 ** (emin - mbits),
        has_inf=has_inf, has_nan=has_nan, onnx_type=onnx, np_dtype_name=np_name, description=desc,
        aliases=tuple(aliases),
    )


for _b in range(2, 9):
    register(_int(_b))
for _b in (2, 3, 4, 8):
    register(_uint(_b))

register(_fp("fp4_e2m1", 2, 1, max_finite=6.0, has_inf=False, has_nan=False,
             onnx=_ONNX["FLOAT4E2M1"], np_name="float4_e2m1fn",
             desc="OCP FP4 E2M1 (MX element type): no inf/NaN, max 6", aliases=("fp4",)))
register(_fp("fp6_e2m3", 2, 3, max_finite=7.5, has_inf=False, has_nan=False,
             np_name="float6_e2m3fn", desc="OCP FP6 E2M3: no inf/NaN, max 7.5"))
register(_fp("fp6_e3m2", 3, 2, max_finite=28.0, has_inf=False, has_nan=False,
             np_name="float6_e3m2fn", desc="OCP FP6 E3M2: no inf/NaN, max 28", aliases=("fp6",)))
register(_fp("fp8_e4m3", 4, 3, max_finite=448.0, has_inf=False, has_nan=True,
             onnx=_ONNX["FLOAT8E4M3FN"], np_name="float8_e4m3fn",
             desc="OCP FP8 E4M3FN: no inf, one NaN, max 448", aliases=("fp8", "e4m3")))
register(_fp("fp8_e5m2", 5, 2, max_finite=57344.0, has_inf=True, has_nan=True,
             onnx=_ONNX["FLOAT8E5M2"], np_name="float8_e5m2",
             desc="OCP FP8 E5M2: IEEE-like with inf/NaN, max 57344", aliases=("e5m2",)))
register(_fp("fp16", 5, 10, max_finite=65504.0, has_inf=True, has_nan=True,
             onnx=_ONNX["FLOAT16"], np_name="float16", desc="IEEE binary16", aliases=("half",)))
register(_fp("bf16", 8, 7, max_finite=float(ml_dtypes.finfo(ml_dtypes.bfloat16).max),
             has_inf=True, has_nan=True, onnx=_ONNX["BFLOAT16"], np_name="bfloat16",
             desc="bfloat16", aliases=("bfloat16",)))


def _mx(name, element: str, desc: str) -> Format:
    el = get(element)
    return Format(
        name=name, kind="mx", bits=el.bits, ebits=el.ebits, mbits=el.mbits, bias=el.bias,
        signed=True, max_finite=el.max_finite, min_normal=el.min_normal,
        min_subnormal=el.min_subnormal, has_inf=False, has_nan=False, block_size=32, scale_bits=8,
        element=element, description=desc,
    )


# MXINT8's element is a signed 8-bit fixed-point number with an implicit scale of 2^-6
# (OCP MX v1.0 §5.3): values k/64 for k in [-127, 127] (we use the symmetric range).
register(Format(
    name="mxint8_element", kind="int", bits=8, mbits=7, signed=True, narrow_range=True,
    max_finite=127 / 64, min_normal=1 / 64, min_subnormal=1 / 64,
    description="MXINT8 element: fixed point k/64, |k| <= 127 (used only inside mxint8)",
))
register(_mx("mxfp8_e4m3", "fp8_e4m3", "OCP MXFP8 E4M3: 32 x E4M3 + E8M0 scale"))
register(_mx("mxfp8_e5m2", "fp8_e5m2", "OCP MXFP8 E5M2: 32 x E5M2 + E8M0 scale"))
register(_mx("mxfp6_e2m3", "fp6_e2m3", "OCP MXFP6 E2M3: 32 x E2M3 + E8M0 scale"))
register(_mx("mxfp6_e3m2", "fp6_e3m2", "OCP MXFP6 E3M2: 32 x E3M2 + E8M0 scale"))
register(_mx("mxfp4_e2m1", "fp4_e2m1", "OCP MXFP4: 32 x E2M1 + E8M0 scale"))
register(_mx("mxint8", "mxint8_element", "OCP MXINT8: 32 x INT8 (k/64) + E8M0 scale"))

register(Format(name="float", kind="float", bits=32, ebits=8, mbits=23, bias=127,
                max_finite=float(np.finfo(np.float32).max), has_inf=True, has_nan=True,
                onnx_type=_ONNX["FLOAT"], np_dtype_name="float32",
                description="no quantization (fp32)", aliases=("fp32", "none")))


def emax_of(fmt: Format) -> int:
    """Exponent of the largest power of two not above max_finite (OCP MX 'emax_elem')."""
    return int(np.floor(np.log2(fmt.max_finite)))


def searchable_names() -> list[str]:
    """Formats a user may put in ``--formats`` (internal helper formats excluded)."""
    return [n for n in names() if not n.endswith("_element")]


def check_searchable(formats) -> tuple:
    """Canonical names of ``formats`` (order kept, no repeats), each one a user may search; an
    empty list, an unknown or an internal name is a one-line FliqsError naming ``--formats``."""
    from fliqs_compiler.base.errors import FliqsError
    if not formats:
        raise FliqsError("--formats is empty; give comma-separated names such as int4,int8,fp8_e4m3 "
                         "(see 'fliqs formats')")
    allowed = searchable_names()
    out = []
    for item in formats:
        try:
            name = get(item).name
        except KeyError:
            raise FliqsError(f"--formats: unknown format {item!r}; known: {', '.join(allowed)}") from None
        if name not in allowed:
            raise FliqsError(f"--formats: {item!r} is internal; use one of {', '.join(allowed)}")
        if name not in out:
            out.append(name)
    return tuple(out)
