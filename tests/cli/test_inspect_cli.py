"""``fliqs inspect``: table and --json output (its schema), --verify exit codes,
bad-input errors. The model loader is replaced by a torch model where the ONNX path is not the
point, so these tests do not depend on the importer; one test runs the bundled ONNX model."""
from __future__ import annotations

import json
import sys
import types

import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

from fliqs_compiler.cli import inspect_cmd
from fliqs_compiler.cli.main import cli
from fliqs_compiler.driver.api import DEMO_MODEL
from fliqs_compiler.ir.graph import Graph, InputSpec


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.bn = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = torch.relu(self.bn(self.c1(x)))
        return self.fc(torch.relu(self.c2(y)).mean((2, 3)))


@pytest.fixture
def fake_model(tmp_path, monkeypatch):
    path = tmp_path / "net.onnx"
    path.write_bytes(b"not read: the loader is patched")
    seen = {}

    def load(model, shapes):
        seen["shapes"] = shapes
        shape = shapes.get("x", (1, 1, 6, 6))
        gm = torch.export.export(Net().eval(), (torch.randn(shape),)).module()
        return Graph(gm, [InputSpec("x", shape)], name="net", source=str(model))

    monkeypatch.setattr(inspect_cmd, "_load", load)
    return path, seen


def test_inspect_json_schema_exact(fake_model):
    path, seen = fake_model
    r = CliRunner().invoke(cli, ["inspect", str(path), "--json", "--input-shape", "x=2x1x8x8"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert seen["shapes"] == {"x": (2, 1, 8, 8)}
    assert set(data) == {"model", "inputs", "nodes"}
    assert data["model"] == "net"
    assert data["inputs"] == [{"name": "x", "shape": [2, 1, 8, 8], "dtype": "float32"}]
    assert [set(n) for n in data["nodes"]] == [{"name", "op", "macs", "params", "group"}] * 3
    c1, c2, fc = data["nodes"]
    assert (c1["op"], c1["macs"], c1["params"], c1["group"]) == ("conv2d", 2 * 4 * 64 * 9, 36, "")
    assert (c2["name"], c2["macs"], c2["group"]) == ("conv2d_1", 2 * 4 * 64 * 36, "conv2d_1")
    assert (fc["op"], fc["macs"], fc["params"]) == ("linear", 2 * 3 * 4, 12)


def test_inspect_table(fake_model):
    path, _ = fake_model
    r = CliRunner().invoke(cli, ["inspect", str(path)])
    assert r.exit_code == 0, r.output
    assert "conv2d_1" in r.output and "float (kept)" in r.output
    assert "3 quantizable nodes" in r.output


def test_inspect_verify_exit_codes(fake_model, monkeypatch):
    path, _ = fake_model
    result = {}
    fake = types.ModuleType("fliqs_compiler.frontends.verify")
    fake.verify_onnx_import = lambda graph, model: result["value"]
    monkeypatch.setitem(sys.modules, "fliqs_compiler.frontends.verify", fake)
    result["value"] = (True, 1e-7)
    r = CliRunner().invoke(cli, ["inspect", str(path), "--verify", "--json"])
    assert r.exit_code == 0, r.output
    json.loads(r.stdout)
    result["value"] = (False, 0.5)
    r = CliRunner().invoke(cli, ["inspect", str(path), "--verify"])
    assert r.exit_code == 1
    assert "disagrees with onnxruntime" in r.stderr and "Traceback" not in r.stderr


def test_inspect_bad_input(tmp_path):
    r = CliRunner().invoke(cli, ["inspect", str(tmp_path / "missing.onnx")])
    assert r.exit_code == 2 and "no such model file" in r.stderr
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    r = CliRunner().invoke(cli, ["inspect", str(model), "--input-shape", "x=1xfoo"])
    assert r.exit_code == 2 and "--input-shape" in r.stderr


@pytest.mark.skipif(not DEMO_MODEL.is_file(), reason="bundled demo model missing")
def test_inspect_bundled_onnx_model(demo_model):
    pytest.importorskip("fliqs_compiler.frontends.onnx_import")
    r = CliRunner().invoke(cli, ["inspect", str(demo_model), "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["nodes"] and all(n["macs"] > 0 for n in data["nodes"])
    assert data["nodes"][0]["group"] == "" and data["nodes"][1]["group"] == data["nodes"][1]["name"]


@pytest.mark.skipif(not DEMO_MODEL.is_file(), reason="bundled demo model missing")
def test_inspect_verify_bundled_onnx_model_against_onnxruntime(demo_model):
    pytest.importorskip("fliqs_compiler.frontends.verify")
    r = CliRunner().invoke(cli, ["inspect", str(demo_model), "--verify"])
    assert r.exit_code == 0, r.output
    assert "verify: max abs error vs onnxruntime" in r.stderr and "DISAGREES" not in r.stderr


def test_inspect_symbolic_batch_needs_no_input_shape(tmp_path):
    """An ONNX input whose only symbolic dim is the batch is inspected at batch 1 without
    --input-shape (and --verify agrees with onnxruntime); a symbolic height still needs it."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    pytest.importorskip("fliqs_compiler.frontends.onnx_import")
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 1, 3, 3))
                                .astype(np.float32), "w")
    fc = numpy_helper.from_array(np.ones((3, 4), np.float32), "fc")

    def save(dims):
        nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
                 helper.make_node("GlobalAveragePool", ["c"], ["g"], name="gap"),
                 helper.make_node("Flatten", ["g"], ["f"], name="flat"),
                 helper.make_node("Gemm", ["f", "fc"], ["y"], name="fc", transB=1)]
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
            "x", TensorProto.FLOAT, dims)], [helper.make_tensor_value_info(
                "y", TensorProto.FLOAT, [dims[0], 3])], [w, fc])
        path = tmp_path / "sym.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
        return path

    r = CliRunner().invoke(cli, ["inspect", str(save(["batch", 1, 6, 6])), "--json", "--verify"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["inputs"][0]["shape"] == [1, 1, 6, 6]
    r = CliRunner().invoke(cli, ["inspect", str(save(["batch", 1, "H", 6]))])
    assert r.exit_code == 2 and "--input-shape x=1x1x1x6" in r.stderr


class Block(nn.Module):
    """Linear → LayerNorm → GELU → Linear → softmax: one input of each ``--quantize-inputs`` op."""

    def __init__(self):
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.norm(self.fc1(x)))).softmax(-1)


def test_inspect_quantize_inputs(tmp_path, monkeypatch):
    path = tmp_path / "block.onnx"
    path.write_bytes(b"not read: the loader is patched")
    monkeypatch.setattr(inspect_cmd, "_load", lambda model, shapes: Graph(
        torch.export.export(Block().eval(), (torch.randn(1, 8),)).module(),
        [InputSpec("x", (1, 8))], name="block", source=str(model)))

    def ops(*extra):
        r = CliRunner().invoke(cli, ["inspect", str(path), "--json", *extra])
        assert r.exit_code == 0, r.output
        return sorted(n["op"] for n in json.loads(r.stdout)["nodes"])
    assert ops() == ["linear", "linear"]
    assert ops("--quantize-inputs", "layernorm,gelu") == ["gelu", "layer_norm", "linear", "linear"]
    assert ops("--quantize-inputs", "softmax") == ["linear", "linear", "softmax"]
    bad = CliRunner().invoke(cli, ["inspect", str(path), "--quantize-inputs", "layernorm,batchnorm"])
    assert bad.exit_code == 2, bad.output
    assert bad.output.strip().count("\n") == 0 and "--quantize-inputs 'batchnorm'" in bad.output
