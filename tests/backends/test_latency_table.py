"""Latency tables: on-disk cache keyed by target/signature/formats/backend/versions, build fills
only missing entries (interrupt-safe), and the onnxruntime micro-graph timing."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from fliqs_compiler.backends import latency_table as lt
from fliqs_compiler.backends.latency_table import (LatencyTable, layer_micrograph, ort_layer_ms)
from fliqs_compiler.backends.ort_backend import run_onnx
from fliqs_compiler.cost.model import config_cost
from fliqs_compiler.base.errors import FliqsError
from fliqs_compiler.ir.graph import Graph, InputSpec, LayerInfo


CONV = LayerInfo("conv1", "conv2d", "conv1", macs=16 * 8 * 9 * 64, weight_shape=(16, 8, 3, 3),
                 input_shape=(1, 8, 8, 8), output_shape=(1, 16, 8, 8),
                 attrs={"stride": (1, 1), "padding": (1, 1), "dilation": (1, 1), "groups": 1,
                        "bias": True})
LIN = LayerInfo("fc", "linear", "fc", macs=4 * 64 * 32, weight_shape=(32, 64), input_shape=(4, 64),
                output_shape=(4, 32), attrs={"bias": True})


def _graph(*layers) -> Graph:
    g = Graph(torch.fx.symbolic_trace(torch.nn.Identity()), [InputSpec("x", (1, 8, 8, 8))])
    g.layers = {layer.name: layer for layer in layers}
    return g


class Counter:
    def __init__(self, fail_at=None):
        self.calls, self.fail_at = [], fail_at

    def __call__(self, layer, fw, fa):
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise KeyboardInterrupt
        self.calls.append((layer.name, fw, fa))
        return 0.5 + len(self.calls)


PAIRS = [("int8", "int8"), ("int4", "int8"), ("fp8_e4m3", "fp8_e4m3")]


def test_second_build_measures_nothing_and_cache_survives_reload(tmp_path):
    graph = _graph(CONV, LIN)
    table = LatencyTable("llvm-znver4", "ort", tmp_path)
    m1 = Counter()
    assert table.build(graph, PAIRS, m1, progress=False) == 6
    assert len(m1.calls) == 6
    m2 = Counter()
    assert table.build(graph, PAIRS, m2, progress=False) == 0 and m2.calls == []
    again = LatencyTable("llvm-znver4", "ort", tmp_path)  # a new process reads the file
    assert again.build(graph, PAIRS, m2, progress=False) == 0 and m2.calls == []
    assert again.layer_ms(CONV, "int8", "int8") == 1.5
    assert again.layer_ms(LIN, "fp8_e4m3", "fp8_e4m3") == 6.5
    # it is a LatencyModel for the cost function
    cost = config_cost(graph, {"conv1": {"weight": "int8", "activation": "int8"},
                               "fc": {"weight": "int4", "activation": "int8"}}, "latency", again)
    assert cost == pytest.approx(1.5 + 5.5)


def test_key_separates_target_backend_formats_and_versions(tmp_path):
    graph = _graph(CONV)
    LatencyTable("cpu-a", "ort", tmp_path).build(graph, PAIRS[:1], Counter(), progress=False)
    for table in (LatencyTable("cpu-b", "ort", tmp_path), LatencyTable("cpu-a", "tvm", tmp_path),
                  LatencyTable("cpu-a", "ort", tmp_path, threads=7)):
        assert not table.has(CONV, "int8", "int8")
    newer = LatencyTable("cpu-a", "ort", tmp_path)
    assert newer.has(CONV, "int8", "int8") and not newer.has(CONV, "int4", "int8")
    newer.versions = {**newer.versions, "onnxruntime": "9.9.9"}
    assert not newer.has(CONV, "int8", "int8")  # a library upgrade re-measures
    m = Counter()
    assert newer.build(graph, PAIRS[:1], m, progress=False) == 1
    entry = json.loads(newer.path.read_text())["entries"][0]
    assert {"signature", "fmt_w", "fmt_a", "ms", "versions"} <= set(entry)


def test_equal_signatures_measured_once_and_per_layer_pairs(tmp_path):
    twin = LayerInfo(**{**CONV.__dict__, "name": "conv2", "node": "conv2"})
    table = LatencyTable("t", "ort", tmp_path)
    m = Counter()
    table.build(_graph(CONV, twin, LIN), {"conv1": PAIRS[:2], "conv2": PAIRS[:2], "fc": []}, m,
                progress=False)
    assert m.calls == [("conv1", "int8", "int8"), ("conv1", "int4", "int8")]
    assert table.layer_ms(twin, "int4", "int8") == table.layer_ms(CONV, "int4", "int8")


def test_interrupted_build_keeps_what_was_measured(tmp_path):
    table = LatencyTable("t", "ort", tmp_path)
    with pytest.raises(KeyboardInterrupt):
        table.build(_graph(CONV, LIN), PAIRS, Counter(fail_at=2), progress=False)
    reread = LatencyTable("t", "ort", tmp_path)
    assert len(reread.entries) == 2
    m = Counter()
    assert reread.build(_graph(CONV, LIN), PAIRS, m, progress=False) == 4 and len(m.calls) == 4


def test_missing_entry_and_bad_values_are_errors(tmp_path):
    table = LatencyTable("t", "ort", tmp_path)
    with pytest.raises(FliqsError, match="fliqs profile"):
        table.layer_ms(CONV, "int8", "int8")
    with pytest.raises(ValueError):
        table.build(_graph(CONV), PAIRS[:1], lambda *a: 0.0, progress=False)
    table.path.write_text("{broken")
    with pytest.raises(FliqsError, match="delete the file"):
        LatencyTable("t", "ort", tmp_path)


def test_default_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FLIQS_CACHE_DIR", str(tmp_path))
    assert LatencyTable("t", "ort").path.parent == tmp_path / "latency"
    monkeypatch.delenv("FLIQS_CACHE_DIR")
    assert lt.default_cache_dir().parts[-3:] == (".cache", "fliqs", "latency")


# ---- onnxruntime micro-graphs ---------------------------------------------------------------
@pytest.mark.parametrize("layer,fw,fa", [
    (CONV, "int8", "uint8"), (CONV, "float", "float"), (CONV, "fp8_e5m2", "fp8_e5m2"),
    (CONV, "mxfp4_e2m1", "mxfp4_e2m1"), (LIN, "int4", "int8"), (LIN, "fp4_e2m1", "bf16")])
def test_ort_layer_ms_is_positive(layer, fw, fa):
    assert ort_layer_ms(layer, fw, fa, threads=2, repeat=3) > 0.0


def test_micrograph_has_the_layer_shapes_and_quantized_weight():
    model = layer_micrograph(CONV, "int8", "uint8")
    onnx.checker.check_model(model, full_check=True)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Conv") == 1 and ops.count("QuantizeLinear") == 2
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    assert {a.name: list(a.ints) for a in conv.attribute if a.ints} == {
        "strides": [1, 1], "dilations": [1, 1], "pads": [1, 1, 1, 1]}
    assert any(t.data_type == onnx.TensorProto.INT8 and tuple(t.dims) == (16, 8, 3, 3)
               for t in model.graph.initializer)
    y = run_onnx(model.SerializeToString(), [np.ones((1, 8, 8, 8), np.float32)])[0]
    assert y.shape == (1, 16, 8, 8)


def test_matmul_activation_by_activation_micrograph():
    mm = LayerInfo("att", "matmul", "att", weight_shape=(1, 16, 8), input_shape=(1, 8, 16),
                   output_shape=(1, 8, 8), attrs={"act_x_act": True})
    model = layer_micrograph(mm, "int8", "int8")
    assert [i.name for i in model.graph.input] == ["x", "w_in"]
    assert ort_layer_ms(mm, "int8", "int8", repeat=3) > 0.0
