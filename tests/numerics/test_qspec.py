"""QuantSpec: numpy quantize / dequantize equal fake_quant bit for bit for every registered
format and both roles (per tensor, per channel, MX blocks); kinds are data; ONNX initializers and
TVM weight codes are the QuantSpec's (one source of truth)."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from onnx import numpy_helper

from fliqs_compiler.backends.onnx_export import quantizer_nodes
from fliqs_compiler.backends.ort_backend import grid_step as ort_grid_step
from fliqs_compiler.numerics import formats as F
from fliqs_compiler.numerics import kinds
from fliqs_compiler.numerics.quant import fake_quant, minmax_scale_zero_point, mse_scale
from fliqs_compiler.numerics.qspec import QuantSpec, grid_step
from fliqs_compiler.numerics.quantizers import FormatQuantizer, SearchableQuantizer

FORMATS = [n for n in F.names() if n != "mxint8_element"]


def _data(shape, seed=0) -> np.ndarray:
    """Normal data with outliers (saturation), exact zeros and both signs of zero."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    flat = x.reshape(-1)
    flat[::17] *= 40.0
    flat[1::23] = 0.0
    flat[2::29] = -0.0
    return x


def _specs(fmt: str, role: str, x: np.ndarray):
    """Per-tensor and (weights) per-channel specs of ``fmt`` calibrated on ``x``, as the
    pipeline makes them (``SearchableQuantizer.to_fixed``), plus an unsigned zero point != 0."""
    f = F.get(fmt)
    out = []
    for channels in ((None, x.shape[0]) if role == "weight" else (None,)):
        sq = SearchableQuantizer([fmt], role, channels=channels, axis=0, block_axis=1,
                                 scale_mode="calibrated")
        with torch.no_grad():
            sq(torch.from_numpy(x))
        out.append(QuantSpec.of(sq.to_fixed()))
    if f.uses_zero_point:
        s, zp = minmax_scale_zero_point(torch.from_numpy(x), f)
        out.append(QuantSpec.of(FormatQuantizer(fmt, s, zero_point=zp + 1, role=role)))
    return out


@pytest.mark.parametrize("role", ["weight", "activation"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_dequantize_equals_fake_quant_bit_for_bit(fmt, role):
    x = _data((8, 40, 3))  # 40 along the block axis: one full MX block and a padded one
    for spec in _specs(fmt, role, x):
        q = spec.quantize(x)
        assert q.codes.dtype == spec.code_dtype and q.codes.shape == x.shape
        got = spec.dequantize(q)
        ref = fake_quant(torch.from_numpy(x), fmt, torch.from_numpy(spec.scale), spec.quant_axis,
                         None if spec.zero_point is None else torch.from_numpy(spec.zero_point))
        if spec.code_format.has_integer_levels:  # an integer code has no -0: +0 for fake_quant's -0
            got, ref = got + np.float32(0), ref + 0.0
        np.testing.assert_array_equal(got.view(np.int32), ref.numpy().view(np.int32),
                                      err_msg=f"{fmt} {role} per_channel={spec.per_channel}")
        np.testing.assert_array_equal(spec.fake_quant(x), ref.numpy())
        if spec.fmt.is_blocked:
            assert q.block_scales.shape[spec.block_axis_of(x.ndim)] == 2  # ceil(40 / 32)
            assert np.all(np.log2(q.block_scales) == np.round(np.log2(q.block_scales)))


@pytest.mark.parametrize("fmt", FORMATS)
def test_codes_are_the_format_grid(fmt):
    """Integer codes are levels in [qmin, qmax] (zero point included); float codes are exactly
    representable in the format's dtype (the round trip through it changes nothing)."""
    x = _data((4, 64))
    spec = _specs(fmt, "weight", x)[-1]
    codes = spec.quantize(x).codes
    cf = spec.code_format
    if cf.has_integer_levels:
        assert codes.min() >= cf.qmin and codes.max() <= cf.qmax
    elif spec.fmt.is_quantized:
        v = codes.astype(np.float32)
        np.testing.assert_array_equal(v.astype(cf.np_dtype).astype(np.float32), v)


def test_kinds_are_data_and_format_facts_derive_from_them():
    assert set(kinds.KINDS) == {f.kind for f in (F.get(n) for n in F.names())}
    assert F.get("uint4").uses_zero_point and not F.get("int4").uses_zero_point
    assert F.get("mxfp4_e2m1").is_blocked and not F.get("mxfp4_e2m1").has_scale
    assert F.get("fp8_e4m3").grid == "float" and F.get("int3").grid == "levels"
    assert not F.get("float").is_quantized and F.get("float").grid_max == 1.0
    assert F.get("int8").grid_max == 127 and F.get("fp8_e4m3").grid_max == 448
    with pytest.raises(ValueError):
        kinds.register_kind(kinds.KINDS["int"])
    from dataclasses import replace
    with pytest.raises(KeyError, match="unknown format kind"):
        F.register(replace(F.get("int8"), name="int8_odd_kind", aliases=(), kind="posit"))


@pytest.mark.parametrize("fmt", ["int8", "uint8", "int3", "fp8_e4m3", "fp6_e3m2", "bf16",
                                 "mxfp8_e4m3", "mxint8"])
def test_grid_step_is_one_source(fmt):
    """ort_backend.grid_step is the QuantSpec's; one step at a grid value is the distance to
    the next grid value up (levels: the scale)."""
    mags = np.array([0.01, 0.3, 1.7, 5.0], np.float64)
    spec = QuantSpec(fmt, "activation", np.array([0.05], np.float32))
    np.testing.assert_array_equal(ort_grid_step(fmt, spec.scale, mags), spec.grid_step(mags))
    np.testing.assert_array_equal(grid_step(fmt, spec.scale, mags), spec.grid_step(mags))
    f = F.get(fmt)
    if not f.is_blocked:
        v = spec.fake_quant(np.array([0.4 * f.grid_max * 0.05], np.float32))  # inside the range
        up = spec.fake_quant(v + np.float32(spec.grid_step(v)[0] * 0.75))
        assert np.isclose(up - v, spec.grid_step(v), rtol=1e-4).all()  # float32 differences


def _onnx_weight(spec: QuantSpec, w: np.ndarray):
    nodes, inits = quantizer_nodes("w", "wq", spec.fmt.name, spec.scale, spec.zero_point,
                                   spec.quant_axis, w.shape, weight=w)
    by_name = {t.name: numpy_helper.to_array(t) for t in inits}
    dq = next((n for n in nodes if n.op_type == "DequantizeLinear"), None)
    return nodes, by_name, dq


@pytest.mark.parametrize("fmt", ["int8", "int4", "int3", "uint8", "uint4", "fp8_e4m3",
                                 "fp8_e5m2", "fp6_e3m2", "fp4_e2m1", "mxfp4_e2m1", "mxint8",
                                 "mxfp8_e4m3"])
def test_onnx_weight_initializers_are_the_qspec(fmt):
    """The exported stored weight, its DequantizeLinear scale and zero point are the QuantSpec's
    codes, scale (MX: block scales × code unit) and zero point."""
    w = _data((6, 40), seed=3) * 0.1
    f = F.get(fmt)
    if f.is_blocked:
        spec = QuantSpec(fmt, "weight", np.ones(1, np.float32), block_axis=1)
    else:
        scale = mse_scale(torch.from_numpy(w), fmt, 0).numpy()
        zp = np.full(6, 3.0, np.float32) if f.uses_zero_point else None
        spec = QuantSpec(fmt, "weight", scale, zp, axis=0)
    q = spec.quantize(w)
    nodes, inits, dq = _onnx_weight(spec, w)
    stored, dq_scale = inits[dq.input[0]], inits[dq.input[1]]
    np.testing.assert_array_equal(stored.astype(np.float32), q.codes.astype(np.float32))
    if f.is_blocked:
        np.testing.assert_array_equal(dq_scale, q.block_scales * np.float32(spec.code_unit))
    else:
        np.testing.assert_array_equal(dq_scale, spec.scale)
    if spec.zero_point is not None:
        np.testing.assert_array_equal(inits[dq.input[2]].astype(np.float32), spec.zero_point)
    else:
        assert len(dq.input) < 3 or not dq.input[2]


@pytest.mark.parametrize("fmt", ["int8", "uint8", "uint4", "fp8_e4m3", "fp8_e5m2"])
def test_onnx_activation_qdq_initializers_are_the_qspec(fmt):
    """A run-time QuantizeLinear / DequantizeLinear pair reads the spec's scale and zero point."""
    x = _data((2, 8, 4))
    spec = _specs(fmt, "activation", x)[-1]
    nodes, inits = quantizer_nodes("x", "y", fmt, spec.scale, spec.zero_point, None, x.shape)
    by_name = {t.name: numpy_helper.to_array(t) for t in inits}
    q = next(n for n in nodes if n.op_type == "QuantizeLinear")
    np.testing.assert_array_equal(by_name[q.input[1]].reshape(-1), spec.scale)
    zp = by_name[q.input[2]].astype(np.float32).reshape(-1)
    np.testing.assert_array_equal(zp, spec.zero_point if spec.zero_point is not None else 0.0)
    assert by_name[q.input[2]].dtype == spec.fmt.np_dtype


@pytest.mark.tvm
@pytest.mark.parametrize("fmt", ["int8", "int4", "int3", "fp8_e4m3", "bf16", "fp4_e2m1"])
def test_tvm_weight_codes_are_the_qspec(fmt):
    """tvm_lower's WEIGHT_RULES store the QuantSpec's codes (int8 levels, or the format's dtype)."""
    import tvm  # noqa: F401
    from tvm import relax
    from fliqs_compiler.backends.tvm_lower import WEIGHT_RULES
    w = _data((8, 40), seed=5) * 0.1
    spec = QuantSpec.calibrated(fmt, w, "weight", axis=0)
    bb = relax.BlockBuilder()
    with bb.function("main", []):
        qt = WEIGHT_RULES[spec.fmt.kind](bb, w, spec)
        bb.emit_func_output(relax.const(np.zeros(1, np.float32)))
    codes = spec.quantize(w).codes
    if qt.np_codes is not None:
        np.testing.assert_array_equal(qt.np_codes, codes.astype(np.int8))
    else:
        const = qt.codes if qt.codes is not None else None
        if const is not None and hasattr(const, "data"):
            np.testing.assert_array_equal(const.data.numpy().astype(np.float32),
                                          codes.astype(np.float32))
    np.testing.assert_array_equal(qt.scale, spec.scale)
