"""Shared test set-up: the repository root on ``sys.path`` (test models live in
``examples/toy_models.py``), and two threads everywhere (the CI machines have two cores).

Shared fixtures: ``threads``, ``demo_model``, ``digits``, ``trained_tiny_cnn``, ``no_debug_env``.
Shared helper modules (``tests/helpers/``, on ``sys.path``): ``onnx_models`` (ONNX test models),
``cli_runs`` (in-process CLI runs, the report.json contract), ``report_samples``."""
from __future__ import annotations

import os
import sys
from pathlib import Path

THREADS = 2
os.environ.setdefault("TVM_NUM_THREADS", str(THREADS))  # before anything imports tvm
ROOT = Path(__file__).resolve().parents[1]
HELPERS = ROOT / "tests" / "helpers"  # shared test machinery: `import conformance_matrix`, ...
for path in (ROOT, HELPERS):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(THREADS)


@pytest.fixture(scope="session")
def threads() -> int:
    """The thread count every test runs with (torch and TVM_NUM_THREADS, set above)."""
    return THREADS


@pytest.fixture(scope="session")
def demo_model() -> Path:
    """Path of the bundled demo ONNX model (``fliqs_compiler.driver.api.DEMO_MODEL``)."""
    from fliqs_compiler.driver.api import DEMO_MODEL
    return DEMO_MODEL


@pytest.fixture(scope="session")
def digits():
    """sklearn digits as a fliqs ``Dataset`` shaped for a 1x1x8x8 input (default 20 % held out,
    seed 0). Shared by the whole session: do not modify it (``dataclasses.replace`` a copy)."""
    from fliqs_compiler.data.sources import load_data
    from fliqs_compiler.ir.graph import InputSpec
    return load_data("digits", InputSpec("x", (1, 1, 8, 8)))


@pytest.fixture(scope="session")
def trained_tiny_cnn(digits):
    """``examples.toy_models.TinyCNN`` trained in float on ``digits`` (200 steps, seed 0), in eval
    mode. Shared by the whole session: deep-copy it (or load its ``state_dict``) before use."""
    from examples.toy_models import TinyCNN, train_float
    torch.manual_seed(0)
    return train_float(TinyCNN(), digits.x_train, digits.y_train, 200, seed=0)


@pytest.fixture
def no_debug_env(monkeypatch):
    """``FLIQS_DEBUG`` unset during the test and after it (``--debug`` sets it process-wide)."""
    monkeypatch.delenv("FLIQS_DEBUG", raising=False)
    yield
    os.environ.pop("FLIQS_DEBUG", None)
