"""The format registry: fields agree with ml_dtypes / ONNX / the OCP specs."""
import ml_dtypes
import numpy as np
import onnx
import pytest

import fliqs_compiler as fq
from fliqs_compiler.numerics import formats as F

ML_DTYPES = {
    "fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2", "fp6_e2m3": "float6_e2m3fn",
    "fp6_e3m2": "float6_e3m2fn", "fp4_e2m1": "float4_e2m1fn", "bf16": "bfloat16", "fp16": "float16",
}


@pytest.mark.parametrize("name,dtype", sorted(ML_DTYPES.items()))
def test_fp_fields_match_ml_dtypes(name, dtype):
    fmt = fq.formats.get(name)
    info = ml_dtypes.finfo(getattr(ml_dtypes, dtype) if hasattr(ml_dtypes, dtype) else dtype)
    assert fmt.kind == "fp"
    assert fmt.max_finite == float(info.max)
    assert fmt.min_subnormal == float(info.smallest_subnormal)
    assert fmt.min_normal == float(info.smallest_normal)
    assert fmt.mbits == info.nmant
    assert fmt.emin == info.minexp
    assert fmt.bits == np.dtype(fmt.np_dtype).itemsize * 8 or fmt.bits < 8
    assert fmt.np_dtype == np.dtype(getattr(ml_dtypes, dtype, dtype))


def test_ocp_conventions():
    e4m3 = F.get("fp8_e4m3")
    assert (e4m3.max_finite, e4m3.has_inf, e4m3.has_nan) == (448.0, False, True)
    e5m2 = F.get("fp8_e5m2")
    assert (e5m2.max_finite, e5m2.has_inf) == (57344.0, True)
    for n in ("fp4_e2m1", "fp6_e2m3", "fp6_e3m2"):
        assert not F.get(n).has_inf and not F.get(n).has_nan


def test_onnx_types():
    tp = onnx.TensorProto
    expect = {"int8": tp.INT8, "uint8": tp.UINT8, "int4": tp.INT4, "uint4": tp.UINT4,
              "fp8_e4m3": tp.FLOAT8E4M3FN, "fp8_e5m2": tp.FLOAT8E5M2, "fp4_e2m1": tp.FLOAT4E2M1,
              "bf16": tp.BFLOAT16, "fp16": tp.FLOAT16, "float": tp.FLOAT}
    for name, t in expect.items():
        assert F.get(name).onnx_type == t, name
    for name in ("int2", "int3", "int5", "fp6_e3m2", "mxfp4_e2m1"):
        assert F.get(name).onnx_type is None


@pytest.mark.parametrize("bits", range(2, 9))
def test_int_ranges(bits):
    f = F.get(f"int{bits}")
    assert (f.qmin, f.qmax) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert f.cost_bits == bits and f.signed and not f.narrow_range


def test_mx_cost_bits_include_amortised_scale():
    assert F.get("mxfp4_e2m1").cost_bits == 4.25
    assert F.get("mxfp8_e4m3").cost_bits == 8.25
    assert F.get("mxint8").cost_bits == 8.25
    assert F.get("mxfp6_e3m2").element_format().name == "fp6_e3m2"
    for f in F.by_kind("mx"):
        assert f.block_size == 32 and f.scale_bits == 8


def test_names_aliases_and_unknown():
    assert {"int4", "fp8_e4m3", "bf16", "mxfp4_e2m1", "float"} <= set(F.names())
    assert F.get("fp8").name == "fp8_e4m3" and F.get("FP4").name == "fp4_e2m1"
    assert "mxint8_element" not in F.searchable_names()
    with pytest.raises(KeyError, match="known formats"):
        F.get("int9")
    with pytest.raises(ValueError):
        F.register(F.get("int4"))
