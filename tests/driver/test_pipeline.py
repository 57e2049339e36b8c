"""The pipeline as data: every command is a list of stages; what ``plan`` (``--dry-run``) lists is
exactly what runs; the runner owns progress, timing and the output folder."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fliqs_compiler.driver import api
from fliqs_compiler.driver.pipeline import PerBudget

DEMO = api.DEMO_MODEL


def _stages(pipeline):
    for s in pipeline:
        yield from (s.stages if isinstance(s, PerBudget) else [s])


@pytest.mark.parametrize("command", sorted(api.PIPELINES))
def test_every_stage_follows_the_stage_protocol(command):
    for stage in _stages(api.PIPELINES[command]):
        assert isinstance(stage.name, str) and stage.name
        assert callable(stage.describe) and callable(stage.run)


def test_the_plan_of_a_sweep_is_what_runs(tmp_path):
    kwargs = dict(model=DEMO, target="ort", data="digits", formats="int2,int4,int8", steps=8,
                  sweep="bops=0.15x,0.3x", baselines="uniform", out=tmp_path / "o", progress=False,
                  layer_latency=False)
    planned = [name for name, _ in api.plan("compile", **kwargs)]
    assert not (tmp_path / "o").exists()  # planning runs nothing, creates nothing
    per_point = ["baselines", "search", "materialize", "export", "lower", "measure", "report"]
    assert planned == ["import", "data", "passes", "budget", *per_point, *per_point, "sweep summary"]
    result = api.compile(**kwargs)
    assert result.executed == planned
    assert [r["budget"] for r in result.report["sweep"]] == ["bops=0.15x", "bops=0.3x"]
    timing = result.report["timing_s"]
    assert {"import", "data", "passes", "search", "export", "lower", "report"} - set(timing) == {"report"}


def test_a_latency_budget_plans_and_runs_the_latency_table(tmp_path):
    kwargs = dict(model=DEMO, target="ort", data="digits", formats="int4,int8", steps=6,
                  budget="latency=100ms", out=tmp_path / "o", progress=False, layer_latency=False)
    planned = [name for name, _ in api.plan("compile", **kwargs)]
    assert planned[:5] == ["import", "data", "passes", "latency table", "budget"]
    assert "baselines" not in planned and "sweep summary" not in planned
    assert api.compile(**kwargs).executed == planned


def test_lower_plan_is_what_runs(tmp_path):
    first = api.compile(DEMO, target="ort", data="digits", formats="int4,int8", steps=6,
                        budget="bops=0.4x", out=tmp_path / "a", progress=False, layer_latency=False)
    kwargs = dict(model=DEMO, config=first.config_path, target="ort", out=tmp_path / "b",
                  data="digits", progress=False, layer_latency=False)
    planned = [name for name, _ in api.plan("lower", **kwargs)]
    assert planned == ["import", "data", "passes", "materialize", "export", "lower", "measure", "report"]
    assert api.lower_config(kwargs.pop("model"), kwargs.pop("config"), **kwargs).executed == planned


def test_plan_checks_options_like_the_call():
    from fliqs_compiler.base.errors import FliqsError
    with pytest.raises(FliqsError, match="--steps"):
        api.plan("compile", model=DEMO, target="ort", steps=0)
    with pytest.raises(FliqsError, match="--tune-trials"):
        api.plan("compile", model=DEMO, target="ort", tune_trials=3)


def test_cli_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    out = tmp_path / "never"
    env = {**os.environ, "TVM_NUM_THREADS": "2"}
    args = ["compile", str(DEMO), "--target", "llvm", "--data", "digits", "--formats", "int2,int8",
            "--sweep", "bops=0.1x,0.2x", "--steps", "5", "--out", str(out)]
    p = subprocess.run([sys.executable, "-m", "fliqs_compiler.cli.main", *args, "--dry-run"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    expected = api.describe("compile", model=DEMO, target="llvm", data="digits", formats="int2,int8",
                            sweep="bops=0.1x,0.2x", steps=5, out=out)
    assert p.stdout.strip() == expected
    assert "lower" in p.stdout and "tvm/model.so" in p.stdout
    assert not out.exists()
