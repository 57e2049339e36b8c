"""The recipes of docs/design.md, followed once each: "Add a format" (FP8 E3M4, a real format
ml_dtypes knows and ONNX has no type for) and "Add a backend" (``pt2``: the materialized graph
saved with ``torch.export.save``). Each is registered from the test as a user or plug-in would,
and the conformance matrix picks it up: its rules check flags it until it is reviewed, then its
cases run on every runner within one output LSB, like the built-in ones."""
from __future__ import annotations

import statistics
import timeit
from pathlib import Path

import numpy as np
import pytest
import torch

import conformance_matrix as CM
from fliqs_compiler.backends import conformance as C
from fliqs_compiler.backends import registry, targets
from fliqs_compiler.backends.registry import Artifact, LayerMeasure, Runner
from fliqs_compiler.driver import api
from fliqs_compiler.numerics import formats as F


# ---- recipe: add a format -------------------------------------------------------------------
def fp8_e3m4() -> F.Format:
    """IEEE-like FP8 with 3 exponent and 4 mantissa bits (``ml_dtypes.float8_e3m4``: inf and NaN,
    bias 3, max (2 − 2⁻⁴)·2³ = 15.5)."""
    bias = 3
    return F.Format(name="fp8_e3m4", kind="fp", bits=8, ebits=3, mbits=4, bias=bias,
                    max_finite=15.5, min_normal=2.0 ** (1 - bias), min_subnormal=2.0 ** (1 - bias - 4),
                    has_inf=True, has_nan=True, np_dtype_name="float8_e3m4",
                    description="IEEE-like FP8 E3M4 (recipe test)")


@pytest.fixture
def new_format(monkeypatch):
    fmt = fp8_e3m4()
    F.register(fmt)
    yield fmt
    F._REGISTRY.pop(fmt.name, None)


def test_add_a_format_recipe(new_format, monkeypatch, tmp_path):
    name = new_format.name
    assert name in F.searchable_names() and api.parse_formats(name) == [name]
    # the conformance rules flag the new format until someone reviews it ...
    assert CM.missing_rules(F.searchable_names(), list(C.runners())) == [f"format {name}"]
    # ... the review: no runner needs a skip or a known-bug rule for it
    monkeypatch.setattr(CM, "REVIEWED_FORMATS", CM.REVIEWED_FORMATS + (name,))
    assert CM.missing_rules(F.searchable_names(), list(C.runners())) == []
    # ... and the matrix parametrizes it for every role and runner, with no mark
    params = {p.values: p.marks for p in CM.matrix_params()}
    runners = CM.backends()
    assert {(b, name, r) for b in runners for r in CM.ROLES} <= set(params)
    assert not any(m.name in ("skip", "xfail") for b in runners for r in CM.ROLES for m in params[(b, name, r)])
    # run just this format's cases (its tier would otherwise share one graph with every format)
    monkeypatch.setattr(CM, "cases", lambda: [(name, role) for role in CM.ROLES])
    matrix = CM.Matrix(tmp_path)
    for backend in runners:
        for role in CM.ROLES:
            err = max(matrix.result(backend, name, role).values())
            assert err <= 1.0 + CM.LSB_SLACK, (backend, role, err)


# ---- recipe: add a backend -------------------------------------------------------------------
def _open_pt2(path: Path):
    """A fresh process would do exactly this: load the saved program, run its module."""
    module = torch.export.load(str(path)).module()

    def run(inputs):
        with torch.no_grad():
            out = module(*[torch.from_numpy(np.ascontiguousarray(x)) for x in inputs])
        return [o.detach().numpy() for o in (out if isinstance(out, (tuple, list)) else (out,))]
    return run


def _median_ms(fn, repeat: int = 5) -> float:
    return statistics.median(timeit.repeat(fn, number=1, repeat=repeat)) * 1e3


class Pt2Backend:
    """The materialized fx graph as a ``torch.export`` program file (``pt2/model.pt2``)."""

    name = "pt2"
    default_target = "pt2"
    tunes = False
    runners = {"pt2": Runner("pt2", _open_pt2, "torch.export.load(pt2/model.pt2).module()")}

    def resolve(self, target):
        return target

    def caps(self, target):
        from dataclasses import replace
        return replace(target.caps, native={"weight": frozenset(), "activation": frozenset()})

    def artifacts(self, target) -> dict:
        return {"pt2": "pt2/model.pt2"}

    def lower(self, fixed, target, out_dir, onnx_path) -> Artifact:
        ep = torch.export.export(fixed.gm.eval(), tuple(fixed.example_inputs()))
        path = Path(out_dir) / "pt2" / "model.pt2"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.export.save(ep, str(path))
        run = _open_pt2(path)
        return Artifact(path, run, lambda inputs: _median_ms(lambda: run(inputs)))

    def measure_layer(self, target, tuning, cache_dir) -> LayerMeasure:
        def fn(layer, fw, fa):  # the float op at the layer's shapes (formats are emulated)
            x = torch.randn(layer.input_shape)
            w = torch.randn(layer.weight_shape)
            if layer.op == "linear":
                return _median_ms(lambda: torch.nn.functional.linear(x, w))
            a = layer.attrs
            return _median_ms(lambda: torch.nn.functional.conv2d(
                x, w, stride=a.get("stride", 1), padding=a.get("padding", 0), groups=a.get("groups", 1)))
        return LayerMeasure("pt2", fn)

    def measure_model(self, artifact, inputs):
        return float(artifact.time_ms(inputs))


def _pt2_form(text: str):
    return targets.Target("pt2", text) if text == "pt2" else None


@pytest.fixture
def new_backend():
    backend = Pt2Backend()
    registry.register(backend)
    targets.register_form(_pt2_form)
    yield backend
    registry.unregister(backend.name)
    targets.unregister_form(_pt2_form)


def test_add_a_backend_recipe(new_backend, monkeypatch, tmp_path):
    assert "pt2" in registry.names() and "pt2" in C.runners()
    assert CM.missing_rules(F.searchable_names(), list(C.runners())) == ["backend pt2"]
    monkeypatch.setattr(CM, "REVIEWED_BACKENDS", CM.REVIEWED_BACKENDS + ("pt2",))
    assert CM.missing_rules(F.searchable_names(), list(C.runners())) == []
    assert {("pt2", f, r) for f in CM.case_formats() for r in CM.ROLES} <= {p.values for p in CM.matrix_params()}
    matrix = CM.Matrix(tmp_path / "matrix")
    for fmt in ("int4", "fp8_e4m3", "mxfp4_e2m1"):
        for role in CM.ROLES:
            err = matrix.result("pt2", fmt, role)
            assert max(err.values()) <= 1.0 + CM.LSB_SLACK, (fmt, role, err)
    # the driver runs it end to end without knowing it: lower → its artifact, measure, report
    kwargs = dict(target="pt2", data="digits", formats="int4,int8", budget="bops=0.4x", steps=6,
                  out=tmp_path / "out", progress=False)
    planned = [name for name, note in api.plan("compile", model=api.DEMO_MODEL, **kwargs)]
    result = api.compile(api.DEMO_MODEL, **kwargs)
    assert result.executed == planned
    assert (tmp_path / "out" / "pt2" / "model.pt2").is_file()
    assert result.report["files"]["pt2"] == "pt2/model.pt2"
    assert result.report["environment"]["device"]["backend"] == "pt2"
    assert result.report["numerics"]["onnxruntime_max_abs_err"] is not None
    assert result.report["totals"]["latency_ms"] > 0
    assert all(row["latency_ms"] is not None for row in result.report["layers"] if not row["keep_float"])
    run = _open_pt2(tmp_path / "out" / "pt2" / "model.pt2")  # as a user of the file runs it
    x = np.random.default_rng(0).standard_normal((1, 1, 8, 8)).astype(np.float32)
    assert run([x])[0].shape == (1, 10)


def test_tuning_is_refused_for_a_backend_that_does_not_tune(new_backend):
    from fliqs_compiler.base.errors import FliqsError
    with pytest.raises(FliqsError, match="--tune-trials"):
        api.plan("compile", model=api.DEMO_MODEL, target="pt2", tune_trials=2)
