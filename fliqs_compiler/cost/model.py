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

import itertools
from dataclasses import dataclass
from typing import Optional, Protocol

import numpy as np

from fliqs_compiler.numerics import formats as F
from fliqs_compiler.ir.graph import Graph, LayerInfo

__all__ = ["layer_bops", "layer_size_bytes", "layer_cost", "config_cost", "costed_layers", "LatencyModel",
           "CostTerm", "cost_terms"]


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


def layer_cost(layer: LayerInfo, formats: dict, kind: str,
               latency: Optional[LatencyModel] = None) -> float:
    """One costed layer's cost under a ``{layer: {"weight", "activation"}}`` assignment.

    kind: 'bops' | 'size' | 'latency' (latency needs a LatencyModel).
    """
    fw, fa = _formats_of(formats, layer)
    if kind == "bops":
        return layer_bops(layer, fw, fa)
    if kind == "size":
        return layer_size_bytes(layer, fw)
    if kind == "latency":
        if latency is None:
            raise ValueError("a latency cost needs a measured latency table")
        return latency.layer_ms(layer, fw, fa)
    raise ValueError(f"unknown cost kind {kind!r}")


def config_cost(graph: Graph, formats: dict, kind: str,
                latency: Optional[LatencyModel] = None) -> float:
    """Cost of a ``{layer: {"weight", "activation"}}`` assignment over the searched layers
    (``layer_cost`` summed over ``costed_layers``)."""
    return float(sum(layer_cost(layer, formats, kind, latency) for layer in costed_layers(graph)))


@dataclass(frozen=True)
class CostTerm:
    """Part of a configuration's cost that depends on the candidates of ``decisions`` alone: one
    decision (a tied layer, or a weight size) with ``table[k]``, or two (a layer whose weight and
    activation are separate decisions) with ``table[k_first, k_second]``."""

    decisions: tuple
    table: np.ndarray


def cost_terms(graph: Graph, kind: str, latency: Optional[LatencyModel] = None) -> tuple:
    """``(constant, [CostTerm])`` with ``config_cost(choice) == constant + Σ term(choice)`` exactly
    for every choice of ``graph.space``. Why not one additive cost per decision: a layer's BOPs are
    bits_w × bits_a, so when its weight and activation are separate decisions its cost is a product,
    and a per-decision linearisation around the all-precise configuration under-counts the cheap
    corner (W2A2 predicted −32 MACs instead of 4: an ILP then picked 197 M BOPs for an 84 M
    budget, measured). Layers with the same decisions share one term."""
    space = graph.space
    of = {member: d for d, decision in enumerate(space.decisions) for member in decision.members}
    base = [0] * space.num_decisions
    constant, tables = 0.0, {}
    for layer in costed_layers(graph):
        ds = tuple(sorted({of[(layer.name, role)] for role in ("weight", "activation")
                           if (layer.name, role) in of}))
        shape = tuple(len(space.decisions[d].candidates) for d in ds)
        table = np.zeros(shape)
        for ks in itertools.product(*(range(n) for n in shape)):
            choice = list(base)
            for d, k in zip(ds, ks):
                choice[d] = k
            table[ks] = layer_cost(layer, space.formats_of(choice) if ds else {}, kind, latency)
        if not ds:
            constant += float(table)
        else:
            tables[ds] = tables.get(ds, 0.0) + table
    return constant, [CostTerm(ds, t) for ds, t in tables.items()]


def float_bops(graph: Graph) -> int:
    """BOPs of the layers kept in float (32×32 bits)."""
    return int(sum(layer.macs * 32 * 32 for layer in graph.layers.values() if layer.keep_float))
