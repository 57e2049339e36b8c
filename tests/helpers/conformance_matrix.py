"""The conformance matrix's machinery (``tests/test_conformance.py`` runs it; the recipe tests
run it on a format and a backend they register): the rules tables, the case graphs built through
the project pipeline, tie inputs and the LSB measure. See test_conformance.py for the criterion."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pytest
import torch
import torch.nn.functional as Fn
from torch import nn

import fliqs_compiler as fq
from fliqs_compiler import passes
from fliqs_compiler.backends import conformance as C
from fliqs_compiler.numerics import formats as F
from fliqs_compiler.numerics.quant import minmax_scale_zero_point, mse_scale
from fliqs_compiler.numerics.quantizers import FormatQuantizer
from qdq_net import lsb


ROLES = ("weight", "activation")
COMPANION = "int8"  # the other role's format in every case
INPUT_KINDS = ("data", "saturate", "ties")
PER_KIND = 16  # images per input kind (one batch of 48)
# float32 noise on a one-step difference: values k·s are rounded, so |ref − got| / s of one step
# is 1 ± |k|·2^-24 (fp16 outputs: |k| up to 2^11 → 1.2e-4); 2 steps stay 2.
LSB_SLACK = 1e-3
TIE_RANGE = 8.0  # |tie| bound, in input units (data is in [-1, 1]; wide fp grids reach 1e38)

# Why a (backend, format, role) cannot run ("*": every role). Skipped with this reason.
_NO_FP4 = "onnxruntime 1.32 has no FLOAT4E2M1 kernel (DequantizeLinear-23)"
UNSUPPORTED = {
    ("ort_default", "fp4_e2m1", "*"): _NO_FP4,
    ("ort_disable_all", "fp4_e2m1", "*"): _NO_FP4,
    **{("tvm", f, "activation"): "MX activations are not lowered to TVM (tvm_lower.ACT_RULES['mx'])"
       for f in F.names("mx")},
}


class Bug(NamedTuple):
    """A known bug: the case must FAIL (strict xfail) until the fix lands; then the entry goes.
    ``refuses``: the backend cannot load / run the graph at all, so the case gets a graph of its
    own (numeric bugs stay in the shared graph: its branches are independent)."""

    reason: str
    refuses: bool = False


# Measured on this matrix (max over data / saturate / ties, in output LSB; the report lists them).
# fp16 / bf16 / fp6 / MX activations into an int8-weight Linear were 2–1300 LSB in the default
# session until onnx_export.shield_weight_only_matmul (ORT's MatMulNBits at accuracy level 4
# re-quantized them to int8); mxint8 weights failed to run there (MatMulIntegerToFloat on the
# blocked int8 weight cannot broadcast its [2, N] scale) until onnx_export.shield_blocked_weight.
# Now every case is within 1 LSB; a new known bug is a ``Bug`` entry here.
XFAIL: dict = {}


# Every format the registry offers, and every artifact a backend executes, must be named here:
# a new one needs its rules (UNSUPPORTED / XFAIL entries, or none) decided, not defaulted.
REVIEWED_FORMATS = ("int2", "int3", "int4", "int5", "int6", "int7", "int8", "uint2", "uint3",
                    "uint4", "uint8", "fp4_e2m1", "fp6_e2m3", "fp6_e3m2", "fp8_e4m3", "fp8_e5m2",
                    "fp16", "bf16", "mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e2m3", "mxfp6_e3m2",
                    "mxfp4_e2m1", "mxint8", "float")
REVIEWED_BACKENDS = ("torch", "onnx_reference", "ort_default", "ort_disable_all", "tvm")
NOT_A_CASE = {"float": "no quantizer: nothing to conform (float ops run in every other case)"}


def rule(table: dict, backend: str, fmt: str, role: str):
    return table.get((backend, fmt, role), table.get((backend, fmt, "*")))


def case_formats() -> list:
    return [f for f in F.searchable_names() if f not in NOT_A_CASE]


def missing_rules(formats, backends) -> list:
    """Registry formats / backends nobody reviewed, and rules naming unknown ones."""
    gaps = [f"format {f}" for f in formats if f not in REVIEWED_FORMATS]
    gaps += [f"backend {b}" for b in backends if b not in REVIEWED_BACKENDS]
    for table in (UNSUPPORTED, XFAIL):
        gaps += [f"rule {k}" for k in table if k[0] not in backends or k[1] not in formats
                 or k[2] not in (*ROLES, "*")]
    return gaps


# ---- the model ----------------------------------------------------------------------------
class Branch(nn.Module):
    """1×8×8 → 10: every op kind, six quantizable layers (conv, dw conv, 1×1 conv on the
    residual, 1×1 conv on the concat, act×act MatMul, Linear)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.c2, self.c3 = nn.Conv2d(8, 8, 1), nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        p = Fn.max_pool2d(torch.relu(self.dw(h)), 2)  # read only by c2's activation quantizer:
        s = Fn.max_pool2d(h, 2)  # ORT's QDQ propagation moves that Q before the MaxPool
        r = torch.relu(self.c2(p) + s)
        t = torch.relu(self.c3(torch.cat([r, s], 1))).flatten(2)  # [B, 8, 16]
        # ReLU6 (a Clip) whose only reader is fc's activation quantizer, as in MobileNets
        return self.fc(Fn.relu6(torch.matmul(t, t.transpose(1, 2)).flatten(1) / 16))


LAYERS_PER_BRANCH = 6


class Bundle(nn.Module):
    """One Branch per case, the trained weights with a seeded 0.1 % jitter each; branch i reads
    input channel i. Why the jitter: the ONNX export shares identical initializers, and a shared
    weight changes which rewrites apply (``onnx_export.gemm_to_matmul`` needs a weight read by
    one DequantizeLinear; measured: identical branches hid ORT's MatMulNBits re-quantization of
    fp16 / bf16 / MX activations). Every branch must export as it would alone."""

    def __init__(self, n: int, state: dict):
        super().__init__()
        self.branches = nn.ModuleList(Branch() for _ in range(n))
        gen = torch.Generator().manual_seed(1)
        for b in self.branches:
            b.load_state_dict({k: v * (1 + 1e-3 * torch.randn(v.shape, generator=gen))
                               for k, v in state.items()})

    def forward(self, x):
        return tuple(b(x[:, i:i + 1]) for i, b in enumerate(self.branches))


def _digits() -> tuple:
    """sklearn digits as [N, 1, 8, 8] in [-1, 1], and the labels."""
    from sklearn.datasets import load_digits
    d = load_digits()
    return torch.tensor(d.images / 8.0 - 1.0, dtype=torch.float32)[:, None], torch.tensor(d.target)


def _train(x: torch.Tensor, y: torch.Tensor) -> dict:
    """150 seeded Adam steps on digits (~70 % held-out accuracy): weights and activations with
    the ranges of a trained network, not of an initialisation."""
    torch.manual_seed(0)
    m = Branch()
    opt = torch.optim.Adam(m.parameters(), 1e-2)
    for _ in range(150):
        idx = torch.randint(0, 1400, (64,))
        loss = Fn.cross_entropy(m(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.state_dict()


# ---- building a case graph through the pipeline ------------------------------------------
def _assignment(layer, fmt: str, role: str) -> dict:
    if layer.params == 0:  # act × act MatMul: both operands are activations
        f = fmt if role == "activation" else COMPANION
        return {"weight": f, "activation": f}
    return {"weight": fmt, "activation": COMPANION} if role == "weight" else \
        {"weight": COMPANION, "activation": fmt}


def output_format(fmt: str) -> str:
    """The output quantizer's format: the case's own, except MX → the companion int8 (MX
    activations do not lower to TVM and FP4, MXFP4's element, has no ORT kernel; the MX
    quantizers inside the branch are what the case tests)."""
    return COMPANION if F.get(fmt).is_blocked else F.get(fmt).name


def _output_quantizer(y: torch.Tensor, fmt: str) -> FormatQuantizer:
    fmt = output_format(fmt)
    f = F.get(fmt)
    if f.uses_zero_point:
        s, zp = minmax_scale_zero_point(y, fmt)
        return FormatQuantizer(fmt, s, zero_point=zp)
    return FormatQuantizer(fmt, mse_scale(y, fmt))


def _add_output_quantizers(graph, calib: torch.Tensor, cases: list) -> list:
    """Quantize each branch output in its case's format (scale calibrated on ``calib``):
    appended to the fx graph, so every exporter and lowering sees it like any quantizer."""
    with torch.no_grad():
        outs = graph(calib)
    gm = graph.gm
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    values = list(out_node.args[0])
    quantizers = []
    for i, ((fmt, _), v, y) in enumerate(zip(cases, values, outs)):
        q = _output_quantizer(y, fmt)
        gm.add_submodule(f"out{i}_q", q)
        with gm.graph.inserting_before(out_node):
            values[i] = gm.graph.call_module(f"out{i}_q", (v,))
        quantizers.append(q)
    out_node.args = (tuple(values),)
    gm.recompile()
    return quantizers


class CaseGraph:
    """A materialized graph holding ``cases`` (one branch each), its output quantizers and the
    input quantizer of each branch's first layer (where the ties are placed)."""

    def __init__(self, cases: list, state: dict, calib: torch.Tensor):
        self.cases = list(cases)
        n = len(cases)
        x = calib.repeat(1, n, 1, 1)
        graph = fq.load(Bundle(n, state).eval(), (x,))
        fmts = sorted({f for f, _ in cases} | {COMPANION})
        sg = passes.prepare(graph, passes.PrepareOptions(
            formats=fmts, tie_weight_activation=False, keep_float_first=False,
            keep_float_last=False, quantize_act_matmul=True, scale_mode="calibrated"))
        order = {node.name: i for i, node in enumerate(sg.gm.graph.nodes)}
        layers = sorted(sg.layers.values(), key=lambda L: order[L.node])
        assert len(layers) == LAYERS_PER_BRANCH * n, [L.name for L in layers]
        per_branch = [layers[i:i + LAYERS_PER_BRANCH]
                      for i in range(0, len(layers), LAYERS_PER_BRANCH)]
        config = {L.name: _assignment(L, fmt, role)
                  for (fmt, role), branch in zip(cases, per_branch) for L in branch}
        with torch.no_grad():  # calibrate the chosen formats' scales on the digits
            sg.space.apply(sg.gm, sg.space.choice_of(config))
            sg(x)
        self.graph = passes.materialize(sg, config)
        self.out_q = _add_output_quantizers(self.graph, x, cases)
        quantizers = self.graph.space.quantizers
        self.in_q = [self.graph.gm.get_submodule(quantizers[(b[0].name, "activation")])
                     for b in per_branch]

    def inputs(self, data: torch.Tensor) -> np.ndarray:
        """[3 × PER_KIND, branches, 8, 8]: data, data × 4, and per-branch ties."""
        n = len(self.cases)
        x = data.repeat(1, n, 1, 1)
        ties = torch.stack([torch.from_numpy(tie_points(q, PER_KIND * 64)).reshape(PER_KIND, 8, 8)
                            for q in self.in_q], 1)
        return torch.cat([x, 4 * x, ties]).numpy()


# ---- ties -------------------------------------------------------------------------------------
def grid(fmt: F.Format) -> np.ndarray:
    """Every finite value of ``fmt``'s unscaled grid, sorted (int: k × step)."""
    if fmt.has_integer_levels:
        return (np.arange(fmt.qmin, fmt.qmax + 1) * fmt.min_subnormal).astype(np.float32)
    codes = np.arange(2 ** fmt.bits, dtype=np.uint8 if fmt.bits <= 8 else np.uint16)
    v = codes.view(fmt.np_dtype).astype(np.float32)
    return np.unique(v[np.isfinite(v)])


def _exact_multiple(m: np.ndarray, s: np.float32) -> np.ndarray:
    """x within 2 float32 ulps of m × s with fl32(x / s) == m exactly (points without one are
    dropped)."""
    x0 = (m * s).astype(np.float32)
    candidates = [x0]
    for direction in (np.float32(np.inf), np.float32(-np.inf)):
        x = x0
        for _ in range(2):
            x = np.nextafter(x, direction)
            candidates.append(x)
    out = np.full_like(x0, np.nan)
    for x in candidates:
        ok = np.isnan(out) & ((x / s).astype(np.float32) == m)
        out[ok] = x[ok]
    return out[~np.isnan(out)]


def tie_points(q: FormatQuantizer, n: int) -> np.ndarray:
    """``n`` inputs of quantizer ``q`` on exact midpoints of its grid (cycled).

    int / fp: ``x / scale`` (+ zero point) is the midpoint of two neighbouring grid values.
    MX: a 1-channel input makes every block one element, whose E8M0 scale puts it in the
    element grid's top binade; the midpoints there, scaled by a power of two, are exact ties."""
    fmt = F.get(q.fmt)
    el = fmt.element_format()
    g = grid(el).astype(np.float64)
    mids = ((g[:-1] + g[1:]) / 2).astype(np.float32)  # exact: one bit more than the format
    if fmt.is_blocked:
        top = 2.0 ** F.emax_of(el)
        x = mids[np.abs(mids) >= top] * np.float32(2.0 ** -F.emax_of(el))
    else:
        s = np.float32(float(q.scale.reshape(-1)[0]))
        if q.zero_point is not None:
            mids = mids - np.float32(float(q.zero_point.reshape(-1)[0]))
        mids = mids[np.abs(mids.astype(np.float64) * s) <= TIE_RANGE]
        idx = np.unique(np.linspace(0, len(mids) - 1, min(len(mids), n)).astype(int))
        x = _exact_multiple(mids[idx], s)
    return np.resize(x.astype(np.float32), n)


# ---- measuring ----------------------------------------------------------------------------
def lsb_error(ref: np.ndarray, got: np.ndarray, q) -> float:
    """max |ref − got| in steps of ``q``'s grid (the coarser of the steps at ref and at got)."""
    step = np.maximum(lsb(ref, q), lsb(got, q))
    return float(np.max(np.abs(ref.astype(np.float64) - got) / step))


def errors(cg: CaseGraph, backend: str, x: np.ndarray, out_dir) -> list:
    """Per branch: {input kind: LSB error} of ``backend`` against the torch graph."""
    ref = C.load(C.REFERENCE, cg.graph, out_dir)([x])
    got = C.load(backend, cg.graph, out_dir)([x])
    assert len(got) == len(ref) == len(cg.cases)
    out = []
    for r, g, q in zip(ref, got, cg.out_q):
        assert g.shape == r.shape
        out.append({k: lsb_error(r[i * PER_KIND:(i + 1) * PER_KIND], np.asarray(g, np.float32)[
            i * PER_KIND:(i + 1) * PER_KIND], q) for i, k in enumerate(INPUT_KINDS)})
    return out


# ---- the matrix ---------------------------------------------------------------------------
def backends() -> list:
    """The runners under test: every registered one but the reference (plug-ins included)."""
    return [b for b in C.runners() if b != C.REFERENCE]


def runner(name: str):
    return C.runners()[name]


def cases() -> list:
    return [(f, r) for f in case_formats() for r in ROLES]


class Matrix:
    """Builds case graphs and artifacts on first use. The cases of one tier (fast / slow) share
    one graph per artifact kind — one ONNX export, one TVM compile — except those a backend of
    that artifact cannot run (``UNSUPPORTED``, ``Bug.refuses``): they get a graph of their own,
    so a session that refuses to load one case cannot take the others down with it."""

    def __init__(self, root):
        self.root = root
        digits, labels = _digits()
        self.state = _train(digits, labels)
        self.calib, self.data = digits[1400:1400 + 3 * PER_KIND], digits[1500:1500 + PER_KIND]
        self.graphs: dict = {}  # key -> CaseGraph
        self.results: dict = {}  # (backend, key) -> per-case errors, or the exception raised

    @staticmethod
    def group(kind: str, case: tuple) -> tuple:
        """(key, cases) of the graph that runs ``case`` on artifact ``kind``."""
        def isolated(c):
            return any((rule(UNSUPPORTED, b, *c) or getattr(rule(XFAIL, b, *c), "refuses", False))
                       for b in backends() if runner(b).artifact == kind)
        if isolated(case):
            return (kind, *case), [case]
        tier = _tier(case[0])
        return (kind, tier), [c for c in cases() if _tier(c[0]) == tier and not isolated(c)]

    def result(self, backend: str, fmt: str, role: str) -> dict:
        key, cases = self.group(runner(backend).artifact, (fmt, role))
        if (backend, key) not in self.results:  # failures are kept: one compile, not one per case
            try:
                if key not in self.graphs:
                    self.graphs[key] = CaseGraph(cases, self.state, self.calib)
                cg = self.graphs[key]
                out = self.root / "-".join(key)
                out.mkdir(parents=True, exist_ok=True)
                self.results[(backend, key)] = errors(cg, backend, cg.inputs(self.data), out)
            except Exception as e:  # noqa: BLE001 — re-raised for every case of the graph
                self.results[(backend, key)] = e
        got = self.results[(backend, key)]
        if isinstance(got, Exception):
            raise got
        return got[cases.index((fmt, role))]


# One format per way a backend realizes formats (README "What each backend executes"): Q/DQ
# int8, zero point, packed int4, decomposed int3, native fp8, FP4 LUT (no ORT kernel), bf16 and
# fp16 casts, MX blocks. The rest of the registry runs in the slow tier.
FAST_FORMATS = ("int8", "uint8", "int4", "int3", "fp8_e4m3", "fp4_e2m1", "bf16", "fp16",
                "mxfp4_e2m1")


def _tier(fmt: str) -> str:
    return "fast" if fmt in FAST_FORMATS else "slow"


def matrix_params():
    """One pytest param per (runner, format, role), with its skip / xfail / tier marks."""
    for fmt, role in cases():
        for backend in backends():
            marks = []
            why = rule(UNSUPPORTED, backend, fmt, role)
            if why:
                marks.append(pytest.mark.skip(reason=why))
            bug = rule(XFAIL, backend, fmt, role)
            if bug:
                marks.append(pytest.mark.xfail(strict=True, reason=bug.reason))
            if _tier(fmt) == "slow":
                marks.append(pytest.mark.slow)
            if runner(backend).artifact == "tvm":
                marks.append(pytest.mark.tvm)
            yield pytest.param(backend, fmt, role, marks=marks, id=f"{fmt}-{role}-{backend}")
