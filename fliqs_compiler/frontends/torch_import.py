"""torch ``nn.Module`` → :class:`~fliqs_compiler.ir.graph.Graph` via ``torch.export``.

The module is exported in eval mode, which (torch 2.13) keeps BatchNorm as one
``aten.batch_norm`` node reading trainable ``get_attr`` parameters and running-stat buffers;
``ep.module()`` is the ``fx.GraphModule``. If ``torch.export`` refuses the module (data-dependent
control flow, unsupported python), ``torch.fx.symbolic_trace`` is tried; if both fail the user
gets one line naming the module and the export error. ``scaled_dot_product_attention`` nodes
are decomposed into their two MatMuls and softmax (``frontends.sdpa``) so attention is searched.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import fx, nn

from fliqs_compiler.base.errors import FliqsError, one_line
from fliqs_compiler.ir.graph import Graph, InputSpec

__all__ = ["import_module"]


def _specs(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> list[InputSpec]:
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    names = names[-len(example_inputs):] if len(names) >= len(example_inputs) else [
        f"input_{i}" for i in range(len(example_inputs))]
    return [InputSpec(name, tuple(t.shape), str(t.dtype).replace("torch.", ""))
            for name, t in zip(names, example_inputs)]


def _export(module: nn.Module, example_inputs: tuple) -> fx.GraphModule:
    """``torch.export`` with a dynamic batch dimension, so the search and the exporters can run
    the graph on any batch size. A batch of 1 would be specialised by export's 0/1 rule, so the
    example is tiled to a batch of 2 first. Modules whose batch cannot be symbolic (a reshape
    that bakes it in) fall back to a static export of the example as given."""
    batched = tuple(t.expand(2, *t.shape[1:]).contiguous() if t.dim() > 0 and t.shape[0] == 1
                    else t for t in example_inputs)
    dynamic = tuple({0: torch.export.Dim.AUTO} if t.dim() > 0 else None for t in batched)
    try:
        return torch.export.export(module, batched, dynamic_shapes=dynamic, strict=False).module()
    except Exception:  # noqa: BLE001 — a static export is still a correct (if batch-pinned) graph
        return torch.export.export(module, example_inputs, strict=False).module()


def import_module(module: nn.Module, example_inputs: Optional[tuple]) -> Graph:
    """Export ``module`` on ``example_inputs`` into a Graph whose parameters stay trainable.

    Requires: ``example_inputs`` a tuple of tensors (a single tensor is accepted).
    Guarantees: ``graph.gm(*example_inputs)`` equals ``module.eval()(*example_inputs)``;
    ``graph.source == 'torch'``; the module's own train/eval mode is restored afterwards.
    """
    if not isinstance(module, nn.Module):
        raise FliqsError(f"expected a torch nn.Module, got {type(module).__name__}")
    if example_inputs is None:
        raise FliqsError(f"{type(module).__name__}: importing a torch module needs example_inputs "
                         "(a tuple of tensors with the real input shapes)")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    if not all(isinstance(t, torch.Tensor) for t in example_inputs):
        raise FliqsError(f"{type(module).__name__}: example_inputs must be a tuple of tensors")
    was_training = module.training
    module.eval()
    try:
        try:
            gm = _export(module, example_inputs)
        except Exception as export_error:  # noqa: BLE001 — any export failure → fallback
            try:
                gm = fx.symbolic_trace(module)
                gm(*example_inputs)
            except Exception:  # noqa: BLE001
                raise FliqsError(
                    f"{type(module).__name__}: torch.export failed ({one_line(export_error)}) and "
                    "torch.fx.symbolic_trace failed too; remove data-dependent control flow "
                    "or export the model to ONNX and import that") from None
    finally:
        module.train(was_training)
    from fliqs_compiler.frontends.sdpa import decompose_sdpa
    from fliqs_compiler.ir.graph import enable_train_eval
    decompose_sdpa(gm)
    enable_train_eval(gm)  # ExportedProgram.module() refuses .train()/.eval(); callers toggle modes
    with torch.no_grad():
        out = gm(*example_inputs)
    n_out = len(out) if isinstance(out, (tuple, list)) else 1
    names = ["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)]
    return Graph(gm, _specs(gm, example_inputs), name=type(module).__name__,
                 output_names=names, source="torch")
