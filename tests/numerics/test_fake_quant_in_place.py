"""The fake-quant op computes in place (fewer activation-sized temporaries) and stays bit for bit
the out-of-place formulas it replaced: forward values, the STE gradient to x and the LSQ
gradient to the scale, for every kind of format, per tensor and per channel, with zero points,
out-of-range, tied, infinite and NaN inputs, and half-precision x."""
import pytest
import torch

import fliqs_compiler as fq
from fliqs_compiler.numerics import formats as F
from fliqs_compiler.numerics.quant import integer_codes

FORMATS = ["int2", "int4", "int8", "uint4", "uint8", "fp4_e2m1", "fp6_e3m2", "fp8_e4m3",
           "fp8_e5m2", "bf16", "fp16", "mxfp4_e2m1", "mxint8", "float"]


def _broadcast(t, x, axis):
    if t.numel() == 1:
        return t.reshape(())
    shape = [1] * x.dim()
    shape[axis] = t.numel()
    return t.reshape(shape)


def _reference_forward(x, scale, zp, fmt, axis):
    """The out-of-place integer path as it was (the other grids' code did not change)."""
    x32, s = x.to(torch.float32), _broadcast(scale.to(torch.float32), x, axis)
    step = fmt.min_subnormal
    k = torch.round(x32 / s / step) if step != 1.0 else torch.round(x32 / s)
    if zp is not None:
        z = _broadcast(zp.to(torch.float32), x, axis)
        k = torch.clamp(k + z, fmt.qmin, fmt.qmax) - z
    else:
        k = torch.clamp(k, fmt.qmin, fmt.qmax)
    return (k * step if step != 1.0 else k) * s


def _reference_backward(x, scale, zp, y, grad, fmt, axis):
    """The backward as it was: a fresh tensor per operation."""
    if fmt.has_scale:
        v = x / _broadcast(scale, x, axis)
        if zp is not None:
            v = v + _broadcast(zp.to(v.dtype), x, axis)
        m = fmt.rules.range_margin
        inside = (v >= fmt.qmin - m) & (v <= fmt.qmax + m)
    else:
        inside = torch.ones_like(x, dtype=torch.bool)
    grad_x = grad * inside
    s = _broadcast(scale, x, axis)
    g = grad * torch.where(inside, (y - x) / s, y / s)
    grad_s = g.sum() if scale.numel() == 1 else g.sum(dim=[d for d in range(x.dim()) if d != axis])
    return grad_x, grad_s.reshape(scale.shape)


def _inputs(fmt, per_channel, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 8, 5, 7, generator=g) * 4  # a fifth or more beyond every format's range
    scale = (torch.rand(8 if per_channel else 1, generator=g) + 0.1) * 0.5
    if F.get(fmt).has_integer_levels:  # exact ties of the integer grid, in and out of range
        x[0, :, 0, :] = (torch.arange(-40, 16).reshape(8, 7) + 0.5) * scale.reshape(-1, 1)
    x[1, 0, 0, :4] = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0])
    return x.to(dtype), scale


def _bits(t):
    return t.detach().to(torch.float32).contiguous().view(torch.int32)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("per_channel", [False, True])
def test_forward_and_gradients_bit_identical_to_out_of_place(fmt, per_channel):
    f = F.get(fmt)
    for seed in range(3):
        x, scale = _inputs(fmt, per_channel, seed)
        zp = (torch.full_like(scale, 3.0) if f.uses_zero_point else None)
        axis = 1 if per_channel or f.is_blocked else None
        if f.is_blocked:
            scale = scale[:1]
        xg, sg = x.clone().requires_grad_(), scale.clone().requires_grad_()
        y = fq.fake_quant(xg, fmt, sg, axis, zp)
        grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 10))
        y.backward(grad)
        if f.has_integer_levels:
            assert torch.equal(_bits(y), _bits(_reference_forward(x, scale, zp, f, axis)))
        ref_gx, ref_gs = _reference_backward(x, scale, zp, y.detach(), grad, f, axis)
        assert torch.equal(_bits(xg.grad), _bits(ref_gx))
        if f.is_quantized:
            assert torch.equal(_bits(sg.grad), _bits(ref_gs))
        else:
            assert sg.grad is None


@pytest.mark.parametrize("fmt", ["int4", "fp8_e4m3"])
def test_half_precision_input_keeps_the_promoted_gradient(fmt):
    f = F.get(fmt)
    x, scale = _inputs(fmt, False, 0, torch.float16)
    xg, sg = x.clone().requires_grad_(), scale.clone().requires_grad_()
    y = fq.fake_quant(xg, fmt, sg)
    grad = torch.ones_like(y)
    y.backward(grad)
    ref_gx, ref_gs = _reference_backward(x, scale, None, y.detach(), grad, f, None)
    assert xg.grad.dtype == torch.float16
    assert torch.equal(_bits(xg.grad), _bits(ref_gx.to(torch.float16)))
    assert torch.equal(_bits(sg.grad), _bits(ref_gs))


def test_integer_codes_with_a_zero_point_of_another_dtype():
    """The public rounding keeps its type promotion (a 1-D float64 zero point gives float64 codes)."""
    v = torch.tensor([-9.5, -0.5, 0.5, 2.5, 100.0])
    f = F.get("uint4")
    codes = integer_codes(v, f, torch.tensor([3.0], dtype=torch.float64))
    assert codes.dtype == torch.float64
    assert codes.tolist() == [0.0, 3.0, 3.0, 5.0, 15.0]
    assert integer_codes(v, f).tolist() == [0.0, 0.0, 0.0, 2.0, 15.0]
    assert v.tolist() == [-9.5, -0.5, 0.5, 2.5, 100.0]  # the input is not modified
