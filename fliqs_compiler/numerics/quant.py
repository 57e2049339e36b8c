"""Quantize-dequantize math, shared by training, export and lowering.

``fake_quant(x, fmt, scale, axis=None)`` returns ``dequantize(quantize(x / scale)) * scale`` in the
format ``fmt`` from the registry, exactly (the value a real kernel in that format would see):

- integers: ``clamp(round_half_even(x / scale) + zp, qmin, qmax) - zp``, times ``scale``;
- floating point: round-to-nearest-even onto the format's grid (subnormals included) of
  ``x / scale``, saturating at ``±max_finite`` (±inf saturate too); NaN propagates;
- MX block formats: ``x / scale`` is cut into blocks of 32 along ``axis``; each block gets the
  OCP E8M0 scale ``2^(floor(log2(absmax)) - emax_elem)`` (clamped to [-127, 127]) and its
  elements are rounded (RNE) and saturated in the element format.
- ``float``: identity.

``scale`` is a scalar or a 1-D tensor of per-channel scales along ``axis``. For MX formats
``scale`` is an extra per-tensor pre-scale (normally 1) and ``axis`` is the block axis.

It is one torch custom op, ``torch.ops.fliqs.fake_quant(x, scale, zero_point, fmt, axis)``, so
``torch.export`` keeps each call as one node that exporters and the TVM lowering map. Its
autograd is an exact straight-through estimator: the forward returns exactly the quantized
value; the gradient passes to ``x`` inside the representable range and is zero where the
value saturated; the gradient to ``scale`` is LSQ's (Esser et al. 2020):
``d y / d s = (y - x) / s`` inside the range and ``y / s`` where it saturated.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

from fliqs_compiler.numerics import formats as F

__all__ = [
    "fake_quant", "quantize_to_grid", "absmax_scale", "minmax_scale_zero_point", "mse_scale",
    "scale_grad", "lsq_grad_factor", "mx_block_scales", "integer_codes",
]

# ml_dtypes dtype name -> torch dtype, for formats whose RNE cast torch implements natively and
# fast. (torch has float8 casts too, but float8 → float32 costs ~10 ms per 4M elements on this CPU,
# 6× the bit-level rounding below, so FP8 takes the generic path.)
_TORCH_CAST_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_SIGN_BIT = -(2 ** 31)


def _round_fp_(v: torch.Tensor, fmt: F.Format) -> torch.Tensor:
    """Round float32 ``v`` (owned by the caller: modified in place) onto ``fmt``'s grid with
    round-half-even, saturating at ±max_finite (±inf too); NaN stays NaN, the sign of zero is kept.

    The "magic number" rounding: with e the exponent of v clamped at emin (so subnormals share
    emin's ulp), c = ±2^(e + 23 - mbits) has a float32 ulp equal to the target ulp, so the fp32
    addition v + c rounds v to the target grid (RNE) and subtracting c is exact. Everything is
    in place on v and one int32 tensor: ~10 memory passes instead of frexp/ldexp's many.
    """
    v.clamp_(-fmt.max_finite, fmt.max_finite)  # saturates ±inf; NaN stays NaN
    torch_dtype = _TORCH_CAST_DTYPES.get(fmt.np_dtype_name or "")
    if torch_dtype is not None:
        return v.copy_(v.to(torch_dtype))
    bits = v.view(torch.int32)
    sign = bits & _SIGN_BIT
    c = (bits >> 23).bitwise_and_(0xFF).clamp_(min=fmt.emin + 127)
    c.add_(23 - fmt.mbits).bitwise_left_shift_(23).bitwise_or_(sign)
    c = c.view(torch.float32)
    v.add_(c).sub_(c)
    bits.bitwise_or_(sign)  # a value that rounded to zero keeps its sign (-0.0, like ml_dtypes)
    return v


def _into(op, a: torch.Tensor, b: torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
    """``op(a, b)``, written into the temporary ``out`` where its dtype and shape are the result's."""
    fits = (out is not None and torch.result_type(a, b) == out.dtype
            and torch.broadcast_shapes(a.shape, b.shape) == out.shape)
    return op(a, b, out=out) if fits else op(a, b)


def integer_codes(v: torch.Tensor, fmt: F.Format,
                  zero_point: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Integer levels of unscaled float32 ``v`` on a 'levels' grid:
    ``clamp(round_half_even(v / step) + zero_point, qmin, qmax)`` (float32; ``v`` not modified).
    The one integer rounding every path uses (fake_quant, QuantSpec codes, exporters)."""
    step = fmt.min_subnormal
    k = torch.round(v / step) if step != 1.0 else torch.round(v)
    return _shift_clamp_codes_(k, fmt, zero_point)


def _shift_clamp_codes_(k: torch.Tensor, fmt: F.Format,
                        zero_point: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The rest of ``integer_codes`` after the rounding, in place on the caller's rounded ``k``
    (the training hot path allocates no activation-sized temporaries for it)."""
    if zero_point is not None:
        k = _into(torch.add, k, zero_point, k)
    return k.clamp_(fmt.qmin, fmt.qmax)


def _levels_grid(v: torch.Tensor, fmt: F.Format, owned: bool) -> torch.Tensor:
    step = fmt.min_subnormal
    k = integer_codes(v, fmt)
    return k.mul_(step) if step != 1.0 else k


def _float_grid(v: torch.Tensor, fmt: F.Format, owned: bool) -> torch.Tensor:
    return _round_fp_(v if owned else v.to(torch.float32, copy=True), fmt)


# Element rounding per ``Format.grid`` (kinds.Kind.grid): unscaled float32 -> grid values.
# ``owned``: the caller gives up ``v`` (it may be rounded in place).
_GRID_ROUNDING = {"levels": _levels_grid, "float": _float_grid}


def quantize_to_grid(v: torch.Tensor, fmt: F.Format) -> torch.Tensor:
    """Round unscaled float32 ``v`` onto ``fmt``'s grid (levels: step ``min_subnormal``), saturating.

    This is the element-wise core shared by every path (MX elements included). For integer
    formats the result is the *real* value ``k * step``; zero points are handled by the caller.
    ``v`` is not modified.
    """
    rounding = _GRID_ROUNDING.get(fmt.grid)
    if rounding is None:
        raise ValueError(f"quantize_to_grid: {fmt.name} is not an element format")
    return rounding(v, fmt, False)


def mx_block_scales(v: torch.Tensor, fmt: F.Format) -> torch.Tensor:
    """E8M0 shared scales for blocks along the last dim of ``v`` ([..., nblocks, block])."""
    el = fmt.element_format()
    amax = v.abs().amax(dim=-1, keepdim=True)
    _, exponent = torch.frexp(amax)  # floor(log2(amax)) = exponent - 1 for amax > 0
    shared = torch.where(amax > 0, exponent - 1 - F.emax_of(el), torch.full_like(exponent, -127))
    shared = torch.clamp(shared, -127, 127)
    return torch.pow(2.0, shared.to(torch.float64)).to(torch.float32)  # 2^-127 is subnormal


def _mx_quant(v: torch.Tensor, fmt: F.Format, axis: int) -> torch.Tensor:
    el = fmt.element_format()
    block = fmt.block_size
    moved = v.movedim(axis, -1)
    n = moved.shape[-1]
    pad = (-n) % block
    if pad:
        moved = torch.nn.functional.pad(moved, (0, pad))
    blocks = moved.reshape(*moved.shape[:-1], -1, block)
    scales = mx_block_scales(blocks, fmt)
    q = _GRID_ROUNDING[el.grid](blocks / scales, el, True)
    q = q.mul_(scales)
    q = q.reshape(*moved.shape[:-1], n + pad)[..., :n]
    return q.movedim(-1, axis)


def _broadcast(t: torch.Tensor, x: torch.Tensor, axis: Optional[int]) -> torch.Tensor:
    if t.numel() == 1:
        return t.reshape(())
    if axis is None:
        raise ValueError("a per-channel scale needs an axis")
    shape = [1] * x.dim()
    shape[axis] = t.numel()
    return t.reshape(shape)


def _fq_levels(x32, s, zero_point, fmt, axis):
    step = fmt.min_subnormal
    v = x32 / s
    k = (v.div_(step) if step != 1.0 else v).round_()  # integer_codes, in place
    if zero_point is None:
        k = _shift_clamp_codes_(k, fmt)
    else:
        zp = _broadcast(zero_point.to(torch.float32), x32, axis)
        k = _shift_clamp_codes_(k, fmt, zp).sub_(zp)
    return (k.mul_(step) if step != 1.0 else k).mul_(s)


def _fq_float(x32, s, zero_point, fmt, axis):
    return _round_fp_(x32 / s, fmt).mul_(s)


# Scaled element-wise fake quantization per ``Format.grid``.
_SCALED_FAKE_QUANT = {"levels": _fq_levels, "float": _fq_float}


def _forward(x, scale, zero_point, fmt_name, axis):
    fmt = F.get(fmt_name)
    x32 = x.to(torch.float32)
    if not fmt.is_quantized:
        return x32.clone()
    s = _broadcast(scale.to(torch.float32), x32, axis)
    if fmt.is_blocked:
        return _mx_quant(x32 / s, fmt, -1 if axis is None else axis) * s
    return _SCALED_FAKE_QUANT[fmt.grid](x32, s, zero_point, fmt, axis)


@torch.library.custom_op("fliqs::fake_quant", mutates_args=())
def _fake_quant_op(x: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor],
                   fmt: str, axis: Optional[int]) -> torch.Tensor:
    return _forward(x, scale, zero_point, fmt, axis)


@_fake_quant_op.register_fake
def _(x, scale, zero_point, fmt, axis):
    return torch.empty_like(x, dtype=torch.float32)


def _in_range(v: torch.Tensor, zero_point, fmt: F.Format, axis) -> torch.Tensor:
    """Where the STE passes gradient: inputs that did not saturate. ``v`` = x / scale, owned
    (the zero point is added in place)."""
    if zero_point is not None:
        v = _into(torch.add, v, _broadcast(zero_point.to(v.dtype), v, axis), v)
    margin = fmt.rules.range_margin
    inside = torch.ge(v, fmt.qmin - margin)
    return inside.logical_and_(v.le_(fmt.qmax + margin))


def _setup_context(ctx, inputs, output):
    x, scale, zero_point, fmt, axis = inputs
    ctx.save_for_backward(x, scale, zero_point if zero_point is not None else None, output)
    ctx.fmt, ctx.axis = fmt, axis


def _backward(ctx, grad):
    """The range mask is recomputed from the saved x, not saved by the forward: saving it would
    take a second output of the op (the node exporters and the lowering map) and 1 byte per
    element of every quantized tensor, and every forward (the reward's forward-only passes too)
    would compute a mask only training reads, to save one division here. What was measured to
    cost is the temporaries: each fresh activation-sized tensor pays its page faults (x / s on
    a 3.2M-element activation, 2 threads: 10-13 ms into a fresh tensor, 0.2 ms into a reused
    one), so one scratch buffer is reused in place throughout."""
    x, scale, zero_point, y = ctx.saved_tensors
    fmt = F.get(ctx.fmt)
    s = _broadcast(scale, x, ctx.axis)
    scratch = inside = None  # float: identity; MX: the block scales never saturate the block max
    if fmt.has_scale:
        scratch = x / s
        inside = _in_range(scratch, zero_point, fmt, ctx.axis)
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = grad * (inside if inside is not None else 1.0)
    grad_scale = None
    if ctx.needs_input_grad[1] and fmt.is_quantized:
        # d y / d s: (y - x) / s inside the range, y / s where it saturated (LSQ)
        d = _into(torch.sub, y, x, scratch)
        if inside is not None:
            d = torch.where(inside, d, y, out=d)  # d's dtype is already the promoted one
        local = _into(torch.mul, _into(torch.div, d, s, d), grad, d)
        if scale.numel() == 1:
            grad_scale = local.sum().reshape(scale.shape)
        else:
            dims = [d for d in range(x.dim()) if d != (ctx.axis % x.dim())]
            grad_scale = local.sum(dim=dims).reshape(scale.shape)
    return grad_x, grad_scale, None, None, None


_fake_quant_op.register_autograd(_backward, setup_context=_setup_context)


def fake_quant(x: torch.Tensor, fmt: Union[str, F.Format], scale: Union[float, torch.Tensor] = 1.0,
               axis: Optional[int] = None, zero_point: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Quantize-dequantize ``x`` in ``fmt`` with ``scale`` (see the module docstring).

    ``axis``: the channel axis of a per-channel ``scale``, or the block axis of an MX format
    (default: last). Returns float32. Exact straight-through gradient to ``x`` and LSQ gradient
    to ``scale``.
    """
    fmt = F.get(fmt)
    if not torch.is_tensor(scale):
        scale = torch.tensor(float(scale), dtype=torch.float32, device=x.device)
    if axis is not None and axis < 0:
        axis += x.dim()
    return torch.ops.fliqs.fake_quant(x, scale, zero_point, fmt.name, axis)


# ---- scale helpers ----------------------------------------------------------------------------
def _reduce_absmax(x: torch.Tensor, axis: Optional[int]) -> torch.Tensor:
    if axis is None:
        return x.detach().abs().amax().reshape(1)
    axis = axis % x.dim()
    dims = [d for d in range(x.dim()) if d != axis]
    return x.detach().abs().amax(dim=dims) if dims else x.detach().abs()


def _grid_max(fmt: F.Format) -> float:
    """The largest magnitude of fmt's grid, in units of the scale (``Format.grid_max``)."""
    return fmt.grid_max


def absmax_scale(x: torch.Tensor, fmt, axis: Optional[int] = None, eps: float = 1e-12) -> torch.Tensor:
    """Scale mapping absmax(x) (per tensor, or per channel along ``axis``) to fmt's largest value."""
    fmt = F.get(fmt)
    if not fmt.has_scale:
        return torch.ones(1 if axis is None else x.shape[axis])
    return torch.clamp(_reduce_absmax(x, axis) / _grid_max(fmt), min=eps).to(torch.float32)


def minmax_scale_zero_point(x: torch.Tensor, fmt, eps: float = 1e-12):
    """Asymmetric per-tensor (scale, zero_point) for an unsigned integer format."""
    fmt = F.get(fmt)
    lo = torch.clamp(x.detach().min(), max=0.0)
    hi = torch.clamp(x.detach().max(), min=0.0)
    scale = torch.clamp((hi - lo) / (fmt.qmax - fmt.qmin), min=eps).reshape(1)
    zp = torch.clamp(torch.round(fmt.qmin - lo / scale), fmt.qmin, fmt.qmax).reshape(1)
    return scale.to(torch.float32), zp.to(torch.float32)


@torch.no_grad()
def mse_scale(x: torch.Tensor, fmt, axis: Optional[int] = None, grid: int = 40,
              lowest: float = 0.2) -> torch.Tensor:
    """MSE-optimal clipping: try ``grid`` clip ratios in [lowest, 1] of absmax, keep the best
    per tensor (or per channel along ``axis``)."""
    fmt = F.get(fmt)
    base = absmax_scale(x, fmt, axis)
    if not fmt.has_scale:
        return base
    x = x.detach().to(torch.float32)
    best = base.clone()
    best_err = torch.full_like(base, math.inf)
    dims = None if axis is None else [d for d in range(x.dim()) if d != axis % x.dim()]
    for ratio in torch.linspace(lowest, 1.0, grid).tolist():
        s = base * ratio
        err = (fake_quant(x, fmt, s, axis) - x).pow(2)
        err = err.mean().reshape(1) if dims is None else err.mean(dim=dims)
        better = err < best_err
        best = torch.where(better, s, best)
        best_err = torch.where(better, err, best_err)
    return best


class _ScaleGrad(torch.autograd.Function):
    """Identity forward (bit-exact), gradient multiplied by ``factor`` (LSQ gradient scaling)."""

    @staticmethod
    def forward(ctx, s, factor):
        ctx.factor = factor
        return s.view_as(s)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def scale_grad(s: torch.Tensor, factor: float) -> torch.Tensor:
    """Return ``s`` unchanged with its gradient scaled by ``factor``."""
    return _ScaleGrad.apply(s, factor)


def lsq_grad_factor(numel_per_scale: int, fmt) -> float:
    """LSQ's gradient scale 1/sqrt(N * Q_P) for a scale shared by ``numel_per_scale`` values."""
    return 1.0 / math.sqrt(max(1, numel_per_scale) * max(1.0, _grid_max(F.get(fmt))))
