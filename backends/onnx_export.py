"""Export a materialized ``Graph`` to standard QDQ ONNX (opset 21; 23 only when FP4 is used).

Pipeline of ``export_qdq``:
1. ``torch.onnx.export(dynamo=True)`` with a custom translation: each
   ``torch.ops.fliqs.fake_quant`` node becomes one placeholder node ``fliqs.FakeQuant``
   (attributes ``fmt``, ``axis``, ``shape``), everything else is the stock exporter. A graph
   that runs on any batch size (``batch_inputs``: ``graph.meta['batch']`` of ONNX imports, the
   symbolic leading dim torch imports carry) is exported with ``dynamic_shapes``: the leading
   dim of its batch inputs and outputs is the symbol ``batch`` (``BATCH_DIM``), so users run
   any batch; a pinned graph keeps its static dims (``graph.meta['batch']['pinned_by']`` says
   why).
2. ``lower_fake_quant`` replaces every placeholder by standard ONNX ops, choosing the rule
   from the format's data (``Format.onnx_type`` / ``grid``, the ``ONNX_NATIVE`` table), see
   ``_RUNTIME_RULES``; every scale, zero point, axis and stored code is the quantizer's
   ``numerics.qspec.QuantSpec``:
   - weights (placeholder input is an initializer) are quantized offline: the quantized
     values are stored as a low-precision initializer + ``DequantizeLinear`` (per-axis scale;
     MX: ``block_size=32`` with the E8M0 block scales as float). Formats without an ONNX type
     are stored in the smallest container type that holds their grid exactly
     (int2/int3 -> INT4, int5..7 -> INT8, fp6/fp4 elements -> FLOAT8E4M3FN); bf16/fp16 weights
     are stored as BFLOAT16/FLOAT16 + ``Cast``. Each folded weight is checked bit-exact against
     ``fq.fake_quant``.
   - activations: ``QuantizeLinear``/``DequantizeLinear`` for INT8/UINT8/INT4/UINT4/FP8/FP4;
     ``Clip`` + ``Cast`` pairs for bf16/fp16; formats without an ONNX type (int2..7, uint2/3,
     fp6_*, MX) are decomposed into standard ops computing exactly ``fq.fake_quant``
     (Round/Clip for integers; a Where-chain for the exponent of small floats; for MX, exact
     ``floor(log2(block absmax))`` via Log + Pow correction and per-block power-of-two scales).
3. Form fixes for onnxruntime (numerically neutral, ``ORT_FORM_FIXES``) so that a DEFAULT
   ``onnxruntime.InferenceSession(path)`` computes what the graph means: ``gemm_to_matmul``
   (per-channel QDQ Gemm → MatMul + Sub(-bias) so ORT uses integer MatMul kernels and its
   MatMulAddFusion cannot rebuild a Gemm whose bias it rounds to int32; the constant bias
   ``Add`` of every quantized MatMul becomes such a ``Sub`` too: on static shapes the fusion
   wraps a 3-D MatMul + Add in Reshapes that make a QDQ session fail to build),
   ``detach_float_bias`` (the bias of a conv that is not an 8-bit integer kernel as a separate
   Add: ORT's int32 bias quantization overflows at FP8 scales and rounds at 4 bits),
   ``shield_float_weight`` (ORT would quantize a float/bf16 weight behind a DQ input to INT8),
   ``shield_weight_only_matmul`` (ORT's MatMulNBits would re-quantize the float activations of a
   MatMul on a quantized constant weight to INT8),
   ``shield_blocked_weight`` (ORT's MatMulIntegerToFloat, fused from an integer activation and
   a blocked mxint8 weight, cannot broadcast the block scales and fails at run time),
   ``shield_softmax_input`` (ORT's QLinearSoftmax, fused from DQ → Softmax → Q, computes other
   probabilities than Softmax then Q),
   ``shield_unbuildable_q`` (a 4-bit Q that QDQ propagation would move across a MaxPool, or a
   4-bit / FP8 Q right after a Clip — ReLU6 — makes the session fail to build) and
   ``protect_relu_before_unclamped_q`` (ReluQuantRewrite, after QDQ propagation, drops a ReLU
   before an FP8/INT4 QuantizeLinear, which does not clamp negatives).
4. ``onnx.checker.check_model(full_check=True)`` and an atomic write.

onnxruntime 1.32 facts this relies on (measured): blocked ``DequantizeLinear`` (``block_size``)
works for INT8/INT4/UINT4/FLOAT8E4M3FN/FLOAT8E5M2 at opset 21, blocked ``QuantizeLinear`` for
INT8; nothing at all is implemented for FLOAT4E2M1 (Q, DQ, Cast at opset 23). MX activations
need data-dependent E8M0 scales that no single ONNX op computes, so they are always decomposed
(static shapes but the batch, a ``-1`` in the block Reshapes); MX weights use blocked DQ
(mxint8 ones behind a barrier, ``shield_blocked_weight``). FP4 models (``native_fp4=True``)
therefore only run in ``onnx.reference.ReferenceEvaluator``; ``native_fp4=False`` decomposes
FP4 (opset 21, runs in ORT).
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from fliqs_compiler.numerics import formats as F
from fliqs_compiler.base import atomic
from fliqs_compiler.base.errors import FliqsError, one_line
from fliqs_compiler.numerics.qspec import QuantSpec
from fliqs_compiler.numerics.quant import quantize_to_grid
from fliqs_compiler.numerics.quantizers import FormatQuantizer

__all__ = ["export_qdq", "lower_fake_quant", "quantizer_nodes", "spec_nodes", "gemm_to_matmul",
           "detach_float_bias",
           "protect_relu_before_unclamped_q", "shield_unbuildable_q", "shield_float_weight",
           "ORT_FORM_FIXES",
           "formats_used", "required_opset", "save_atomic", "batch_inputs", "BATCH_DIM",
           "shield_blocked_weight", "shield_softmax_input"]

DOMAIN = "fliqs"
_TP = TensorProto
# What ONNX expresses natively per element type: (form, lowest opset). 'qdq': an element type
# of QuantizeLinear / DequantizeLinear; 'cast': Clip + Cast pairs (bf16 / fp16). A format whose
# ``onnx_type`` is not here is decomposed into standard ops (see the module docstring).
ONNX_NATIVE = {
    _TP.INT8: ("qdq", 21), _TP.UINT8: ("qdq", 21), _TP.INT4: ("qdq", 21), _TP.UINT4: ("qdq", 21),
    _TP.FLOAT8E4M3FN: ("qdq", 21), _TP.FLOAT8E5M2: ("qdq", 21),
    _TP.FLOAT4E2M1: ("qdq", 23),  # and IR 11; onnxruntime 1.32 has no kernel for it
    _TP.FLOAT16: ("cast", 21), _TP.BFLOAT16: ("cast", 21),
}
QDQ_TYPES = {t for t, (form, _) in ONNX_NATIVE.items() if form == "qdq"}
CAST_TYPES = {t for t, (form, _) in ONNX_NATIVE.items() if form == "cast"}
FP4_TYPES = {t for t, (_, opset) in ONNX_NATIVE.items() if opset > 21}  # need opset 23
# Storage containers for weights whose format has no ONNX type, smallest first. fp16 (Cast up)
# holds any fp grid of ≤ 10 mantissa bits within its range (e.g. FP8 E3M4, which no FP8 type
# can hold: 4 mantissa bits).
CONTAINERS = ("int4", "uint4", "int8", "uint8", "fp8_e4m3", "fp8_e5m2", "fp16")


# ---- step 1: torch -> ONNX with one placeholder per fake_quant ----------------------------------
def _register_schema() -> None:
    """Register ``fliqs.FakeQuant`` so the exporter can emit it (replaced before saving)."""
    D = onnx.defs
    if D.has("FakeQuant", DOMAIN):
        return
    P = D.OpSchema.FormalParameter
    opt = D.OpSchema.FormalParameterOption.Optional
    D.register_schema(D.OpSchema(
        "FakeQuant", DOMAIN, 1, doc="fliqs fake_quant placeholder (lowered by export_qdq)",
        inputs=[P("x", "T"), P("scale", "T"), P("zero_point", "T", param_option=opt)],
        outputs=[P("y", "T")], type_constraints=[("T", ["tensor(float)"], "float32")],
        attributes=[D.OpSchema.Attribute("fmt", D.OpSchema.AttrType.STRING, "format name"),
                    D.OpSchema.Attribute("axis", D.OpSchema.AttrType.INT, "axis, -1: none"),
                    D.OpSchema.Attribute("shape", D.OpSchema.AttrType.INTS, "static shape")]))


def _translate(x, scale, zero_point=None, fmt: str = "float", axis: Optional[int] = None):
    import onnxscript
    opset = onnxscript.values.Opset(DOMAIN, 1)
    shape = [d if isinstance(d, int) else -1 for d in (x.shape or [])]
    return opset.FakeQuant(x, scale, zero_point, fmt=fmt, axis=-1 if axis is None else int(axis),
                           shape=shape)


def formats_used(graph) -> set:
    """Executed format names of every quantizer in ``graph.gm`` (modules or exported op nodes)."""
    used = {m.fmt for m in graph.gm.modules() if isinstance(m, FormatQuantizer)}
    for node in graph.gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.fliqs.fake_quant.default:
            used.add(F.get(node.args[3]).name)
    return used - {"float"}


def required_opset(fmt_names, native_fp4: bool = True) -> int:
    """23 when a format is exported with an FP4 ONNX type, else 21."""
    fp4 = any(F.get(n).onnx_type in FP4_TYPES for n in fmt_names)
    return 23 if (fp4 and native_fp4) else 21


# ---- step 2: lowering of the placeholders --------------------------------------------------------
class _Builder:
    """Collects new nodes / initializers with unique names derived from a prefix."""

    def __init__(self, prefix: str, inits: dict):
        self.prefix, self.inits, self.nodes, self.n = prefix, inits, [], 0

    def _name(self, hint: str) -> str:
        self.n += 1
        return f"{self.prefix}/{hint}_{self.n}"

    def const(self, value, hint="c", dtype=np.float32) -> str:
        name = self._name(hint)
        arr = np.asarray(value, dtype=dtype) if dtype is not None else np.asarray(value)
        self.inits[name] = numpy_helper.from_array(arr, name)
        return name

    def op(self, op_type, inputs, out=None, **attrs) -> str:
        out = out or self._name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=out + "_node",
                                           **attrs))
        return out


def _emit_levels_grid(b: _Builder, v: str, fmt: F.Format) -> str:
    step = fmt.min_subnormal
    k = b.op("Round", [b.op("Div", [v, b.const(step)])] if step != 1.0 else [v])
    k = b.op("Clip", [k, b.const(fmt.qmin), b.const(fmt.qmax)])
    return b.op("Mul", [k, b.const(step)]) if step != 1.0 else k


def _emit_float_grid(b: _Builder, v: str, fmt: F.Format) -> str:
    clipped = b.op("Clip", [v, b.const(-fmt.max_finite), b.const(fmt.max_finite)])
    if fmt.onnx_type in CAST_TYPES or fmt.onnx_type in (QDQ_TYPES - FP4_TYPES):
        return b.op("Cast", [b.op("Cast", [clipped], to=fmt.onnx_type)], to=_TP.FLOAT)
    # Small float without a runnable ONNX type: ulp = 2^(clamp(floor(log2|v|), emin, emax) - m),
    # built from exact comparisons against powers of two; then RNE on the ulp grid.
    a = b.op("Abs", [clipped])
    ulp = b.const(2.0 ** (fmt.emin - fmt.mbits))
    for e in range(fmt.emin + 1, F.emax_of(fmt) + 1):
        ge = b.op("GreaterOrEqual", [a, b.const(2.0 ** e)])
        ulp = b.op("Mul", [ulp, b.op("Where", [ge, b.const(2.0), b.const(1.0)])])
    q = b.op("Mul", [b.op("Round", [b.op("Div", [a, ulp])]), ulp])
    neg = b.op("Less", [v, b.const(0.0)])
    return b.op("Where", [neg, b.op("Neg", [q]), q])


# ONNX ops computing ``quant.quantize_to_grid`` per ``Format.grid``.
_GRID_EMITTERS = {"levels": _emit_levels_grid, "float": _emit_float_grid}


def _emit_grid(b: _Builder, v: str, fmt: F.Format) -> str:
    """ONNX ops computing ``quant.quantize_to_grid(v, fmt)`` exactly (unscaled element values)."""
    return _GRID_EMITTERS[fmt.grid](b, v, fmt)


def _emit_scaled(b, x, spec: QuantSpec, rank, out):
    """``fake_quant`` of an element format without Q/DQ: (grid(x / s [+ zp]) [- zp]) * s."""
    fmt = spec.fmt
    s = spec.broadcast(spec.scale, rank)
    v = b.op("Div", [x, b.const(s, "scale")]) if not np.all(s == 1.0) else x
    if spec.zero_point is not None and fmt.has_integer_levels:
        z = b.const(spec.broadcast(spec.zero_point, rank), "zp")
        k = b.op("Add", [b.op("Round", [v]), z])
        k = b.op("Clip", [k, b.const(fmt.qmin), b.const(fmt.qmax)])
        q = b.op("Sub", [k, z])
    else:
        q = _emit_grid(b, v, fmt)
    if np.all(s == 1.0):
        return b.op("Identity", [q], out=out)
    return b.op("Mul", [q, b.const(s, "scale")], out=out)


def _emit_qdq(b, x, spec: QuantSpec, rank, out):
    """Standard QuantizeLinear -> DequantizeLinear (per tensor or per axis)."""
    s = spec.scale if spec.per_channel else spec.scale.reshape(())
    z = np.zeros_like(s) if spec.zero_point is None else spec.zero_point.reshape(s.shape)
    zname = b._name("zero_point")
    b.inits[zname] = numpy_helper.from_array(z.astype(spec.fmt.np_dtype), zname)
    attrs = {"axis": spec.axis} if spec.per_channel else {}
    sname = b.const(s, "scale")
    q = b.op("QuantizeLinear", [x, sname, zname], **attrs)
    return b.op("DequantizeLinear", [q, sname, zname], out=out, **attrs)


def _emit_mx(b, x, spec: QuantSpec, rank, out, shape):
    """MX block quantization of a runtime tensor along the spec's block axis."""
    fmt = spec.fmt
    el, blk = spec.element, spec.block_size
    axis = spec.block_axis_of(rank)
    # one symbolic dim (the batch) other than the block axis is a -1 in both Reshapes
    if shape[axis] < 0 or sum(d < 0 for d in shape) > 1:
        raise FliqsError(f"MX format {fmt.name} on {out!r} needs a static input shape; pin it "
                         "with --input-shape")
    s = float(spec.scale[0])
    v = b.op("Div", [x, b.const(s)]) if s != 1.0 else x
    perm = [i for i in range(rank) if i != axis] + [axis]
    moved = [shape[i] for i in perm]
    n, pad = moved[-1], (-moved[-1]) % blk
    if perm != list(range(rank)):
        v = b.op("Transpose", [v], perm=perm)
    if pad:
        v = b.op("Pad", [v, b.const([0] * (2 * rank - 1) + [pad], "pads", np.int64)])
    moved = [-1 if d < 0 else d for d in moved]
    blocks = b.op("Reshape", [v, b.const(moved[:-1] + [(n + pad) // blk, blk], "shape", np.int64)])
    amax = b.op("ReduceMax", [b.op("Abs", [blocks]), b.const([-1], "axes", np.int64)], keepdims=1)
    # exact floor(log2(amax)): estimate with Log, correct by comparing with exact powers of two
    two = b.const(2.0)
    e0 = b.op("Floor", [b.op("Mul", [b.op("Log", [amax]), b.const(1.0 / np.log(2.0))])])
    p = b.op("Pow", [two, e0])
    too_big = b.op("Cast", [b.op("Greater", [p, amax])], to=_TP.FLOAT)
    too_small = b.op("Cast", [b.op("LessOrEqual", [b.op("Mul", [p, two]), amax])], to=_TP.FLOAT)
    e = b.op("Add", [b.op("Sub", [e0, too_big]), too_small])
    shared = b.op("Sub", [e, b.const(F.emax_of(el))])
    shared = b.op("Clip", [shared, b.const(-127.0), b.const(127.0)])
    shared = b.op("Where", [b.op("Greater", [amax, b.const(0.0)]), shared, b.const(-127.0)])
    bscale = b.op("Pow", [two, shared])
    q = b.op("Mul", [_emit_grid(b, b.op("Div", [blocks, bscale]), el), bscale])
    q = b.op("Reshape", [q, b.const(moved[:-1] + [n + pad], "shape", np.int64)])
    if pad:
        q = b.op("Slice", [q, b.const([0], "st", np.int64), b.const([n], "en", np.int64),
                           b.const([rank - 1], "ax", np.int64)])
    if perm != list(range(rank)):
        q = b.op("Transpose", [q], perm=[perm.index(i) for i in range(rank)])
    return b.op("Mul", [q, b.const(s)], out=out) if s != 1.0 else b.op("Identity", [q], out=out)


def _native_qdq(fmt: F.Format, native_fp4: bool) -> bool:
    return fmt.onnx_type in QDQ_TYPES and (native_fp4 or fmt.onnx_type not in FP4_TYPES)


# Activation lowering rules, first match wins: (name, predicate(fmt, native_fp4), emitter).
_RUNTIME_RULES = (
    ("qdq", lambda f, n4: f.has_scale and _native_qdq(f, n4), _emit_qdq),
    ("scaled-grid", lambda f, n4: f.has_scale, _emit_scaled),
    ("mx-blocks", lambda f, n4: f.is_blocked, _emit_mx),
)


def _container(fmt: F.Format, values: torch.Tensor, native_fp4: bool) -> F.Format:
    """The format whose ONNX type stores ``values`` (on fmt's grid) exactly."""
    if fmt.onnx_type is not None and (native_fp4 or fmt.onnx_type not in FP4_TYPES):
        return fmt
    for name in CONTAINERS:
        c = F.get(name)
        if (c.grid == fmt.grid and c.signed == fmt.signed
                and torch.equal(values.float(), quantize_to_grid(values.float(), c))):
            return c
    raise FliqsError(f"format {fmt.name}: no ONNX storage type holds its values; "
                     "choose another weight format")


def _fold_weight(b, w, spec: QuantSpec, out, native_fp4):
    """Quantize initializer ``w`` offline (the spec's codes); emit the stored low-precision
    initializer + DQ/Cast, checked bit-exact against the spec's fake_quant."""
    w = np.array(w, np.float32)
    if np.isnan(w).any():
        raise FliqsError(f"quantizer {out!r}: its weight contains NaN; fix or retrain the model")
    fmt, rank = spec.fmt, w.ndim
    y = torch.from_numpy(spec.fake_quant(w))  # the truth every representation must reproduce
    q = spec.quantize(w)
    if fmt.is_blocked:  # blocked DQ: one scale per block, E8M0 x code unit x pre-scale
        dq_scale = q.block_scales * np.float32(spec.code_unit) * np.float32(spec.scale[0])
        attrs = {"axis": spec.block_axis_of(rank), "block_size": spec.block_size}
    else:
        dq_scale = spec.scale if spec.per_channel else spec.scale.reshape(())
        attrs = {"axis": spec.axis} if spec.per_channel else {}
    codes = q.codes.astype(np.float32)
    cont = _container(spec.code_format, torch.from_numpy(codes),
                      native_fp4 and not fmt.is_blocked)  # MX: runnable containers
    stored_np = codes.astype(cont.np_dtype)
    wname = b._name(f"w_{cont.name}")
    b.inits[wname] = numpy_helper.from_array(stored_np, wname)
    zt = None if spec.zero_point is None else torch.from_numpy(spec.zero_point.copy())
    if cont.onnx_type in CAST_TYPES:  # bf16 / fp16 weight: Cast up, then scale
        dq = b.op("Cast", [wname], to=_TP.FLOAT)
        sv = spec.broadcast(spec.scale, rank)
        res = b.op("Mul", [dq, b.const(sv, "scale")], out=out) if not np.all(sv == 1) else \
            b.op("Identity", [dq], out=out)
        check = torch.from_numpy(stored_np.astype(np.float32)) * torch.from_numpy(sv.copy())
    else:
        zname = None
        if zt is not None and not fmt.is_blocked:
            zname = b._name("zero_point")
            zarr = spec.zero_point.reshape(dq_scale.shape).astype(cont.np_dtype)
            b.inits[zname] = numpy_helper.from_array(zarr, zname)
        res = b.op("DequantizeLinear", [wname, b.const(dq_scale, "scale")]
                   + ([zname] if zname else []), out=out, **attrs)
        check = _dequant_check(stored_np, torch.from_numpy(np.array(dq_scale, np.float32)),
                               zt, attrs, rank)
    if not torch.equal(check, y):
        raise RuntimeError(f"internal: folded weight {out!r} ({fmt.name}) is not bit-exact")
    return res


def _dequant_check(stored_np, dq_scale, zt, attrs, rank) -> torch.Tensor:
    """What DequantizeLinear computes from the stored weight (float32), for the exactness check."""
    k = torch.from_numpy(stored_np.astype(np.float32))
    if "block_size" in attrs:
        ax, blk = attrs["axis"], attrs["block_size"]
        s = dq_scale.repeat_interleave(blk, dim=ax).narrow(ax, 0, k.shape[ax])
        return k * s
    s = dq_scale if dq_scale.dim() == 0 else dq_scale.reshape(
        [-1 if i == attrs["axis"] % rank else 1 for i in range(rank)])
    z = 0.0 if zt is None else zt.reshape(s.shape)
    return (k - z) * s


def quantizer_nodes(x: str, out: str, fmt: str, scale, zero_point=None, axis: Optional[int] = None,
                    shape: Sequence[int] = (), weight: Optional[np.ndarray] = None,
                    native_fp4: bool = True) -> tuple[list, list]:
    """``spec_nodes`` for the spec of ``fake_quant(x, fmt, scale, axis, zero_point)``:
    ``axis`` is the per-channel axis of ``scale`` (int/fp) or the block axis (MX)."""
    spec = QuantSpec.from_call(fmt, scale, zero_point, axis,
                               role="weight" if weight is not None else "activation")
    return spec_nodes(x, out, spec, shape, weight=weight, native_fp4=native_fp4)


def spec_nodes(x: str, out: str, spec: QuantSpec, shape: Sequence[int] = (),
               weight: Optional[np.ndarray] = None, native_fp4: bool = True) -> tuple[list, list]:
    """Standard ONNX nodes + initializers computing ``spec.fake_quant`` of tensor ``x`` into ``out``.

    ``shape``: static shape of ``x`` (needed for MX and per-channel activations). With
    ``weight`` (the value of ``x``, an array) the tensor is quantized offline: the result reads
    a new low-precision initializer holding the spec's codes, not ``x``. Names are prefixed
    with ``out``. Used by ``lower_fake_quant`` and by the latency micro-graphs, so both have the
    same form.
    """
    b = _Builder(out, {})
    fmt = spec.fmt
    if not fmt.is_quantized:
        b.op("Identity", [x], out=out)
    elif weight is not None:
        _fold_weight(b, weight, spec, out, native_fp4)
    else:
        rank = len(shape)
        for _, pred, emit in _RUNTIME_RULES:
            if pred(fmt, native_fp4):
                extra = (list(shape),) if emit is _emit_mx else ()
                emit(b, x, spec, rank, out, *extra)
                break
    return b.nodes, list(b.inits.values())


def lower_fake_quant(model: onnx.ModelProto, native_fp4: bool = True) -> onnx.ModelProto:
    """Replace every ``fliqs.FakeQuant`` node of ``model`` by standard ONNX ops (in place).

    Requires: placeholder scales / zero points are initializers. Guarantees: no node of the
    ``fliqs`` domain remains; weights (initializer inputs) are stored quantized; every
    replacement computes exactly ``fq.fake_quant`` (weights are checked bit-exact here).
    """
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    new_nodes = []
    for node in g.node:
        if node.domain != DOMAIN:
            new_nodes.append(node)
            continue
        a = {at.name: helper.get_attribute_value(at) for at in node.attribute}
        fmt = F.get(a["fmt"].decode() if isinstance(a["fmt"], bytes) else a["fmt"])
        axis = None if a.get("axis", -1) < 0 else int(a["axis"])
        shape = list(a.get("shape", []))
        names = list(node.input) + [""] * (3 - len(node.input))
        for n in names[1:]:
            if n and n not in inits:
                raise FliqsError(f"quantizer {node.output[0]!r}: scale/zero point {n!r} must be a "
                                 "constant; materialize the graph before export")
        scale = numpy_helper.to_array(inits[names[1]])
        zp = numpy_helper.to_array(inits[names[2]]) if names[2] else None
        w = numpy_helper.to_array(inits[names[0]]) if names[0] in inits else None
        spec = QuantSpec.from_call(fmt, scale, zp, axis,
                                   role="weight" if w is not None else "activation")
        nodes, new_inits = spec_nodes(names[0], node.output[0], spec, shape, weight=w,
                                      native_fp4=native_fp4)
        inits.update((t.name, t) for t in new_inits)
        new_nodes.extend(nodes)
    used = {i for n in new_nodes for i in n.input} | {o.name for o in g.output}
    del g.node[:]
    g.node.extend(new_nodes)
    del g.initializer[:]
    g.initializer.extend(t for name, t in inits.items() if name in used)
    keep = [o for o in model.opset_import if o.domain != DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    return model


# ---- step 3: driver -------------------------------------------------------------------------
def save_atomic(model: onnx.ModelProto, path: Path) -> Path:
    """Serialize ``model`` to ``path`` atomically."""
    return atomic.write_bytes(path, model.SerializeToString())


def _bias_node(x: str, bias: str, out: str, inits: dict, name: str):
    """``x + bias`` as ``Sub(x, -bias)`` when bias is an initializer (see gemm_to_matmul)."""
    if bias not in inits:
        return helper.make_node("Add", [x, bias], [out], name=name)
    neg = bias + "/neg"
    inits[neg] = numpy_helper.from_array(-numpy_helper.to_array(inits[bias]), neg)
    return helper.make_node("Sub", [x, neg], [out], name=name)


def gemm_to_matmul(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite ``Gemm(A, DequantizeLinear(W), C, transB=1)`` as ``MatMul(A, DQ(W^T)) - (-C)``
    (in place; ``+ C`` where C is not an initializer), and the bias of a quantized MatMul,
    ``Add(MatMul(A, B), C)``, as ``Sub(MatMul(A, B), -C)`` too (``_matmul_bias_as_sub``).

    Why: onnxruntime fuses QDQ MatMul with per-channel weight scales into integer kernels
    (QLinearMatMul / MatMulIntegerToFloat) but leaves a per-channel QDQ Gemm in float. The bias
    is a ``Sub`` of the negated constant because a default session's MatMulAddFusion turns
    MatMul + Add back into a Gemm, whose float bias WeightBiasQuantization then rounds to int32
    at s_x*s_w: that overflows at FP8 scales (measured: 34 output LSB on an fp8_e5m2 Linear),
    rounds elsewhere, and the Gemm runs in float (measured, int8 128x1024x1024 x2, default
    session: 23.8 ms with Add, 0.96 ms with Sub). No fusion matches Sub, and x - (-C) is
    bit-identical to x + C.
    Requires: W is an initializer read only by that DQ; alpha = beta = 1, transA = 0.
    Anything else is left unchanged. Numerics: the same products and sums (float).

    The same MatMulAddFusion hits the MatMul + Add that Linear layers on [B, T, C] tokens
    export as (transformers; ONNX imports of Gemm-free models) once the graph's shapes are
    static (a pinned batch; it skips a symbolic one), with worse effects: it wraps the Gemm in
    Reshapes to [B*T, C] and back, QDQPropagationTransformer then moves the activation's DQ
    across the input Reshape by inserting a Q/DQ pair whose Q carries ``output_dtype=INT8``,
    and QDQS8ToU8Transformer turns that pair's zero point into UINT8: the session does not
    build ("Node (gemm_input_reshape_arg_q) ... output_dtype INT8 does not match y_zero_point
    type UINT8"; measured on a static-batch int8 TinyViT, ORT 1.32; bisected with
    ``disabled_optimizers``: it builds with any one of MatMulAddFusion,
    QDQPropagationTransformer, QDQS8ToU8Transformer disabled). Where it builds (rank 2), the
    fused Gemm's bias is rounded to int32 as above (measured, fp8_e5m2 MatMul + Add [16, 64] x
    [64, 32]: up to 25600 output scales off; 0 as a Sub). So every
    ``Add`` of a constant float bias to a MatMul with a DequantizeLinear input is a ``Sub`` of
    the negated bias as well (``_matmul_bias_as_sub``): the graph's values stay bit-identical,
    and a static graph runs the MatMuls as a symbolic-batch export of it does.
    """
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    uses: dict = {}
    for n in g.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    new_nodes = []
    for node in g.node:
        a = {at.name: helper.get_attribute_value(at) for at in node.attribute}
        is_gemm = node.op_type == "Gemm" and len(node.input) > 1
        dq = producers.get(node.input[1]) if is_gemm else None
        if (dq is None or dq.op_type != "DequantizeLinear" or a.get("transB", 0) != 1
                or a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0
                or dq.input[0] not in inits or dq.input[1] not in inits
                or uses.get(dq.input[0]) != 1
                or uses.get(node.input[1]) != 1):
            new_nodes.append(node)
            continue
        w = inits[dq.input[0]]
        inits[w.name] = numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(w).T),
                                                w.name)
        dq_attrs = {at.name: helper.get_attribute_value(at) for at in dq.attribute}
        if "block_size" in dq_attrs or numpy_helper.to_array(inits[dq.input[1]]).ndim == 2:
            sc = inits[dq.input[1]]  # blocked: the scale tensor is transposed with the weight
            inits[sc.name] = numpy_helper.from_array(
                np.ascontiguousarray(numpy_helper.to_array(sc).T), sc.name)
        for at in dq.attribute:
            if at.name == "axis":
                at.i = 1 - (at.i % 2)
        out = node.output[0]
        mm_out = out + "/matmul" if len(node.input) > 2 and node.input[2] else out
        new_nodes.append(helper.make_node("MatMul", [node.input[0], node.input[1]], [mm_out],
                                          name=(node.name or out) + "/matmul"))
        if mm_out != out:
            new_nodes.append(_bias_node(mm_out, node.input[2], out, inits,
                                        (node.name or out) + "/bias"))
    del g.node[:]
    g.node.extend(new_nodes)
    used = {i for n in new_nodes for i in n.input} | {o.name for o in g.output}
    del g.initializer[:]
    g.initializer.extend(t for name, t in inits.items() if name in used)
    stale = {n.input[1] for n in new_nodes if n.op_type == "MatMul"}  # transposed now
    keep = [v for v in g.value_info if v.name not in stale]
    del g.value_info[:]
    g.value_info.extend(keep)
    return _matmul_bias_as_sub(model)


NEGATABLE_TYPES = (_TP.FLOAT, _TP.FLOAT16, _TP.DOUBLE)  # -C is exact and round-trips numpy


def _matmul_bias_as_sub(model: onnx.ModelProto) -> onnx.ModelProto:
    """``Add(MatMul(A, B), C)`` (either input order) → ``Sub(MatMul(A, B), -C)`` (in place) where
    A comes from a DequantizeLinear or B does (directly or through a Transpose, ``_weight_dq``),
    the MatMul's output is read by that Add only and is no graph output (what MatMulAddFusion
    needs), and C is a float initializer that is no graph input (why: ``gemm_to_matmul``).
    ``x - (-C)`` is bit-identical to ``x + C``: negation is exact and IEEE defines the
    difference as that sum. Anything else is left unchanged."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    uses = _Uses(g)
    graph_inputs = {i.name for i in g.input}
    new_nodes = []
    for node in g.node:
        if node.op_type != "Add" or len(node.input) != 2:
            new_nodes.append(node)
            continue
        mm = next((i for i, name in enumerate(node.input)
                   if _op(uses.producer, name) == "MatMul"
                   and uses.count.get(name) == 1 and name not in uses.outputs), None)
        bias = node.input[1 - mm] if mm is not None else None
        matmul = uses.producer[node.input[mm]] if mm is not None else None
        if (bias is None or bias not in inits or bias in graph_inputs
                or inits[bias].data_type not in NEGATABLE_TYPES
                or not (_op(uses.producer, matmul.input[0]) == "DequantizeLinear"
                        or _weight_dq(uses.producer, matmul.input[1]) is not None)):
            new_nodes.append(node)
            continue
        new_nodes.append(_bias_node(node.input[mm], bias, node.output[0], inits,
                                    node.name or node.output[0]))
    del g.node[:]
    g.node.extend(new_nodes)
    used = {i for n in new_nodes for i in n.input} | {o.name for o in g.output}
    del g.initializer[:]
    g.initializer.extend(t for name, t in inits.items() if name in used)
    return model


INT_TYPES = {_TP.INT8, _TP.UINT8, _TP.INT4, _TP.UINT4, _TP.INT16, _TP.UINT16, _TP.INT32}


INT8_KERNEL_TYPES = (_TP.INT8, _TP.UINT8)  # what ORT's integer conv kernel (QLinearConv) takes


def _dq_type(tensor: str, producers: dict, inits: dict):
    """The quantized element type behind ``tensor`` when a DequantizeLinear produces it (the
    stored weight's type, or an activation's zero-point type), else None."""
    dq = producers.get(tensor)
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    src = inits.get(dq.input[0])  # a stored weight
    if src is None and len(dq.input) > 2:
        src = inits.get(dq.input[2])  # an activation: its zero point has the Q type
    return None if src is None else src.data_type


def _runs_as_qlinearconv(conv, producers: dict, consumers: dict, inits: dict) -> bool:
    """Whether ORT's QDQ fusion makes ``conv`` an integer kernel (QLinearConv): DQs of 8-bit
    integers on input and weight, and its output (after at most a Relu) read only by a
    QuantizeLinear to an 8-bit integer."""
    if _dq_type(conv.input[0], producers, inits) not in INT8_KERNEL_TYPES \
            or _dq_type(conv.input[1], producers, inits) not in INT8_KERNEL_TYPES:
        return False
    readers = consumers.get(conv.output[0], [])
    if len(readers) == 1 and readers[0].op_type == "Relu":
        readers = consumers.get(readers[0].output[0], [])
    zp = _zero_point(readers[0], inits) if len(readers) == 1 else None
    return zp is not None and zp.data_type in INT8_KERNEL_TYPES


def detach_float_bias(model: onnx.ModelProto) -> onnx.ModelProto:
    """Move the bias of a Conv/ConvTranspose with a DequantizeLinear weight into a following
    ``Add`` (in place), unless the conv runs as QLinearConv (``_runs_as_qlinearconv``).

    Why: onnxruntime's WeightBiasQuantization turns a QDQ conv's float bias into int32 at scale
    s_x * s_w. Only QLinearConv needs it there (its int32 bias is the kernel's own rounding,
    measured <= 1 output LSB); every other conv stays float with a needlessly rounded bias: FP8
    scales are so small that the int32 overflows and corrupts the output, and at 4 bits, or
    before an FP8 quantizer, the rounding (up to 0.5 s_x s_w per channel) shifts whole channels
    across the next quantizer's steps (measured on the demo model with int4 layers: 4.4 output
    LSB in a default session, 0 with the bias detached). Requires: the bias is an initializer.
    """
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    consumers: dict = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    new_nodes = []
    for node in g.node:
        conv = node.op_type in ("Conv", "ConvTranspose") and len(node.input) > 2 \
            and node.input[2] in inits
        if not conv or _dq_type(node.input[1], producers, inits) is None \
                or _runs_as_qlinearconv(node, producers, consumers, inits):
            new_nodes.append(node)
            continue
        bias = numpy_helper.to_array(inits[node.input[2]])
        rank = len(helper.get_attribute_value(next(a for a in node.attribute
                                                   if a.name == "kernel_shape"))) \
            if any(a.name == "kernel_shape" for a in node.attribute) else 2
        bname = node.input[2] + "/bias_nchw"
        inits[bname] = numpy_helper.from_array(bias.reshape([-1] + [1] * rank), bname)
        out = node.output[0]
        conv = helper.make_node(node.op_type, list(node.input[:2]), [out + "/nobias"],
                                name=(node.name or out) + "/nobias")
        conv.attribute.extend(node.attribute)
        new_nodes += [conv, helper.make_node("Add", [out + "/nobias", bname], [out],
                                             name=(node.name or out) + "/bias")]
    del g.node[:]
    g.node.extend(new_nodes)
    used = {i for n in new_nodes for i in n.input}
    del g.initializer[:]
    g.initializer.extend(t for n, t in inits.items() if n in used)
    return model


def _minus_inf(g, name: str = "fliqs/minus_inf") -> str:
    """The -inf initializer of the identity ``Max(x, -inf)`` barriers (added once)."""
    if not any(t.name == name for t in g.initializer):
        g.initializer.append(numpy_helper.from_array(np.array(-np.inf, np.float32), name))
    return name


def _barrier_before(node, index: int, g, new_nodes: list) -> None:
    """Feed input ``index`` of ``node`` through ``Max(x, -inf)`` (the identity; NaN stays NaN;
    not a propagation op, and no onnxruntime rewrite removes it or looks through it)."""
    shielded = node.input[index] + "/shield"
    new_nodes.append(helper.make_node("Max", [node.input[index], _minus_inf(g)], [shielded],
                                      name=shielded + "_node"))
    node.input[index] = shielded


def shield_float_weight(model: onnx.ModelProto) -> onnx.ModelProto:
    """Put ``Max(x, -inf)`` between an input DequantizeLinear and a Conv/ConvTranspose/Gemm
    whose weight is not a DequantizeLinear (float, bf16/fp16 Cast) (in place).

    Why: onnxruntime's WeightBiasQuantization sees a DQ input and a float weight initializer
    (bf16/fp16 Cast weights become one by constant folding) and quantizes that weight to
    per-tensor INT8 (measured: DQ(int8) -> Conv(bf16 weight) -> Q: 6 output LSB). It needs the
    DQ as the conv's direct producer; the barrier keeps the graph's float/bf16 weight.
    """
    def input_behind_a_dq(node, producers, constants):
        if node.op_type in ("Conv", "ConvTranspose", "Gemm") and len(node.input) > 1 \
                and _op(producers, node.input[0]) == "DequantizeLinear" \
                and _op(producers, node.input[1]) != "DequantizeLinear":
            return 0
        return None
    return _shield_inputs(model, input_behind_a_dq)


def shield_weight_only_matmul(model: onnx.ModelProto) -> onnx.ModelProto:
    """Put ``Max(x, -inf)`` between a constant weight's DequantizeLinear and a MatMul whose other
    input does not come from a DequantizeLinear (float, fp16/bf16 Cast, decomposed fp6 / MX
    activations) (in place).

    Why: onnxruntime's DQMatMulToMatMulNBits turns DQ(weight) → MatMul into MatMulNBits at
    accuracy level 4, which re-quantizes the float activations to INT8 (measured on the
    conformance matrix: fp16 500–1300, bf16 10–47, fp6_e3m2 2, MX 2–11 output LSB). The barrier
    keeps the MatMul on the graph's dequantized weight; integer activations (a DQ input) keep
    their integer kernels. The price, for weight-only 4-bit models: an fp32 MatMul instead of
    MatMulNBits' packed kernel (right numbers first; a faster exact form is future work).
    The weight may reach the MatMul through a ``Transpose`` (``_weight_dq``): ORT folds it into
    the initializer before the fusion (measured on an ONNX-imported ViT, whose Linear layers
    export as ``MatMul(x, Transpose(DQ(w)))``, with an mxfp8 activation: 2 output LSB through
    MatMulNBits, 0 with the barrier after the Transpose)."""
    def weight_of_a_float_matmul(node, producers, constants):
        weight_dq = _weight_dq(producers, node.input[1]) if node.op_type == "MatMul" else None
        if weight_dq is not None and weight_dq.input[0] in constants \
                and _op(producers, node.input[0]) != "DequantizeLinear":
            return 1
        return None
    return _shield_inputs(model, weight_of_a_float_matmul)


def shield_softmax_input(model: onnx.ModelProto) -> onnx.ModelProto:
    """Put ``Max(x, -inf)`` between a DequantizeLinear and the Softmax reading it (in place).

    Why: onnxruntime's QDQ selectors fuse DQ(int8/uint8) → Softmax → Q into
    ``com.microsoft.QLinearSoftmax``, a lookup-table kernel whose probabilities differ from
    Softmax-then-QuantizeLinear (measured on a ViT with int8 softmax inputs,
    ``--quantize-inputs softmax``: max |err| 0.009 on random weights, 7.1 output LSB on 6 of 8
    rows of a trained one, in the default session and the exact one alike; 3e-7 with the
    selector disabled). Behind the barrier Softmax runs in float on the dequantized scores, as
    the graph says; the Q after it stays an integer input of the A·V MatMul."""
    def input_of_a_softmax(node, producers, constants):
        return 0 if node.op_type == "Softmax" and \
            _op(producers, node.input[0]) == "DequantizeLinear" else None
    return _shield_inputs(model, input_of_a_softmax)


def _weight_dq(producers: dict, name: str):
    """The DequantizeLinear behind ``name``: its producer, or the producer of a ``Transpose``
    producing it (the stock exporter's ``aten.t`` of a Linear weight), else None."""
    node = producers.get(name)
    if node is not None and node.op_type == "Transpose":
        node = producers.get(node.input[0])
    return node if node is not None and node.op_type == "DequantizeLinear" else None


def _blocked_int_dq(producers: dict, inits: dict, name: str) -> bool:
    """Whether ``name`` is the output of a blocked DequantizeLinear (``block_size``: an MX
    weight; directly or through a Transpose, ``_weight_dq``) of an integer-stored constant
    (mxint8; the fp-element MX formats are stored as FLOAT8, which no integer MatMul kernel
    takes)."""
    dq = _weight_dq(producers, name)
    return dq is not None and any(a.name == "block_size" and a.i > 0 for a in dq.attribute) \
        and _dq_type(dq.output[0], producers, inits) in INT_TYPES


def shield_blocked_weight(model: onnx.ModelProto) -> onnx.ModelProto:
    """Put ``Max(x, -inf)`` between a blocked integer weight's DequantizeLinear (mxint8:
    ``block_size``, INT8 codes) and a MatMul/Gemm whose other input comes from a
    DequantizeLinear (an integer activation) (in place).

    Why: onnxruntime's QDQ selectors fuse DQ(int8 activation) + DQ(int8 weight) → MatMul into
    MatMulIntegerToFloat without looking at ``block_size``: its weight-scale input is then the
    [K/32, N] block-scale tensor, which it cannot broadcast against [K, N], and ``run`` fails
    ("Attempting to broadcast an axis by a dimension other than 1"; measured on mxint8 weights
    with int8 activations, K = 64 and 256). Behind the barrier the MatMul runs in float32 on
    the exactly dequantized weight; ORT neither folds the DQ nor looks through the Max (measured:
    0 output LSB on that model and on the conformance matrix). A weight behind a Transpose
    (ONNX-imported Linear layers) is shielded too, though ORT 1.32 was measured to leave
    Transpose(blocked DQ) → MatMul unfused (0 LSB either way on a ViT, K = 64): the barrier
    costs nothing there. Blocked-weight convs are not fused (measured), and FLOAT8-stored MX
    weights (mxfp8/6/4) are never taken by an integer kernel: both are left as they are.
    ``shield_weight_only_matmul`` covers the MatMuls whose activation is float. The price: an
    fp32 MatMul where an exact blocked integer kernel would be faster (ORT 1.32 has none that
    runs this)."""
    inits = {t.name: t for t in model.graph.initializer}

    def blocked_weight_of_an_integer_matmul(node, producers, constants):
        if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 \
                and _blocked_int_dq(producers, inits, node.input[1]) \
                and _op(producers, node.input[0]) == "DequantizeLinear":
            return 1
        return None
    return _shield_inputs(model, blocked_weight_of_an_integer_matmul)


def _op(producers: dict, name: str) -> str:
    return getattr(producers.get(name), "op_type", "")


def _shield_inputs(model: onnx.ModelProto, pick) -> onnx.ModelProto:
    """A ``Max(x, -inf)`` barrier before input ``pick(node, producers, initializer names)`` of
    every node where it returns an index (in place)."""
    g = model.graph
    producers = {o: n for n in g.node for o in n.output}
    constants = {i.name for i in g.initializer}
    new_nodes = []
    for node in g.node:
        index = pick(node, producers, constants)
        if index is not None:
            _barrier_before(node, index, g, new_nodes)
        new_nodes.append(node)
    del g.node[:]
    g.node.extend(new_nodes)
    return model


# Ops across which onnxruntime's QDQPropagationTransformer moves a QuantizeLinear backwards
# (1.32, qdq_propagation.cc ``CanNodePropagate``), each step only over an edge that is the
# producer's single use and not a graph output.
QDQ_PROPAGATION_OPS = ("MaxPool", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Slice")
# ReluQuantRewrite (relu_quantizelinear.cc) checks the zero point only for these Q types (it
# keeps the Relu unless zp == the type's minimum, which is correct); for every other type
# (INT4, UINT4, INT16, FLOAT8...) it drops a Relu in front of any scalar-zero-point Q.
RELU_Q_CHECKED_TYPES = (_TP.INT8, _TP.UINT8)
# The lowest code of each integer Q type: a Q clamps negatives to 0 only when zp is this value.
INT_QMIN = {_TP.INT4: -8, _TP.UINT4: 0, _TP.INT8: -128, _TP.UINT8: 0, _TP.INT16: -2 ** 15,
            _TP.UINT16: 0}
FOUR_BIT_TYPES = (_TP.INT4, _TP.UINT4)
# The zero-point types ClipQuantFusion (clip_quantizelinear.cc ``GetQConstantLowerUpper``) can
# read; on any other type after a Clip (4-bit, FLOAT8*) ORT 1.32 aborts building the session.
CLIP_Q_FUSION_TYPES = (_TP.INT8, _TP.UINT8, _TP.INT16, _TP.UINT16)


class _Uses:
    """Producers and use counts of a graph's tensors."""

    def __init__(self, g):
        self.producer = {o: n for n in g.node for o in n.output}
        self.count: dict = {}
        for n in g.node:
            for i in n.input:
                self.count[i] = self.count.get(i, 0) + 1
        self.outputs = {o.name for o in g.output}


def _propagation_path(q, uses: _Uses) -> tuple:
    """Where ORT's QDQ propagation moves QuantizeLinear ``q``: ``(crossed, source)``, the
    ``QDQ_PROPAGATION_OPS`` nodes it is moved across (nearest first) and the node it then
    directly follows (None: a graph input or initializer)."""
    crossed, tensor = [], q.input[0]
    while True:
        src = uses.producer.get(tensor)
        if src is None or src.op_type not in QDQ_PROPAGATION_OPS or uses.count[tensor] != 1 \
                or tensor in uses.outputs:
            return crossed, src
        crossed.append(src)
        tensor = src.input[0]


def _zero_point(q, inits: dict):
    """The scalar zero-point initializer of QuantizeLinear ``q``, else None."""
    zp = inits.get(q.input[2]) if q.op_type == "QuantizeLinear" and len(q.input) > 2 else None
    return zp if zp is not None and np.asarray(numpy_helper.to_array(zp)).size == 1 else None


def _relu_drop_breaks(zp) -> bool:
    """Whether ReluQuantRewrite would drop a Relu in front of a Q with zero point ``zp`` although
    that Q does not map negatives to 0 (a float type, or an integer type with zp above its
    minimum)."""
    if zp.data_type in RELU_Q_CHECKED_TYPES:
        return False  # ORT keeps the Relu, or drops it only where that is exact
    qmin = INT_QMIN.get(zp.data_type)
    return qmin is None or int(np.asarray(numpy_helper.to_array(zp), np.int64)) != qmin


def protect_relu_before_unclamped_q(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace ``Relu`` by ``Max(x, 0)`` where onnxruntime would wrongly delete it (in place).

    Why: ReluQuantRewrite deletes a Relu directly in front of a QuantizeLinear, assuming Q
    clamps negatives; a FLOAT8 Q (or INT4, or UINT4 with a non-zero zero point) does not, so a
    default session passes negative values through. QDQPropagationTransformer first moves the
    Q back across MaxPool/Reshape/..., so ``Relu -> MaxPool -> Q(fp8)`` is hit too (measured on
    a digits CNN, int8/int4/fp8/bf16 with the fp8 conv after a MaxPool: 15 output LSB, 3.3 %
    of the logits, all from that conv's negative inputs). ``Max`` computes the same values and
    no rewrite matches it; Relus before clamping Qs (uint8 zp 0, the common case) stay Relus.
    """
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    uses = _Uses(g)
    relus = []
    for q in g.node:
        zp = _zero_point(q, inits)
        src = _propagation_path(q, uses)[1] if zp is not None else None
        if src is not None and src.op_type == "Relu" and _relu_drop_breaks(zp):
            relus.append(src)
    if relus:
        zero = "fliqs/relu_zero"
        g.initializer.append(numpy_helper.from_array(np.zeros((), np.float32), zero))
        for relu in relus:
            relu.op_type = "Max"
            relu.input.append(zero)
    return model


def _q_breaks_session(zp, crossed: list, src) -> bool:
    """Whether a Q with zero point ``zp``, moved across ``crossed`` to follow ``src``, makes ORT
    1.32 refuse to build the session: a 4-bit Q across a MaxPool (the QDQ selectors leave MaxPool
    reading tensor(int4): no kernel, INVALID_GRAPH); a Q of a type ClipQuantFusion cannot read
    (``CLIP_Q_FUSION_TYPES``: 4-bit, FLOAT8) after a Clip ("Unexpected data type for
    QuantizeLinear input y_zero_point": measured on a MobileNetV2-shaped model with fp8 after a
    ReLU6, and with int4 / uint4 / float8e4m3fn / float8e5m2 after Add → Clip). Measured:
    Reshape, Transpose, Unsqueeze, Slice are fine."""
    across_maxpool = zp.data_type in FOUR_BIT_TYPES and any(n.op_type == "MaxPool" for n in crossed)
    after_clip = src is not None and src.op_type == "Clip" and zp.data_type not in CLIP_Q_FUSION_TYPES
    return across_maxpool or after_clip


def shield_unbuildable_q(model: onnx.ModelProto) -> onnx.ModelProto:
    """Put ``Max(x, -inf)`` in front of each QuantizeLinear whose propagation would make a
    default onnxruntime session fail to build (``_q_breaks_session``; in place).

    Why: behind the barrier (``_barrier_before``) the Q stays where it is and MaxPool/Clip run
    in float (measured: the session builds and equals ORT_DISABLE_ALL). Requires: Q zero
    points are initializers.
    """
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    uses = _Uses(g)
    new_nodes = []
    for node in g.node:
        zp = _zero_point(node, inits)
        if zp is not None and _q_breaks_session(zp, *_propagation_path(node, uses)):
            _barrier_before(node, 0, g, new_nodes)
        new_nodes.append(node)
    del g.node[:]
    g.node.extend(new_nodes)
    return model


# Step 3, in order (each numerically neutral, each a docstring on why): the shield goes before
# the Relu protection, so a Relu it already cut off from QDQ propagation stays a Relu.
ORT_FORM_FIXES = (gemm_to_matmul, detach_float_bias, shield_float_weight, shield_weight_only_matmul,
                  shield_blocked_weight, shield_softmax_input, shield_unbuildable_q,
                  protect_relu_before_unclamped_q)


def _set_opset(model: onnx.ModelProto, opset: int) -> None:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = opset
    model.ir_version = max(model.ir_version, 11 if opset >= 23 else 10)


BATCH_DIM = "batch"  # the symbolic leading dim of a batch-polymorphic graph's inputs / outputs
log = logging.getLogger(__name__)


def batch_inputs(graph) -> list:
    """Indices of ``graph.inputs`` whose leading dim is the batch, when the graph runs on any
    batch size; ``[]`` when it is pinned, or when nothing says it runs on any batch.

    ONNX imports record it in ``graph.meta['batch']`` (``frontends/batch.py``: ``dynamic`` and
    the batch ``inputs``; a pinned graph says why in ``pinned_by``). Torch imports
    (``frontends/torch_import.py``) are exported with ``Dim.AUTO`` on the leading dim, which
    leaves a symbolic size on each batch placeholder's ``meta['val']`` (a static fallback leaves
    ints there)."""
    facts = graph.meta.get("batch")
    if facts is not None:
        names = set(facts.get("inputs") or []) if facts.get("dynamic") else set()
        return [i for i, s in enumerate(graph.inputs) if s.name in names and len(s.shape)]
    places = [n for n in graph.gm.graph.nodes if n.op == "placeholder"][-len(graph.inputs):] \
        if graph.inputs else []
    out = []
    for i, node in enumerate(places):
        shape = getattr(node.meta.get("val"), "shape", None)
        if shape is not None and len(shape) and not isinstance(shape[0], int):
            out.append(i)
    return out


def _torch_onnx(graph, opset: int, batched: list, kwargs: dict):
    """``torch.onnx.export(dynamo=True)`` of ``graph.gm`` with the placeholder translation; the
    leading dim of the inputs ``batched`` (indices) symbolic, named ``BATCH_DIM``. Traced at a
    batch of at least 2 (export's 0/1 rule specializes a batch of 1)."""
    example = graph.example_inputs()
    dynamic = None
    if batched:
        example = tuple(t.expand(2, *t.shape[1:]).contiguous()
                        if i in batched and t.shape[0] == 1 else t for i, t in enumerate(example))
        dim = torch.export.Dim(BATCH_DIM)
        dynamic = tuple({0: dim} if i in batched else None for i in range(len(example)))
    quiet = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "torchvision is not installed" notes on every export
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # training-mode / deprecation chatter
            return torch.onnx.export(
                graph.gm, example, dynamo=True, opset_version=opset, dynamic_shapes=dynamic,
                input_names=[s.name for s in graph.inputs], optimize=True, verbose=False,
                custom_translation_table={torch.ops.fliqs.fake_quant.default: _translate},
                **kwargs)
    finally:
        quiet.setLevel(level)


def export_qdq(graph, path, opset: Optional[int] = None, native_fp4: bool = True) -> Path:
    """Write ``graph`` (materialized: fixed ``FormatQuantizer`` / fake_quant nodes) as QDQ ONNX.

    Requires: a Graph with static ``inputs``; every quantizer has a fixed format and constant
    scales. Guarantees: opset 21 (23 when FP4 is exported natively), no custom ops,
    ``onnx.checker.check_model(full_check=True)`` passes, graph input/output names are
    ``graph.inputs[i].name`` / ``graph.output_names`` (when given), written atomically. When
    the graph runs on any batch size (``batch_inputs``), the leading dim of its batch inputs and
    of the outputs that follow it is symbolic (``BATCH_DIM``), else the traced size; should
    torch.onnx refuse a symbolic batch, the model is exported static, with a warning and
    ``graph.meta['export_batch_pinned_by']`` saying why.
    """
    from fliqs_compiler.numerics.quantizers import SearchableQuantizer
    if any(isinstance(m, SearchableQuantizer) for m in graph.gm.modules()):
        raise FliqsError(f"graph {graph.name!r} still has searchable quantizers; materialize a "
                         "format assignment (passes.materialize) before exporting")
    _register_schema()
    need = required_opset(formats_used(graph), native_fp4)
    opset = opset or need
    if not 21 <= opset <= 23:
        raise FliqsError(f"--opset {opset}: QDQ export supports ONNX opsets 21 to 23")
    if opset < need:
        raise FliqsError(f"--opset {opset}: FP4 E2M1 needs ONNX opset >= 23; drop the option "
                         "or use a format other than fp4_e2m1")
    kwargs = {}
    if graph.output_names:
        kwargs["output_names"] = list(graph.output_names)
    batched = batch_inputs(graph)
    try:
        prog = _torch_onnx(graph, opset, batched, kwargs)
    except Exception as e:  # noqa: BLE001 — the batch cannot stay symbolic: say so, pin it
        if not batched:
            raise
        log.warning("%s: exported with the static batch %s: torch.onnx could not keep it "
                    "symbolic (%s)", graph.name, graph.inputs[batched[0]].shape[0], one_line(e))
        graph.meta["export_batch_pinned_by"] = one_line(e)
        prog = _torch_onnx(graph, opset, [], kwargs)
    model = lower_fake_quant(prog.model_proto, native_fp4=native_fp4)
    for fix in ORT_FORM_FIXES:
        model = fix(model)
    _set_opset(model, opset)
    onnx.checker.check_model(model, full_check=True)
    return save_atomic(model, Path(path))
