"""onnxruntime backend: sessions, running, timing, and numerics against the torch graph.

Every session uses ``intra_op_num_threads=threads`` (default 2, project rule) and one inter-op
thread, with all graph optimizations on (so QDQ patterns fuse into ORT's int8 kernels).
``onnx.reference.ReferenceEvaluator`` is the fallback engine for models ORT cannot run
(FP4 E2M1 Q/DQ at opset 23: ORT 1.32 implements no FLOAT4E2M1 kernel).
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import onnxruntime as ort
import torch

from fliqs_compiler.errors import FliqsError

__all__ = ["QDQ_DISABLED_OPTIMIZERS", "EXACT_DISABLED_OPTIMIZERS", "make_session", "run_onnx",
           "time_onnx", "compare", "ort_can_run", "to_numpy_inputs"]

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
# which ORT 1.32 has no kernel (INVALID_GRAPH; seen on the demo model at int4).
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
            name = "<model bytes>" if isinstance(path, bytes) else str(path)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise FliqsError(f"{name}: onnxruntime cannot load the model ({first[:300]}); "
                             "check the file or use engine='reference'") from e


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


def compare(graph, onnx_path, inputs, engine: str = "ort", threads: int = 2,
            exact: bool = True) -> float:
    """Max absolute difference between the torch graph and the ONNX model over all outputs.

    ``inputs``: tensors or arrays in graph-input order. Output counts/shapes must agree
    (a mismatch is a FliqsError). NaN in the same place on both sides counts as equal.
    ``exact`` (default): an ORT session without the rewrites that change numerics on purpose
    (int32 bias rounding), so the number measures the export, not ORT's deployment rounding.
    """
    torch.set_num_threads(threads)
    tensors = [torch.as_tensor(np.asarray(x)) if not torch.is_tensor(x) else x for x in inputs]
    with torch.no_grad():
        ref = [t.detach().float().numpy() for t in _flatten(graph(*tensors))]
    got = run_onnx(onnx_path, tensors, engine=engine, threads=threads, exact=exact)
    if len(ref) != len(got):
        raise FliqsError(f"{onnx_path}: {len(got)} outputs, the torch graph has {len(ref)}")
    err = 0.0
    for i, (r, g) in enumerate(zip(ref, got)):
        g = np.asarray(g, dtype=np.float32)
        if r.shape != g.shape:
            raise FliqsError(f"{onnx_path}: output {i} has shape {g.shape}, torch {r.shape}")
        both_nan = np.isnan(r) & np.isnan(g)
        d = np.where(both_nan, 0.0, np.abs(r - g))
        err = max(err, float(np.max(d)) if d.size else 0.0)
    return err
