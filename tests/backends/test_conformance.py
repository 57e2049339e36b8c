"""Conformance matrix: every searchable format × role × backend agrees with the torch fake-quant
graph within ONE step (LSB) of the output quantizer.

The graphs are built by the project pipeline (``fq.load`` → ``passes.prepare`` → calibrate →
``passes.materialize``) from a small CNN trained on sklearn digits that holds every op kind the
compiler handles: conv, depthwise conv, MaxPool after the quantized activation (4-bit formats
included), residual Add, Concat, activation × activation MatMul, Linear. Each case (format,
role) is one branch: role ``weight`` puts the format on every weight (activations int8), role
``activation`` on every activation, both MatMul operands included (weights int8). Each branch
output gets an output quantizer in the case's format (``output_format``; calibrated), whose grid
step is the unit of the criterion (``test_onnx_export.lsb``: int → the scale; fp → the spacing
of the grid at the value, ulp × scale).

Inputs, one batch: held-out digits (``data``), the same ×4 (``saturate``: beyond the calibrated
range of every quantizer), and ``ties``: values on exact midpoints of the first activation
quantizer's grid (``x / scale`` is the midpoint in float32, so round-half-even is what decides).

Backends come from ``fliqs_compiler.backends.conformance.BACKENDS``. The cases of a tier share one graph
per artifact — one ``model.qdq.onnx`` for the ONNX backends, one TVM compile (seconds each; the
branches are independent) — except cases a backend of that artifact cannot run (``UNSUPPORTED``,
``Bug.refuses``): they get a graph of their own, so one refusal cannot hide the other cases.
The fast tier (``FAST_FORMATS``: one format per way a backend realizes formats) runs in the
default suite, the rest of the registry under ``-m slow``.
``UNSUPPORTED`` (skips, with the reason) and ``XFAIL`` (known bugs, strict) are data; a format or
backend the registries gain without rules here fails ``test_rules_cover_every_format_and_backend``.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as Fn
from torch import nn

from conformance_matrix import (LSB_SLACK, Matrix, case_formats, grid, matrix_params,
                                missing_rules, tie_points)
from fliqs_compiler.backends import conformance as C
from fliqs_compiler.numerics import formats as F
from fliqs_compiler.numerics.quantizers import FormatQuantizer


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    # numerics only, no timing: one intra-op thread. On a loaded 2-core box the pool's wake-ups
    # cost 100× the work of these tiny tensors (measured: torch.round on 8k floats 1.1 ms with
    # 2 threads, 9 µs with 1), and the results do not depend on it.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Matrix(tmp_path_factory.mktemp("conformance"))
    torch.set_num_threads(threads)


@pytest.mark.parametrize("backend,fmt,role", list(matrix_params()))
def test_backend_within_one_lsb_of_torch(matrix, backend, fmt, role):
    err = matrix.result(backend, fmt, role)
    assert max(err.values()) <= 1.0 + LSB_SLACK, err


# ---- the rules tables ---------------------------------------------------------------------
def test_rules_cover_every_format_and_backend():
    assert missing_rules(F.searchable_names(), list(C.BACKENDS)) == []


def test_an_unreviewed_format_or_backend_fails_the_rules_check(monkeypatch):
    from dataclasses import replace
    monkeypatch.setitem(F._REGISTRY, "int9", replace(F.get("int8"), name="int9", bits=9))
    monkeypatch.setitem(C.BACKENDS, "tflite", C.BACKENDS["onnx_reference"])
    gaps = missing_rules(F.searchable_names(), list(C.BACKENDS))
    assert gaps == ["format int9", "backend tflite"]
    assert "int9" in case_formats()  # and the matrix would parametrize it


@pytest.mark.parametrize("fmt", case_formats())
def test_tie_points_are_exact_midpoints(fmt):
    """The ``ties`` inputs: ``x / scale`` lies exactly halfway between two neighbouring grid
    values (checked in float32, the arithmetic every backend uses)."""
    f = F.get(fmt)
    scale = torch.ones(1) if f.is_blocked else torch.tensor([0.0123457])
    zp = torch.tensor([3.0]) if f.uses_zero_point else None
    q = FormatQuantizer(fmt, scale, zero_point=zp)
    x = tie_points(q, 512)
    v = (x / np.float32(scale.item())).astype(np.float32) + np.float32(0 if zp is None else 3)
    el = f.element_format()
    if f.is_blocked:  # one-element blocks: v in [2^emax, 2^(emax+1)) after the E8M0 scale
        v = v * np.float32(2.0 ** F.emax_of(el))
    g = grid(el)
    hi = np.searchsorted(g, v)
    assert len(x) == 512 and np.all((hi > 0) & (hi < len(g)))
    np.testing.assert_array_equal(v - g[hi - 1], g[hi] - v)


# ---- TVM at exact ties with learned (LSQ-like) scales --------------------------------------
LSQ_SCALE = 0.0123457  # arbitrary, not a power of two: x / s is inexact for most x


class _TieModel(nn.Module):
    """Output i: quantizer i (one per int / fp format, LSQ-like scale) on input row i; last
    output: an int8 1×1 conv (odd codes × odd codes) requantized at 2·s_x·s_w, so every real
    value is an exact .5 tie of the output grid (what a learned scale pair can land near)."""

    def __init__(self, fmts):
        super().__init__()
        self.qs = nn.ModuleList(FormatQuantizer(f, torch.tensor([LSQ_SCALE]), zero_point=(
            torch.tensor([3.0]) if F.get(f).uses_zero_point else None))
            for f in fmts)
        sw = 0.00731
        odd = torch.arange(-15, 17, 2, dtype=torch.float32)
        self.w = nn.Parameter(odd.reshape(16, 1, 1, 1) * sw)
        self.aq = FormatQuantizer("int8", torch.tensor([LSQ_SCALE]))
        self.wq = FormatQuantizer("int8", torch.tensor([sw]), role="weight")
        p = np.float32(np.float32(LSQ_SCALE) * np.float32(sw))
        self.oq = FormatQuantizer("int8", torch.tensor([float(2 * p)]))

    def forward(self, rows, img):
        outs = tuple(q(rows[i]) for i, q in enumerate(self.qs))
        return outs + (self.oq(Fn.conv2d(self.aq(img), self.wq(self.w))),)


@pytest.mark.tvm
@pytest.mark.parametrize("fuse", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_tvm_lsq_scale_ties(fuse):
    """Run-time quantizers: TVM equals torch fake-quant BIT FOR BIT on exact midpoints with an
    arbitrary scale, every int / fp format (``fdiv`` by the same f32 scale, ``nearbyint`` =
    round half even; a reciprocal multiply or round-half-away would flip ties here), with and
    without operator fusion.

    Integer conv → requantize: TVM accumulates exactly in int32 and rescales once, fl(fl(acc) ·
    fl(s_x·s_w)); torch runs an fp32 conv of dequantized values, fl(fl(k_x·s_x)·fl(k_w·s_w))
    summed in oneDNN's order. On exact .5 ties of the next quantizer the two float values fall
    on either side (measured: 44 of 172 ties differ) — ONE step of that quantizer, never more,
    and TVM's exact accumulation keeps round-half-even at least as often as the reference. This
    is the documented contract of the integer kernels (tvm_lower COMPUTE_RULES), not a bug."""
    from fliqs_compiler.backends.tvm_lower import lower
    from fliqs_compiler.ir.graph import Graph, InputSpec
    fmts = [f for f in case_formats() if F.get(f).has_scale]
    m = _TieModel(fmts).eval()
    rows = torch.stack([torch.from_numpy(tie_points(q, 1024)) for q in m.qs])
    odd = torch.arange(-127, 129, 2, dtype=torch.float32).repeat(2)
    img = (odd * LSQ_SCALE).reshape(1, 1, 16, 16)
    g = Graph(torch.fx.symbolic_trace(m), [InputSpec("rows", tuple(rows.shape)),
                                            InputSpec("img", (1, 1, 16, 16))])
    got = lower(g, "llvm", fuse=fuse).run([rows.numpy(), img.numpy()])
    with torch.no_grad():
        ref = [r.numpy() for r in m(rows, img)]
    for f, r, o in zip(fmts, ref, got):
        np.testing.assert_array_equal(o, r, err_msg=f)
    step = float(m.oq.scale)
    kw = (m.wq(m.w).detach() / float(m.wq.scale)).round().reshape(1, 16, 1, 1)
    real = (img / LSQ_SCALE).round() * kw
    ties = (real.abs() / 2 < 127).numpy()  # in range; each value real/2 is a .5 tie
    codes_ref, codes_tvm = np.round(ref[-1] / step), np.round(got[-1] / step)
    assert np.abs(codes_ref - codes_tvm).max() <= 1
    assert (codes_tvm[ties] % 2 == 0).mean() >= (codes_ref[ties] % 2 == 0).mean()
