"""ONNX import conformance against onnxruntime: tf2onnx-style graphs, single ops with random
inputs (atol 1e-5), the ops fixed to follow the spec, and batch polymorphism (graphs traced at
one batch size that must run on any)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from fliqs_compiler.base.errors import FliqsError
from fliqs_compiler.frontends.onnx_import import import_onnx
from fliqs_compiler.frontends.verify import ort_session, verify_onnx_import

import onnx_models as M

ATOL = 1e-5


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("conformance")


def _vi(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def _model(tmp: Path, name: str, nodes, inputs, inits=(), opset: int = 13) -> Path:
    """A one-output graph whose output type comes from ONNX shape inference."""
    probe = helper.make_model(helper.make_graph(nodes, name, inputs, [onnx.ValueInfoProto(name="y")],
                                                list(inits)),
                              opset_imports=[helper.make_opsetid("", opset)])
    inferred = onnx.shape_inference.infer_shapes(probe)
    out = next(v for v in list(inferred.graph.value_info) + list(inferred.graph.output)
               if v.name == "y")
    model = helper.make_model(helper.make_graph(nodes, name, inputs, [out], list(inits)),
                              opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return M.save(model, tmp / f"{name}.onnx")


def _feed(path: Path, batch=None, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    feed = {}
    for vi in onnx.load(str(path)).graph.input:
        tt = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else batch for d in tt.shape.dim]
        if batch is not None and shape:
            shape[0] = batch
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        feed[vi.name] = (rng.standard_normal(shape).astype(dtype) if dtype.kind == "f"
                         else rng.integers(0, 8, shape).astype(dtype))
    return feed


def _ours(graph, feed: dict) -> list:
    with torch.no_grad():
        out = graph(*[torch.from_numpy(feed[s.name]) for s in graph.inputs])
    return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]


def _max_err(ours: list, ref: list) -> float:
    assert [o.shape for o in ours] == [r.shape for r in ref]
    return max(float(np.abs(o.astype(np.float64) - r.astype(np.float64)).max()) if r.size else 0.0
               for o, r in zip(ours, ref))


def _assert_matches_ort(path: Path, batch=None, seed: int = 0, atol: float = ATOL):
    graph = import_onnx(path)
    feed = _feed(path, batch, seed)
    err = _max_err(_ours(graph, feed), ort_session(path).run(None, feed))
    assert err <= atol, f"{path.name}: max abs err {err:.3g} vs onnxruntime"
    return graph


# ---- a tf2onnx model end to end ----------------------------------------------------------------
@pytest.mark.parametrize("opset,conv", [(11, "2d"), (13, "2d"), (13, "1d")])
def test_tf2onnx_int32_conv1d_model_matches_onnxruntime(folder, opset, conv):
    """int32 ids → Cast → Gather → Conv1D (NHWC Transposes + 1×k SAME_UPPER Conv, or Conv 1-D) →
    PRelu → MatMul/Add → Relu6 → ReduceMax → Reshape → Softmax: within 1e-5 of onnxruntime, on
    the pinned batch (what ``inspect --verify`` checks) and on a batch of 3 (dynamic ``unk__``)."""
    path = M.make_tf_conv1d(folder, opset, conv)
    graph = import_onnx(path)  # the only dynamic dim is the leading one: no --input-shape needed
    assert graph.inputs[0].shape == (1, 16) and graph.inputs[0].dtype == "int32"
    assert graph.meta["batch"]["dynamic"]
    ok, err = verify_onnx_import(graph, path, rtol=0, atol=ATOL)
    assert ok and err <= ATOL, err
    for batch, seed in ((1, 1), (3, 2)):
        feed = {"ids": np.random.default_rng(seed).integers(0, 256, (batch, 16)).astype(np.int32)}
        assert _max_err(_ours(graph, feed), ort_session(path).run(None, feed)) <= ATOL


# ---- ops fixed to follow the spec --------------------------------------------------------------
@pytest.mark.parametrize("x_shape,slope_shape", [
    ((2, 8, 8), (8,)), ((2, 8, 8), (1, 8)), ((2, 3, 3, 3), (3,)), ((2, 4, 4), (1, 1, 4)),
    ((2, 4, 3, 3), (4, 1, 1)), ((2, 4, 4), (4, 1)), ((2, 4), (4,)), ((2, 4, 5), (1,)),
])
def test_prelu_slope_broadcasts_from_the_last_axis(tmp_path, x_shape, slope_shape):
    """ONNX PRelu broadcasts the slope numpy-style (unidirectional, from the last axis); the
    importer used F.prelu whenever the slope had as many values as axis 1, which applied a (C,)
    slope of an N×T×C tensor along T when T == C."""
    slope = numpy_helper.from_array(
        np.random.default_rng(3).standard_normal(slope_shape).astype(np.float32), "slope")
    path = _model(tmp_path, "prelu", [helper.make_node("PRelu", ["x", "slope"], ["y"])],
                  [_vi("x", list(x_shape))], [slope], opset=16)
    _assert_matches_ort(path)


@pytest.mark.parametrize("mode", ["reflect", "edge", "wrap"])
@pytest.mark.parametrize("shape,pads", [
    ((2, 5, 3), [1, 2, 0, 1, 1, 0]),  # the batch axis too
    ((5, 3), [1, 2, 0, 1]), ((6,), [2, 3]),
    ((1, 5, 6, 3), [0, 1, 2, 0, 0, 2, 1, 0]),  # NHWC (tf2onnx's tf.pad)
    ((2, 3, 4, 5, 3), [0, 1, 1, 1, 0, 0, 1, 1, 1, 0]),
    ((2, 5, 6), [0, -1, 2, 0, 1, -2]),  # negative pads crop
])
def test_pad_modes_on_any_axis(tmp_path, mode, shape, pads):
    """ONNX Pad reflect/edge/wrap apply to every axis; torch's F.pad only pads trailing dims in
    those modes (and no negative pads), which the importer refused as 'cannot be converted'."""
    path = _model(tmp_path, f"pad_{mode}", [helper.make_node("Pad", ["x", "pads"], ["y"], mode=mode)],
                  [_vi("x", list(shape))], [numpy_helper.from_array(np.array(pads, np.int64), "pads")],
                  opset=19)
    _assert_matches_ort(path)


def test_masked_matmul_add_is_data_not_a_weight(tmp_path):
    """A -inf attention mask added to Q·Kᵀ is not a bias: it stays a buffer (the importer made
    it a trainable weight and then refused it for holding inf), while a real bias trains."""
    mask = np.triu(np.full((4, 4), -np.inf, np.float32), 1)
    nodes = [helper.make_node("MatMul", ["x", "kt"], ["s"]), helper.make_node("Add", ["s", "mask"], ["m"]),
             helper.make_node("Softmax", ["m"], ["p"], axis=-1),
             helper.make_node("MatMul", ["p", "w"], ["h"]), helper.make_node("Add", ["h", "bias"], ["y"])]
    rng = np.random.default_rng(4)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "kt"),
             numpy_helper.from_array(mask, "mask"),
             numpy_helper.from_array(rng.standard_normal((4, 6)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "bias")]
    path = _model(tmp_path, "masked", nodes, [_vi("x", ["N", 4, 8])], inits)
    graph = _assert_matches_ort(path, batch=2)
    params = dict(graph.gm.named_parameters())
    assert any(tuple(p.shape) == (6,) for p in params.values())  # the bias trains
    assert not any(bool(torch.isinf(p).any()) for p in params.values())


# ---- every candidate op, one graph each, vs onnxruntime (random inputs, atol 1e-5) -------------
def _n(op, ins, **attrs):
    return helper.make_node(op, ins, ["y"], **attrs)


def _c(name, arr):
    return numpy_helper.from_array(np.asarray(arr), name)


_R = np.random.default_rng(5)
_W = lambda *s: _R.standard_normal(s).astype(np.float32)  # noqa: E731
_I64 = lambda v: np.array(v, np.int64)  # noqa: E731
X234 = [_vi("x", [2, 3, 4])]
# (id, nodes, inputs, initializers, opset)
OP_CASES = [
    *[(f"{op}_op{o}_axis{ax}", [_n(op, ["x"], axis=ax)], X234, [], o)
      for op in ("Softmax", "LogSoftmax") for o in (11, 13) for ax in (0, 1, -1)],
    ("Softmax_op11_default", [_n("Softmax", ["x"])], X234, [], 11),
    ("Softmax_op13_default", [_n("Softmax", ["x"])], X234, [], 13),
    *[(f"Conv_{ap}_s{s}", [_n("Conv", ["x", "w", "b"], auto_pad=ap, strides=[1, s], kernel_shape=[1, 4])],
       [_vi("x", [1, 3, 1, 11])], [_c("w", _W(5, 3, 1, 4)), _c("b", _W(5))], 13)
      for ap in ("SAME_UPPER", "SAME_LOWER", "VALID") for s in (1, 2, 3)],
    *[(f"Gemm_tA{ta}_tB{tb}", [_n("Gemm", ["a", "b", "c"], transA=ta, transB=tb, alpha=0.5, beta=2.0)],
       [_vi("a", [4, 3] if ta else [3, 4])], [_c("b", _W(5, 4) if tb else _W(4, 5)), _c("c", _W(1, 5))], 13)
      for ta in (0, 1) for tb in (0, 1)],
    ("Gemm_dynamic_B", [_n("Gemm", ["a", "b"], transB=1)], [_vi("a", [3, 4]), _vi("b", [5, 4])], [], 13),
    *[(f"MatMul_{'x'.join(map(str, sa))}_{'x'.join(map(str, sb))}", [_n("MatMul", ["a", "b"])],
       [_vi("a", list(sa))], [_c("b", _W(*sb))], 13)
      for sa, sb in (((2, 3, 4), (4, 5)), ((4,), (4, 5)), ((2, 3, 4), (4,)), ((2, 1, 3, 4), (5, 4, 2)))],
    *[(f"{op}_keepdims{k}", [_n(op, ["x"], axes=[1, -1], keepdims=k)], X234, [], 13)
      for op in ("ReduceMean", "ReduceMax", "ReduceL2") for k in (0, 1)],
    *[(f"ReduceSum_op13_keepdims{k}", [_n("ReduceSum", ["x", "ax"], keepdims=k)], X234,
       [_c("ax", _I64([1, -1]))], 13) for k in (0, 1)],
    ("ReduceMean_op18_axes_input", [_n("ReduceMean", ["x", "ax"], keepdims=0)], X234, [_c("ax", _I64([-1]))], 18),
    ("Clip_relu6_inputs", [_n("Clip", ["x", "lo", "hi"])], X234,
     [_c("lo", np.float32(0)), _c("hi", np.float32(0.6))], 13),
    ("Clip_max_only", [_n("Clip", ["x", "", "hi"])], X234, [_c("hi", np.float32(0.1))], 13),
    ("Clip_op6_attrs", [_n("Clip", ["x"], min=-0.2, max=0.3)], X234, [], 6),
    ("Einsum_batched", [_n("Einsum", ["x", "w"], equation="bij,jk->bik")], X234, [_c("w", _W(4, 5))], 12),
    ("Einsum_implicit", [_n("Einsum", ["x", "w"], equation="bij,bjk")], X234, [_c("w", _W(2, 4, 2))], 12),
    ("Squeeze_axes_input", [_n("Squeeze", ["x", "ax"])], [_vi("x", [2, 1, 4, 1])], [_c("ax", _I64([1, -1]))], 13),
    ("Unsqueeze_axes_input", [_n("Unsqueeze", ["x", "ax"])], X234, [_c("ax", _I64([0, -1]))], 13),
    ("Unsqueeze_op11_attr", [_n("Unsqueeze", ["x"], axes=[1])], X234, [], 11),
    ("Reshape_zero_minus1", [_n("Reshape", ["x", "s"])], X234, [_c("s", _I64([0, -1, 2]))], 13),
    ("Gather_int32_ids", [_n("Gather", ["table", "ids"], axis=0)], [_vi("ids", [2, 5], TensorProto.INT32)],
     [_c("table", _W(8, 3))], 13),
    ("Gather_axis1_negative", [_n("Gather", ["x", "i"], axis=1)], X234, [_c("i", _I64([[0, -1], [2, 1]]))], 13),
    ("Flatten_axis2", [_n("Flatten", ["x"], axis=2)], X234, [], 13),
    ("HardSigmoid", [_n("HardSigmoid", ["x"], alpha=0.3, beta=0.4)], X234, [], 13),
    ("Mul_by_constant", [_n("Mul", ["x", "k"])], X234, [_c("k", _W(4))], 13),
    ("Transpose_default_perm", [_n("Transpose", ["x"])], X234, [], 13),
    ("AveragePool_same_upper", [_n("AveragePool", ["x"], kernel_shape=[3], strides=[2], auto_pad="SAME_UPPER")],
     [_vi("x", [2, 3, 11])], [], 19),
    ("MaxPool_same_lower", [_n("MaxPool", ["x"], kernel_shape=[4], strides=[3], auto_pad="SAME_LOWER")],
     [_vi("x", [2, 3, 11])], [], 19),
]


@pytest.mark.parametrize("case", OP_CASES, ids=[c[0] for c in OP_CASES])
def test_single_op_matches_onnxruntime(tmp_path, case):
    name, nodes, inputs, inits, opset = case
    _assert_matches_ort(_model(tmp_path, name, nodes, inputs, inits, opset))


# ---- batch polymorphism --------------------------------------------------------------------------
def test_paddle_pinned_batch_runs_per_sample(folder):
    """Literal batch-1 targets (Reshape [1, -1], Expand to [1, 1, D], ConstantOfShape [1, 5, 1])
    are unpinned: the graph runs on a batch of 3 and each sample equals onnxruntime on that sample
    alone (onnxruntime itself cannot run the pinned [1, -1] on a batch of 3)."""
    path = M.make_paddle_pinned(folder)
    graph = import_onnx(path)
    facts = graph.meta["batch"]
    assert facts["dynamic"] and set(facts["unpinned"]) == {
        "flatten_0", "reshape2_0", "expand_v2_0", "fill_constant_0"}
    x = np.random.default_rng(6).standard_normal((3, 3, 2, 2)).astype(np.float32)
    ours = _ours(graph, {"x": x})
    assert [o.shape for o in ours] == [(3, 4), (3, 8)]
    session = ort_session(path)
    for i in range(3):
        ref = session.run(None, {"x": x[i:i + 1]})
        assert _max_err([o[i:i + 1] for o in ours], ref) <= ATOL
    with pytest.raises(Exception):  # the premise: onnxruntime refuses the batch of 3
        session.run(None, {"x": x})


def test_vit_export_runs_on_any_batch(folder):
    """torch.onnx.export(dynamo=False, opset 17, dynamic batch) of a 2-block ViT: class-token
    Expand + Concat and Shape→Gather→Concat attention reshapes run at batch 1, 3 and 7."""
    path = M.make_vit(folder)
    graph = import_onnx(path)
    assert graph.inputs[0].shape == (1, 1, 8, 8) and graph.meta["batch"]["dynamic"]
    for batch in (1, 3, 7):
        feed = _feed(path, batch, seed=batch)
        assert _max_err(_ours(graph, feed), ort_session(path).run(None, feed)) <= 1e-4


def test_unsqueeze_of_the_batch_axis_keeps_it(tmp_path):
    """Unsqueeze(axes=[0]) of an N×5 tensor puts the batch on axis 1; the old rule 'a folded
    reshape target whose first entry equals the batch becomes -1' silently moved it back."""
    nodes = [helper.make_node("Unsqueeze", ["x", "ax"], ["u"]),
             helper.make_node("ReduceSum", ["u", "ax"], ["y"], keepdims=0)]
    path = _model(tmp_path, "unsq0", nodes, [_vi("x", ["N", 5])], [_c("ax", _I64([0]))])
    graph = import_onnx(path)
    assert graph.meta["batch"]["dynamic"]
    for batch in (1, 3):
        feed = _feed(path, batch)
        assert _max_err(_ours(graph, feed), ort_session(path).run(None, feed)) <= ATOL


def test_a_batch_merged_into_features_is_refused_naming_the_node(folder):
    """[1, 6] → Reshape [6]: no rewrite can batch it. Import succeeds (batch 1 is fine and
    matches onnxruntime); another batch size is one line naming the ONNX node."""
    path = M.make_batch_merge(folder)
    graph = import_onnx(path)
    assert verify_onnx_import(graph, path)[0]
    facts = graph.meta["batch"]
    assert not facts["dynamic"] and "'merge_batch' (Reshape)" in facts["pinned_by"]
    with pytest.raises(FliqsError) as e:
        graph(torch.zeros(3, 6))
    msg = str(e.value)
    assert "\n" not in msg and "batch_merge.onnx" in msg and "'merge_batch'" in msg
    assert "batch of 1" in msg


@pytest.mark.parametrize("dim", ["batch", "N", "?", -1, None])
def test_symbolic_leading_dim_is_the_batch(tmp_path, dim):
    """An input whose only symbolic dim is the leading one is traced at batch 1 without
    --input-shape and stays dynamic; a symbolic dim elsewhere still needs --input-shape."""
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])],
        "g", [_vi("x", [dim, 2, 5, 5])], [_vi("y", [dim, 3, 5, 5])], [_c("w", _W(3, 2, 3, 3))]),
        opset_imports=[helper.make_opsetid("", 13)])
    d = model.graph.input[0].type.tensor_type.shape.dim[0]
    if dim is None:
        d.Clear()
    elif dim == "?":
        d.Clear()
        d.dim_param = "?"
    path = tmp_path / "lead.onnx"
    onnx.save(model, str(path))
    graph = import_onnx(path)
    assert graph.inputs[0].shape == (1, 2, 5, 5) and graph.meta["batch"]["dynamic"]
    assert graph(torch.zeros(4, 2, 5, 5)).shape == (4, 3, 5, 5)
    model.graph.input[0].type.tensor_type.shape.dim[2].Clear()
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"
    onnx.save(model, str(path))
    with pytest.raises(FliqsError, match=r"--input-shape x=1x2x1x5"):
        import_onnx(path)
