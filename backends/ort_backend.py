"""onnxruntime backend: sessions, running, timing, and numerics against the torch graph.

Every session uses ``intra_op_num_threads=threads`` (default 2, project rule) and one inter-op
thread, with all graph optimizations on (so QDQ patterns fuse into ORT's int8 kernels).
Three kinds: ``default_session`` is exactly what a user's ``ort.InferenceSession(path)`` runs
(the artifact check, ``check_numerics``); ``make_session`` (ours, used for latency) turns
``MatMulAddFusion`` off; ``make_session(exact=True)`` also turns off the rewrites that round on
purpose, so it measures the export itself.
``onnx.reference.ReferenceEvaluator`` is the fallback engine for models ORT cannot run
(FP4 E2M1 Q/DQ at opset 23: ORT 1.32 implements no FLOAT4E2M1 kernel).
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import onnxruntime as ort
import torch

from fliqs_compiler.base.errors import CheckFailed, FliqsError
from fliqs_compiler.numerics.qspec import QuantSpec
from fliqs_compiler.numerics.qspec import grid_step as qspec_grid_step
from fliqs_compiler.numerics.quantizers import FormatQuantizer

__all__ = ["QDQ_DISABLED_OPTIMIZERS", "EXACT_DISABLED_OPTIMIZERS", "DEFAULT_TOLERANCE_LSB",
           "make_session", "default_session", "run_onnx", "time_onnx", "compare", "ort_can_run",
           "to_numpy_inputs", "grid_step", "output_steps", "check_numerics", "check_artifact", "GraphReference"]

SessionOrPath = Union[str, Path, bytes, ort.InferenceSession]


# ORT graph rewrite turned off for QDQ models (see make_session): MatMulAddFusion folds
# MatMul+Add into Gemm before the QDQ fusions run, and a per-channel QDQ Gemm then stays float
# (measured, 2 threads: int8 128x1024x1024 0.70 ms as MatMul+Add, ~9-15 ms as Gemm).
QDQ_DISABLED_OPTIMIZERS = ("MatMulAddFusion",)
# Additionally off in ``exact`` sessions (numerics checks): WeightBiasQuantization rounds a
# float conv bias to int32 at scale s_x*s_w (what integer kernels do; it can flip a later
# rounding), and ReluQuantRewrite, which drops a Relu before a zero-point-0 QuantizeLinear.
# Exact sessions also set MatMulNBits' accuracy level to 0: by default ORT turns a DQ(int4
# weight)->MatMul into MatMulNBits with accuracy level 4, which quantizes the activations to
# int8 on the fly (measured: 3e-4 off on a model the exact session matches to 1.5e-8).
EXACT_DISABLED_OPTIMIZERS = ("WeightBiasQuantization", "ReluQuantRewrite")
EXACT_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "0"}
# Retried without when a session fails to build: QDQPropagationTransformer moves a 4-bit Q/DQ
# pair across MaxPool, and the QDQ selectors then leave MaxPool reading tensor(uint4), for
# which ORT 1.32 has no kernel (INVALID_GRAPH; seen on the demo model at int4). Our export no
# longer has that form (onnx_export.shield_unbuildable_q: a default session must load it too);
# the retry stays for QDQ models from elsewhere.
RETRY_DISABLED_OPTIMIZERS = ("QDQPropagationTransformer",)


def _is_qdq(path) -> bool:
    import onnx
    try:
        model = onnx.load_from_string(path) if isinstance(path, bytes) else \
            onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 — let the session report unreadable files
        return False
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


def make_session(path, threads: int = 2, disabled_optimizers=None,
                 exact: bool = False) -> ort.InferenceSession:
    """A CPU InferenceSession for ``path`` (file path or serialized model bytes), ``threads``
    intra-op threads, full graph optimization. For QDQ models ``disabled_optimizers`` defaults
    to ``QDQ_DISABLED_OPTIMIZERS`` (integer kernels for per-channel MatMul), plus
    ``EXACT_DISABLED_OPTIMIZERS`` with ``exact=True`` (the graph's own numerics, bit for bit).
    A file ORT cannot load is a FliqsError."""
    if disabled_optimizers is None:
        disabled_optimizers = []
        if _is_qdq(path):
            disabled_optimizers = list(QDQ_DISABLED_OPTIMIZERS)
            disabled_optimizers += list(EXACT_DISABLED_OPTIMIZERS) if exact else []
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    for key, value in (EXACT_CONFIG.items() if exact else ()):
        so.add_session_config_entry(key, value)
    src = path if isinstance(path, bytes) else str(path)
    attempts = [list(disabled_optimizers),
                list(disabled_optimizers) + list(RETRY_DISABLED_OPTIMIZERS)]
    for i, disabled in enumerate(attempts):
        try:
            return ort.InferenceSession(src, sess_options=so, providers=["CPUExecutionProvider"],
                                        disabled_optimizers=disabled)
        except Exception as e:  # noqa: BLE001 — ORT raises its own exception types
            if i + 1 < len(attempts) and "INVALID_GRAPH" in str(e):
                continue
            raise _load_error(path, e) from e


def _load_error(path, e: Exception) -> FliqsError:
    name = "<model bytes>" if isinstance(path, bytes) else str(path)
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return FliqsError(f"{name}: onnxruntime cannot load the model ({first[:300]}); "
                      "check the file or use engine='reference'")


def default_session(path, threads: int = 2) -> ort.InferenceSession:
    """The session a user gets from ``ort.InferenceSession(path)``: every default rewrite on,
    nothing disabled, no config entries; only the thread counts are set (project rule, they do
    not change numerics). A file it cannot load is a FliqsError."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(path if isinstance(path, bytes) else str(path),
                                    sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 — ORT raises its own exception types
        raise _load_error(path, e) from e


def ort_can_run(path) -> bool:
    """Whether onnxruntime can build a session for the model (False e.g. for FP4 Q/DQ)."""
    try:
        make_session(path, threads=1)
        return True
    except FliqsError:
        return False


def to_numpy_inputs(inputs) -> list:
    """Tensors / arrays / scalars → list of numpy arrays (float tensors stay float32)."""
    out = []
    for x in inputs:
        if torch.is_tensor(x):
            x = x.detach().cpu().numpy()
        out.append(np.ascontiguousarray(x))
    return out


def run_onnx(path_or_session: SessionOrPath, inputs: Sequence, engine: str = "ort",
             threads: int = 2, exact: bool = False) -> list:
    """Run the model on ``inputs`` (in graph-input order) → list of numpy outputs.

    ``engine``: 'ort' (default) or 'reference' (onnx.reference.ReferenceEvaluator; slow, but
    implements every standard type including FLOAT4E2M1). ``exact``: see ``make_session``.
    """
    arrays = to_numpy_inputs(inputs)
    if engine == "reference":
        import onnx
        from onnx.reference import ReferenceEvaluator
        if isinstance(path_or_session, ort.InferenceSession):
            raise ValueError("engine='reference' needs a model path, not an ORT session")
        model = onnx.load(str(path_or_session)) if not isinstance(path_or_session, bytes) \
            else onnx.load_from_string(path_or_session)
        ref = ReferenceEvaluator(model)
        names = [i.name for i in model.graph.input]
        return [np.asarray(o) for o in ref.run(None, dict(zip(names, arrays)))]
    if engine != "ort":
        raise ValueError(f"unknown engine {engine!r}: use 'ort' or 'reference'")
    sess = path_or_session if isinstance(path_or_session, ort.InferenceSession) \
        else make_session(path_or_session, threads, exact=exact)
    names = [i.name for i in sess.get_inputs()]
    if len(names) != len(arrays):
        raise FliqsError(f"the ONNX model takes {len(names)} inputs ({', '.join(names)}), "
                         f"got {len(arrays)}")
    return sess.run(None, dict(zip(names, arrays)))


def time_onnx(path: SessionOrPath, inputs: Sequence, threads: int = 2, repeat: int = 50,
              warmup: int = 5, min_time_s: float = 0.05) -> float:
    """Median wall time of one run in milliseconds (``warmup`` untimed runs, then at least
    ``repeat`` timed runs and at least ``min_time_s`` seconds)."""
    sess = path if isinstance(path, ort.InferenceSession) else make_session(path, threads)
    names = [i.name for i in sess.get_inputs()]
    feed = dict(zip(names, to_numpy_inputs(inputs)))
    for _ in range(warmup):
        sess.run(None, feed)
    times = []
    start = time.perf_counter()
    while len(times) < repeat or time.perf_counter() - start < min_time_s:
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t0)
        if len(times) > 100 * repeat:
            break
    return statistics.median(times) * 1e3


def _flatten(out) -> list:
    if torch.is_tensor(out):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flatten(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _flatten(o)]
    raise TypeError(f"unsupported graph output type {type(out).__name__}")


def _output_errors(ref: list, got: list, where) -> list:
    """Max |ref - got| per output (NaN in the same place on both sides counts as equal);
    output counts / shapes must agree (else a FliqsError)."""
    if len(ref) != len(got):
        raise FliqsError(f"{where}: {len(got)} outputs, the torch graph has {len(ref)}")
    errs = []
    for i, (r, g) in enumerate(zip(ref, got)):
        g = np.asarray(g, dtype=np.float32)
        if r.shape != g.shape:
            raise FliqsError(f"{where}: output {i} has shape {g.shape}, torch {r.shape}")
        d = np.where(np.isnan(r) & np.isnan(g), 0.0, np.abs(r - g))
        errs.append(float(np.max(d)) if d.size else 0.0)
    return errs


def _torch_outputs(graph, inputs) -> list:
    tensors = [torch.as_tensor(np.asarray(x)) if not torch.is_tensor(x) else x for x in inputs]
    with torch.no_grad():
        return [t.detach().float().numpy() for t in _flatten(graph(*tensors))]


def compare(graph, onnx_path, inputs, engine: str = "ort", threads: int = 2,
            exact: bool = True) -> float:
    """Max absolute difference between the torch graph and the ONNX model over all outputs.

    ``onnx_path``: a path, model bytes or an ORT session (e.g. ``default_session``).
    ``inputs``: tensors or arrays in graph-input order. Output counts/shapes must agree
    (a mismatch is a FliqsError). NaN in the same place on both sides counts as equal.
    ``exact`` (default): an ORT session without the rewrites that change numerics on purpose
    (int32 bias rounding), so the number measures the export, not ORT's deployment rounding.
    """
    torch.set_num_threads(threads)
    got = run_onnx(onnx_path, inputs, engine=engine, threads=threads, exact=exact)
    return max(_output_errors(_torch_outputs(graph, inputs), got, onnx_path), default=0.0)


# ---- the artifact check: a default session against the torch graph, in output LSBs ------------
# A default session may deviate from the graph by this many output LSBs (``output_steps``).
# Two of its rewrites round on purpose, and the export keeps them because they are ORT's own
# integer kernels: WeightBiasQuantization's int32 bias at s_x*s_w of a conv that becomes
# QLinearConv, and MatMulNBits (DQ(4-bit weight) -> MatMul), which at the default accuracy
# level 4 quantizes its activations to int8 on the fly; each flips single roundings of a later
# quantizer (measured: <= 1 LSB of the output quantizer, e.g. int8 QLinearConv 0.2 % of the
# outputs one step off, int3/int4-weight Linear 1 LSB). Measured end to end (digits CNNs, 37
# mixed configs of int8/int4/fp8/bf16 and of int3/uint4/uint8/fp16/fp8_e5m2/mxfp4 too, held-out
# and x3 inputs, while the export fixes landed): at most 0.8 LSB (one config at 1.6 until
# detach_float_bias looked at the conv's output quantizer: then 0.54); the dropped Relu of the
# issue was 10-15 LSB, the FP8 Gemm bias overflow 34, the 4-bit conv bias rounding 4.4.
DEFAULT_TOLERANCE_LSB = 2.0
# The LSB of an output no quantizer precedes (a float model): this fraction of the output's
# range, fp16 resolution; float reassociation (fused kernels, other summation orders) is all a
# default session changes there.
FLOAT_ONLY_UNIT = 2.0 ** -10
# A few output rows may exceed the tolerance in the default AND the unoptimized session alike:
# a float op both compute differently from torch (LayerNorm, softmax: ~1e-7 apart) puts one value
# on the other side of a later quantizer's rounding boundary, and in a deep stack of quantized
# layers that one flipped code propagates (measured: an all-int8 ViT on digits, one of 400 rows,
# a single LayerNorm output 3.9e-7 apart flipped 1 code of the next quantizer and 138 codes of the
# last one: 2.1 output LSB, identical in both sessions). An export error or a rewrite that
# changes the semantics moves most rows, or only the default session's.
CASCADE_ROW_SHARE = 0.25


def grid_step(fmt_name: str, scale, magnitude) -> np.ndarray:
    """One step of format ``fmt_name``'s grid (scaled by the largest of ``scale``) at each
    ``magnitude`` (``numerics.qspec.grid_step``: int: the scale; fp: the ulp at that value; MX:
    one step of the block's largest element, an upper bound)."""
    return qspec_grid_step(fmt_name, scale, magnitude)


class _StepRecorder(torch.fx.Interpreter):
    """Runs the fx graph and keeps, per activation quantizer node, its format's grid step at
    the largest magnitude it produced (``grid_step``)."""

    def __init__(self, gm):
        super().__init__(gm)
        self.steps: dict = {}

    def _activation_quantizer(self, n):
        """The QuantSpec of an activation quantizer node (module or fake_quant call), else None."""
        spec = None
        if n.op == "call_module":
            m = self.fetch_attr(n.target)
            if isinstance(m, FormatQuantizer) and m.role == "activation":
                spec = QuantSpec.of(m)
        elif n.op == "call_function" and n.target is torch.ops.fliqs.fake_quant.default \
                and getattr(n.args[0], "op", None) != "get_attr":  # get_attr input: a weight
            args, _ = self.fetch_args_kwargs_from_env(n)
            spec = QuantSpec.from_call(args[3], args[1], args[2], args[4])
        return spec if spec is not None and spec.fmt.is_quantized else None

    def run_node(self, n):
        out = super().run_node(n)
        q = self._activation_quantizer(n)
        if q is not None and torch.is_tensor(out) and out.numel():
            step = float(q.grid_step(out.detach().abs().max().item()))
            self.steps[n] = max(self.steps.get(n, 0.0), step)
        return out


def _ancestors(node) -> set:
    seen, todo = set(), [node]
    while todo:
        for a in todo.pop().all_input_nodes:
            if a not in seen:
                seen.add(a)
                todo.append(a)
    return seen


def output_steps(graph, input_lists) -> list:
    """The LSB of each graph output: one grid step of the LAST activation quantizer on the path
    to that output (topological order), at the largest magnitude it produces on
    ``input_lists``. For an output that is itself quantized this is exactly its grid step; for
    a float layer after it (logits of a Gemm) it is the step the layer's input moves by when
    one rounding flips. Outputs with no quantizer before them: None."""
    rec = _StepRecorder(graph.gm)
    with torch.no_grad():
        for inputs in input_lists:
            rec.run(*[torch.as_tensor(np.asarray(x)) for x in inputs])
    order = {n: i for i, n in enumerate(graph.gm.graph.nodes)}
    out_node = next(n for n in graph.gm.graph.nodes if n.op == "output")
    steps = []
    for leaf in _flatten_nodes(out_node.args[0]):
        before = [n for n in _ancestors(leaf) | {leaf} if n in rec.steps]
        steps.append(rec.steps[max(before, key=order.get)] if before else None)
    return steps


def _flatten_nodes(arg) -> list:
    if isinstance(arg, (list, tuple)):
        return [n for a in arg for n in _flatten_nodes(a)]
    if isinstance(arg, dict):
        return [n for a in arg.values() for n in _flatten_nodes(a)]
    return [arg] if isinstance(arg, torch.fx.Node) else []


def _row_errors(ref: list, got: list, where) -> list:
    """Per output, max |ref - got| per batch row (axis 0; a 0-d output is one row)."""
    _output_errors(ref, got, where)  # counts and shapes checked, one message
    rows = []
    for r, g in zip(ref, got):
        d = np.where(np.isnan(r) & np.isnan(g), 0.0, np.abs(r - np.asarray(g, np.float32)))
        d = d.reshape(d.shape[0] if d.ndim else 1, -1)
        rows.append(d.max(axis=1) if d.size else np.zeros(len(d)))
    return rows


def deviation_verdict(default_lsb, exact_lsb, tolerance_lsb: float) -> Optional[str]:
    """Why per-row deviations (output LSBs of the default and the unoptimized session, same
    rows) make the artifact wrong, or None: a row beyond the tolerance in the default session
    only (an onnxruntime rewrite changes the result), or more than ``CASCADE_ROW_SHARE`` of the
    rows beyond it in both."""
    default_lsb, exact_lsb = np.asarray(default_lsb), np.asarray(exact_lsb)
    over = default_lsb > tolerance_lsb
    if (over & (exact_lsb <= tolerance_lsb)).any():
        return "where the unoptimized session does not: an onnxruntime rewrite changes the result"
    if over.sum() > CASCADE_ROW_SHARE * max(1, over.size):
        return f"on {int(over.sum())} of {over.size} output rows"
    return None


class GraphReference:
    """The torch graph's outputs and output LSBs on ``input_lists``, computed once (on first use)
    and shared by every artifact checked against them (the QDQ model, then the TVM ``.so``).
    ``lsb_rows(outputs per input list, where) -> (per-row deviation in output LSBs, max |err|)``:
    each output's LSB is ``output_steps``' (``FLOAT_ONLY_UNIT`` of its range where no quantizer
    precedes it); rows are batch rows × outputs × input lists."""

    def __init__(self, graph, input_lists):
        self.graph, self.input_lists = graph, input_lists
        self._refs = self._units = None

    def _measure(self) -> None:
        steps = output_steps(self.graph, self.input_lists)
        self._refs = [_torch_outputs(self.graph, inputs) for inputs in self.input_lists]
        scale = [max((float(np.max(np.abs(ref[i]), initial=0.0)) for ref in self._refs), default=0.0)
                 for i in range(len(steps))]
        self._units = [st if st else max(m, 1e-30) * FLOAT_ONLY_UNIT for st, m in zip(steps, scale)]

    def lsb_rows(self, got_lists, where):
        if self._refs is None:
            self._measure()
        per_input = [_row_errors(ref, got, where) for ref, got in zip(self._refs, got_lists)]
        in_lsb = np.concatenate([e / u for per in per_input for e, u in zip(per, self._units)]
                                or [np.zeros(0)])
        worst = max((float(e.max(initial=0.0)) for per in per_input for e in per), default=0.0)
        return in_lsb, worst


def check_artifact(graph, where: str, input_lists, outputs, tolerance_lsb: float = DEFAULT_TOLERANCE_LSB,
                   reference: Optional[GraphReference] = None) -> dict:
    """An artifact other than the QDQ model (a TVM ``.so`` run in a fresh VM) against the torch
    graph: ``outputs`` are its outputs on each of ``input_lists``. Returns ``{"err", "lsb"}``
    (max |err|, largest deviation in output LSBs). Raises ``CheckFailed`` when more than
    ``CASCADE_ROW_SHARE`` of the output rows deviate beyond ``tolerance_lsb``: a compiler that
    miscompiles a kernel moves most rows (seen: TVM 0.27's LLVM vectorizing a fused broadcast read
    ``B[i, 0, j % 8]`` as a contiguous 16-lane load on znver4; 21-31 LSB). ``reference``: the
    graph's outputs on ``input_lists`` when already computed (``GraphReference``)."""
    reference = reference or GraphReference(graph, input_lists)
    in_lsb, worst = reference.lsb_rows(outputs, where)
    over = in_lsb > tolerance_lsb
    lsb = float(in_lsb.max(initial=0.0))
    if over.sum() > CASCADE_ROW_SHARE * max(1, over.size):
        raise CheckFailed(f"{where}: the artifact deviates from the quantized graph by {lsb:.1f} "
                          f"output LSBs (max |err| {worst:.3g}, tolerance {tolerance_lsb:g} LSB) on "
                          f"{int(over.sum())} of {over.size} output rows; the artifact is wrong for "
                          "users, report it with the model (--target ort builds the checked QDQ model "
                          "alone)")
    return {"err": worst, "lsb": lsb}


def check_numerics(graph, onnx_path, input_lists, threads: int = 2,
                   tolerance_lsb: float = DEFAULT_TOLERANCE_LSB,
                   reference: Optional[GraphReference] = None) -> dict:
    """The artifact check: a ``default_session`` (what users run) and our exact session
    against the torch graph on every input list of ``input_lists``.

    Returns ``{"default_err", "exact_err", "default_lsb", "cascade_rows", "rows"}``: max |err| of
    each session over all outputs and inputs, the default session's largest error in output
    LSBs (``output_steps``; ``FLOAT_ONLY_UNIT`` of the output's range where no quantizer
    precedes it), and how many output rows (batch rows × outputs) deviate beyond the tolerance
    in BOTH sessions. Raises ``CheckFailed`` (one line) when a default session cannot load the
    model, when a row deviates beyond ``tolerance_lsb`` in the default session but not in the
    exact one (an onnxruntime rewrite changes the result), or when more than
    ``CASCADE_ROW_SHARE`` of the rows deviate beyond it (``CASCADE_ROW_SHARE`` says why a few
    may). ``reference``: the graph's outputs on ``input_lists`` when already computed.
    """
    torch.set_num_threads(threads)
    try:
        default = default_session(onnx_path, threads)
    except FliqsError as e:
        raise CheckFailed(f"{onnx_path}: a default onnxruntime.InferenceSession cannot load "
                          f"the artifact ({str(e)[:200]})") from e
    exact = make_session(onnx_path, threads, exact=True)
    reference = reference or GraphReference(graph, input_lists)
    in_lsb, worst = {}, {}
    for kind, sess in (("default", default), ("exact", exact)):
        in_lsb[kind], worst[kind] = reference.lsb_rows([run_onnx(sess, inputs, threads=threads)
                                            for inputs in input_lists], onnx_path)
    lsb = float(in_lsb["default"].max(initial=0.0))
    over = in_lsb["default"] > tolerance_lsb
    why = deviation_verdict(in_lsb["default"], in_lsb["exact"], tolerance_lsb)
    if why is not None:
        raise CheckFailed(f"{onnx_path}: a default onnxruntime session deviates from the "
                          f"quantized graph by {lsb:.1f} output LSBs (max |err| "
                          f"{worst['default']:.3g}, tolerance {tolerance_lsb:g} "
                          f"LSB) {why}; the artifact is wrong for users, report it with the model")
    return {"default_err": worst["default"], "exact_err": worst["exact"], "default_lsb": lsb,
            "cascade_rows": int(over.sum()), "rows": int(over.size)}
