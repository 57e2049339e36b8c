"""ONNX QuantizeLinear / DequantizeLinear: a Q→DQ pair becomes one ``torch.ops.fliqs.fake_quant``
node with the registry format of the quantized type; DQ of a stored quantized tensor (a weight)
computes ``(q - zero_point) * scale`` and folds to a float constant."""
from __future__ import annotations

from typing import Optional

import torch

from fliqs_compiler.frontends.builder import V, require_const
from fliqs_compiler.numerics import quant  # noqa: F401 — registers torch.ops.fliqs.fake_quant
from fliqs_compiler.frontends.onnx_ops import PendingQ, axis_of, op, qformat, qtype


def _q_axis(n, scale: V, a: dict, rank: int) -> Optional[int]:
    """None for a per-tensor scale, else the (non-negative) channel axis."""
    if a.get("block_size", 0):
        raise n.fail("blocked quantization (block_size) is not supported")
    return None if scale.const.numel() == 1 else axis_of(a.get("axis", 1), rank)


@op("QuantizeLinear")
def _quantize(b, n, x, a):
    """Deferred: returns a PendingQ that the consuming DequantizeLinear turns into fake_quant.
    Requires constant scale / zero point and a quantized type with a fliqs format."""
    if a.get("saturate", 1) != 1:
        raise n.fail("saturate=0 is not supported")
    scale = require_const(x[1], "scale", n.name)
    zp = x[2] if len(x) > 2 and x[2] is not None else None
    if zp is not None:
        require_const(zp, "zero point", n.name)
    t = qtype(zp, a)
    qformat(t, n)
    return PendingQ(x[0], scale, zp, t, _q_axis(n, scale, a, x[0].ndim), n)


@op("DequantizeLinear")
def _dequantize(b, n, x, a):
    """Q→DQ with matching scale/zero point/axis → one fake_quant node (folds when the input is
    constant); DQ of a quantized tensor → ``(q - zp) * scale`` (folds for stored weights)."""
    q = x[0]
    scale = require_const(x[1], "scale", n.name)
    zp = x[2] if len(x) > 2 and x[2] is not None else None
    if isinstance(q, PendingQ):
        axis = _q_axis(n, scale, a, q.x.ndim)
        if not _same(q.scale, scale) or not _same(q.zero_point, zp) or q.axis != axis:
            raise n.fail(f"its QuantizeLinear {q.node.name!r} uses a different scale/zero point/"
                         "axis; only matching Q→DQ pairs are supported")
        fmt = qformat(q.onnx_type, n)
        zpt = None
        if zp is not None and fmt.has_integer_levels and bool((zp.const != 0).any()):
            zpt = V(const=zp.const.to(torch.float32).reshape(-1), name=zp.name)
        s = V(const=scale.const.to(torch.float32).reshape(-1), name=scale.name)
        return b.call(torch.ops.fliqs.fake_quant.default, q.x, s, zpt, fmt.name, axis)
    # a real quantized tensor (usually a weight initializer): (q - zp) * scale
    axis = _q_axis(n, scale, a, q.ndim)
    shape = [1] * q.ndim
    if axis is not None:
        shape[axis] = -1
    s = V(const=scale.const.to(torch.float32).reshape(shape if axis is not None else ()))
    out = b.call(torch.Tensor.to, q, torch.float32)
    if zp is not None and bool((zp.const.to(torch.float32) != 0).any()):
        z = V(const=zp.const.to(torch.float32).reshape(shape if axis is not None else ()))
        out = b.call(torch.sub, out, z)
    return b.call(torch.mul, out, s)


def _same(u: Optional[V], v: Optional[V]) -> bool:
    if u is None or v is None:
        return (u is None or not bool((u.const.float() != 0).any())) and \
               (v is None or not bool((v.const.float() != 0).any()))
    return u.const.shape == v.const.shape and bool((u.const.float() == v.const.float()).all())
