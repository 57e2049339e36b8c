"""Budgets: ``--budget KIND=VALUE`` parsed, then resolved against a graph to an absolute target.

Kinds are data (``KINDS``): each names its cost model (``fliqs_compiler.cost.model.config_cost``), its
unit suffixes and its display unit. Values are absolute (``bops=12.5G``, ``size=2MB``,
``latency=3ms``) or relative with an ``x`` suffix (``bops=0.25x``): a fraction of the cost of
the searched layers with weights and activations all at INT8 (the reference of the method).
Resolution refuses a budget below the cheapest configuration the search space can reach.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from fliqs_compiler.cost.model import LatencyModel, config_cost
from fliqs_compiler.base.errors import FliqsError
from fliqs_compiler.ir.graph import Graph

__all__ = ["BudgetKind", "Budget", "KINDS", "TOLERANCE", "meets_budget", "parse_budget", "resolve_budget", "reference_cost",
           "cheapest_config", "format_cost"]


@dataclass(frozen=True)
class BudgetKind:
    name: str
    unit: str  # display unit of the base value
    suffixes: dict  # lower-case suffix -> multiplier to the base unit
    example: str


KINDS: dict = {
    "bops": BudgetKind("bops", "BOPs", {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}, "bops=0.25x or bops=12.5G"),
    "size": BudgetKind("size", "bytes", {"": 1.0, "b": 1.0, "kb": 1e3, "mb": 1e6, "gb": 1e9,
                                         "kib": 1024.0, "mib": 1024.0 ** 2, "gib": 1024.0 ** 3},
                       "size=2MB or size=0.5x"),
    "latency": BudgetKind("latency", "ms", {"": 1.0, "ms": 1.0, "us": 1e-3, "s": 1e3}, "latency=3ms or latency=0.5x"),
}

_VALUE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Budget:
    """A parsed budget: ``value`` in the kind's base unit, or a fraction when ``relative``."""

    kind: str
    value: float
    relative: bool
    text: str

    def as_dict(self) -> dict:
        return {"kind": self.kind, "value": self.value, "relative": self.relative, "text": self.text}


def parse_budget(text: str) -> Budget:
    """``"bops=0.25x" | "bops=12.5G" | "size=2MB" | "latency=3ms"`` → ``Budget``.

    Requires: ``KIND=VALUE`` with a registered kind, a positive number and a known suffix.
    Guarantees: absolute values converted to the base unit (BOPs, bytes, ms).
    Raises ``FliqsError`` naming ``--budget`` and the accepted forms otherwise.
    """
    kind_name, sep, raw = str(text).partition("=")
    kind_name = kind_name.strip().lower()
    if not sep or kind_name not in KINDS:
        raise FliqsError(f"--budget {text!r}: unknown budget kind {kind_name!r}; use one of "
                         f"{', '.join(f'{k}=...' for k in KINDS)} (e.g. bops=0.25x)")
    kind = KINDS[kind_name]
    m = _VALUE.match(raw)
    suffix = m.group(2).lower() if m else ""
    if not m or (suffix != "x" and suffix not in kind.suffixes):
        raise FliqsError(f"--budget {text!r}: cannot read the value; write e.g. {kind.example} "
                         f"(suffixes: {', '.join(s for s in kind.suffixes if s)}, or x for a fraction "
                         "of the all-INT8 cost)")
    number = float(m.group(1))
    if number <= 0:
        raise FliqsError(f"--budget {text!r}: the value must be positive")
    if suffix == "x":
        return Budget(kind_name, number, True, text.strip())
    return Budget(kind_name, number * kind.suffixes[suffix], False, text.strip())


def _check_space(graph: Graph, what: str):
    if graph.space is None or not graph.space.decisions:
        raise FliqsError(f"{what}: the graph {graph.name!r} has no search space (no searched "
                         "layers); run the prepare passes with at least one format")


def reference_cost(graph: Graph, kind: str, latency: Optional[LatencyModel] = None) -> float:
    """Cost of the searched layers with weights and activations all at INT8 (the ``x`` reference)."""
    formats = {layer.name: {"weight": "int8", "activation": "int8"} for layer in graph.searched_layers()}
    return config_cost(graph, formats, kind, latency)


def cheapest_config(graph: Graph, kind: str, latency: Optional[LatencyModel] = None):
    """(cost, choice) of the cheapest configuration in ``graph.space``.

    Coordinate descent over decisions (exact for BOPs and size, which are monotone in each
    decision's bit widths; a good upper bound for a latency table).
    """
    space = graph.space
    choice = [0] * space.num_decisions
    best = config_cost(graph, space.formats_of(choice), kind, latency)
    for _ in range(3):
        improved = False
        for d, decision in enumerate(space.decisions):
            for k in range(len(decision.candidates)):
                trial = list(choice)
                trial[d] = k
                cost = config_cost(graph, space.formats_of(trial), kind, latency)
                if cost < best - 1e-12:
                    best, choice, improved = cost, trial, True
        if not improved:
            break
    return best, choice


# A configuration meets a budget T when its cost is at most T·(1 + TOLERANCE): the rule every
# comparison at "equal cost" uses (the demo's table, the quality bench, the tests).
TOLERANCE = 0.02


def meets_budget(cost: float, target: float) -> bool:
    return float(cost) <= float(target) * (1.0 + TOLERANCE)


def format_cost(kind: str, value: float) -> str:
    """Human-readable cost: ``1.23 GBOPs``, ``2.5 MB``, ``3.1 ms``."""
    if kind == "bops":
        for div, unit in ((1e12, "TBOPs"), (1e9, "GBOPs"), (1e6, "MBOPs"), (1e3, "kBOPs")):
            if value >= div:
                return f"{value / div:.4g} {unit}"
        return f"{value:.4g} BOPs"
    if kind == "size":
        for div, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
            if value >= div:
                return f"{value / div:.4g} {unit}"
        return f"{value:.4g} B"
    return f"{value:.4g} {KINDS[kind].unit}"


def resolve_budget(budget, graph: Graph, latency: Optional[LatencyModel] = None) -> float:
    """Absolute cost target (BOPs, bytes or ms over the searched layers) for ``budget``.

    Accepts a ``Budget`` or its text. Requires a graph with a search space; a latency budget
    requires a ``LatencyModel``. Refuses (``FliqsError``) a budget below the cheapest
    achievable configuration, naming that value.
    """
    if isinstance(budget, str):
        budget = parse_budget(budget)
    _check_space(graph, f"--budget {budget.text}")
    if budget.kind == "latency" and latency is None:
        raise FliqsError(f"--budget {budget.text}: a latency budget needs a measured latency table "
                         "for the target; run `fliqs profile MODEL --target TARGET` or use bops=/size=")
    target = budget.value * reference_cost(graph, budget.kind, latency) if budget.relative else budget.value
    cheapest, choice = cheapest_config(graph, budget.kind, latency)
    if target < cheapest * (1 - 1e-9):
        ref = reference_cost(graph, budget.kind, latency)
        fmts = sorted({f for e in graph.space.formats_of(choice).values() for f in e.values()})
        raise FliqsError(
            f"--budget {budget.text}: impossible, the cheapest configuration in the search space "
            f"costs {format_cost(budget.kind, cheapest)} ({cheapest / ref:.4g}x of all-INT8, all layers "
            f"at {'/'.join(fmts)}); raise the budget or add cheaper formats")
    return float(target)
