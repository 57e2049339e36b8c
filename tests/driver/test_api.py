"""fliqs_compiler.driver.api: option parsing, out-folder guarantees (atomic publish, cleanup on failure),
and ``fq.compile`` on an ``nn.Module`` through the Python API."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import fliqs_compiler as fq
from fliqs_compiler.driver import api, outdir
from fliqs_compiler.base.errors import FliqsError


def test_parse_formats():
    assert api.parse_formats(None) == list(api.DEFAULT_FORMATS)
    assert api.parse_formats("int8, fp8 ,INT8,bf16") == ["int8", "fp8_e4m3", "bf16"]
    assert api.parse_formats(["int4", "fp4"]) == ["int4", "fp4_e2m1"]
    with pytest.raises(FliqsError, match="int13"):
        api.parse_formats("int8,int13")
    with pytest.raises(FliqsError, match="empty"):
        api.parse_formats(" , ")
    with pytest.raises(FliqsError, match="internal"):
        api.parse_formats("mxint8_element")


def test_parse_sweep_and_steps():
    assert api.parse_sweep(None) is None
    assert api.parse_sweep("bops=0.2x, 0.5x") == ["bops=0.2x", "bops=0.5x"]
    assert api.parse_sweep("size=1MB,2MB") == ["size=1MB", "size=2MB"]
    for bad in ("bops", "=0.2x", "bops=", "bops=0.2x,0.2x", "bops=0.2x,soon", "power=1W,2W"):
        with pytest.raises(FliqsError, match="--sweep"):
            api.parse_sweep(bad)
    assert api.check_steps("25") == 25
    for bad in ("0", "-1", "2.5", "x", None):
        with pytest.raises(FliqsError, match="--steps"):
            api.check_steps(bad)


def test_resolve_out_dir_default_and_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert api.resolve_out_dir(None, "models/resnet8.onnx") == tmp_path.joinpath("fliqs-out", "resnet8").relative_to(tmp_path)
    assert (tmp_path / "fliqs-out" / "resnet8").is_dir()
    (tmp_path / "f").write_text("x")
    with pytest.raises(FliqsError, match="not a folder"):
        api.resolve_out_dir(tmp_path / "f", "m.onnx")
    with pytest.raises(FliqsError, match="not writable"):
        api.resolve_out_dir(tmp_path / "f" / "sub", "m.onnx")


def test_publish_moves_everything_atomically(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("old")
    stage = outdir.staging(out)
    (stage / "tvm").mkdir()
    (stage / "tvm" / "model.so").write_bytes(b"so")
    (stage / "report.json").write_text("new")
    moved = outdir.publish(stage, out)
    assert set(moved) == {"report.json", "tvm/model.so"}
    assert (out / "report.json").read_text() == "new"
    assert (out / "tvm" / "model.so").read_bytes() == b"so"
    assert not stage.exists()


def test_failed_run_keeps_only_checkpoint(tmp_path):
    parent = tmp_path / "new"
    with pytest.raises(RuntimeError):
        with outdir.out_dir(parent / "deep" / "out", "m.onnx") as out:
            (out / "checkpoint").mkdir()
            (out / "checkpoint" / "state.pt").write_bytes(b"ckpt")
            (out / "search.jsonl").write_text("{}\n")
            (out / "search_result.json").write_text("{}")
            outdir.staging(out).joinpath("config.json").write_text("{}")
            raise RuntimeError("export failed")
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "search.jsonl"]
    with pytest.raises(FliqsError):
        with outdir.out_dir(tmp_path / "fresh" / "out", "m.onnx") as out2:
            (out2 / "half.onnx").write_text("")
            raise FliqsError("bad data")
    assert not (tmp_path / "fresh").exists()  # every folder this run created is gone again
    keep = tmp_path / "existing"
    keep.mkdir()
    (keep / "mine.txt").write_text("user file")
    with pytest.raises(KeyboardInterrupt):
        with outdir.out_dir(keep, "m.onnx"):
            raise KeyboardInterrupt
    assert [p.name for p in keep.iterdir()] == ["mine.txt"]


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, padding=1)
        self.c3 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        x = torch.relu(self.c3(x))
        return self.fc(x.mean((2, 3)))


def test_compile_unlabeled_npz_uses_float_teacher(tmp_path, demo_model):
    """A .npz with x only: no labels, so the float model is the teacher and quality is agreement."""
    import numpy as np
    from sklearn.datasets import load_digits
    x = (load_digits().images[:300, None] / 16.0).astype(np.float32)
    np.savez(tmp_path / "unlabeled.npz", x=x, extra=np.arange(3))  # extra arrays are ignored
    res = fq.compile(str(demo_model), target="ort", data=str(tmp_path / "unlabeled.npz"),
                     formats="int8,bf16", budget="bops=1.5x", steps=3, out=tmp_path / "o",
                     progress=False, layer_latency=False, holdout=0.25)
    report = res.report
    assert report["quality"]["metric"] == "agreement" and report["quality"]["float"] == 1.0
    assert report["data"]["labels"] is False
    assert report["data"]["holdout"] == 75 and report["data"]["holdout_fraction"] == 0.25
    assert "teacher" in res.out_dir.joinpath("report.md").read_text()


def test_compile_torch_module_without_data(tmp_path):
    """An nn.Module, no data (random inputs, float model as teacher), the ort target."""
    torch.manual_seed(0)
    res = fq.compile(SmallNet().eval(), example_inputs=(torch.randn(1, 1, 8, 8),), target="ort",
                     formats="int8,bf16", budget="bops=1.5x", steps=4, out=tmp_path / "o",
                     progress=False, layer_latency=False)
    assert isinstance(res, api.Result)
    assert res.report_path.is_file() and res.config_path.is_file() and res.onnx_path.is_file()
    assert res.so_path is None
    report = json.loads(res.report_path.read_text())
    assert report["quality"]["metric"] == "agreement"
    assert report["quality"]["float"] == 1.0
    assert "random" in report["data"]["description"]
    assert res.formats and set(res.formats) == {la["node"] for la in report["layers"]}
    assert res.bops == report["totals"]["bops"]
    assert "agreement" in repr(res)
