"""ONNX operator table: ``OPS[op_type](b, n, x, a) -> V | list[V]``.

``b`` is the :class:`~fliqs_compiler.frontends.builder.Builder`, ``n`` the :class:`NodeInfo`
(name, op type, opset), ``x`` the input values (``None`` for omitted optional inputs) and ``a``
the attributes as python values. Handlers compose ``torch`` / ``torch.nn.functional`` callables
through ``b.call`` (constant inputs fold at import time) and mark weights trainable with
``b.param``. Anything a handler cannot express exactly raises a one-line ``FliqsError``.

This module holds the registry and shared helpers; the handlers live in ``ops_nn`` (elementwise,
conv/linear, normalization, pooling, reductions), ``ops_shape`` (shape and data movement,
Resize) and ``ops_qdq`` (QuantizeLinear→DequantizeLinear pairs → one
``torch.ops.fliqs.fake_quant`` node), imported at the bottom to fill :data:`OPS`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from fliqs_compiler.numerics import formats
from fliqs_compiler.base.errors import FliqsError, one_line
from fliqs_compiler.frontends.builder import V, require_const

__all__ = ["OPS", "NodeInfo", "PendingQ", "ONNX_TO_TORCH_DTYPE", "op", "qformat", "tensor_value"]

OPS: dict[str, Callable] = {}

ONNX_TO_TORCH_DTYPE = {
    1: torch.float32, 2: torch.uint8, 3: torch.int8, 4: torch.uint16, 5: torch.int16,
    6: torch.int32, 7: torch.int64, 9: torch.bool, 10: torch.float16, 11: torch.float64,
    12: torch.uint32, 13: torch.uint64, 16: torch.bfloat16, 17: torch.float8_e4m3fn,
    19: torch.float8_e5m2, 21: torch.uint8, 22: torch.int8,  # uint4/int4 stored widened
}
_TORCH_TO_ONNX = {v: k for k, v in ONNX_TO_TORCH_DTYPE.items() if k not in (21, 22)}


@dataclass
class NodeInfo:
    name: str
    op: str
    opset: int
    num_outputs: int = 1

    def fail(self, what: str) -> FliqsError:
        return FliqsError(f"node {self.name!r} ({self.op}): {what}")


@dataclass
class PendingQ:
    """A QuantizeLinear whose only consumers are DequantizeLinear nodes (fused on use)."""

    x: V
    scale: V
    zero_point: Optional[V]
    onnx_type: int
    axis: Optional[int]
    node: NodeInfo


def op(*names):
    """Register the decorated handler for each ONNX op type in ``names``."""
    def deco(fn):
        for name in names:
            OPS[name] = fn
        return fn
    return deco


def axis_of(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def attr_or_input(x, i, a, key, default=None, n=None):
    """Opset-dependent operands: an input (newer opsets) or an attribute (older)."""
    if len(x) > i and x[i] is not None:
        return require_const(x[i], key, n.name).ints()
    return a.get(key, default)


def qtype(v: Optional[V], a: dict) -> int:
    if v is not None:
        return v.onnx_type or _TORCH_TO_ONNX[v.dtype]
    return a.get("output_dtype", 0) or 2  # default uint8


def qformat(onnx_type: int, node: NodeInfo) -> formats.Format:
    """The registry format whose ONNX element type is ``onnx_type``."""
    for fmt in formats.by_kind("int") + formats.by_kind("fp"):
        if fmt.onnx_type == onnx_type:
            return fmt
    raise node.fail(f"quantized ONNX element type {onnx_type} has no fliqs format")


def torch_pad_order(pads):
    """ONNX [b1, b2, ..., e1, e2, ...] (spatial dims) → F.pad's (bn, en, ..., b1, e1)."""
    k = len(pads) // 2
    out = []
    for i in reversed(range(k)):
        out += [pads[i], pads[i + k]]
    return out


# the handler modules register themselves into OPS on import


def tensor_value(t, name: str = "") -> V:
    """Decode an ONNX TensorProto into a constant ``V`` (int4/uint4 widened to int8/uint8)."""
    from onnx import numpy_helper

    try:
        arr = numpy_helper.to_array(t)
    except Exception as e:  # noqa: BLE001 — data that does not match its dims / element type
        raise FliqsError(f"tensor {name or t.name!r} cannot be decoded ({one_line(e)}); "
                         "re-export the model") from None
    kind = str(arr.dtype)
    if t.data_type in (21, 22):  # uint4 / int4 → widened integers, element type remembered
        arr = arr.astype(np.uint8 if t.data_type == 21 else np.int8)
        return V(const=torch.from_numpy(np.ascontiguousarray(arr)), name=name or t.name,
                 onnx_type=t.data_type)
    dtype = ONNX_TO_TORCH_DTYPE.get(t.data_type)
    if dtype is None:
        raise FliqsError(f"tensor {name or t.name!r} has ONNX element type {t.data_type} ({kind}), "
                         "which fliqs cannot import; convert it to float32/int64 first")
    if dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
        raw = np.ascontiguousarray(arr).view(np.uint16 if dtype == torch.bfloat16 else np.uint8)
        tensor = torch.from_numpy(raw.copy()).view(dtype)
    else:
        tensor = torch.from_numpy(np.array(arr, copy=True))
    return V(const=tensor, name=name or t.name)


from fliqs_compiler.frontends import ops_nn, ops_qdq, ops_shape  # noqa: E402,F401
