"""Per-layer latency tables: measured milliseconds per (layer shape, weight format, activation
format) on a target, cached on disk, and the onnxruntime measure function.

``LatencyTable`` implements ``fliqs_compiler.cost.model.LatencyModel``. Entries are keyed by
(target, ``LayerInfo.signature()``, fmt_w, fmt_a, backend, thread count, versions of torch /
onnxruntime / tvm), so a library upgrade re-measures instead of reusing stale numbers. The cache is one JSON
file per (target, backend) under ``cache_dir`` (default ``$FLIQS_CACHE_DIR`` or
``~/.cache/fliqs/latency``), rewritten atomically after every measured entry (an interrupted
``build`` keeps everything measured so far). Writers merge with what is on disk, so two
processes filling the same table lose nothing but a duplicate measurement.

``ort_layer_ms`` times a one-layer QDQ micro-graph (conv / conv-transpose / linear / matmul
with the layer's shapes and attributes; activation Q/DQ in ``fmt_a`` on the input and on the
output, weight stored quantized in ``fmt_w``) in onnxruntime, built with ``onnx.helper``, the
exporter's own ``spec_nodes`` and all of its ``ORT_FORM_FIXES``, so it has the form
``export_qdq`` produces.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from fliqs_compiler.numerics import formats as F
from fliqs_compiler.base import atomic
from fliqs_compiler.base.errors import FliqsError
from fliqs_compiler.ir.graph import Graph, LayerInfo
from fliqs_compiler.cost.model import costed_layers
from fliqs_compiler.numerics.qspec import QuantSpec

from fliqs_compiler.backends.onnx_export import ORT_FORM_FIXES, spec_nodes
from fliqs_compiler.backends.ort_backend import make_session, time_onnx
from fliqs_compiler.backends.targets import default_threads

__all__ = ["LatencyTable", "ort_layer_ms", "layer_micrograph", "default_cache_dir",
           "library_versions"]

MeasureFn = Callable[[LayerInfo, str, str], float]


def default_cache_dir() -> Path:
    """``$FLIQS_CACHE_DIR/latency`` if set, else ``~/.cache/fliqs/latency``."""
    env = os.environ.get("FLIQS_CACHE_DIR")
    return Path(env) / "latency" if env else Path.home() / ".cache" / "fliqs" / "latency"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "none"


# The form of the measured micro-graphs; bumped when it changes, so old entries are re-measured
# (2: every ORT_FORM_FIXES rewrite applied, a rank-2 linear exported as Gemm like export_qdq;
# 3: shield_weight_only_matmul joined them; 4: a quantized MatMul's bias written as Sub;
# 5: TVM micro-graphs fused and rule-scheduled by tvm_schedules, like the artifact;
# 6: bf16-exact layers (fp8 / bf16 / ...) on the avx512bf16 kernel, tvm_bf16, where the target has it;
# 7: float layers on the fp32 FMA kernel, tvm_fp32, and convs in the layout lower() runs the model
# in with any hand kernel, not only VNNI: tvm_measure.model_layout;
# 8: int4 / int2 weights packed inside the VNNI kernels, tvm_packed_weights;
# 9: conv epilogues fused into the kernels' write-back, tvm_epilogue;
# 10: erf / exp / tanh and GELU, sigmoid, SiLU, softmax as vectorized polynomials, tvm_fast_math;
# 11: the dense kernels write the layer's leading dims and take their Linear's epilogue, and
# depthwise convs run in NHWC, tvm_layout.depthwise; 12: quantizers' rounding vectorized,
# tvm_compat.vectorizable_nearbyint, and pools read their input without a padded copy).
MICROGRAPH_FORM = "12"


def library_versions() -> dict:
    """Versions that invalidate measurements (read from package metadata; imports nothing),
    with the micro-graph form (``MICROGRAPH_FORM``)."""
    return {"torch": torch.__version__, "onnxruntime": _version("onnxruntime"),
            "tvm": _version("apache-tvm"), "micrograph": MICROGRAPH_FORM}


class LatencyTable:
    """Measured per-layer latencies for one target and backend, cached as JSON on disk.

    ``layer_ms(layer, fmt_w, fmt_a)`` returns a cached measurement (FliqsError if missing:
    run ``build`` / ``fliqs profile`` first). ``build(graph, format_pairs, measure_fn)`` fills the
    missing entries, one ``measure_fn(layer, fmt_w, fmt_a) -> ms`` call per distinct
    (signature, fmt_w, fmt_a), saving after each.
    """

    def __init__(self, target_key: str, backend: str, cache_dir: Optional[Path] = None,
                 threads: Optional[int] = None):
        self.target_key, self.backend = str(target_key), str(backend)
        self.threads = int(threads) if threads is not None else default_threads()
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.versions = library_versions()
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.target_key)[:60]
        digest = hashlib.sha1(self.target_key.encode()).hexdigest()[:10]
        safe_backend = re.sub(r"[^A-Za-z0-9_-]+", "_", self.backend)
        self.path = self.cache_dir / f"{stem}-{digest}.{safe_backend}.json"
        self.entries: dict = self._read()
        self.measured = 0  # entries measured by this object (tests / progress reports)
        self.measured_on: dict = {}  # entry key → the remote device (HOST:PORT) that measured it

    # -- keys and persistence -----------------------------------------------------------------
    def key(self, layer: LayerInfo, fmt_w: str, fmt_a: str) -> str:
        """The cache key: every field that changes the measurement, as canonical JSON."""
        return json.dumps([self.target_key, layer.signature(), F.get(fmt_w).name,
                           F.get(fmt_a).name, self.backend, self.threads, self.versions],
                          sort_keys=True)

    def _read(self) -> dict:
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise FliqsError(f"{self.path}: unreadable latency cache ({e}); delete the file to "
                             "re-measure") from None
        return {e["key"]: e for e in data.get("entries", [])}

    def save(self) -> Path:
        """Merge with the file on disk (other writers) and write it atomically."""
        merged = {**self._read(), **self.entries}
        self.entries = merged
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        body = {"target": self.target_key, "backend": self.backend,
                "entries": sorted(merged.values(), key=lambda e: e["key"])}
        return atomic.write_text(self.path, json.dumps(body, indent=1))

    # -- LatencyModel ---------------------------------------------------------------------------
    def has(self, layer: LayerInfo, fmt_w: str, fmt_a: str) -> bool:
        """Whether a measurement for (layer signature, fmt_w, fmt_a) is cached."""
        return self.key(layer, fmt_w, fmt_a) in self.entries

    def layer_ms(self, layer: LayerInfo, fmt_w: str, fmt_a: str) -> float:
        entry = self.entries.get(self.key(layer, fmt_w, fmt_a))
        if entry is None:
            raise FliqsError(f"latency table {self.path}: no measurement for layer {layer.name!r} "
                             f"(weight {fmt_w}, activation {fmt_a}) on {self.target_key}; run "
                             "`fliqs profile` for this model and target")
        return float(entry["ms"])

    def record(self, layer: LayerInfo, fmt_w: str, fmt_a: str, ms: float) -> None:
        """Store one measurement and save the table."""
        ms = float(ms)
        if not np.isfinite(ms) or ms <= 0:
            raise ValueError(f"latency of {layer.name} ({fmt_w}/{fmt_a}) must be > 0, got {ms}")
        k = self.key(layer, fmt_w, fmt_a)
        self.entries[k] = {"key": k, "signature": layer.signature(), "op": layer.op,
                           "fmt_w": F.get(fmt_w).name, "fmt_a": F.get(fmt_a).name, "ms": ms,
                           "threads": self.threads, "versions": self.versions}
        self.save()

    def build(self, graph: Graph, format_pairs: Union[Iterable, dict], measure_fn: MeasureFn,
              progress: bool = True, layers: Optional[Iterable[LayerInfo]] = None) -> int:
        """Measure every missing (layer, fmt_w, fmt_a) and return how many were measured.

        ``format_pairs``: ``[(fmt_w, fmt_a), ...]`` for every searched layer, or
        ``{layer name: [(fmt_w, fmt_a), ...]}``. ``layers`` defaults to
        ``cost.model.costed_layers(graph)`` (input-only layers cost nothing: no entry). Layers
        with equal signatures are measured once.
        """
        todo, seen = [], set()
        for layer in (list(layers) if layers is not None else costed_layers(graph)):
            pairs = format_pairs.get(layer.name, []) if isinstance(format_pairs, dict) \
                else format_pairs
            for fw, fa in pairs:
                k = self.key(layer, fw, fa)
                if k not in self.entries and k not in seen:
                    seen.add(k)
                    todo.append((layer, fw, fa))
        if not todo:
            return 0
        from tqdm import tqdm
        bar = tqdm(todo, desc=f"latency {self.backend}", unit="entry", disable=not progress,
                   leave=False)
        many = getattr(measure_fn, "measure_many", None)
        if many is not None:  # a farm of devices: entries measured in parallel, recorded on arrival
            bar.close()
            for (layer, fw, fa), ms, device in many(todo, progress=progress):
                self.record(layer, fw, fa, ms)
                self.measured_on[self.key(layer, fw, fa)] = device
                self.measured += 1
            return len(todo)
        for layer, fw, fa in bar:
            bar.set_postfix_str(f"{layer.name} {fw}/{fa}", refresh=False)
            self.record(layer, fw, fa, measure_fn(layer, fw, fa))
            self.measured += 1
        return len(todo)


# ---- the onnxruntime measure function -------------------------------------------------------
def _pair(v, n: int) -> list:
    if v is None:
        return [1] * n
    return [int(x) for x in v] if isinstance(v, (list, tuple)) else [int(v)] * n


def _conv_attrs(layer: LayerInfo, spatial: int) -> dict:
    a = layer.attrs
    attrs = {"strides": _pair(a.get("stride"), spatial),
             "dilations": _pair(a.get("dilation"), spatial), "group": int(a.get("groups") or 1)}
    pad = a.get("padding", 0)
    if isinstance(pad, str):
        if pad.lower() == "same":
            attrs["auto_pad"] = "SAME_UPPER"
        elif pad.lower() != "valid":
            raise FliqsError(f"layer {layer.name}: padding {pad!r} is not supported")
    else:
        p = _pair(pad, spatial)
        attrs["pads"] = p + p
    if layer.op.startswith("conv_transpose") and a.get("output_padding"):
        attrs["output_padding"] = _pair(a["output_padding"], spatial)
    return attrs


def layer_micrograph(layer: LayerInfo, fmt_w: str, fmt_a: str, seed: int = 0) -> onnx.ModelProto:
    """A one-layer QDQ ONNX model (opset 21) for ``layer``'s op, shapes and attributes:
    input → Q/DQ(fmt_a) → op(·, weight stored in fmt_w) [+ bias] → Q/DQ(fmt_a) → output, in the
    form ``export_qdq`` writes: a rank-2 linear is a Gemm(transB=1) like the torch export, the
    quantizers are ``QuantSpec``s lowered by the exporter's ``spec_nodes``, and every
    ``ORT_FORM_FIXES`` rewrite runs on it (so the time is that of the graph users run)."""
    op = layer.op
    if layer.input_shape is None or layer.weight_shape is None:
        raise FliqsError(f"layer {layer.name}: input/weight shapes unknown; run shape propagation")
    fa, fw = F.get(fmt_a), F.get(fmt_w)
    native_fp4 = False  # onnxruntime has no FLOAT4E2M1 kernels: FP4 is timed decomposed
    rng = np.random.default_rng(seed)
    x_shape, w_shape = list(layer.input_shape), list(layer.weight_shape)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = (rng.standard_normal(w_shape) * 0.1).astype(np.float32)
    nodes, inits = [], []
    act_x_act = bool(layer.attrs.get("act_x_act"))
    gemm = op == "linear" and len(x_shape) == 2  # torch.onnx exports a rank-2 linear as Gemm
    w_axis = 1 if op.startswith("conv_transpose") else 0  # output-channel axis of the weight
    block_axis = 0 if op.startswith("conv_transpose") else 1  # reduction axis (MX blocks)
    if op == "linear" and not gemm:  # stored as MatMul [in, out]
        w = np.ascontiguousarray(w.T)
        w_axis, block_axis = 1, 0
    elif op == "matmul":
        w_axis, block_axis = len(w_shape) - 1, len(w_shape) - 2
    channels_last = op in ("linear", "matmul")  # where activation MX blocks run

    def quant(name, out, spec: QuantSpec, shape, weight=None):
        if not spec.fmt.is_quantized:
            return name
        n, i = spec_nodes(name, out, spec, shape, weight=weight, native_fp4=native_fp4)
        nodes.extend(n)
        inits.extend(i)
        return out

    def act_spec(value, shape):
        return QuantSpec.calibrated(fa, value, "activation",
                                    block_axis=len(shape) - 1 if channels_last else 1)

    xq = quant("x", "x_q", act_spec(x, x_shape), x_shape)
    if act_x_act:
        inputs = [helper.make_tensor_value_info("w_in", TensorProto.FLOAT, list(w.shape))]
        wq = quant("w_in", "w_q", QuantSpec.calibrated(fa, w, "activation"), list(w.shape))
    else:
        inputs = []
        wspec = QuantSpec.calibrated(fw, w, "weight", axis=w_axis, block_axis=block_axis)
        wq = quant("w", "w_q", wspec, list(w.shape), weight=w)
        if wq == "w":
            inits.append(numpy_helper.from_array(w, "w"))
    args = [xq, wq]
    if layer.attrs.get("bias") and op not in ("matmul",):
        nb = w_shape[1] * int(layer.attrs.get("groups") or 1) if op.startswith("conv_transpose") \
            else w_shape[0]
        inits.append(numpy_helper.from_array(rng.standard_normal(nb).astype(np.float32), "b"))
        args.append("b")
    if op.startswith("conv"):
        spatial = len(x_shape) - 2
        onnx_op = "ConvTranspose" if op.startswith("conv_transpose") else "Conv"
        nodes.append(helper.make_node(onnx_op, args, ["y"], **_conv_attrs(layer, spatial)))
    elif gemm:
        nodes.append(helper.make_node("Gemm", args, ["y"], transB=1))
    elif op in ("linear", "matmul"):
        nodes.append(helper.make_node("MatMul", args[:2], ["y0" if len(args) > 2 else "y"]))
        if len(args) > 2:
            nodes.append(helper.make_node("Add", ["y0", args[2]], ["y"]))
    else:
        raise FliqsError(f"layer {layer.name}: op {op!r} has no ONNX micro-graph")
    out_shape = list(layer.output_shape) if layer.output_shape else None
    yq = "y"
    if fa.is_quantized:
        if fa.is_blocked and out_shape is None:
            raise FliqsError(f"layer {layer.name}: output shape unknown")
        y_mag = np.full(1, 4.0, np.float32)  # any scale: the value does not change the timing
        yq = quant("y", "y_q", act_spec(y_mag, out_shape or [0]), out_shape or [])
    ins = [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)] + inputs
    outs = [helper.make_tensor_value_info(yq, TensorProto.FLOAT, out_shape)]
    g = helper.make_graph(nodes, f"layer_{op}", ins, outs, initializer=inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    for fix in ORT_FORM_FIXES:  # the very export form of export_qdq
        model = fix(model)
    onnx.checker.check_model(model, full_check=True)
    return model


def ort_layer_ms(layer: LayerInfo, fmt_w: str, fmt_a: str, threads: int = 2,
                 repeat: int = 30) -> float:
    """Median milliseconds of ``layer_micrograph(layer, fmt_w, fmt_a)`` in onnxruntime
    (``threads`` intra-op threads). FP4 E2M1 is timed in its decomposed form (ORT has no
    FLOAT4E2M1 kernels)."""
    model = layer_micrograph(layer, fmt_w, fmt_a)
    sess = make_session(model.SerializeToString(), threads=threads)
    rng = np.random.default_rng(1)
    feeds = [rng.standard_normal(i.shape).astype(np.float32) for i in sess.get_inputs()]
    return time_onnx(sess, feeds, threads=threads, repeat=repeat)
