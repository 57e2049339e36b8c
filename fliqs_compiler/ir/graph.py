"""``Graph``: the one object every stage passes around — an ``fx.GraphModule`` plus what the
frontends and passes learned about it (inputs, quantizable layers, the search space).

Node naming: each quantizable layer has a public ``name`` (the ONNX node name for imported
models, the fx node name for torch modules). That name is the key in ``config.json`` and in
``fliqs inspect``; ``LayerInfo.node`` is the fx node it corresponds to.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import fx

__all__ = ["InputSpec", "LayerInfo", "Graph", "set_training", "enable_train_eval"]


@dataclass
class InputSpec:
    name: str
    shape: tuple
    dtype: str = "float32"

    def random(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        dtype = getattr(torch, self.dtype)
        if dtype.is_floating_point:
            return torch.randn(self.shape, generator=generator).to(dtype)
        return torch.randint(0, 2, self.shape, generator=generator).to(dtype)


@dataclass
class LayerInfo:
    """One quantizable node (conv, conv-transpose, linear/Gemm, MatMul)."""

    name: str  # public name (config.json key)
    op: str  # 'conv1d' | 'conv2d' | 'conv_transpose1d' | 'conv_transpose2d' | 'linear' | 'matmul'
    node: str  # fx node name
    macs: int = 0
    params: int = 0
    group: str = ""  # decision group name
    weight_shape: Optional[tuple] = None
    input_shape: Optional[tuple] = None
    output_shape: Optional[tuple] = None
    keep_float: bool = False  # excluded from the search by keep-float rules
    attrs: dict = field(default_factory=dict)  # stride, padding, groups, ... (for signatures)

    def signature(self) -> str:
        """A key that identifies the layer's computation shape (for latency tables)."""
        a = ",".join(f"{k}={v}" for k, v in sorted(self.attrs.items()))
        return f"{self.op}|in={self.input_shape}|w={self.weight_shape}|{a}"


class Graph:
    """An fx graph with the facts passes need. ``graph(*inputs)`` runs it."""

    def __init__(self, gm: fx.GraphModule, inputs: Sequence[InputSpec], name: str = "model",
                 output_names: Optional[Sequence[str]] = None, source: Optional[str] = None):
        self.gm = gm
        self.inputs = list(inputs)
        self.name = name
        self.output_names = list(output_names or [])
        self.source = source  # path of the ONNX file, or 'torch'
        self.layers: dict[str, LayerInfo] = {}  # filled by passes.discover_quantizable
        self.space = None  # SearchSpace, filled by passes.insert_quantizers / group_decisions
        # pass timings, notes; ONNX imports add "batch": {"dynamic": bool, "size": traced batch,
        # "pinned_by": one-line reason or None, "unpinned": ONNX nodes whose literal batch-1
        # targets were generalized, "inputs": the batch inputs} (frontends/batch.py)
        self.meta: dict[str, Any] = {}

    def __call__(self, *args):
        return self.gm(*args)

    def example_inputs(self, seed: int = 0) -> tuple:
        g = torch.Generator().manual_seed(seed)
        return tuple(spec.random(g) for spec in self.inputs)

    def quantizable(self) -> list[LayerInfo]:
        return list(self.layers.values())

    def searched_layers(self) -> list[LayerInfo]:
        return [layer for layer in self.layers.values() if not layer.keep_float]

    def fx_node(self, node_name: str) -> fx.Node:
        for n in self.gm.graph.nodes:
            if n.name == node_name:
                return n
        raise KeyError(node_name)

    def __repr__(self):
        return f"Graph({self.name!r}, inputs={self.inputs}, layers={len(self.layers)})"


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
