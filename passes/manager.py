"""A small pass manager: run ``graph -> graph`` passes in order, check the graph after each one,
and record how long each took in ``graph.meta["pass_times"]``.

A pass is a plain function ``Graph -> Graph``. A pass that leaves the model's numbers unchanged
(up to float rounding) sets the attribute ``preserves_numerics = True`` (see :func:`numeric`);
with ``check_numerics`` the manager compares the model's outputs on ``graph.example_inputs()``
before and after such passes.
"""
from __future__ import annotations

import functools
import time
from typing import Callable, Iterable, Sequence

import torch

from fliqs_compiler.graph import Graph

__all__ = ["Pass", "numeric", "bind", "run_passes", "check_graph", "set_training",
           "enable_train_eval"]

Pass = Callable[[Graph], Graph]


def numeric(fn: Pass) -> Pass:
    """Mark a pass as numerics-preserving (checked when ``check_numerics=True``)."""
    fn.preserves_numerics = True
    return fn


def bind(fn, name: str | None = None, **kwargs) -> Pass:
    """``fn`` with keyword options bound; keeps the pass name and the numerics flag."""
    bound = functools.partial(fn, **kwargs)
    bound.__name__ = name or fn.__name__
    bound.preserves_numerics = getattr(fn, "preserves_numerics", False)
    return bound


def check_graph(graph: Graph) -> None:
    """Lint the fx graph and regenerate the module's code.

    Guarantees: ``graph.gm.graph`` is well-formed and ``graph.gm.forward`` matches it."""
    graph.gm.graph.lint()
    graph.gm.recompile()


def set_training(gm: torch.nn.Module, mode: bool) -> None:
    """``gm.train(mode)`` that also works on ``ExportedProgram.module()`` results (whose
    ``train``/``eval`` raise NotImplementedError): sets ``.training`` on every submodule."""
    for m in gm.modules():
        m.training = mode


def enable_train_eval(gm: torch.nn.Module) -> None:
    """Drop the instance-level ``train``/``eval`` overrides that ``ExportedProgram.module()``
    installs, so the (deep-copied) graph module supports ``.train()`` / ``.eval()`` again."""
    for attr in ("train", "eval"):
        gm.__dict__.pop(attr, None)


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

    Requires: each pass maps a Graph to a Graph. Guarantees: after every pass the graph lints and
    is recompiled; ``graph.meta["pass_times"][pass name]`` holds its wall time in seconds; with
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
        t0 = time.perf_counter()
        graph = p(graph)
        check_graph(graph)
        times[name] = times.get(name, 0.0) + time.perf_counter() - t0
        graph.meta.setdefault("pass_times", times)
        if check_numerics and getattr(p, "preserves_numerics", False):
            got = _run(graph, inputs)
            for a, b in zip(reference, got):
                if a.shape != b.shape or not torch.allclose(a, b, rtol=rtol, atol=atol):
                    err = (a - b).abs().max().item() if a.shape == b.shape else float("inf")
                    raise RuntimeError(f"pass {name} changed the model's outputs (max abs err "
                                       f"{err:.3g})")
    return graph
