"""Per-layer TVM latency: one quantized layer compiled alone and timed on a target.

``tvm_layer_ms(layer, fmt_w, fmt_a, target)`` builds a micro-graph with the layer's shapes and
attributes (``LayerInfo.op``, ``weight_shape``, ``input_shape``, ``attrs`` stride / padding /
dilation / groups), the weight quantized per output channel in ``fmt_w`` and the input per tensor
in ``fmt_a`` (``FormatQuantizer``s, exactly what ``materialize`` leaves), lowers it with
``tvm_lower.lower`` (the same rules as whole models, VNNI included) and returns the median time in
ms. It plugs into ``latency_table.build(graph, pairs, measure_fn)`` as ``measure_fn``.

Layout: a model whose convs all run on hand kernels (VNNI, bf16, fp32 FMA; or are a float image
stem) runs NHWC end to end (``tvm_layout.choose_layout``: ConvertLayout), every other model NCHW
(each kernel call then transposes around itself). A conv's
micro-model runs in the layout of the model it is measured for (``layout``; ``model_layout``
decides it for a graph and its formats): ``"NHWC"`` takes and returns NHWC tensors, so the lowered
micro-model has no NCHW↔NHWC transposes around the kernel, like the artifact.
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

__all__ = ["tvm_layer_ms", "measure_fn", "layer_module", "layer_graph", "layer_inputs",
           "model_layout", "conv_nhwc_ready", "LAYOUTS"]

_CACHE: dict = {}
LAYOUTS = ("NCHW", "NHWC")


def _layout(layer: LayerInfo, layout: str) -> str:
    """The layout a layer's micro-model runs in: ``layout`` for a conv2d, NCHW for anything else
    (a linear / MatMul has no spatial layout)."""
    if layout not in LAYOUTS:
        raise FliqsError(f"layout {layout!r}: choose from {', '.join(LAYOUTS)}")
    return layout if layer.op == "conv2d" else "NCHW"


def _input_shapes(layer: LayerInfo, layout: str = "NCHW") -> list:
    n, c, h, w = layer.input_shape if _layout(layer, layout) == "NHWC" else (None,) * 4
    x = (n, h, w, c) if n is not None else tuple(layer.input_shape)
    return [x] + ([tuple(layer.weight_shape)] if _act_x_act(layer) else [])


def _quantizer(fmt: str, t: torch.Tensor, role: str, axis: Optional[int] = None,
               block_axis: int = 1) -> Optional[FormatQuantizer]:
    """The fixed quantizer ``materialize`` would leave (absmax scales): a weight per output
    channel along ``axis``, an activation (or the second operand of an activation × activation
    MatMul: ``axis`` None) per tensor; MX blocks along ``block_axis`` (the reduction axis)."""
    spec = QuantSpec.calibrated(fmt, t.detach().numpy(), role, axis=axis, block_axis=block_axis)
    return spec.to_quantizer() if spec.fmt.is_quantized else None


def _act_x_act(layer: LayerInfo) -> bool:
    return layer.op == "matmul" and bool((layer.attrs or {}).get("act_x_act"))


def layer_inputs(layer: LayerInfo, seed: int = 0, layout: str = "NCHW") -> list:
    """The micro-model's run-time inputs (float32 arrays, standard normal): the layer's input
    (NHWC for a conv measured in ``layout`` NHWC), and for an activation × activation MatMul its
    second operand too."""
    import numpy as np
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in _input_shapes(layer, layout)]


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


class _ChannelsLast(_Layer):
    """A conv taking and returning NHWC: the permutes meet the ones ConvertLayout puts around an
    NHWC conv, so the lowered micro-model runs NHWC end to end like an all-VNNI model."""

    def forward(self, x):
        return self._apply(x.permute(0, 3, 1, 2), self.weight).permute(0, 2, 3, 1)


def layer_module(layer: LayerInfo, fmt_w: str, fmt_a: str, layout: str = "NCHW") -> nn.Module:
    """The micro-model for one layer (eval mode), a conv in ``layout``. Unsupported op →
    FliqsError."""
    if layer.op not in ("conv2d", "conv1d", "linear", "matmul"):
        raise FliqsError(f"layer {layer.name}: op {layer.op!r} has no TVM micro-benchmark; "
                         "supported: conv2d, conv1d, linear, matmul")
    if not layer.weight_shape or not layer.input_shape:
        raise FliqsError(f"layer {layer.name}: weight_shape / input_shape unknown; run shape "
                         "propagation (passes.prepare) before measuring latency")
    cls = (_ActMatMul if _act_x_act(layer)
           else _ChannelsLast if _layout(layer, layout) == "NHWC" else _Layer)
    return cls(layer, fmt_w, fmt_a).eval()


def layer_graph(layer: LayerInfo, fmt_w: str, fmt_a: str, layout: str = "NCHW") -> Graph:
    """A ``Graph`` of the micro-model (a conv in ``layout``), with one LayerInfo named like
    ``layer``."""
    m = layer_module(layer, fmt_w, fmt_a, layout)
    gm = torch.fx.symbolic_trace(m)
    inputs = [InputSpec(n, s) for n, s in zip(("x", "w"), _input_shapes(layer, layout))]
    g = Graph(gm, inputs, name=f"layer:{layer.name}")
    node = next(n.name for n in gm.graph.nodes if n.op == "call_function"
                and getattr(n.target, "__name__", "") in ("conv2d", "conv1d", "linear", "matmul"))
    g.layers[layer.name] = LayerInfo(layer.name, layer.op, node, weight_shape=layer.weight_shape,
                                     input_shape=layer.input_shape, attrs=dict(layer.attrs or {}))
    return g


def tvm_layer_ms(layer: LayerInfo, fmt_w: str, fmt_a: str, target="llvm", tuning=None, *,
                 repeat: int = 5, min_repeat_ms: int = 50, return_lowered: bool = False,
                 layout: str = "NCHW"):
    """Median latency (ms) of ``layer`` with weight format ``fmt_w`` and input format ``fmt_a``.

    Requires: ``layer.weight_shape`` and ``layer.input_shape``. ``tuning``: a
    ``tvm_lower.Tuning`` (MetaSchedule trials and its persistent database), None: default
    schedules. ``layout``: the layout of the model the layer runs in (a conv's micro-model takes
    and returns it). Results are cached per process by (layer signature, formats, target key,
    trials, layout).
    """
    from fliqs_compiler.backends.targets import parse_target
    from fliqs_compiler.backends.tvm_lower import lower
    target = parse_target(target)
    layout = _layout(layer, layout)
    key = (layer.signature(), F.get(fmt_w).name, F.get(fmt_a).name, target.key,
           None if tuning is None else tuning.trials, layout)
    if key in _CACHE and not return_lowered:
        return _CACHE[key]
    g = layer_graph(layer, fmt_w, fmt_a, layout)
    low = lower(g, target, None, tuning=tuning)
    ms = low.time_ms(layer_inputs(layer, layout=layout), repeat=repeat,
                     min_repeat_ms=min_repeat_ms)
    _CACHE[key] = ms
    return (ms, low) if return_lowered else ms


def measure_fn(target="llvm", tuning=None, layout: str = "NCHW"):
    """``(layer, fmt_w, fmt_a) -> ms`` bound to a target (and a ``tvm_lower.Tuning``, or None,
    and the model's ``layout``): the ``measure_fn`` that ``latency_table.build(graph, pairs,
    measure_fn)`` expects."""
    def measure(layer: LayerInfo, fmt_w: str, fmt_a: str) -> float:
        return tvm_layer_ms(layer, fmt_w, fmt_a, target, tuning, layout=layout)
    return measure


_ON_KERNEL_CACHE: dict = {}


def conv_nhwc_ready(layer: LayerInfo, fmt_w: str, fmt_a: str, target="llvm") -> bool:
    """Whether the conv2d ``layer`` in (``fmt_w``, ``fmt_a``) lets a model run NHWC on ``target``
    — it runs on one of the target's hand kernels, or is a float image stem: its micro-model
    translated by ``tvm_lower.translate`` and its conv call checked by the test ``lower`` applies
    (``tvm_layout.nhwc_ready``), nothing compiled. Cached per process."""
    from fliqs_compiler.backends import tvm_kernels as K
    from fliqs_compiler.backends.targets import parse_target
    from fliqs_compiler.backends.tvm_lower import kernel_weights, translate
    target = parse_target(target)
    if layer.op != "conv2d":
        return False
    key = (layer.signature(), F.get(fmt_w).name, F.get(fmt_a).name, target.key)
    if key not in _ON_KERNEL_CACHE:
        kernels = K.kernels_for(target.caps)
        g = layer_graph(layer, fmt_w, fmt_a)
        ep = torch.export.export(g.gm.eval(), tuple(g.example_inputs()))
        mod, records = translate(ep, frozenset(k.compute_rule for k in kernels))  # as lower() does
        convs = K.calls(mod["main"], "relax.nn.conv2d")
        ready = K.nhwc_ready(kernel_weights(kernels, records))
        _ON_KERNEL_CACHE[key] = len(convs) == 1 and ready(convs[0])
    return _ON_KERNEL_CACHE[key]


def model_layout(graph: Graph, formats: dict, target="llvm") -> str:
    """The layout the lowered model runs in: ``"NHWC"`` when it has a conv2d and every one of
    them (layers kept float included: they are float) is ``conv_nhwc_ready`` — then ``lower``
    (``tvm_layout.choose_layout``) converts the whole graph to NHWC — else ``"NCHW"``.
    ``formats``: ``{layer: {"weight", "activation"}}``; a layer it lacks is float."""
    convs = [la for la in graph.layers.values() if la.op == "conv2d"]
    if not convs:
        return "NCHW"
    for la in convs:
        e = {} if la.keep_float else (formats.get(la.name) or {})
        fw = e.get("weight", "float")
        if not conv_nhwc_ready(la, fw, e.get("activation", fw), target):
            return "NCHW"
    return "NHWC"
