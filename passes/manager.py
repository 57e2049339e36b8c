"""A small pass manager: run ``graph -> graph`` passes in order, check each pass's contract and
lint the graph after each one, and record how long each took in ``graph.meta["pass_times"]``.

A pass is a function ``Graph -> Graph``. Its contract (in the style of torch.fx's
``PassBase.requires`` / ``ensures``) is declared with :func:`contract`: ``requires`` and
``ensures`` are lists of *conditions*, named functions ``Graph -> None | str`` that return None
when they hold and otherwise a short description of what violates them (usually the offending
node). :func:`run_passes` checks a pass's requires before it runs and its ensures after, and
raises :class:`PassContractError` (pass name, condition name, detail) on the first one that
fails. Conditions are cheap (linear in the graph size), so they are always checked.

A pass that leaves the model's numbers unchanged (up to float rounding) sets the attribute
``preserves_numerics = True`` (see :func:`numeric`); with ``check_numerics`` the manager compares
the model's outputs on ``graph.example_inputs()`` before and after such passes.
"""
from __future__ import annotations

import functools
import time
from typing import Callable, Iterable, Optional, Sequence

import torch

from fliqs_compiler.ir.graph import Graph, enable_train_eval, set_training  # noqa: F401 (re-exported)

__all__ = ["Pass", "Condition", "PassContractError", "contract", "check_conditions", "numeric",
           "bind", "run_passes", "check_graph", "set_training", "enable_train_eval"]

Pass = Callable[[Graph], Graph]
Condition = Callable[[Graph], Optional[str]]  # None: holds; else what violates it


class PassContractError(RuntimeError):
    """A pass's ``requires`` did not hold before it ran, or its ``ensures`` after: a pipeline
    ordering or pass bug, not bad user input."""


def contract(requires: Sequence[Condition] = (), ensures: Sequence[Condition] = ()):
    """Declare a pass's contract: ``@contract(requires=[cond, ...], ensures=[cond, ...])``."""
    def mark(fn: Pass) -> Pass:
        fn.requires = tuple(requires)
        fn.ensures = tuple(ensures)
        return fn
    return mark


def check_conditions(name: str, graph: Graph, conditions: Iterable[Condition],
                     clause: str) -> None:
    """Raise PassContractError for the first of ``conditions`` that does not hold on ``graph``
    (``clause``: 'requires' or 'ensures', for the message)."""
    for condition in conditions:
        detail = condition(graph)
        if detail is not None:
            raise PassContractError(f"pass {name}: {clause} {condition.__name__} does not hold: "
                                    f"{detail}")


def numeric(fn: Pass) -> Pass:
    """Mark a pass as numerics-preserving (checked when ``check_numerics=True``)."""
    fn.preserves_numerics = True
    return fn


def bind(fn, name: str | None = None, **kwargs) -> Pass:
    """``fn`` with keyword options bound; keeps the pass name, contract and numerics flag."""
    bound = functools.partial(fn, **kwargs)
    bound.__name__ = name or fn.__name__
    bound.preserves_numerics = getattr(fn, "preserves_numerics", False)
    bound.requires = getattr(fn, "requires", ())
    bound.ensures = getattr(fn, "ensures", ())
    return bound


def check_graph(graph: Graph) -> None:
    """Lint the fx graph and regenerate the module's code.

    Guarantees: ``graph.gm.graph`` is well-formed and ``graph.gm.forward`` matches it."""
    graph.gm.graph.lint()
    graph.gm.recompile()


def _flat_outputs(out) -> list:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flat_outputs(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _flat_outputs(o)]
    return []


@torch.no_grad()
def _run(graph: Graph, inputs: Sequence[torch.Tensor]) -> list:
    training = graph.gm.training
    set_training(graph.gm, False)
    try:
        return [t.detach().clone() for t in _flat_outputs(graph.gm(*inputs))]
    finally:
        set_training(graph.gm, training)


def run_passes(graph: Graph, passes: Iterable[Pass], check_numerics: bool = False,
               rtol: float = 1e-4, atol: float = 1e-5) -> Graph:
    """Run ``passes`` in order on ``graph``.

    Requires: each pass maps a Graph to a Graph. Guarantees: each pass's ``requires`` held
    before it ran and its ``ensures`` after it (else PassContractError naming the pass and the
    condition); after every pass the graph lints and is recompiled;
    ``graph.meta["pass_times"][pass name]`` holds its wall time in seconds; with
    ``check_numerics``, outputs after each numerics-preserving pass match those before the
    pipeline within (rtol, atol) on ``graph.example_inputs()`` (eval mode), else RuntimeError
    (a pass bug, not bad input).
    """
    reference = None
    inputs = None
    if check_numerics:
        inputs = graph.example_inputs()
        reference = _run(graph, inputs)
    times = graph.meta.setdefault("pass_times", {})
    for p in passes:
        name = getattr(p, "__name__", repr(p))
        check_conditions(name, graph, getattr(p, "requires", ()), "requires")
        t0 = time.perf_counter()
        graph = p(graph)
        check_graph(graph)
        times[name] = times.get(name, 0.0) + time.perf_counter() - t0
        check_conditions(name, graph, getattr(p, "ensures", ()), "ensures")
        graph.meta.setdefault("pass_times", times)
        if check_numerics and getattr(p, "preserves_numerics", False):
            got = _run(graph, inputs)
            for a, b in zip(reference, got):
                if a.shape != b.shape or not torch.allclose(a, b, rtol=rtol, atol=atol):
                    err = (a - b).abs().max().item() if a.shape == b.shape else float("inf")
                    raise RuntimeError(f"pass {name} changed the model's outputs (max abs err "
                                       f"{err:.3g})")
    return graph
