"""``fliqs compile`` end to end through the CLI on the bundled demo model and sklearn digits
(few steps), the output folder per the output contract (docs/design.md), report.json against
that contract (every field and type: ``cli_runs.assert_contract``), then ``fliqs report`` and
``fliqs lower`` on the result. The TVM (llvm) variant is slow (TVM compiles) and marked so."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from fliqs_compiler.numerics import formats as F
from fliqs_compiler.cli.main import cli

from cli_runs import assert_contract, run_cli


@pytest.fixture(scope="module")
def run(tmp_path_factory, demo_model):
    """One compile for the ort target (no TVM build: seconds)."""
    out = tmp_path_factory.mktemp("compile") / "demo-out"
    stdout = run_cli(["compile", str(demo_model), "--target", "ort", "--data", "digits",
                      "--steps", "12", "--formats", "int8,fp8_e4m3,bf16", "--budget", "bops=1x",
                      "--out", str(out), "--quiet"])
    return out, stdout


def test_output_folder(run):
    out, stdout = run
    assert str(out) in stdout
    for name in ("config.json", "model.qdq.onnx", "report.json", "report.md", "formats.png",
                 "search.jsonl"):
        assert (out / name).is_file(), name
    assert any((out / "checkpoint").iterdir())
    assert not (out / "pareto.png").exists()  # no sweep
    assert not (out / "tvm").exists()  # ort target
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".fliqs")]


def test_report_contract_and_consistency(run, threads):
    out, _ = run
    report = json.loads((out / "report.json").read_text())
    assert_contract(report)
    assert report["model"] == "demo" and report["target"] == "ort"
    assert report["formats"] == ["int8", "fp8_e4m3", "bf16"]
    assert report["budget"]["kind"] == "bops"
    assert report["quality"]["metric"] == "accuracy"
    assert report["quality"]["float"] > 0.95
    assert 0.0 <= report["quality"]["final"] <= 1.0
    searched = [la for la in report["layers"] if not la["keep_float"]]
    kept = [la for la in report["layers"] if la["keep_float"]]
    assert searched and kept  # first/last kept in float by default
    assert report["totals"]["bops"] == sum(la["bops"] for la in searched)
    assert report["totals"]["float_bops"] == sum(la["macs"] * 1024 for la in kept)
    for la in searched:
        assert la["format_w"] in report["formats"] and la["format_a"] in report["formats"]
        assert la["bops"] == la["macs"] * F.get(la["format_w"]).bits * F.get(la["format_a"]).bits
        assert la["latency_ms"] is None or la["latency_ms"] > 0
    # QDQ ONNX == quantized torch graph: exactly in our exact session, within the stated LSB
    # tolerance in the default session users run
    assert report["numerics"]["onnxruntime_exact_max_abs_err"] < 1e-2
    assert report["numerics"]["onnxruntime_default_lsb"] <= 2.0
    assert report["numerics"]["tvm_max_abs_err"] is None
    assert set(report["artifact_bytes"]) == {"onnx"} and report["artifact_bytes"]["onnx"] > 0
    assert report["totals"]["latency_ms"] > 0
    assert report["environment"]["threads"] == threads
    assert report["data"]["holdout"] > 0 and 0 < report["data"]["holdout_fraction"] < 1


def test_config_matches_report(run):
    out, _ = run
    cfg = json.loads((out / "config.json").read_text())
    report = json.loads((out / "report.json").read_text())
    assert cfg["model"] == "demo"
    chosen = {la["node"]: {"weight": la["format_w"], "activation": la["format_a"]}
              for la in report["layers"] if not la["keep_float"]}
    assert cfg["formats"] == chosen


def test_qdq_onnx_runs_with_the_models_io(run, demo_model, threads):
    import onnxruntime as ort
    out, _ = run
    model = onnx.load(out / "model.qdq.onnx")
    onnx.checker.check_model(model)
    src = onnx.load(demo_model)
    assert [i.name for i in model.graph.input] == [i.name for i in src.graph.input]
    assert [o.name for o in model.graph.output] == [o.name for o in src.graph.output]
    assert any(n.op_type == "DequantizeLinear" for n in model.graph.node)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(out / "model.qdq.onnx"), opts, providers=["CPUExecutionProvider"])
    y = sess.run(None, {"input": np.zeros((1, 1, 8, 8), np.float32)})[0]
    assert y.shape == (1, 10)


def test_search_log(run):
    out, _ = run
    lines = [json.loads(s) for s in (out / "search.jsonl").read_text().splitlines()]
    sched = json.loads((out / "report.json").read_text())["search"]["schedule"]
    charged = sched["prior"]["charged_steps"]  # the sensitivity prior's passes, paid as steps
    assert 0 < charged <= 2 and sched["weight_steps"] == 12 - charged
    assert [r["step"] for r in lines] == list(range(12 - charged))
    for r in lines:
        for k in ("cost", "entropy"):
            assert isinstance(r[k], (int, float))
        # the reward is measured at every search step, elsewhere every monitor_every (10) steps
        monitored = r["phase"] == "search" or r["step"] % 10 == 0 or r["step"] == len(lines) - 1
        for k in ("reward", "quality"):
            assert isinstance(r[k], (int, float)) if monitored else r[k] is None
        assert "choice" in r or "formats" in r



def test_report_md_and_plot(run):
    out, _ = run
    md = (out / "report.md").read_text()
    for needle in ("budget asked", "budget achieved", "quality (accuracy)", "held out", "## Layers",
                   "measured latency", "2 threads"):
        assert needle in md, needle
    assert (out / "formats.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_command_rerenders(run):
    out, _ = run
    (out / "report.md").unlink()
    stdout = run_cli(["report", str(out)])
    assert (out / "report.md").exists() and "report.md" in stdout


def test_lower_command_from_config(run, tmp_path, demo_model):
    out, _ = run
    out2 = tmp_path / "lowered"
    run_cli(["lower", str(demo_model), "--config", str(out / "config.json"), "--target", "ort",
             "--data", "digits", "--out", str(out2), "--quiet"])
    report = json.loads((out2 / "report.json").read_text())
    assert_contract(report)
    cfg = json.loads((out / "config.json").read_text())
    got = {la["node"]: {"weight": la["format_w"], "activation": la["format_a"]}
           for la in report["layers"] if la["format_w"] != "float"}
    assert got == {k: v for k, v in cfg["formats"].items() if v["weight"] != "float"}
    assert (out2 / "model.qdq.onnx").is_file()


@pytest.mark.slow
def test_sweep_draws_pareto(tmp_path, demo_model):
    out = tmp_path / "sweep"
    run_cli(["compile", str(demo_model), "--target", "ort", "--data", "digits", "--steps", "6",
             "--formats", "int4,int8", "--sweep", "bops=0.4x,0.8x", "--out", str(out), "--quiet"])
    report = json.loads((out / "report.json").read_text())
    assert_contract(report)
    assert [p["budget"] for p in report["sweep"]] == ["bops=0.4x", "bops=0.8x"]
    assert report["budget"]["text"] == "bops=0.4x"
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    second = out / report["sweep"][1]["dir"]
    assert (second / "config.json").is_file() and (second / "report.json").is_file()
    assert report["sweep"][0]["budget_value"] < report["sweep"][1]["budget_value"]


def test_finetune_reports_both_qualities(tmp_path, demo_model):
    out = tmp_path / "ft"
    run_cli(["compile", str(demo_model), "--target", "ort", "--data", "digits", "--steps", "6",
             "--formats", "int4,int8", "--finetune", "3", "--out", str(out), "--quiet"])
    sq = json.loads((out / "report.json").read_text())["search"]["search_quality"]
    assert sq["finetune_steps"] == 3 and 0.0 <= sq["final_finetuned"] <= 1.0
    assert "fine-tuning steps" in (out / "report.md").read_text()
    r = CliRunner().invoke(cli, ["compile", str(demo_model), "--target", "ort", "--finetune", "-1"])
    assert r.exit_code == 2 and "--finetune" in r.output


@pytest.mark.slow
@pytest.mark.tvm
def test_compile_llvm_builds_loadable_model_so(tmp_path, demo_model):
    """The TVM path: tvm/model.so loads in a fresh VirtualMachine that takes only the inputs."""
    out = tmp_path / "llvm"
    run_cli(["compile", str(demo_model), "--target", "llvm", "--data", "digits", "--steps", "8",
             "--out", str(out), "--quiet"])
    report = json.loads((out / "report.json").read_text())
    assert_contract(report)
    assert report["numerics"]["tvm_max_abs_err"] is not None
    assert report["numerics"]["tvm_max_abs_err"] < 1e-2
    assert report["numerics"]["tvm_lsb"] <= 2  # compile's own gate (ort_backend.check_artifact)
    assert report["totals"]["latency_ms"] > 0
    searched = [la for la in report["layers"] if not la["keep_float"]]
    assert all(la["executed_dtype"] and la["weight_storage"] for la in searched)
    # what the artifacts weigh on disk, as written
    assert report["artifact_bytes"] == {k: (out / report["files"][k]).stat().st_size
                                        for k in ("onnx", "tvm")}
    assert "artifact `tvm/model.so`" in (out / "report.md").read_text()
    import tvm
    from tvm import relax
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(out / "tvm" / "model.so")), tvm.cpu())
    x = np.zeros((1, 1, 8, 8), np.float32)
    y = vm["main"](tvm.runtime.tensor(x, tvm.cpu()))
    y = y[0] if not hasattr(y, "numpy") else y
    assert y.numpy().shape == (1, 10)


def _sweep_points(out) -> list:
    report = json.loads((out / "report.json").read_text())
    points = []
    for row in report["sweep"]:
        d = out / row["dir"]
        rep = json.loads((d / "report.json").read_text())
        points.append({"budget": row["budget"], "formats": json.loads((d / "config.json").read_text())["formats"],
                       "quality": rep["quality"]["final"], "bops": rep["totals"]["bops"],
                       "baselines": [{k: v for k, v in b.items() if k != "seconds"}
                                     for b in rep["baselines"]],
                       "log": (d / "search.jsonl").read_text().splitlines()})
    return points


def test_sweep_points_at_once_equal_the_serial_sweep(tmp_path, demo_model):
    """``--jobs 2``: the points run in two processes of their own and come out as one by one:
    same formats, quality, BOPs, baselines and step logs, point by point."""
    args = ["compile", str(demo_model), "--target", "ort", "--data", "digits", "--steps", "6",
            "--formats", "int4,int8", "--sweep", "bops=0.4x,0.6x,0.8x", "--baselines", "uniform",
            "--quiet"]
    run_cli(args + ["--out", str(tmp_path / "serial")])
    run_cli(args + ["--out", str(tmp_path / "jobs"), "--jobs", "2"])
    serial, jobs = _sweep_points(tmp_path / "serial"), _sweep_points(tmp_path / "jobs")
    assert [p["budget"] for p in jobs] == ["bops=0.4x", "bops=0.6x", "bops=0.8x"]
    assert jobs == serial
    assert (tmp_path / "jobs" / "pareto.png").is_file()
    assert sorted(p.name for p in (tmp_path / "jobs").rglob("*")) == \
        sorted(p.name for p in (tmp_path / "serial").rglob("*"))
    # points run as separate jobs, merged afterwards: the same sweep table
    serial_dir = tmp_path / "serial"
    dirs = [serial_dir] + sorted((serial_dir / "sweep").iterdir())
    run_cli(["report", *map(str, dirs), "--out", str(tmp_path / "merged")])
    merged = json.loads((tmp_path / "merged" / "report.json").read_text())
    table = json.loads((serial_dir / "report.json").read_text())["sweep"]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "dir"} for r in rows]  # noqa: E731
    assert strip(merged["sweep"]) == strip(table)
    assert [r["dir"] for r in merged["sweep"]] == [f"../{d.relative_to(tmp_path)}" for d in dirs]
    assert (tmp_path / "merged" / "pareto.png").is_file()
