"""The QDQ artifact in the session users run: a DEFAULT ``onnxruntime.InferenceSession(path)``.

The case of the issue: a plain CNN trained on digits (3x32x32), layers cycling int8/int8,
int4/int8, fp8_e4m3, bf16 with a MaxPool in front of the fp8 conv, checked on held-out inputs
and on the same inputs x3 (outside the calibration range). ORT's default rewrites
(QDQPropagation + ReluQuantRewrite) used to delete the ReLU in front of the fp8 quantizer
there, while our exact session (and the report) said all was well.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import fliqs_compiler as fq
from fliqs_compiler.driver import api
from fliqs_compiler import passes
from fliqs_compiler.backends import onnx_export as ox
from fliqs_compiler.backends.ort_backend import (DEFAULT_TOLERANCE_LSB, check_artifact, check_numerics,
                                                 make_session, output_steps)
from fliqs_compiler.cli.main import cli
from fliqs_compiler.data.sources import load_data
from fliqs_compiler.base.errors import CheckFailed
from fliqs_compiler.ir.graph import InputSpec


SHAPE = (8, 3, 32, 32)
CYCLE = [("int8", "int8"), ("int4", "int8"), ("fp8_e4m3", "fp8_e4m3"), ("bf16", "bf16"),
         ("int8", "int8"), ("int4", "int8"), ("int8", "int8"), ("int4", "int8")]


class PlainCNN(nn.Module):
    """conv conv pool conv conv pool conv(s2) conv flatten gemm gemm, ReLU after each."""

    def __init__(self):
        super().__init__()
        chans = [(3, 8, 1), (8, 8, 1), (8, 16, 1), (16, 16, 1), (16, 16, 2), (16, 16, 1)]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1, stride=s) for a, b, s in chans)
        self.fc1, self.fc2 = nn.Linear(16 * 4 * 4, 32), nn.Linear(32, 10)

    def forward(self, x):
        for i, conv in enumerate(self.convs):
            x = torch.relu(conv(x))
            if i in (1, 3):
                x = nn.functional.max_pool2d(x, 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


@pytest.fixture(scope="module")
def trained():
    """The CNN trained one epoch on digits upsampled to 3x32x32 (realistic weights and
    activations; ~80 % held-out accuracy)."""
    ds = load_data("digits", InputSpec("x", SHAPE), seed=0)
    torch.manual_seed(0)
    model = PlainCNN()
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for i in range(0, len(ds.x_train), 32):
        loss = nn.functional.cross_entropy(model(ds.x_train[i:i + 32]), ds.y_train[i:i + 32])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(ds.x_val).argmax(1) == ds.y_val).float().mean().item()
    assert acc > 0.6  # trained, not random
    return model, ds


def _fixed_graph(model, ds):
    """load → prepare → calibrate on training batches → materialize (what ``fliqs lower`` does)."""
    graph = fq.load(model, example_inputs=(ds.x_train[:SHAPE[0]],))
    names = list(passes.analyze(graph).layers)
    formats = {n: {"weight": w, "activation": a} for n, (w, a) in zip(names, CYCLE)}
    used = sorted({f for v in formats.values() for f in v.values()})
    searchable = passes.prepare(graph, passes.PrepareOptions(
        formats=used, keep_float_first=False, keep_float_last=False))
    searchable.space.apply(searchable.gm, searchable.space.choice_of(formats))
    with torch.no_grad():
        for i in range(4):
            searchable.gm(ds.x_train[i * 64:(i + 1) * 64])
    return passes.materialize(searchable, formats), formats


def _inputs(ds):
    """4 held-out batches, then the same batches x3 (beyond the calibrated ranges)."""
    b = SHAPE[0]
    held = [[ds.x_val[i * b:(i + 1) * b].numpy()] for i in range(4)]
    return held + [[3.0 * x[0]] for x in held]


@pytest.fixture(scope="module")
def artifact(trained, tmp_path_factory):
    model, ds = trained
    fixed, formats = _fixed_graph(model, ds)
    path = ox.export_qdq(fixed, tmp_path_factory.mktemp("default") / "model.qdq.onnx")
    return fixed, path, _inputs(ds), formats


def _without_relu_protection(monkeypatch) -> None:
    """Export as before the fix: no ``protect_relu_before_unclamped_q``."""
    monkeypatch.setattr(ox, "ORT_FORM_FIXES", tuple(
        f for f in ox.ORT_FORM_FIXES if f is not ox.protect_relu_before_unclamped_q))


def _in_lsb(a, b, steps) -> float:
    return max(float(np.max(np.abs(x - y))) / s for x, y, s in zip(a, b, steps))


def test_config_is_the_issues_mix(artifact):
    fixed, path, _, formats = artifact
    assert len(formats) == 8 and [tuple(v.values()) for v in formats.values()] == CYCLE
    stored = {t.data_type for t in onnx.load(path).graph.initializer}
    assert {onnx.TensorProto.INT8, onnx.TensorProto.INT4, onnx.TensorProto.FLOAT8E4M3FN,
            onnx.TensorProto.BFLOAT16} <= stored


def test_default_session_matches_onnx_reference(artifact):
    """A plain ``ort.InferenceSession(path)`` computes what the graph means (onnx.reference),
    within the stated tolerance of the output's LSB, on held-out and out-of-range inputs."""
    from onnx.reference import ReferenceEvaluator
    fixed, path, inputs, _ = artifact
    sess = ort.InferenceSession(str(path))  # no options at all: what a user writes
    ref = ReferenceEvaluator(onnx.load(path))
    steps = output_steps(fixed, inputs)
    worst = 0.0
    for x in inputs:
        got = sess.run(None, {sess.get_inputs()[0].name: x[0]})
        want = ref.run(None, {ref.input_names[0]: x[0]})
        worst = max(worst, _in_lsb(got, want, steps))
    assert worst <= DEFAULT_TOLERANCE_LSB, worst


def test_check_numerics_measures_the_default_session(artifact):
    fixed, path, inputs, _ = artifact
    n = check_numerics(fixed, path, inputs)
    assert n["default_lsb"] <= DEFAULT_TOLERANCE_LSB
    # the number is the default session's: recompute it with a plain session
    sess = ort.InferenceSession(str(path))
    with torch.no_grad():
        errs = [float(np.max(np.abs(sess.run(None, {sess.get_inputs()[0].name: x[0]})[0]
                                    - fixed.gm(torch.from_numpy(x[0])).numpy())))
                for x in inputs]
    assert max(errs) == pytest.approx(n["default_err"], rel=1e-6, abs=1e-7)


def test_dropped_relu_fails_the_check_but_not_the_exact_session(artifact, tmp_path,
                                                                monkeypatch):
    """Without the export's ReLU protection the artifact is wrong in a default session (the
    bug): the exact session does not see it, the default-session check does."""
    fixed, _, inputs, _ = artifact
    _without_relu_protection(monkeypatch)
    path = ox.export_qdq(fixed, tmp_path / "broken.onnx")
    exact = make_session(path, exact=True)
    steps = output_steps(fixed, inputs)
    with torch.no_grad():
        ref = [[fixed.gm(torch.from_numpy(x[0])).numpy()] for x in inputs]
    exact_lsb = max(_in_lsb(exact.run(None, {"x": x[0]}), r, steps) for x, r in zip(inputs, ref))
    assert exact_lsb <= DEFAULT_TOLERANCE_LSB
    with pytest.raises(CheckFailed, match="default onnxruntime session deviates") as e:
        check_numerics(fixed, path, inputs)
    assert "\n" not in str(e.value)


def test_an_artifact_off_by_a_few_lsb_on_most_rows_fails_its_check(artifact):
    """``check_artifact`` (what compile runs on tvm/model.so): real artifact outputs (here the
    default session's) pass with their deviation in LSBs; the same outputs moved by 3 output
    LSBs on every row (what a miscompiled kernel did: 21-31 LSB) fail in one line."""
    fixed, path, inputs, _ = artifact
    sess = ort.InferenceSession(str(path))
    outs = [sess.run(None, {"x": x[0]}) for x in inputs]
    ok = check_artifact(fixed, "model.so", inputs, outs)
    assert ok["lsb"] <= DEFAULT_TOLERANCE_LSB and ok["err"] > 0
    steps = output_steps(fixed, inputs)
    shifted = [[o + np.float32(3 * steps[0]) for o in out] for out in outs]
    with pytest.raises(CheckFailed, match="model.so: the artifact deviates") as e:
        check_artifact(fixed, "model.so", inputs, shifted)
    rows = sum(len(x[0]) for x in inputs)
    assert "\n" not in str(e.value) and f"{rows} of {rows} output rows" in str(e.value)


@pytest.mark.tvm
def test_tvm_model_so_agrees_with_the_default_session(artifact, tmp_path):
    """``tvm/model.so`` in a fresh ``relax.VirtualMachine`` and the default session agree."""
    import tvm
    from tvm import relax
    from fliqs_compiler.backends.targets import parse_target
    from fliqs_compiler.backends.tvm_lower import lower
    fixed, path, inputs, _ = artifact
    lower(fixed, parse_target("llvm"), tmp_path)
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(tmp_path / "tvm" / "model.so")),
                              tvm.cpu())
    sess = ort.InferenceSession(str(path))
    steps = output_steps(fixed, inputs)
    worst = 0.0
    for x in inputs:
        y = vm["main"](tvm.runtime.tensor(x[0], tvm.cpu()))
        y = y[0] if not hasattr(y, "numpy") else y
        worst = max(worst, _in_lsb([y.numpy()], sess.run(None, {"x": x[0]}), steps))
    assert worst <= 2 * DEFAULT_TOLERANCE_LSB, worst


# ---- through the CLI: report numerics and the exit code ---------------------------------------
@pytest.fixture(scope="module")
def onnx_model(trained, tmp_path_factory):
    """The trained CNN as an ONNX file plus the issue's config (node names of the importer)."""
    model, _ = trained
    folder = tmp_path_factory.mktemp("cli")
    path = folder / "cnn.onnx"
    torch.onnx.export(model, (torch.zeros(SHAPE),), str(path), input_names=["x"],
                      output_names=["logits"], dynamo=False)
    nodes = [n.name for n in onnx.load(path).graph.node if n.op_type in ("Conv", "Gemm")]
    cfg = folder / "config.json"
    cfg.write_text(json.dumps({"model": "cnn", "formats": {
        n: {"weight": w, "activation": a} for n, (w, a) in zip(nodes, CYCLE)}}))
    return path, cfg


def test_lower_reports_default_session_numerics(onnx_model, tmp_path):
    """``lower_config`` (what ``fliqs lower`` runs) records the default session's numerics."""
    path, cfg = onnx_model
    res = api.lower_config(str(path), str(cfg), target="ort", out=tmp_path / "ok", data="digits",
                          progress=False, layer_latency=False)
    n = json.loads((res.out_dir / "report.json").read_text())["numerics"]
    assert n["onnxruntime_default_lsb"] <= DEFAULT_TOLERANCE_LSB
    assert n["onnxruntime_max_abs_err"] >= n["onnxruntime_exact_max_abs_err"] - 1e-6
    assert "held-out" in n["numerics_inputs"] and "x3" in n["numerics_inputs"]
    assert "default session" in (res.out_dir / "report.md").read_text()


def test_lower_fails_with_one_line_on_a_broken_artifact(onnx_model, tmp_path, monkeypatch):
    _without_relu_protection(monkeypatch)
    path, cfg = onnx_model
    r = CliRunner().invoke(cli, ["lower", str(path), "--config", str(cfg), "--target", "ort",
                                 "--data", "digits", "--out", str(tmp_path / "broken"), "--quiet"])
    assert r.exit_code == 1, r.output
    lines = [s for s in r.stderr.splitlines() if s.strip()]
    assert len(lines) == 1 and "default onnxruntime session" in lines[0], r.stderr
    assert not (tmp_path / "broken" / "report.json").exists()
