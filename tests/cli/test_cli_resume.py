"""``fliqs compile --resume`` after SIGKILL, through the real CLI in subprocesses: the killed run
leaves only its checkpoint (and the step log), and the resumed run ends with the same config,
quality and search log as an uninterrupted run with the same seed."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fliqs_compiler.driver.api import DEMO_MODEL

STEPS = 48
BASE = [sys.executable, "-m", "fliqs_compiler.cli.main", "compile", str(DEMO_MODEL), "--target", "ort",
        "--data", "digits", "--steps", str(STEPS), "--checkpoint-every", "4", "--seed", "3",
        "--formats", "int8,fp8_e4m3,bf16", "--budget", "bops=1.2x", "--quiet"]
ENV = {**os.environ, "TVM_NUM_THREADS": "2", "OMP_NUM_THREADS": "2"}


def _lines(path: Path) -> int:
    try:
        return len(path.read_text().splitlines())
    except OSError:
        return 0


def _final(out: Path) -> dict:
    report = json.loads((out / "report.json").read_text())
    return {"formats": json.loads((out / "config.json").read_text())["formats"],
            "quality": report["quality"]["final"], "bops": report["totals"]["bops"],
            "log": [json.loads(s) for s in (out / "search.jsonl").read_text().splitlines()]}


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    p = subprocess.run(BASE + ["--out", str(ref)], env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr

    proc = subprocess.Popen(BASE + ["--out", str(cut)], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            if (cut / "checkpoint").is_dir() and _lines(cut / "search.jsonl") >= 10:
                break
            assert proc.poll() is None, f"run ended before it could be killed: {proc.stderr.read()}"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    killed_at = _lines(cut / "search.jsonl")
    assert killed_at < STEPS, "the search had finished before the kill"
    # nothing half-written: only the checkpoint and the step log
    left = {p.name for p in cut.iterdir()}
    assert left <= {"checkpoint", "search.jsonl"}, left

    p = subprocess.run(BASE + ["--out", str(cut), "--resume"], env=ENV, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    a, b = _final(ref), _final(cut)
    assert b["formats"] == a["formats"]
    assert b["quality"] == a["quality"]
    assert b["bops"] == a["bops"]
    ran = json.loads((cut / "report.json").read_text())["search"]["schedule"]["weight_steps"]
    assert 0 < STEPS - ran <= -(-STEPS // 10)  # the prior's passes, paid as steps (≤ 10 %, rounded up)
    assert len(b["log"]) == ran
    assert b["log"] == a["log"]
