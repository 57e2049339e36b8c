"""Bad-input corpus through the CLI (click's CliRunner, in process): every case exits 2 with ONE
line on stderr that names the problem (no traceback), and leaves nothing in --out.
``--debug`` turns the one line into a traceback."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from fliqs_compiler.driver.api import DEMO_MODEL
from fliqs_compiler.cli.main import cli

import onnx_models as M

DEMO = str(DEMO_MODEL)  # a module constant: the case table below names it
pytestmark = pytest.mark.usefixtures("no_debug_env")  # --debug sets FLIQS_DEBUG process-wide


# ---- input files -----------------------------------------------------------------------------
def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def _case_files(tmp: Path) -> dict:
    """Build every input file the cases need under ``tmp``; returns name → path string."""
    f = {}
    f["text"] = tmp / "notes.onnx"
    f["text"].write_text("this is not an onnx model\n")
    f["truncated"] = tmp / "truncated.onnx"
    f["truncated"].write_bytes(Path(DEMO).read_bytes()[:20000])
    bad = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["nowhere"], ["y"], name="relu")], "bad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])]),
        opset_imports=[helper.make_opsetid("", 17)])
    f["checker"] = tmp / "checker.onnx"
    onnx.save(bad, f["checker"])
    f["custom"] = M.write_tiny(tmp / "custom.onnx", domain_op="FancyOp")
    # a symbolic batch alone is traced at 1 (batch-polymorphic); a symbolic height needs pinning
    f["dynamic"] = M.write_tiny(tmp / "dynamic.onnx", dims=("N", 1, "H", 8))
    f["zero"] = M.write_tiny(tmp / "zero.onnx", dims=(1, 0, 8, 8))
    nan_w = np.ones((4, 1, 3, 3), np.float32)
    nan_w[0, 0, 0, 0] = np.nan
    f["nan"] = M.write_tiny(tmp / "nan.onnx", w=nan_w)
    inf_w = np.ones((4, 1, 3, 3), np.float32)
    inf_w[1, 0, 1, 1] = np.inf
    f["inf"] = M.write_tiny(tmp / "inf.onnx", w=inf_w)
    (tmp / "models").mkdir()
    (tmp / "secret.bin").write_bytes(np.ones(36, np.float32).tobytes())
    f["external"] = M.write_tiny(tmp / "models" / "ext.onnx", external="../secret.bin")
    x = np.random.default_rng(0).standard_normal((20, 1, 8, 8)).astype(np.float32)
    f["shape_npz"] = _npz(tmp / "shape.npz", x=np.ones((20, 7), np.float32))
    f["zero_w"] = M.write_tiny(tmp / "zero_w.onnx", w=np.zeros((0, 1, 3, 3), np.float32))
    f["dtype_npz"] = _npz(tmp / "dtype.npz", x=np.array(["a"] * 20))
    y = np.arange(20) % 10
    y[3] = -1
    f["labels_npz"] = _npz(tmp / "labels.npz", x=x, y=y)
    f["classes_npz"] = _npz(tmp / "classes.npz", x=x, y=np.arange(20))  # demo has 10 classes
    f["count_npz"] = _npz(tmp / "count.npz", x=x, y=np.zeros(7, np.int64))
    f["empty_npz"] = _npz(tmp / "empty.npz", x=np.zeros((0, 1, 8, 8), np.float32))
    x_nan = x.copy()
    x_nan[3, 0, 0, 0] = np.nan
    f["nan_npz"] = _npz(tmp / "nan_data.npz", x=x_nan)
    f["nox_npz"] = _npz(tmp / "nox.npz", inputs=x)
    f["afile"] = tmp / "a_file.txt"
    f["afile"].write_text("x")
    f["bad_config"] = tmp / "bad_config.json"
    f["bad_config"].write_text(json.dumps({"model": "demo", "formats": {"no_such_node": {"weight": "int8", "activation": "int8"}}}))
    f["badfmt_config"] = tmp / "badfmt_config.json"
    f["badfmt_config"].write_text(json.dumps({"model": "demo", "formats": {"x": {"weight": "int99"}}}))
    f["junk_config"] = tmp / "junk_config.json"
    f["junk_config"].write_text("{not json")
    pinned = helper.make_model(helper.make_graph(  # a literal Reshape fixes the batch at 1
        [helper.make_node("Reshape", ["input", "shape"], ["r"], name="reshape_8x8"),
         helper.make_node("Relu", ["r"], ["y"], name="relu")], "pinned",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 8])],
        [numpy_helper.from_array(np.array([8, 8], np.int64), "shape")]),
        opset_imports=[helper.make_opsetid("", 17)])
    f["pinned"] = tmp / "pinned.onnx"
    onnx.save(pinned, f["pinned"])
    return {k: str(v) for k, v in f.items()}


# ---- the corpus: (id, argv with {placeholders}, words the error line must contain) ------------
C = ["compile"]
OK = ["--target", "ort", "--steps", "2", "--quiet"]
CASES = [
    ("missing-file", C + ["{tmp}/nope.onnx", *OK], ["nope.onnx"]),
    ("model-is-folder", C + ["{tmp}", *OK], ["folder"]),
    ("not-onnx", C + ["{text}", *OK], ["notes.onnx"]),
    ("truncated-protobuf", C + ["{truncated}", *OK], ["truncated.onnx"]),
    ("checker-failure", C + ["{checker}", *OK], ["checker.onnx"]),
    ("custom-domain-op", C + ["{custom}", *OK], ["FancyOp"]),
    ("dynamic-input", C + ["{dynamic}", *OK], ["--input-shape"]),
    ("zero-size-input", C + ["{zero}", *OK], ["zero.onnx"]),
    ("nan-weights", C + ["{nan}", *OK], ["nan.onnx"]),
    ("inf-weights", C + ["{inf}", *OK], ["inf.onnx"]),
    ("external-data-outside", C + ["{external}", *OK], ["ext.onnx"]),
    ("batch-pinned-by-reshape", C + ["{pinned}", *OK], ["pinned", "batch", "'reshape_8x8'"]),
    ("data-wrong-shape", C + [DEMO, "--data", "{shape_npz}", *OK], ["shape.npz"]),
    ("zero-size-weight", C + ["{zero_w}", *OK], ["zero_w.onnx"]),
    ("labels-beyond-classes", C + [DEMO, "--data", "{classes_npz}", *OK], ["classes.npz", "[0, 9]"]),
    ("data-wrong-dtype", C + [DEMO, "--data", "{dtype_npz}", *OK], ["dtype.npz"]),
    ("labels-out-of-range", C + [DEMO, "--data", "{labels_npz}", *OK], ["labels", "-1"]),
    ("labels-wrong-count", C + [DEMO, "--data", "{count_npz}", *OK], ["count.npz"]),
    ("empty-data", C + [DEMO, "--data", "{empty_npz}", *OK], ["empty.npz"]),
    ("nan-data", C + [DEMO, "--data", "{nan_npz}", *OK], ["NaN"]),
    ("npz-without-x", C + [DEMO, "--data", "{nox_npz}", *OK], ["'x'"]),
    ("missing-npz", C + [DEMO, "--data", "{tmp}/none.npz", *OK], ["none.npz"]),
    ("unknown-data", C + [DEMO, "--data", "mnist-please", *OK], ["mnist-please"]),
    ("unknown-format", C + [DEMO, "--formats", "int8,int13", *OK], ["int13"]),
    ("empty-formats", C + [DEMO, "--formats", ",", *OK], ["--formats"]),
    ("impossible-budget", C + [DEMO, "--budget", "bops=0.01x", *OK], ["impossible", "cheapest"]),
    ("unknown-budget-kind", C + [DEMO, "--budget", "energy=3J", *OK], ["energy"]),
    ("bad-budget-value", C + [DEMO, "--budget", "bops=-1x", *OK], ["--budget"]),
    ("unknown-target", C + [DEMO, "--target", "cuda-h100", "--steps", "2"], ["cuda-h100"]),
    ("bad-json-target", C + [DEMO, "--target", '{"kind": llvm', "--steps", "2"], ["JSON"]),
    ("rpc-target", C + [DEMO, "--target", "rpc://10.0.0.1:9190/pi", "--steps", "2"], ["RPC"]),
    ("missing-target", C + [DEMO, "--steps", "2"], ["--target"]),
    ("out-under-a-file", C + [DEMO, *OK, "--out", "{afile}/sub"], ["--out"]),
    ("out-is-a-file", C + [DEMO, *OK, "--out", "{afile}"], ["--out"]),
    ("bad-input-shape", C + [DEMO, *OK, "--input-shape", "input:1x1x8x8"], ["--input-shape"]),
    ("zero-input-shape", C + [DEMO, *OK, "--input-shape", "input=1x0x8x8"], ["--input-shape"]),
    ("bad-sweep", C + [DEMO, *OK, "--sweep", "bops"], ["--sweep"]),
    ("bad-sweep-value", C + [DEMO, *OK, "--sweep", "bops=0.5x,fast"], ["--sweep", "fast"]),
    ("budget-and-sweep", C + [DEMO, *OK, "--budget", "bops=0.5x", "--sweep", "bops=0.3x,0.5x"], ["--sweep"]),
    ("negative-steps", C + [DEMO, "--target", "ort", "--steps", "-5"], ["--steps"]),
    ("zero-steps", C + [DEMO, "--target", "ort", "--steps", "0"], ["--steps"]),
    ("text-steps", C + [DEMO, "--target", "ort", "--steps", "many"], ["--steps"]),
    ("text-seed", C + [DEMO, *OK, "--seed", "lucky"], ["--seed"]),
    ("unknown-metric", C + [DEMO, *OK, "--metric", "f1score"], ["--metric", "f1score", "cosine", "sqnr"]),
    ("search-unknown-metric", ["search", DEMO, "--metric", "mAP", "--quiet"], ["--metric", "map", "agreement"]),
    ("label-metric-without-labels", C + [DEMO, *OK, "--metric", "accuracy"], ["--metric", "no labels"]),
    ("unknown-option", C + [DEMO, *OK, "--turbo"], ["--turbo"]),
    ("missing-model-arg", C + ["--target", "ort"], ["MODEL"]),
    ("lower-missing-config", ["lower", DEMO, "--config", "{tmp}/none.json", "--target", "ort", "--quiet"], ["none.json"]),
    ("lower-no-config", ["lower", DEMO, "--target", "ort", "--quiet"], ["--config"]),
    ("lower-unknown-node", ["lower", DEMO, "--config", "{bad_config}", "--target", "ort", "--quiet"], ["no_such_node"]),
    ("lower-unknown-format", ["lower", DEMO, "--config", "{badfmt_config}", "--target", "ort", "--quiet"], ["int99"]),
    ("lower-junk-config", ["lower", DEMO, "--config", "{junk_config}", "--target", "ort", "--quiet"], ["junk_config.json"]),
    ("search-latency-no-target", ["search", DEMO, "--budget", "latency=1ms", "--quiet"], ["--target"]),
    ("unknown-device", C + [DEMO, "--device", "tpu", *OK], ["--device", "'tpu'", "cuda:N"]),
    ("bad-device-index", ["search", DEMO, "--device", "cuda:x", "--quiet"], ["--device", "cuda:x"]),
    ("nproc-zero", C + [DEMO, "--nproc", "0", *OK], ["--nproc", "'0'"]),
    ("nproc-odd-batch", ["search", DEMO, "--nproc", "3", "--quiet"], ["batch size 64", "3 processes"]),
    ("profile-tune-on-ort", ["profile", DEMO, "--target", "ort", "--tune-trials", "8", "--quiet"], ["--tune-trials", "TVM"]),
    ("profile-negative-trials", ["profile", DEMO, "--target", "llvm", "--tune-trials", "-3", "--quiet"], ["--tune-trials"]),
    ("compile-tune-on-ort", C + [DEMO, *OK, "--tune-trials", "8"], ["--tune-trials", "TVM"]),
    ("profile-unknown-format", ["profile", DEMO, "--target", "ort", "--formats", "int99", "--quiet"], ["int99"]),
    ("report-no-run", ["report", "{tmp}/empty_dir"], ["report.json"]),
    ("report-merge-no-out", ["report", "{tmp}/empty_dir", "{tmp}/empty_dir"], ["--out MERGED"]),
    ("jobs-zero", C + [DEMO, "--sweep", "bops=0.4x,0.8x", "--jobs", "0", *OK], ["--jobs", "'0'"]),
    ("jobs-with-nproc", C + [DEMO, "--jobs", "2", "--nproc", "2", *OK], ["--nproc 2", "--jobs 2"]),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "empty_dir").mkdir()
    f = _case_files(tmp)
    f["tmp"] = str(tmp)
    return f


def _argv(args, files):
    return [a.format(**files) if "{" in a and not a.startswith('{"') else a for a in args]


def test_corpus_is_large_enough():
    assert len(CASES) >= 25


@pytest.mark.parametrize("case_id,args,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case_id, args, words, files, tmp_path):
    out = tmp_path / "out"
    argv = _argv(args, files)
    if argv[0] in ("compile", "lower", "search") and "--out" not in argv:
        argv += ["--out", str(out)]
    before = sorted(p.name for p in Path(files["tmp"]).iterdir())
    code, stderr = _invoke(argv)
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert code == 2, f"exit {code}, stderr: {stderr!r}"
    assert len(lines) == 1, f"expected one line on stderr, got: {stderr!r}"
    assert "Traceback" not in stderr
    assert lines[0].startswith("fliqs: error: "), lines[0]
    for word in words:
        assert word.lower() in lines[0].lower(), f"{word!r} not in {lines[0]!r}"
    assert not out.exists() or not any(out.iterdir()), f"left behind: {list(out.rglob('*'))}"
    assert sorted(p.name for p in Path(files["tmp"]).iterdir()) == before


def _invoke(argv) -> tuple:
    """(exit code, stderr) of ``fliqs ARGV`` in process; an exception escaping the CLI fails."""
    result = CliRunner().invoke(cli, argv)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback
        raise AssertionError("uncaught exception: " + "".join(
            traceback.format_exception(result.exception)))
    return result.exit_code, result.stderr


def test_debug_shows_traceback(files, tmp_path):
    """--debug: the same bad input raises with a traceback (run as a real process)."""
    cmd = [sys.executable, "-m", "fliqs_compiler.cli.main", "compile", DEMO, "--target", "ort",
           "--formats", "int13", "--out", str(tmp_path / "o"), "--debug"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert "Traceback" in p.stderr and "int13" in p.stderr
    assert not (tmp_path / "o").exists()
