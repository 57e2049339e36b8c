"""Per-layer TVM latency: one quantized layer compiled alone and timed on a target.

``tvm_layer_ms(layer, fmt_w, fmt_a, target)`` builds a micro-graph with the layer's shapes and
attributes (``LayerInfo.op``, ``weight_shape``, ``input_shape``, ``attrs`` stride / padding /
dilation / groups), the weight quantized per output channel in ``fmt_w`` and the input per tensor
in ``fmt_a`` (``FormatQuantizer``s, exactly what ``materialize`` leaves), lowers it with
``tvm_lower.lower`` (the same rules as whole models, VNNI included) and returns the median time in
ms. It plugs into ``latency_table.build(graph, pairs, measure_fn)`` as ``measure_fn``.
"""
from __future__ import annotations

import os
from typing import Optional

os.environ.setdefault("TVM_NUM_THREADS", "2")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from fliqs_compiler.numerics import formats as F  # noqa: E402
from fliqs_compiler.base.errors import FliqsError  # noqa: E402
from fliqs_compiler.ir import ops as ir  # noqa: E402
from fliqs_compiler.ir.graph import Graph, InputSpec, LayerInfo  # noqa: E402
from fliqs_compiler.numerics.qspec import QuantSpec  # noqa: E402
from fliqs_compiler.numerics.quantizers import FormatQuantizer  # noqa: E402

__all__ = ["tvm_layer_ms", "measure_fn", "layer_module", "layer_graph", "layer_inputs"]

_CACHE: dict = {}


def _quantizer(fmt: str, t: torch.Tensor, role: str, axis: Optional[int] = None,
               block_axis: int = 1) -> Optional[FormatQuantizer]:
    """The fixed quantizer ``materialize`` would leave (absmax scales): a weight per output
    channel along ``axis``, an activation (or the second operand of an activation × activation
    MatMul: ``axis`` None) per tensor; MX blocks along ``block_axis`` (the reduction axis)."""
    spec = QuantSpec.calibrated(fmt, t.detach().numpy(), role, axis=axis, block_axis=block_axis)
    return spec.to_quantizer() if spec.fmt.is_quantized else None


def _act_x_act(layer: LayerInfo) -> bool:
    return layer.op == "matmul" and bool((layer.attrs or {}).get("act_x_act"))


def layer_inputs(layer: LayerInfo, seed: int = 0) -> list:
    """The micro-model's run-time inputs (float32 arrays, standard normal): the layer's input,
    and for an activation × activation MatMul its second operand too."""
    import numpy as np
    rng = np.random.default_rng(seed)
    shapes = [layer.input_shape] + ([layer.weight_shape] if _act_x_act(layer) else [])
    return [rng.standard_normal(tuple(s)).astype(np.float32) for s in shapes]


class _Layer(nn.Module):
    """One conv / linear / MatMul with fixed quantizers on weight and input (as ``materialize``
    leaves them: weight axes from ``ir.weight_axes``). An activation × activation MatMul takes
    its second operand as a second input, quantized per tensor like the search quantizes it."""

    def __init__(self, layer: LayerInfo, fmt_w: str, fmt_a: str, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.op = layer.op
        a = layer.attrs or {}
        self.stride, self.padding = a.get("stride") or 1, a.get("padding") or 0
        self.dilation, self.groups = a.get("dilation") or 1, a.get("groups") or 1
        x = torch.randn(tuple(layer.input_shape), generator=g)
        w = torch.randn(tuple(layer.weight_shape), generator=g) * 0.05
        rank = len(layer.weight_shape)
        if _act_x_act(layer):
            self.weight, self.bias = None, None
            self.wq = _quantizer(fmt_w, w, "activation", block_axis=rank - 2)
        else:
            self.weight = nn.Parameter(w)
            out_axis, red_axis = ir.weight_axes(self.op, rank)
            self.bias = (nn.Parameter(torch.zeros(layer.weight_shape[out_axis]))
                         if self.op != "matmul" else None)
            self.wq = _quantizer(fmt_w, w, "weight", axis=out_axis, block_axis=red_axis)
        self.aq = _quantizer(fmt_a, x, "activation", block_axis=1 if self.op.startswith("conv") else -1)

    def forward(self, x):
        return self._apply(x, self.weight)

    def _apply(self, x, w):
        w = self.wq(w) if self.wq is not None else w
        x = self.aq(x) if self.aq is not None else x
        if self.op == "conv2d":
            return nn.functional.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation,
                                        self.groups)
        if self.op == "conv1d":
            return nn.functional.conv1d(x, w, self.bias, self.stride, self.padding, self.dilation,
                                        self.groups)
        if self.op == "linear":
            return nn.functional.linear(x, w, self.bias)
        return torch.matmul(x, w)  # MatMul: weight [.., K, N], as ONNX and torch.matmul take it


class _ActMatMul(_Layer):
    def forward(self, x, w):
        return self._apply(x, w)


def layer_module(layer: LayerInfo, fmt_w: str, fmt_a: str) -> nn.Module:
    """The micro-model for one layer (eval mode). Unsupported op → FliqsError."""
    if layer.op not in ("conv2d", "conv1d", "linear", "matmul"):
        raise FliqsError(f"layer {layer.name}: op {layer.op!r} has no TVM micro-benchmark; "
                         "supported: conv2d, conv1d, linear, matmul")
    if not layer.weight_shape or not layer.input_shape:
        raise FliqsError(f"layer {layer.name}: weight_shape / input_shape unknown; run shape "
                         "propagation (passes.prepare) before measuring latency")
    return (_ActMatMul if _act_x_act(layer) else _Layer)(layer, fmt_w, fmt_a).eval()


def layer_graph(layer: LayerInfo, fmt_w: str, fmt_a: str) -> Graph:
    """A ``Graph`` of the micro-model, with one LayerInfo named like ``layer``."""
    m = layer_module(layer, fmt_w, fmt_a)
    second = _act_x_act(layer)
    gm = torch.fx.symbolic_trace(m)
    inputs = [InputSpec("x", tuple(layer.input_shape))]
    if second:
        inputs.append(InputSpec("w", tuple(layer.weight_shape)))
    g = Graph(gm, inputs, name=f"layer:{layer.name}")
    node = next(n.name for n in gm.graph.nodes if n.op == "call_function"
                and getattr(n.target, "__name__", "") in ("conv2d", "conv1d", "linear", "matmul"))
    g.layers[layer.name] = LayerInfo(layer.name, layer.op, node, weight_shape=layer.weight_shape,
                                     input_shape=layer.input_shape, attrs=dict(layer.attrs or {}))
    return g


def tvm_layer_ms(layer: LayerInfo, fmt_w: str, fmt_a: str, target="llvm", tuning=None, *,
                 repeat: int = 5, min_repeat_ms: int = 50, return_lowered: bool = False):
    """Median latency (ms) of ``layer`` with weight format ``fmt_w`` and input format ``fmt_a``.

    Requires: ``layer.weight_shape`` and ``layer.input_shape``. ``tuning``: a
    ``tvm_lower.Tuning`` (MetaSchedule trials and its persistent database), None: default
    schedules. Results are cached per process by (layer signature, formats, target key, trials).
    """
    from fliqs_compiler.backends.targets import parse_target
    from fliqs_compiler.backends.tvm_lower import lower
    target = parse_target(target)
    key = (layer.signature(), F.get(fmt_w).name, F.get(fmt_a).name, target.key,
           None if tuning is None else tuning.trials)
    if key in _CACHE and not return_lowered:
        return _CACHE[key]
    g = layer_graph(layer, fmt_w, fmt_a)
    low = lower(g, target, None, tuning=tuning)
    ms = low.time_ms(layer_inputs(layer), repeat=repeat, min_repeat_ms=min_repeat_ms)
    _CACHE[key] = ms
    return (ms, low) if return_lowered else ms


def measure_fn(target="llvm", tuning=None):
    """``(layer, fmt_w, fmt_a) -> ms`` bound to a target (and a ``tvm_lower.Tuning``, or None):
    the ``measure_fn`` that ``latency_table.build(graph, pairs, measure_fn)`` expects."""
    def measure(layer: LayerInfo, fmt_w: str, fmt_a: str) -> float:
        return tvm_layer_ms(layer, fmt_w, fmt_a, target, tuning)
    return measure
