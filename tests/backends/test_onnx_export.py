"""QDQ ONNX export: every format's lowering is exact, weights are stored quantized with per-axis
scales, the exported model passes the checker, keeps names, and FP4 uses opset 23."""
from __future__ import annotations

import math
import os

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import fliqs_compiler as fq
from fliqs_compiler.numerics import formats as F
from fliqs_compiler.backends import onnx_export as ox
from fliqs_compiler.backends.onnx_export import export_qdq, quantizer_nodes
from fliqs_compiler.backends.ort_backend import compare, default_session, ort_can_run, run_onnx
from fliqs_compiler.base.errors import FliqsError
from qdq_net import assert_within_lsb, lsb, make_graph

# ---- element-level: every format's ONNX form equals fq.fake_quant bit for bit --------------------
ALL_FORMATS = [n for n in F.searchable_names() if n != "float"]


def _one_quantizer_model(fmt, x_shape, scale, zp, axis, weight=None, native_fp4=False):
    nodes, inits = quantizer_nodes("x", "y", fmt, scale, zp, axis, x_shape, weight=weight,
                                   native_fp4=native_fp4)
    ins = [] if weight is not None else [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                       list(x_shape))]
    g = helper.make_graph(nodes, "q", ins,
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x_shape))],
                          initializer=inits)
    opset = 23 if (native_fp4 and F.get(fmt).onnx_type == TensorProto.FLOAT4E2M1) else 21
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 11 if opset == 23 else 10
    onnx.checker.check_model(model, full_check=True)
    return model


def _test_values(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.logspace(-3, 2, shape[-1])
    x.view(-1)[:6] = torch.tensor([0.0, -0.0, 1e4, -1e4, 1e-30, 0.0375])  # saturation, tiny, ties
    return x


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_activation_lowering_is_bit_exact(fmt):
    f = F.get(fmt)
    x = _test_values((4, 72))  # 72 = 2 full MX blocks + a padded one
    if f.kind == "int" and not f.signed:
        scale, zp = torch.tensor([0.05]), torch.tensor([float(2 ** (f.bits - 1) - 1)])
    else:
        scale, zp = torch.tensor([1.0 if f.kind == "mx" else 0.05]), None
    axis = 1 if f.kind == "mx" else None
    ref = fq.fake_quant(x, f, scale, axis, zp).numpy()
    model = _one_quantizer_model(fmt, x.shape, scale.numpy(), None if zp is None else zp.numpy(),
                                 axis)
    got = run_onnx(model.SerializeToString(), [x.numpy()])[0]
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_weight_is_stored_quantized_and_exact(fmt):
    f = F.get(fmt)
    w = _test_values((6, 40), seed=1)
    axis = 1 if f.kind == "mx" else 0
    scale = torch.ones(1) if f.kind == "mx" else fq.quant.absmax_scale(w, f, 0)
    zp = torch.zeros_like(scale) if (f.kind == "int" and not f.signed) else None
    ref = fq.fake_quant(w, f, scale, axis, zp).numpy()
    model = _one_quantizer_model(fmt, w.shape, scale.numpy(), None if zp is None else zp.numpy(),
                                 axis, weight=w.numpy())
    stored = [t for t in model.graph.initializer if tuple(t.dims) == (6, 40)]
    assert len(stored) == 1 and stored[0].data_type != TensorProto.FLOAT
    assert F.get(fmt).onnx_type is None or stored[0].data_type == F.get(fmt).onnx_type \
        or F.get(fmt).onnx_type == TensorProto.FLOAT4E2M1
    got = run_onnx(model.SerializeToString(), [])[0]
    np.testing.assert_array_equal(got, ref)
    if f.kind == "mx":
        dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear")
        assert {a.name: a.i for a in dq.attribute} == {"axis": 1, "block_size": 32}


def test_fp4_native_lowering_matches_reference_evaluator():
    """FLOAT4E2M1 Q/DQ (opset 23) in onnx's reference evaluator equals fq.fake_quant exactly."""
    from onnx.reference import ReferenceEvaluator
    x = _test_values((4, 72))
    scale = np.array([0.05], np.float32)
    model = _one_quantizer_model("fp4_e2m1", x.shape, scale, None, None, native_fp4=True)
    assert {n.op_type for n in model.graph.node} == {"QuantizeLinear", "DequantizeLinear"}
    got = ReferenceEvaluator(model).run(None, {"x": x.numpy()})[0]
    np.testing.assert_array_equal(got, fq.fake_quant(x, "fp4_e2m1", torch.tensor(scale)).numpy())


# ---- whole-model export -------------------------------------------------------------------------
MIXED = {"q_in": "fp8_e4m3", "q_w1": "int8", "q_a2": "int8", "q_w2": "int4", "q_a3": "mxfp4_e2m1",
         "q_wf": "fp6_e3m2", "q_out": "int8"}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    graph, x, q_out = make_graph(MIXED)
    path = export_qdq(graph, tmp_path_factory.mktemp("mixed") / "model.qdq.onnx")
    return graph, x, q_out, path, onnx.load(path)


def test_mixed_export_is_standard_and_keeps_names(mixed):
    graph, x, q_out, path, model = mixed
    onnx.checker.check_model(model, full_check=True)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [21]
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)
    assert [i.name for i in model.graph.input] == ["images"]
    assert [o.name for o in model.graph.output] == ["logits"]
    assert sorted(os.listdir(path.parent)) == ["model.qdq.onnx"]  # atomic write left no temp


def test_weights_are_low_precision_with_per_axis_scales(mixed):
    graph, x, q_out, path, model = mixed
    inits = {t.name: t for t in model.graph.initializer}
    weights = [t for t in inits.values() if len(t.dims) >= 2
               and not t.name.endswith("/bias_nchw")]  # detach_float_bias: a float [C,1,1] bias
    assert sorted(TensorProto.DataType.Name(t.data_type) for t in weights) == \
        ["FLOAT8E4M3FN", "INT4", "INT8"]  # conv1 int8, conv2 int4, fc fp6 (stored in e4m3)
    for dq in (n for n in model.graph.node if n.op_type == "DequantizeLinear"
               and n.input[0] in inits and len(inits[n.input[0]].dims) >= 2):
        w, s = inits[dq.input[0]], numpy_helper.to_array(inits[dq.input[1]])
        axis = {a.name: a.i for a in dq.attribute}["axis"]
        assert s.shape == (w.dims[axis],)  # one scale per output channel
    # activation quantizers: INT8 / FP8 Q/DQ for the typed ones, decomposition for MX
    zps = {TensorProto.DataType.Name(inits[n.input[2]].data_type)
           for n in model.graph.node if n.op_type == "QuantizeLinear"}
    assert zps == {"INT8", "UINT8", "FLOAT8E4M3FN"}  # ReLU output runs int8 as uint8
    assert any(n.op_type == "ReduceMax" for n in model.graph.node)  # MX block absmax


def test_mixed_export_matches_torch_in_onnxruntime(mixed):
    graph, x, q_out, path, model = mixed
    ref = graph(x).detach().numpy()
    assert_within_lsb(ref, run_onnx(path, [x])[0], q_out)
    assert compare(graph, path, [x]) <= float(lsb(ref, q_out).max())


def test_fp4_export_uses_opset_23_and_matches_reference(tmp_path):
    graph, x, q_out = make_graph("fp4_e2m1")
    path = export_qdq(graph, tmp_path / "fp4.onnx")
    model = onnx.load(path)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [23]
    assert model.ir_version >= 11
    types = {t.data_type for t in model.graph.initializer}
    assert TensorProto.FLOAT4E2M1 in types
    assert not ort_can_run(path)  # onnxruntime 1.32: no FLOAT4E2M1 kernels
    got = run_onnx(path, [x], engine="reference")[0]
    assert_within_lsb(graph(x).detach().numpy(), got, q_out)
    # decomposed FP4 runs in onnxruntime at opset 21
    path21 = export_qdq(graph, tmp_path / "fp4_21.onnx", native_fp4=False)
    assert onnx.load(path21).opset_import[0].version == 21
    assert_within_lsb(graph(x).detach().numpy(), run_onnx(path21, [x])[0], q_out)


def test_fp4_with_too_low_opset_is_a_user_error(tmp_path):
    graph, _, _ = make_graph({**MIXED, "q_w2": "fp4_e2m1"})
    with pytest.raises(FliqsError, match="opset"):
        export_qdq(graph, tmp_path / "x.onnx", opset=21)
    assert not (tmp_path / "x.onnx").exists()


def test_reexport_of_imported_onnx_keeps_io_names(mixed, tmp_path):
    """ONNX → fq.load (Q/DQ pairs become fake_quant nodes) → export_qdq: same names, same values."""
    graph, x, q_out, path, _ = mixed
    imported = fq.load(path)
    again = export_qdq(imported, tmp_path / "again.onnx")
    model = onnx.load(again)
    assert [i.name for i in model.graph.input] == ["images"]
    assert [o.name for o in model.graph.output] == ["logits"]
    assert_within_lsb(run_onnx(path, [x])[0], run_onnx(again, [x])[0], q_out)


def test_save_atomic_keeps_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "m.onnx"
    target.write_bytes(b"old")

    class Broken:
        def SerializeToString(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        ox.save_atomic(Broken(), target)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["m.onnx"]


def test_lsb_helper_is_one_grid_step():
    """The tolerance used above is one step of the grid (not a loose bound)."""
    q = type("Q", (), {"fmt": "fp8_e4m3", "scale": torch.tensor([1.0])})()
    assert lsb(np.array([1.0, 3.0, 448.0]), q).tolist() == [0.125, 0.25, 32.0]
    q.fmt = "int8"
    assert lsb(np.array([5.0]), q).tolist() == [1.0]
    assert math.isclose(float(lsb(np.array([0.0]), type("Q", (), {
        "fmt": "fp6_e3m2", "scale": torch.tensor([1.0])})())[0]), 2.0 ** -4)


@pytest.mark.parametrize("fmt", ["int8", "uint8", "int3", "fp8_e5m2", "fp6_e2m3", "bf16"])
def test_per_channel_activation_lowering_is_bit_exact(fmt):
    f = F.get(fmt)
    x = _test_values((3, 5, 8), seed=2)
    scale = torch.tensor([0.02, 0.1, 0.5, 1.0, 3.0])
    zp = torch.full((5,), 7.0) if not f.signed else None
    ref = fq.fake_quant(x, f, scale, 1, zp).numpy()
    model = _one_quantizer_model(fmt, x.shape, scale.numpy(), None if zp is None else zp.numpy(),
                                 1)
    np.testing.assert_array_equal(run_onnx(model.SerializeToString(), [x.numpy()])[0], ref)


def test_nan_weight_is_a_user_error():
    w = np.ones((4, 4), np.float32)
    w[1, 2] = np.nan
    with pytest.raises(FliqsError, match="NaN"):
        quantizer_nodes("w", "wq", "int8", np.ones(4, np.float32), None, 0, (4, 4), weight=w)


# ---- form fixes: the graph keeps its meaning in a default onnxruntime session -----------------
def _relu_q_model(zp, between: str, shape=(1, 4, 4, 4)):
    """x -> Relu -> [MaxPool | Reshape] -> Q(zp) -> DQ -> y."""
    nodes, cur = [helper.make_node("Relu", ["x"], ["r"])], "r"
    out_shape = list(shape)
    if between == "MaxPool":
        nodes.append(helper.make_node("MaxPool", [cur], ["p"], kernel_shape=[2, 2], strides=[2, 2]))
        cur, out_shape = "p", [shape[0], shape[1], shape[2] // 2, shape[3] // 2]
    elif between == "Reshape":
        nodes.append(helper.make_node("Reshape", [cur, "shp"], ["p"]))
        cur, out_shape = "p", [shape[0], -1]
    nodes += [helper.make_node("QuantizeLinear", [cur, "s", "z"], ["q"]),
              helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "s"),
             numpy_helper.from_array(zp, "z")]
    if between == "Reshape":
        inits.append(numpy_helper.from_array(np.array([shape[0], -1], np.int64), "shp"))
        out_shape = [shape[0], int(np.prod(shape[1:]))]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                     list(shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
                          initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    return m


def _disabled_session_run(model_bytes, x):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]


def _zp(name, value):
    import ml_dtypes
    return np.array(value, {"int8": np.int8, "uint8": np.uint8, "int4": ml_dtypes.int4,
                            "uint4": ml_dtypes.uint4, "fp8": ml_dtypes.float8_e4m3fn,
                            "fp8e5m2": ml_dtypes.float8_e5m2}[name])


@pytest.mark.parametrize("between", ["none", "MaxPool", "Reshape"])
@pytest.mark.parametrize("qtype,zp,protected", [
    ("fp8", 0, True), ("int4", 0, True), ("uint4", 3, True),  # Q does not clamp negatives
    ("uint8", 0, False), ("uint4", 0, False), ("int8", 0, False), ("int8", -128, False)])
def test_relu_survives_a_default_session(between, qtype, zp, protected):
    """ReluQuantRewrite (after QDQPropagation moved the Q up to the Relu) deletes a Relu in
    front of any non-int8/uint8 Q; the export replaces exactly those Relus by Max(x, 0)."""
    x = np.random.RandomState(0).randn(1, 4, 4, 4).astype(np.float32) - 1.0
    model = _relu_q_model(_zp(qtype, zp), between)
    truth = _disabled_session_run(model.SerializeToString(), x)
    shielded = between == "MaxPool" and qtype in ("int4", "uint4")  # shield_unbuildable_q's case
    if shielded:  # unfixed, a default session cannot even be built
        with pytest.raises(FliqsError, match="INVALID_GRAPH"):
            default_session(model.SerializeToString())
    elif protected:  # the test can fail: unfixed, a default session is wrong
        plain = default_session(model.SerializeToString()).run(None, {"x": x})[0]
        assert np.max(np.abs(plain - truth)) > 0.1
    fixed = ox.protect_relu_before_unclamped_q(ox.shield_unbuildable_q(model))  # export's order
    ops = [n.op_type for n in fixed.graph.node]
    assert ("Relu" in ops) != (protected and not shielded)  # a shielded Q cannot reach the Relu
    got = default_session(fixed.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, truth)


@pytest.mark.parametrize("qtype,producer", [("int4", "MaxPool"), ("uint4", "MaxPool"),
                                            ("int4", "Clip"), ("uint4", "Clip"), ("fp8", "Clip"),
                                            ("fp8e5m2", "Clip")])
def test_q_after_maxpool_or_clip_builds_a_default_session(qtype, producer):
    """Without the shield a default session cannot be built at all (MaxPool on tensor(int4):
    INVALID_GRAPH; ClipQuantFusion after a ReLU6-like Clip: unexpected zero point type, 4-bit
    and FLOAT8 alike); with it, it computes the same as ORT_DISABLE_ALL."""
    import onnxruntime as ort
    conv = helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1])
    prod = helper.make_node("MaxPool", ["c"], ["p"], kernel_shape=[2, 2], strides=[2, 2]) \
        if producer == "MaxPool" else helper.make_node("Clip", ["c", "lo", "hi"], ["p"])
    nodes = [conv, prod, helper.make_node("QuantizeLinear", ["p", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    rs = np.random.RandomState(0)
    out = [1, 2, 2, 2] if producer == "MaxPool" else [1, 2, 4, 4]
    inits = [numpy_helper.from_array(rs.randn(2, 2, 3, 3).astype(np.float32), "w"),
             numpy_helper.from_array(np.array(0.1, np.float32), "s"),
             numpy_helper.from_array(_zp(qtype, 0), "z"),
             numpy_helper.from_array(np.array(-1.0, np.float32), "lo"),
             numpy_helper.from_array(np.array(1.0, np.float32), "hi")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                     [1, 2, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, out)],
                          initializer=inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    x = rs.randn(1, 2, 4, 4).astype(np.float32)
    truth = _disabled_session_run(model.SerializeToString(), x)
    with pytest.raises(Exception):
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    fixed = ox.shield_unbuildable_q(model)
    onnx.checker.check_model(fixed, full_check=True)
    got = default_session(fixed.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, truth)


def _conv_q_model(w_fmt: str, x_zp, bias=True):
    """x -> Q/DQ(x_zp's type) -> Conv(weight in ``w_fmt``: DQ int4/int8, or a bf16 Cast) -> Q/DQ
    int8 -> y: what WeightBiasQuantization rewrites."""
    import ml_dtypes
    rs = np.random.RandomState(0)
    w = (rs.randn(8, 4, 3, 3) * np.logspace(-2, 0, 8)[:, None, None, None]).astype(np.float32)
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["qx"]),
             helper.make_node("DequantizeLinear", ["qx", "sx", "zx"], ["dx"])]
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "sx"),
             numpy_helper.from_array(x_zp, "zx"),
             numpy_helper.from_array(np.array(0.02, np.float32), "sy"),
             numpy_helper.from_array(np.array(0, np.int8), "zy"),
             numpy_helper.from_array(rs.randn(8).astype(np.float32), "b")]
    if w_fmt == "bf16":
        inits.append(numpy_helper.from_array(w.astype(ml_dtypes.bfloat16), "wq"))
        nodes.append(helper.make_node("Cast", ["wq"], ["w"], to=TensorProto.FLOAT))
    else:
        f = F.get(w_fmt)
        ws = np.abs(w).max(axis=(1, 2, 3)) / f.qmax
        q = np.clip(np.round(w / ws[:, None, None, None]), f.qmin, f.qmax).astype(f.np_dtype)
        inits += [numpy_helper.from_array(q, "wq"), numpy_helper.from_array(ws, "ws")]
        nodes.append(helper.make_node("DequantizeLinear", ["wq", "ws"], ["w"], axis=0))
    nodes += [helper.make_node("Conv", ["dx", "w"] + (["b"] if bias else []), ["c"],
                               pads=[1, 1, 1, 1]),
              helper.make_node("QuantizeLinear", ["c", "sy", "zy"], ["qy"]),
              helper.make_node("DequantizeLinear", ["qy", "sy", "zy"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                     [1, 4, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])],
                          initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    return m


@pytest.mark.parametrize("w_fmt,x_type,fix,changed", [
    ("int4", "int8", ox.detach_float_bias, True),  # no integer kernel: bias rounding only
    ("int8", "int4", ox.detach_float_bias, True),
    ("bf16", "int8", ox.shield_float_weight, True),  # WBQ would make the weight INT8
    ("int8", "int8", ox.detach_float_bias, False)])  # QLinearConv: its int32 bias stays
def test_weight_bias_quantization_only_sees_integer_kernel_convs(w_fmt, x_type, fix, changed):
    """A default session equals ORT_DISABLE_ALL (bit for bit) on every conv that does not
    become QLinearConv; without the fix WeightBiasQuantization changes its result."""
    x = np.random.RandomState(1).randn(1, 4, 8, 8).astype(np.float32) * 2
    model = _conv_q_model(w_fmt, _zp(x_type, 0))
    truth = _disabled_session_run(model.SerializeToString(), x)
    plain = default_session(model.SerializeToString()).run(None, {"x": x})[0]
    before = len(model.graph.node)
    fixed = fix(model)
    assert (len(fixed.graph.node) != before) == changed
    onnx.checker.check_model(fixed, full_check=True)
    got = default_session(fixed.SerializeToString()).run(None, {"x": x})[0]
    if changed:
        assert np.max(np.abs(plain - truth)) > 0  # the test can fail: unfixed, ORT rounds
        np.testing.assert_array_equal(got, truth)


def _matmul_bias_model(shape, weight: str = "dq", bias_first: bool = False, reads: int = 1):
    """x[shape] -> Q/DQ int8 -> MatMul(``weight``: a per-channel int8 DQ, or a float
    initializer read with a float input) -> Add(bias[6]) -> Q/DQ int8 -> y; ``reads`` = 2: the
    MatMul's output is also a graph output."""
    rs = np.random.RandomState(0)
    w = rs.randn(shape[-1], 6).astype(np.float32)
    ws = (np.abs(w).max(0) / 127).astype(np.float32)
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "sx"),
             numpy_helper.from_array(np.array(0, np.int8), "zx"),
             numpy_helper.from_array(np.array(0.1, np.float32), "sy"),
             numpy_helper.from_array(np.array(0, np.int8), "zy"),
             numpy_helper.from_array(rs.randn(6).astype(np.float32), "b")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["qx"]),
             helper.make_node("DequantizeLinear", ["qx", "sx", "zx"], ["dx"])]
    if weight == "dq":
        inits += [numpy_helper.from_array(np.round(w / ws).astype(np.int8), "wq"),
                  numpy_helper.from_array(ws, "ws")]
        nodes.append(helper.make_node("DequantizeLinear", ["wq", "ws"], ["w"], axis=1))
    else:
        inits.append(numpy_helper.from_array(w, "w"))
    out = list(shape[:-1]) + [6]
    nodes += [helper.make_node("MatMul", ["dx" if weight == "dq" else "x", "w"], ["m"]),
              helper.make_node("Add", ["b", "m"] if bias_first else ["m", "b"], ["a"]),
              helper.make_node("QuantizeLinear", ["a", "sy", "zy"], ["qy"]),
              helper.make_node("DequantizeLinear", ["qy", "sy", "zy"], ["y"])]
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, out)]
    if reads == 2:
        outs.append(helper.make_tensor_value_info("m", TensorProto.FLOAT, out))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                     list(shape))],
                          outs, initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    return m


@pytest.mark.parametrize("shape,bias_first", [((2, 5, 8), False), ((2, 5, 8), True),
                                              ((10, 8), False)])
def test_quantized_matmul_bias_builds_a_default_session(shape, bias_first):
    """A static 3-D int8 MatMul + Add (a Linear on [B, T, C]) does not build in a default
    session (MatMulAddFusion's Reshapes + QDQ propagation + S8ToU8: a Q whose output_dtype is
    INT8 with a UINT8 zero point); as ``Sub(x, -b)`` it builds, and the graph's values are
    bit-identical (onnx.reference) and what the session computes."""
    from onnx.reference import ReferenceEvaluator
    import onnxruntime as ort
    model = _matmul_bias_model(shape, bias_first=bias_first)
    x = (np.random.RandomState(1).randn(*shape) * 2).astype(np.float32)
    want = ReferenceEvaluator(model).run(None, {"x": x})[0]
    if len(shape) == 3:  # the test can fail: unfixed, no session at all
        with pytest.raises(Exception, match="output_dtype INT8 does not match"):
            ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    fixed = ox.gemm_to_matmul(model)
    onnx.checker.check_model(fixed, full_check=True)
    assert [n.op_type for n in fixed.graph.node].count("Sub") == 1
    assert "Add" not in [n.op_type for n in fixed.graph.node]
    np.testing.assert_array_equal(ReferenceEvaluator(fixed).run(None, {"x": x})[0], want)
    got = default_session(fixed.SerializeToString()).run(None, {"x": x})[0]
    assert np.max(np.abs(got - want)) / 0.1 <= 1.0 + 1e-3


@pytest.mark.parametrize("weight,reads", [("float", 1), ("dq", 2)])
def test_matmul_bias_stays_an_add_where_nothing_fuses_a_qdq_gemm(weight, reads):
    """A float MatMul (no DequantizeLinear input), or one whose output is read elsewhere too
    (MatMulAddFusion needs a single reader), keeps its Add."""
    model = _matmul_bias_model((2, 5, 8), weight=weight, reads=reads)
    before = model.SerializeToString()
    assert ox.gemm_to_matmul(model).SerializeToString() == before
