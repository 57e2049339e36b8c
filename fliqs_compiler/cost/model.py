"""Cost models: BOPs, weight size, and (via a measured table) latency, per layer and per config.

BOPs = MACs × bits_w × bits_a (FP formats count their total width, MX formats their amortised
width; ``float`` counts 32). Size = params × bits_w / 8. Layers kept in float are outside the
searched cost and the budget (docs/method.md, "Cost models"); ``float_bops`` reports them
separately. Input-only layers (a LayerNorm / softmax / GELU input searched on request) cost
nothing in any kind (``costed_layers``): the op runs in float on the dequantized input on both
backends, so its format saves no multiply-accumulate (it has none), no weight byte and no
measured time; it is chosen for quality alone.
"""
from __future__ import annotations

from typing import Optional, Protocol

from fliqs_compiler.numerics import formats as F
from fliqs_compiler.ir.graph import Graph, LayerInfo

__all__ = ["layer_bops", "layer_size_bytes", "config_cost", "costed_layers", "LatencyModel"]


def layer_bops(layer: LayerInfo, fmt_w: str, fmt_a: str) -> float:
    return layer.macs * F.get(fmt_w).cost_bits * F.get(fmt_a).cost_bits


def layer_size_bytes(layer: LayerInfo, fmt_w: str) -> float:
    return layer.params * F.get(fmt_w).cost_bits / 8.0


class LatencyModel(Protocol):
    """(layer signature, weight format, activation format) → milliseconds, measured on a target."""

    def layer_ms(self, layer: LayerInfo, fmt_w: str, fmt_a: str) -> float: ...


def _formats_of(formats: dict, layer: LayerInfo):
    entry = formats.get(layer.name) or {}
    return entry.get("weight", "float"), entry.get("activation", entry.get("weight", "float"))


def costed_layers(graph: Graph) -> list:
    """The searched layers a cost counts (and a latency table measures): all but input-only
    ones (module docstring)."""
    return [layer for layer in graph.searched_layers() if not layer.attrs.get("input_only")]


def config_cost(graph: Graph, formats: dict, kind: str,
                latency: Optional[LatencyModel] = None) -> float:
    """Cost of a ``{layer: {"weight", "activation"}}`` assignment over the searched layers.

    kind: 'bops' | 'size' | 'latency' (latency needs a LatencyModel).
    """
    total = 0.0
    for layer in costed_layers(graph):
        fw, fa = _formats_of(formats, layer)
        if kind == "bops":
            total += layer_bops(layer, fw, fa)
        elif kind == "size":
            total += layer_size_bytes(layer, fw)
        elif kind == "latency":
            if latency is None:
                raise ValueError("a latency cost needs a measured latency table")
            total += latency.layer_ms(layer, fw, fa)
        else:
            raise ValueError(f"unknown cost kind {kind!r}")
    return total


def float_bops(graph: Graph) -> int:
    """BOPs of the layers kept in float (32×32 bits)."""
    return int(sum(layer.macs * 32 * 32 for layer in graph.layers.values() if layer.keep_float))
