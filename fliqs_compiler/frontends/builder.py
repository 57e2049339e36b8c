"""The fx-graph builder the ONNX op table writes through.

Every ONNX value becomes a :class:`V`: either a *constant* (a real CPU tensor, known at import
time) or a *dynamic* value (an fx node plus a ``meta``-device tensor that carries its shape and
dtype). :meth:`Builder.call` applies a ``torch`` / ``torch.nn.functional`` callable: if every
argument is constant it evaluates eagerly (this is how shape arithmetic — Shape, Gather, Concat,
Cast, … — folds to constants once input shapes are pinned); otherwise it adds one
``call_function`` node and runs the callable on meta tensors to learn the output shape.

Constants reaching a dynamic node become ``get_attr`` nodes: ``nn.Parameter`` when the op table
marked them trainable (:meth:`Builder.param`: conv/gemm/matmul weights, norm parameters) and
float, buffers otherwise.
"""
from __future__ import annotations

import operator
import re
from typing import Any, Callable, Optional

import torch
from torch import fx
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from fliqs_compiler.base.errors import FliqsError

__all__ = ["V", "Builder", "sanitize", "MAX_ELEMENTS", "check_numel"]

# One tensor larger than this (1 GiB of float32) means a corrupt or absurd shape, not a model
# fliqs can search on a CPU: refused before anything is allocated.
MAX_ELEMENTS = 2 ** 28


def check_numel(shape, where: str) -> None:
    """Raise a one-line FliqsError when a tensor of ``shape`` would exceed MAX_ELEMENTS."""
    numel = 1
    for d in shape:
        numel *= max(int(d), 0)
    if numel > MAX_ELEMENTS:
        raise FliqsError(f"{where} would make a tensor of {numel:,} elements "
                         f"({'x'.join(str(int(d)) for d in shape)}); the model's shapes are "
                         "corrupt or far too large")


class V:
    """One ONNX value: ``const`` (CPU tensor) or ``node`` (fx node) with ``meta`` (meta tensor)."""

    __slots__ = ("const", "node", "meta", "name", "trainable", "onnx_type")

    def __init__(self, const: Optional[torch.Tensor] = None, node: Optional[fx.Node] = None,
                 meta: Optional[torch.Tensor] = None, name: str = "",
                 onnx_type: Optional[int] = None):
        self.const, self.node, self.meta, self.name = const, node, meta, name
        self.trainable = False
        self.onnx_type = onnx_type  # the ONNX element type, where torch has no exact dtype (int4)

    @property
    def is_const(self) -> bool:
        return self.const is not None

    @property
    def shape(self) -> tuple:
        return tuple((self.const if self.is_const else self.meta).shape)

    @property
    def dtype(self) -> torch.dtype:
        return (self.const if self.is_const else self.meta).dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def ints(self) -> list[int]:
        """The constant's values as python ints (shape arithmetic inputs)."""
        return [int(v) for v in self.const.reshape(-1).tolist()]

    def floats(self) -> list[float]:
        return [float(v) for v in self.const.reshape(-1).tolist()]


def sanitize(name: str) -> str:
    """A python identifier made from an ONNX name (used for fx node and attribute names)."""
    s = re.sub(r"\W", "_", name).strip("_") or "v"
    return "_" + s if s[0].isdigit() else s


class Builder:
    """Accumulates an ``fx.Graph`` and the root module's parameters/buffers.

    Requires: handlers call :meth:`call` with callables that work on CPU and meta tensors.
    Guarantees: every node created while ``current`` is set carries ``meta['onnx_name']`` and
    ``meta['onnx_op']`` plus ``meta['tensor_meta']``; constants are materialised once each.
    """

    def __init__(self):
        self.graph = fx.Graph()
        self.root = torch.nn.Module()
        self.current: Optional[tuple[str, str]] = None  # (onnx_name, onnx_op)
        self._attr_names: set[str] = set()
        self._materialized: dict[tuple, fx.Node] = {}
        self._keep: list = []  # keeps materialised constants alive (their ids are cache keys)

    # -- values -----------------------------------------------------------------------------
    def placeholder(self, name: str, shape: tuple, dtype: torch.dtype) -> V:
        node = self.graph.placeholder(sanitize(name))
        meta = torch.empty(shape, dtype=dtype, device="meta")
        node.meta["tensor_meta"] = _extract_tensor_metadata(meta)
        node.meta["onnx_name"] = name
        return V(node=node, meta=meta, name=name)

    @staticmethod
    def param(v: Optional[V]) -> Optional[V]:
        """The trainable view of a float constant (it becomes an ``nn.Parameter``).

        Returns a new ``V`` sharing the tensor, so the same initializer read elsewhere (e.g. a
        deduplicated zeros tensor that is also a BN running mean) stays a buffer there.
        """
        if v is None or not v.is_const or not v.const.is_floating_point() or v.trainable:
            return v
        out = V(const=v.const, name=v.name, onnx_type=v.onnx_type)
        out.trainable = True
        return out

    def node_of(self, v: V) -> fx.Node:
        """The fx node for ``v``; constants become ``get_attr`` of a parameter or buffer."""
        if not v.is_const:
            return v.node
        key = (id(v.const), v.trainable)
        if key in self._materialized:
            return self._materialized[key]
        base = sanitize(v.name or "const")
        name, i = base, 1
        while name in self._attr_names or hasattr(self.root, name):
            name, i = f"{base}_{i}", i + 1
        self._attr_names.add(name)
        t = v.const.detach().clone().contiguous()
        if v.trainable:
            self.root.register_parameter(name, torch.nn.Parameter(t, requires_grad=True))
        else:
            self.root.register_buffer(name, t)
        saved, self.current = self.current, None
        node = self.graph.get_attr(name)
        self.current = saved
        node.meta["tensor_meta"] = _extract_tensor_metadata(t)
        self._materialized[key] = node
        self._keep.append(v.const)
        return node

    # -- ops --------------------------------------------------------------------------------
    def call(self, fn: Callable, *args: Any, **kwargs: Any):
        """Apply ``fn``: folded when all ``V`` arguments are constant, else one fx node.

        Returns a ``V`` (or a list of ``V`` when ``fn`` returns a tuple/list of tensors).
        """
        dynamic = []
        map_aggregate((args, kwargs),
                      lambda a: dynamic.append(a) if isinstance(a, V) and not a.is_const else None)
        if not dynamic:
            self._check_sizes(fn, args, kwargs)
            out = fn(*_unwrap(args, "const"), **_unwrap(kwargs, "const"))
            if isinstance(out, (tuple, list)):
                return [V(const=o) for o in out]
            return V(const=out)
        fx_args = map_aggregate(args, lambda a: self.node_of(a) if isinstance(a, V) else a)
        fx_kwargs = map_aggregate(kwargs, lambda a: self.node_of(a) if isinstance(a, V) else a)
        meta_out = fn(*_unwrap(args, "meta"), **_unwrap(kwargs, "meta"))
        self._check_outputs(meta_out)
        node = self._new_node(fn, fx_args, fx_kwargs, meta_out)
        if isinstance(meta_out, (tuple, list)):
            outs = []
            for i, m in enumerate(meta_out):
                item = self._new_node(operator.getitem, (node, i), {}, m)
                outs.append(V(node=item, meta=m))
            return outs
        return V(node=node, meta=meta_out)

    def _where(self) -> str:
        return f"node {self.current[0]!r} ({self.current[1]})" if self.current else "a constant"

    def _check_outputs(self, out) -> None:
        for o in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(o, torch.Tensor):
                check_numel(o.shape, self._where())

    def _check_sizes(self, fn, args, kwargs) -> None:
        """Before folding: the output size from a meta run (ops without a meta kernel fold
        unchecked; their outputs are bounded by their inputs)."""
        try:
            meta = fn(*_unwrap(args, "meta"), **_unwrap(kwargs, "meta"))
        except Exception:  # noqa: BLE001 — no meta kernel, or the real call fails too
            return
        self._check_outputs(meta)

    def _new_node(self, fn, args, kwargs, meta_out) -> fx.Node:
        name = sanitize(self.current[0]) if self.current else None
        node = self.graph.create_node("call_function", fn, args, kwargs, name=name)
        if isinstance(meta_out, torch.Tensor):
            node.meta["tensor_meta"] = _extract_tensor_metadata(meta_out)
        if self.current:
            node.meta["onnx_name"], node.meta["onnx_op"] = self.current
        return node

    def output(self, values: list[V]) -> None:
        nodes = [self.node_of(v) for v in values]
        self.graph.output(nodes[0] if len(nodes) == 1 else tuple(nodes))

    def finish(self, class_name: str) -> fx.GraphModule:
        self.graph.eliminate_dead_code()
        self.graph.lint()
        gm = fx.GraphModule(self.root, self.graph, class_name=sanitize(class_name))
        return gm


def _unwrap(tree, field: str):
    def f(a):
        if not isinstance(a, V):
            return a
        if field == "const":
            return a.const
        return a.meta if not a.is_const else a.const.to("meta")
    return map_aggregate(tree, f)


def require_const(v: Optional[V], what: str, node_name: str) -> V:
    """Raise a one-line FliqsError when a shape-like input did not fold to a constant."""
    if v is None or not v.is_const:
        raise FliqsError(f"node {node_name!r}: its {what} input is computed from data at run time "
                         "and could not be folded to a constant; pin the input shapes with "
                         "--input-shape NAME=1x3x224x224 or simplify the model (onnxsim)")
    return v
