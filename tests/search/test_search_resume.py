"""A search killed with SIGKILL mid-run and resumed from its checkpoint ends with the same
configuration, metrics, step log and weights as an uninterrupted run with the same seed."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

from fliqs_compiler.search.checkpoint import checkpoint_path, load_checkpoint
from examples import toy_models
from examples.toy_models import TinyCNN, train_float

import pytest


@pytest.fixture(scope="module")
def float_state(digits, tmp_path_factory):
    model = train_float(TinyCNN(), digits.x_train, digits.y_train, 100, seed=0)
    path = tmp_path_factory.mktemp("float") / "tiny.pt"
    torch.save(model.state_dict(), path)
    return path


SCRIPT = textwrap.dedent("""
    import sys, json, torch
    torch.set_num_threads(2)
    from fliqs_compiler.data.sources import load_data
    from fliqs_compiler.ir.graph import InputSpec
    from fliqs_compiler.search import SearchOptions, ControllerOptions, run_search
    from examples.toy_models import TinyCNN, make_searchable
    state, out, resume, steps = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
    data = load_data("digits", InputSpec("x", (1, 1, 8, 8)))
    m = TinyCNN(); m.load_state_dict(torch.load(state, weights_only=True))
    g = make_searchable(m, data.x_train[:1], ["int2", "int4", "int8"], name="tiny")
    o = SearchOptions(steps=steps, seed=3, gamma=1.0, reward_batch_size=64, checkpoint_every=5,
                      controller=ControllerOptions(lr=0.1, entropy_max=0.1))
    r = run_search(g, data, "bops=0.3x", o, out_dir=out, resume=resume, progress=False)
    torch.save(g.gm.state_dict(), out + "/final_state.pt")
    print(json.dumps({"choice": r.choice, "cost": r.cost, "quality": r.quality}))
""")


def test_sigkill_and_resume_equals_uninterrupted(float_state, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    steps = 30
    # the script runs outside the repository: give it the root so `examples` imports
    root = str(Path(toy_models.__file__).resolve().parents[1])
    env = dict(os.environ, OMP_NUM_THREADS="2",
               PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))

    def run(out, resume):
        p = subprocess.run([sys.executable, str(script), str(float_state), str(out), "1" if resume else "0",
                            str(steps)], capture_output=True, text=True, env=env, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        return json.loads(p.stdout.strip().splitlines()[-1])

    full = run(tmp_path / "full", False)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(script), str(float_state), str(killed), "0", str(steps)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    log = killed / "search.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:  # kill once a checkpoint exists and the run is past it
        if checkpoint_path(killed).exists() and log.exists() and len(log.read_text().splitlines()) >= 8:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = load_checkpoint(killed)
    assert 5 <= ckpt["step"] < steps
    resumed = run(killed, True)
    assert resumed == full  # same configuration, cost and metrics
    assert (killed / "search.jsonl").read_text() == (tmp_path / "full" / "search.jsonl").read_text()
    a = torch.load(tmp_path / "full" / "final_state.pt", weights_only=True)
    b = torch.load(killed / "final_state.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


