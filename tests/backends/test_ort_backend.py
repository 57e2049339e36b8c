"""onnxruntime backend: the exported model equals the torch graph within one step of the output
quantizer for every ONNX-typed and every decomposed format; sessions, timing and errors."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from fliqs_compiler.backends.onnx_export import export_qdq
from fliqs_compiler.backends.ort_backend import (check_numerics, compare, default_session,
                                                 make_session, ort_can_run, output_steps,
                                                 run_onnx, time_onnx)
from fliqs_compiler.base.errors import CheckFailed, FliqsError
from qdq_net import assert_within_lsb, lsb, make_graph


# int8/uint8: Q/DQ (post-ReLU activations run int8 as uint8); explicit uint8 everywhere;
# int4/uint4/fp8: Q/DQ; bf16/fp16: Cast pairs; int3/fp6/mxfp4: decomposed standard ops.
FORMATS = ["int8", "uint8", "int4", "uint4", "fp8_e4m3", "fp8_e5m2", "bf16", "fp16", "int3",
           "fp6_e3m2", "mxfp4_e2m1"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_onnxruntime_matches_torch_within_one_lsb(fmt, tmp_path):
    graph, x, q_out = make_graph(fmt)
    path = export_qdq(graph, tmp_path / f"{fmt}.onnx")
    ref = graph(x).detach().numpy()
    got = run_onnx(path, [x])[0]
    assert got.shape == ref.shape == (2, 10)
    assert_within_lsb(ref, got, q_out)
    assert compare(graph, path, [x]) <= float(np.max(lsb(ref, q_out)))
    # the output really is quantized: every value is on the output quantizer's grid
    np.testing.assert_array_equal(q_out(torch.from_numpy(got)).numpy(), got)


@pytest.mark.parametrize("fmt", FORMATS)
def test_default_session_matches_torch_within_one_lsb(fmt, tmp_path):
    """What users run, ``onnxruntime.InferenceSession(path)`` with every default rewrite, is
    within one step of the output quantizer for every format, also on inputs x3 beyond the
    calibration range; ``check_numerics`` measures the same in LSBs."""
    graph, x, q_out = make_graph(fmt)
    path = export_qdq(graph, tmp_path / f"{fmt}.onnx")
    sess = default_session(path)
    assert sess.get_session_options().graph_optimization_level == \
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # the library default, nothing changed
    for xs in (x, 3.0 * x):
        ref = graph(xs).detach().numpy()
        assert_within_lsb(ref, sess.run(None, {"images": xs.numpy()})[0], q_out)
    n = check_numerics(graph, path, [[x.numpy()], [3.0 * x.numpy()]])
    assert n["default_lsb"] <= 1.0 + 1e-6 and n["exact_err"] <= n["default_err"] + 1e-6


def test_output_steps_are_the_output_quantizers_step():
    graph, x, q_out = make_graph("fp8_e4m3")
    ref = graph(x).detach().numpy()
    assert output_steps(graph, [[x]]) == [float(lsb(np.abs(ref).max(), q_out))]
    graph, x, q_out = make_graph("int8")
    assert output_steps(graph, [[x], [3 * x]]) == [float(q_out.scale.reshape(-1)[0])]


def test_check_numerics_fails_one_line_on_a_wrong_artifact(tmp_path):
    graph, x, _ = make_graph("int8")
    model = onnx.load(export_qdq(graph, tmp_path / "ok.onnx"))
    bias = next(t for t in model.graph.initializer
                if "bias" in t.name and t.data_type == onnx.TensorProto.FLOAT)
    arr = onnx.numpy_helper.to_array(bias) + 1.0
    bias.CopyFrom(onnx.numpy_helper.from_array(arr.astype(np.float32), bias.name))
    onnx.save(model, tmp_path / "wrong.onnx")
    with pytest.raises(CheckFailed, match="output LSBs") as e:
        check_numerics(graph, tmp_path / "wrong.onnx", [[x]])
    assert "\n" not in str(e.value) and e.value.exit_code == 1


@pytest.fixture(scope="module")
def int8_model(tmp_path_factory):
    graph, x, q_out = make_graph("int8")
    return graph, x, export_qdq(graph, tmp_path_factory.mktemp("ort") / "int8.onnx"), q_out


def test_session_run_and_reference_engine_agree(int8_model):
    graph, x, path, q_out = int8_model
    sess = make_session(path, threads=2)
    assert sess.get_session_options().intra_op_num_threads == 2
    a = run_onnx(sess, [x.numpy()])[0]
    b = run_onnx(path, [x])[0]
    c = run_onnx(path, [x], engine="reference")[0]
    np.testing.assert_array_equal(a, b)
    assert np.max(np.abs(a - c)) <= float(np.max(lsb(a, q_out)))


def test_time_onnx_returns_median_ms(int8_model):
    _, x, path, _ = int8_model
    ms = time_onnx(path, [x], threads=2, repeat=5, warmup=1, min_time_s=0.0)
    assert 0.0 < ms < 1000.0


def test_bad_inputs_are_one_line_user_errors(int8_model, tmp_path):
    _, x, path, _ = int8_model
    with pytest.raises(FliqsError, match="takes 1 inputs"):
        run_onnx(path, [x, x])
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx model")
    with pytest.raises(FliqsError, match="bad.onnx") as e:
        make_session(bad)
    assert "\n" not in str(e.value)
    assert not ort_can_run(bad) and ort_can_run(path)
    with pytest.raises(ValueError, match="engine"):
        run_onnx(path, [x], engine="tvm")


def test_compare_reports_a_real_difference(int8_model, tmp_path):
    """compare is not vacuous: perturbing a weight in the ONNX file shows up as an error."""
    graph, x, path, q_out = int8_model
    model = onnx.load(path)
    bias = next(t for t in model.graph.initializer
                if "bias" in t.name and t.data_type == onnx.TensorProto.FLOAT)
    arr = onnx.numpy_helper.to_array(bias) + 5.0
    bias.CopyFrom(onnx.numpy_helper.from_array(arr.astype(np.float32), bias.name))
    onnx.save(model, tmp_path / "perturbed.onnx")
    assert compare(graph, tmp_path / "perturbed.onnx", [x]) > 0.1


class _Small(torch.nn.Module):
    """conv-bn-relu → conv-relu (stride 2) → pool → linear: the ReLUs feed quantizers directly."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16)
        self.c2, self.fc = torch.nn.Conv2d(16, 16, 3, padding=1, stride=2), torch.nn.Linear(16, 10)

    def forward(self, x):
        h = torch.relu(self.c2(torch.relu(self.bn(self.c1(x)))))
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(h, 1), 1))


@pytest.mark.parametrize("assign", [
    {"conv2d": "int8", "conv2d_1": "fp8_e4m3", "linear": "int3"},
    {"conv2d": "fp8_e5m2", "conv2d_1": "fp8_e4m3", "linear": "fp8_e5m2"},
])
def test_pipeline_graph_export_is_exact(assign, tmp_path):
    """fq.load → passes.prepare → passes.materialize → export_qdq: ORT (exact session) equals
    the torch graph to float rounding, and the FP8 ReLU survives ORT's default rewrites."""
    from fliqs_compiler import passes
    import fliqs_compiler as fq
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    graph = fq.load(_Small().eval(), example_inputs=(x,))
    opts = passes.PrepareOptions(formats=tuple(sorted(set(assign.values()))),
                                 keep_float_first=False, keep_float_last=False)
    searchable = passes.prepare(graph, opts)
    assert sorted(searchable.layers) == sorted(assign)
    fixed = passes.materialize(searchable, {n: {"weight": f, "activation": f}
                                            for n, f in assign.items()})
    path = export_qdq(fixed, tmp_path / "m.onnx")
    model = onnx.load(path)
    assert [i.name for i in model.graph.input] == [s.name for s in fixed.inputs]
    assert compare(fixed, path, [x]) < 1e-6
    ref = fixed(x).detach().numpy()
    if "int3" not in assign.values() and "int4" not in assign.values():
        np.testing.assert_allclose(run_onnx(path, [x])[0], ref, atol=1e-6)
    ops = [n.op_type for n in model.graph.node]
    assert "Max" in ops  # ReLU before an FP8 QuantizeLinear is protected from ReluQuantRewrite


def test_four_bit_activation_before_maxpool_runs_in_onnxruntime(tmp_path):
    """ORT's QDQ propagation would leave MaxPool reading tensor(uint4) (INVALID_GRAPH); the
    session is rebuilt without that rewrite, and its output still matches the torch graph."""
    from importlib import resources

    import fliqs_compiler as fq
    from fliqs_compiler import passes
    torch.manual_seed(0)
    graph = fq.load(str(resources.files("fliqs_compiler") / "assets" / "demo.onnx"))
    searchable = passes.prepare(graph, passes.PrepareOptions(formats=["int4"],
                                                             scale_mode="calibrated"))
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        searchable(x)  # calibrate
    names = [layer.name for layer in searchable.searched_layers()]
    fixed = passes.materialize(searchable, {n: {"weight": "int4", "activation": "int4"}
                                            for n in names})
    path = export_qdq(fixed, tmp_path / "demo_int4.onnx")
    assert ort_can_run(path)
    one = x[:1]  # the demo model's input has batch 1
    got = run_onnx(make_session(path, exact=True), [one])[0]
    np.testing.assert_allclose(got, fixed(one).detach().numpy(), rtol=0, atol=1e-5)


def test_deviation_verdict_tells_cascades_from_wrong_artifacts():
    """A rare row off in both sessions is a rounding cascade (a float op on the other side of a
    later rounding boundary); a row off only in the default session is a rewrite; many rows off
    is a wrong artifact."""
    from fliqs_compiler.backends.ort_backend import CASCADE_ROW_SHARE, deviation_verdict
    quiet = [0.3] * 8
    assert deviation_verdict(quiet, quiet, 2.0) is None
    one_both = [2.1] + [0.2] * 7
    assert deviation_verdict(one_both, one_both, 2.0) is None
    assert "rewrite" in deviation_verdict(one_both, [0.2] * 8, 2.0)
    many = [5.0] * 3 + [0.2] * 5
    assert 3 / 8 > CASCADE_ROW_SHARE
    assert "3 of 8" in deviation_verdict(many, many, 2.0)
