"""Lower a materialized fliqs graph to TVM Relax with real low-precision compute, and compile it.

Pipeline (``lower``): ``torch.export`` the graph → ``translate`` (TVM's exported-program importer
with our converters for ``fliqs.fake_quant``, ``conv2d``, ``linear`` and ``matmul``) → ``tvm_kernels.vnni_rewrite``
(``relax.dpl``: u8×s8→s32 conv/matmul with constant weights → hand VNNI ``call_tir``; then
``tvm_bf16.bf16_rewrite``: bf16-exact codes → ``vdpbf16ps`` ``call_tir``) → legalize
and fuse (or MetaSchedule tuning) → ``tvm_schedules`` rule-based schedules for every function
still unscheduled → ``tvm.compile`` → ``out_dir/tvm/model.so`` (atomic).

Per-format rules live in ONE place, the tables below, keyed by ``Format.kind``:

- ``WEIGHT_RULES[kind](bb, w, spec) -> QTensor``: how a constant weight is stored and decoded
  (int whose levels fit int8 → int8 codes, uint8 → dequantized fp32; int ≤ 4 bits and fp4 → two
  codes per uint8 with a fused LUT unpack;
  fp8/fp16/bf16 → stored in that dtype and upcast; other fp/mx → exact dequantized fp32).
  Codes, scales, zero points and axes come from the node's ``numerics.qspec.QuantSpec``
  (``spec.quantize``); nothing here re-derives rounding.
- ``ACT_RULES[kind](bb, x, spec) -> QTensor``: how an activation is quantized at run time
  (int → round/clip to int8/uint8 codes; fp16 → divide, saturate, cast, cast back, multiply;
  fp8/bf16/fp6/fp4 → divide, exact round-to-nearest-even on the f32 bit pattern
  (``tvm_kernels.fp_round_te``), multiply — never ``relax.op.quantize`` or TVM's fp8 casts).
- ``COMPUTE_RULES`` (pattern → rewrite): which (weight, activation) code dtypes a conv / linear /
  MatMul (attention MatMuls included: the second operand plays the weight) consumes natively: int8 × (u)int8 → int32 accumulation, then one multiply by s_x·s_w (per
  output channel) and the bias (fused into one loop nest by default (``fuse=True``) and when tuning);
  bf16-exact codes on both sides (fp8 / bf16 / fp6 / fp4 grids, int ≤ 8-bit levels; not int8 ×
  int8) with a constant weight → ``vdpbf16ps`` with fp32 accumulation (``tvm_bf16``), the same
  single rescale and bias — only where the target has avx512bf16 and the layer suits the kernel
  (conv: groups 1, dilation 1); bf16 × bf16 / fp16 × fp16 otherwise → upcast, fp32 accumulation;
  anything else runs in fp32 on the dequantized values (quantize-dequantize math).

Numerics (``tests/test_conformance.py``): run-time quantizers equal ``quant.fake_quant`` bit for
bit, exact ties included (``fdiv`` by the same float32 scale, ``nearbyint`` = round half even;
never a reciprocal multiply). Integer rules accumulate exactly in int32 and rescale once,
fl(fl(acc)·fl(s_x·s_w)) + bias, where the torch reference runs an fp32 conv on dequantized values:
a value within float32 rounding of a .5 tie of the NEXT quantizer can round one step the other
way — within one LSB of that quantizer by contract, not bit-exact (measured on exact requantize
ties: 44 / 172 differ; this lowering keeps round-half-even more often than the reference).

``Lowered.executed`` reports the REALIZED precision per layer public name (``graph.layers``):
compute dtype (e.g. ``uint8xint8->int32``), kernel ('vnni' only when that layer's compiled
function really contains ``vpdpbusd``, 'bf16-dpbf16ps' only when it contains ``vdpbf16ps`` (the
count under that key); 'int8' plain int32-accumulating loops, with a ``fallback`` reason where a
kernel was wanted; 'bf16-upcast-fp32'; 'fp32'), formats and weight storage.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

os.environ.setdefault("TVM_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fliqs_compiler.numerics import formats as F  # noqa: E402
from fliqs_compiler.base import atomic  # noqa: E402
from fliqs_compiler.base.errors import FliqsError  # noqa: E402
from fliqs_compiler.numerics.qspec import QuantSpec  # noqa: E402

from fliqs_compiler.backends import tvm_kernels as K  # noqa: E402
from fliqs_compiler.backends.tvm_float_rewrite import float_conv_applicable  # noqa: E402
from fliqs_compiler.backends.targets import Target, cross_compiler, parse_target  # noqa: E402

__all__ = ["QTensor", "Lowered", "Tuning", "lower", "translate", "compile_module", "WEIGHT_RULES",
           "ACT_RULES", "COMPUTE_RULES", "ir_functions", "kernel_ir", "instruction_calls",
           "fuse_pipeline"]

_TVM_CAST = {"float8_e4m3fn": "float8_e4m3fn", "float8_e5m2": "float8_e5m2",
             "bfloat16": "bfloat16", "float16": "float16"}  # np dtype name -> TVM dtype we cast to
_COMPUTE_NAME = {"bfloat16": "bf16", "float16": "fp16"}  # cast dtypes a conv consumes natively


def _relax():
    import tvm  # noqa: F401
    from tvm import relax
    return relax


@dataclass
class QTensor:
    """What one ``fake_quant`` node lowered to.

    ``value``: float32 Relax expr of the dequantized tensor (always valid); ``codes``: an expr in
    ``compute`` dtype whose product with ``scale`` (minus ``zero_point``) is ``value``, or None when
    only the float value exists; ``scale``: numpy, [1] or per-channel along axis 0.
    """

    fmt: F.Format
    value: object
    codes: object = None
    compute: str = "fp32"  # 'int8' | 'uint8' | 'bf16' | 'fp16' | 'fp32'
    scale: Optional[np.ndarray] = None
    zero_point: float = 0.0
    storage: str = "fp32"
    np_codes: Optional[np.ndarray] = None  # integer weights: the int8 codes (for pre-packing)
    axis: Optional[int] = None  # channel axis of a per-channel scale
    # codes exactly representable in bf16 (``_bf16_exact``), as float32 — what the bf16 kernel
    # (tvm_bf16) consumes: ``grid`` a run-time activation's Relax expr, ``np_grid`` a constant
    # weight's values (value == grid · scale)
    grid: object = None
    np_grid: Optional[np.ndarray] = None

    def labels(self) -> set:
        """What the codes can be consumed as by ``COMPUTE_RULES``: the ``compute`` dtype (when
        ``codes`` exist), 'bf16-codes' (run-time ``grid``), 'bf16-codes-const' (``np_grid``)."""
        out = {self.compute} if self.codes is not None else set()
        if self.grid is not None:
            out.add("bf16-codes")
        if self.np_grid is not None:
            out.add("bf16-codes-const")
        return out


# ---- helpers ----------------------------------------------------------------------------------
def _is_const(e) -> bool:
    from tvm.ir.expr import Constant
    return isinstance(e, Constant)


def _const(a, dtype=None):
    relax = _relax()
    a = np.asarray(a)
    return relax.const(a if dtype is None else a.astype(dtype))


def _pack_nibbles(codes_u4: np.ndarray) -> np.ndarray:
    """Flat 4-bit codes (0..15) → uint8, element 2i in the low nibble, 2i+1 in the high one."""
    flat = codes_u4.reshape(-1).astype(np.uint8)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)


def _unpack_nibbles(bb, packed, lut: np.ndarray, shape, out_dtype: str):
    """Relax: uint8 packed codes → LUT values of ``shape`` (the fused unpack)."""
    relax = _relax()
    op = relax.op
    lo = bb.emit(op.astype(op.bitwise_and(packed, _const(np.uint8(15))), "int32"))
    hi = bb.emit(op.astype(op.right_shift(packed, _const(np.uint8(4))), "int32"))
    both = bb.emit(op.concat([op.expand_dims(lo, 1), op.expand_dims(hi, 1)], axis=1))
    idx = bb.emit(op.reshape(both, (-1,)))
    n = int(np.prod(shape))
    if 2 * int(packed.ty.shape[0]) != n:
        idx = bb.emit(op.strided_slice(idx, axes=[0], begin=[0], end=[n]))
    vals = bb.emit(op.take(_const(lut.astype(out_dtype)), idx, axis=0))
    return bb.emit(op.reshape(vals, tuple(int(d) for d in shape)))


def _bf16_exact(spec: QuantSpec) -> bool:
    """True when every code of ``spec`` (value / scale, before the scale) is exact in bf16: fp grids
    with at most 7 mantissa and 8 exponent bits (fp8, bf16, fp6, fp4), and integer levels within
    ±256 without a zero point. (bf16 subnormals are flushed by vdpbf16ps: a term below 2^-126.)"""
    fmt = spec.fmt
    if fmt.kind == "fp":
        return fmt.mbits <= 7 and fmt.ebits <= 8
    if fmt.kind == "int":
        zp = spec.zero_point
        return (zp is None or not np.any(zp != 0)) and fmt.qmin >= -256 and fmt.qmax <= 256
    return False


# ---- weight rules (constant tensors) ----------------------------------------------------------
def _scale_const(spec: QuantSpec, ndim: int):
    """The spec's scale as a constant broadcastable against a rank-``ndim`` tensor."""
    return _const(spec.broadcast(spec.scale, ndim))


def _int_weight(bb, w, spec: QuantSpec):
    fmt, zp = spec.fmt, spec.zero_point
    # int8 codes only where every level fits int8: uint8 weights (0..255) would wrap
    if (zp is not None and np.any(zp != 0)) or fmt.qmin < -128 or fmt.qmax > 127:
        return _dequant_weight(bb, w, spec)
    k = spec.quantize(w).codes.astype(np.int8)
    if fmt.bits <= 4:  # two per byte, LUT unpack (nibble -> int8: two's complement if signed)
        lut = np.array([v - 16 if fmt.signed and v >= 8 else v for v in range(16)], np.int8)
        codes = _unpack_nibbles(bb, _const(_pack_nibbles(k.astype(np.uint8) & 15)), lut,
                                w.shape, "int8")
        storage = f"{fmt.name} packed 2/byte (uint8) + LUT unpack"
    else:
        codes = _const(k)
        storage = "int8"
    value = bb.emit(_relax().op.multiply(_relax().op.astype(codes, "float32"),
                                         _scale_const(spec, w.ndim)))
    return QTensor(fmt, value, codes, "int8", spec.scale, 0.0, storage, np_codes=k)


def _fp_weight(bb, w, spec: QuantSpec):
    op = _relax().op
    fmt = spec.fmt
    g = spec.quantize(w).codes  # grid values in fmt's own dtype
    s = _scale_const(spec, w.ndim)
    tvm_dt = _TVM_CAST.get(fmt.np_dtype_name or "")
    if tvm_dt is not None:  # stored natively (fp8 / fp16 / bf16) and upcast
        codes = _const(g)
        value = bb.emit(op.multiply(op.astype(codes, "float32"), s))
        compute = _COMPUTE_NAME.get(fmt.np_dtype_name, "fp32")
        return QTensor(fmt, value, codes if compute != "fp32" else None, compute, spec.scale, 0.0,
                       tvm_dt)
    if fmt.bits <= 4 and fmt.np_dtype is not None:  # FP4: codes 2/byte, E2M1 LUT
        lut = np.arange(16, dtype=np.uint8).view(fmt.np_dtype).astype(np.float32)
        code = g.view(np.uint8) & 15
        vals = _unpack_nibbles(bb, _const(_pack_nibbles(code)), lut, w.shape, "float32")
        value = bb.emit(op.multiply(vals, s))
        return QTensor(fmt, value, None, "fp32", spec.scale, 0.0,
                       f"{fmt.name} packed 2/byte (uint8) + LUT unpack")
    return _dequant_weight(bb, w, spec)


def _dequant_weight(bb, w, spec: QuantSpec):
    """Exact quantize-dequantize at lowering time (the spec's fake_quant), stored as fp32."""
    return QTensor(spec.fmt, _const(spec.fake_quant(w)), None, "fp32", None, 0.0,
                   f"fp32 (dequantized {spec.fmt.name})")


def _float_weight(bb, w, spec: QuantSpec):
    return QTensor(spec.fmt, _const(np.asarray(w, np.float32)), None, "fp32", None, 0.0, "fp32")


WEIGHT_RULES: dict[str, Callable] = {"int": _int_weight, "fp": _fp_weight, "mx": _dequant_weight,
                                      "float": _float_weight}


# ---- activation rules (run-time tensors) ------------------------------------------------------
def _int_act(bb, x, spec: QuantSpec):
    op = _relax().op
    fmt = spec.fmt
    s = _scale_const(spec, len(x.ty.shape))
    zp = spec.zero_point
    if zp is not None and zp.size > 1:
        raise FliqsError(f"format {fmt.name}: per-channel zero points on run-time tensors are not "
                         "lowered to TVM; use a per-tensor zero point")
    zpv = float(zp[0]) if zp is not None else 0.0
    v = op.round(op.divide(x, s))
    if zpv:
        v = op.add(v, _const(np.float32(zpv)))
    v = op.minimum(op.maximum(v, _const(np.float32(fmt.qmin))), _const(np.float32(fmt.qmax)))
    v = bb.emit(v)
    storage = spec.code_dtype.name  # int8 / uint8 levels
    codes = bb.emit(op.astype(v, storage))
    deq = op.subtract(v, _const(np.float32(zpv))) if zpv else v
    value = bb.emit(op.multiply(deq, s))
    return QTensor(fmt, value, codes if not zpv else None, storage, spec.scale, zpv, storage,
                   grid=v if _bf16_exact(spec) else None)


def _fp_act(bb, x, spec: QuantSpec):
    op = _relax().op
    fmt = spec.fmt
    s = _scale_const(spec, len(x.ty.shape))
    v = op.divide(x, s)
    mx = _const(np.float32(fmt.max_finite))
    tvm_dt = _TVM_CAST.get(fmt.np_dtype_name or "")
    if tvm_dt is not None and fmt.np_dtype_name == "float16":  # native in LLVM: plain casts
        v = bb.emit(op.minimum(op.maximum(v, op.negative(mx)), mx))
        c = bb.emit(op.astype(v, tvm_dt))
        value = bb.emit(op.multiply(op.astype(c, "float32"), s))
        return QTensor(fmt, value, c, "fp16", spec.scale, 0.0, tvm_dt)
    # fp8 / bf16 / fp6 / fp4: divide -> exact RNE on the f32 bit pattern -> multiply. Not relax
    # casts: TVM 0.27 gets f32->fp8 wrong below the smallest normal and drops fp8 / bf16 cast
    # pairs inside fused kernels (tvm_kernels.fp_round_te has the details).
    same_range = fmt.ebits >= 8  # bf16: f32's exponent range, subnormals included
    r = bb.emit_te(K.fp_round_te, bb.emit(v), mbits=fmt.mbits, max_finite=fmt.max_finite,
                   min_normal=0.0 if same_range else fmt.min_normal,
                   min_subnormal=fmt.min_subnormal)
    value = bb.emit(op.multiply(r, s))
    compute = _COMPUTE_NAME.get(fmt.np_dtype_name or "", "fp32")
    c = bb.emit(op.astype(r, tvm_dt)) if compute != "fp32" else None  # exact: on the grid
    return QTensor(fmt, value, c, compute, spec.scale, 0.0, tvm_dt or "fp32",
                   grid=r if _bf16_exact(spec) else None)


def _mx_act(bb, x, spec: QuantSpec):
    raise FliqsError(f"activation format {spec.fmt.name}: MX activations are not lowered to TVM "
                     "yet; use an int/fp activation format or the 'ort' target")


def _float_act(bb, x, spec: QuantSpec):
    return QTensor(spec.fmt, x, None, "fp32", None, 0.0, "fp32")


ACT_RULES: dict[str, Callable] = {"int": _int_act, "fp": _fp_act, "mx": _mx_act,
                                   "float": _float_act}


# ---- compute rules: (weight codes dtype, activation codes dtype) -> native kernel --------------
@dataclass(frozen=True)
class ComputeRule:
    """Pattern: the code dtypes of weight and activation. Rewrite: run the conv/matmul on the codes
    with ``acc`` accumulation, then multiply by s_x·s_w (per output channel) and add the bias."""

    weight: tuple  # QTensor.labels() it takes
    act: tuple
    acc: str
    name: str  # executed dtype label prefix / kernel name
    # only where a scheduled kernel of this rule runs on the target (tvm_kernels.kernels_for) and
    # the layer's shape suits it; elsewhere the next rule (or fp32) takes the layer
    kernel_only: bool = False
    operands: Optional[str] = None  # the dtype both operands are fed as, when not their codes'


COMPUTE_RULES = [
    ComputeRule(("int8",), ("uint8", "int8"), "int32", "int8"),
    # bf16-exact codes on both sides (fp8 / bf16 / fp6 / fp4, int <= 8 bits; int8 x int8 is taken
    # above) with a constant weight: vdpbf16ps (tvm_bf16) where the target has avx512bf16. The
    # kernel keeps bf16 as uint16 bits and calls the intrinsic from LLVM IR: the obstacle below.
    ComputeRule(("bf16-codes-const",), ("bf16-codes",), "float32", "bf16-dpbf16ps",
                kernel_only=True, operands="bf16"),
    # Without the kernel above: TVM 0.27 legalizes every bf16 / fp16 value to f32 before LLVM
    # (BF16ComputeLegalize runs unconditionally; a vdpbf16ps tensor intrinsic in TIR fails LLVM
    # verification with <32 x float> operands, measured): the loops upcast and run fp32 FMAs —
    # hence the kernel name.
    ComputeRule(("bf16",), ("bf16",), "float32", "bf16-upcast-fp32"),
    ComputeRule(("fp16",), ("fp16",), "float32", "fp16-upcast-fp32"),
]


def _match_rule(w: Optional[QTensor], a: Optional[QTensor], channel_axes: tuple = (0,),
                kernels: frozenset = frozenset(), kernel_ok: bool = False) -> Optional[ComputeRule]:
    """The native rule for (weight, activation), or None (fp32 on dequantized values). Needs a
    per-tensor activation scale and a per-tensor or per-output-channel weight scale (the output
    channel on one of ``channel_axes``: conv / linear 0, MatMul [.., K, N] the last). A
    ``kernel_only`` rule matches only when its name is in ``kernels`` (the target runs its kernel)
    and ``kernel_ok`` (the layer's shape suits the kernel)."""
    if w is None or a is None:
        return None
    if a.scale is None or a.scale.size != 1 or w.scale is None or \
            (w.scale.size > 1 and w.axis not in (*channel_axes, None)):
        return None
    wl, al = w.labels(), a.labels()
    for rule in COMPUTE_RULES:
        if rule.kernel_only and not (kernel_ok and rule.name in kernels):
            continue
        if wl.intersection(rule.weight) and al.intersection(rule.act):
            return rule
    return None


# ---- the translator ---------------------------------------------------------------------------
@dataclass
class _Layer:
    fx_name: str
    op: str
    rule: Optional[str]
    dtype: str
    weight_fmt: str = "float"
    act_fmt: str = "float"
    storage: str = "fp32"
    weight_const: object = None  # the weight constant a kernel rewrite finds the layer by


class _Translator:
    """Holds the side tables the converters share while TVM's importer walks the graph."""

    def __init__(self, ep, prepacked: frozenset = frozenset()):
        self.ep = ep
        # compute rules with a scheduled kernel on this target (tvm_kernels.kernels_for): their
        # layers get an integer constant weight, pre-packed by the kernel's rewrite later
        self.prepacked = frozenset(prepacked)
        self.qt: dict = {}  # fx node -> QTensor
        self.layers: list[_Layer] = []
        self.consts = {}
        sd = dict(ep.state_dict)
        sd.update(getattr(ep, "constants", {}) or {})
        for spec in ep.graph_signature.input_specs:
            if spec.target is not None and spec.target in sd:
                self.consts[spec.arg.name] = sd[spec.target]

    def const_of(self, node) -> Optional[np.ndarray]:
        if node is None or getattr(node, "op", None) != "placeholder":
            return None
        t = self.consts.get(node.name)
        return None if t is None else t.detach().to(torch.float32).cpu().numpy()

    # fliqs.fake_quant(x, scale, zero_point, fmt, axis)
    def fake_quant(self, node, imp):
        x_node, s_node, zp_node, fmt_name, axis = (list(node.args) + [None] * 5)[:5]
        fmt = F.get(fmt_name)
        scale = self.const_of(s_node)
        zp = self.const_of(zp_node) if zp_node is not None else None
        if scale is None and fmt.has_scale:
            raise FliqsError(f"node {node.name}: the scale of fake_quant must be a constant buffer")
        w = self.const_of(x_node)
        spec = QuantSpec.from_call(fmt, np.ones(1) if scale is None else scale, zp, axis,
                                   role="weight" if w is not None else "activation")
        bb = imp.block_builder
        if w is not None:
            q = WEIGHT_RULES[fmt.kind](bb, w, spec)
            if _bf16_exact(spec):
                q.np_grid = np.asarray(spec.quantize(w).codes).astype(np.float32)
        else:
            q = ACT_RULES[fmt.kind](bb, imp.env[x_node], spec)
        q.axis = spec.axis
        self.qt[node] = q
        return q.value

    def _quant_inputs(self, node):
        a = self.qt.get(node.args[0]) if isinstance(node.args[0], torch.fx.Node) else None
        w = self.qt.get(node.args[1]) if isinstance(node.args[1], torch.fx.Node) else None
        return a, w

    def _record(self, node, op_name, rule, a, w, wconst=None):
        if rule is not None and rule.operands:
            dtype = f"{rule.operands}x{rule.operands}->{rule.acc}"
        elif rule is not None:
            dtype = f"{a.compute}x{w.compute}->{rule.acc}"
        else:
            dtype = "float32"
        self.layers.append(_Layer(node.name, op_name, rule.name if rule else None, dtype,
                                  w.fmt.name if w else "float", a.fmt.name if a else "float",
                                  w.storage if w else "fp32", wconst))

    def _float_weight_const(self, node, imp):
        """The constant fp32 weight of a layer without a native rule, when the target has the
        fp32 kernel (``tvm_fp32``; its rule "fp32" is prepacked): a parameter (bound only after
        the import, so made a constant here) or a weight dequantized at lowering. The kernel's
        rewrite finds the layer by identity with it. None for a weight decoded at run time
        (low-bit codes: their storage stays low-bit) and on other targets."""
        arg = node.args[1] if len(node.args) > 1 else None
        if "fp32" not in self.prepacked or not isinstance(arg, torch.fx.Node):
            return None
        value = imp.env.get(arg)
        if _is_const(value):
            return value if value.ty.dtype == "float32" else None
        param = self.const_of(arg)
        return None if param is None else _const(param)

    @contextlib.contextmanager
    def _weight_as(self, imp, node, const):
        """The importer's converter reads ``const`` as the layer's weight (when not None)."""
        arg = node.args[1]
        saved = imp.env.get(arg)
        if const is not None:
            imp.env[arg] = const
        try:
            yield
        finally:
            imp.env[arg] = saved

    def _rescale(self, bb, y, a, w, rule, ndim, channel_axis):
        """acc → float32 × s_x·s_w, the per-output-channel scales on ``channel_axis`` (conv NCHW:
        1; linear: -1, whatever the rank — a [B, T, C] input keeps its channels last)."""
        op = _relax().op
        y = bb.emit(op.astype(y, "float32")) if rule.acc != "float32" else y
        s = (a.scale.reshape(-1)[0] * w.scale.reshape(-1)).astype(np.float32)
        shape = [1] * ndim
        shape[channel_axis] = s.size
        return bb.emit(op.multiply(y, _const(s.reshape(shape) if s.size > 1 else s.reshape(()))))

    def _kernel_operands(self, a, w):
        """(activation, weight) of a ``rule.operands`` layer: the bf16-exact float32 codes (the
        weight a constant, recorded so the kernel's rewrite finds the layer)."""
        storage = f"fp32 codes (holds {w.fmt.name} values)"
        return a.grid, QTensor(**{**w.__dict__, "codes": _const(w.np_grid), "storage": storage})

    def conv2d(self, node, imp):
        a, w = self._quant_inputs(node)
        dilation_arg, groups_arg = (list(node.args) + [None] * 7)[5:7]
        rule = _match_rule(w, a, kernels=self.prepacked, kernel_ok=float_conv_applicable(
            groups_arg or 1, _pair(dilation_arg or 1)))
        if rule is None:
            wconst = self._float_weight_const(node, imp)
            self._record(node, "conv2d", None, a, w, wconst)
            with self._weight_as(imp, node, wconst):
                return imp._conv2d(node)
        relax = _relax()
        args = imp.retrieve_args(node)
        bias = args[2] if len(args) > 2 else None
        stride, padding, dilation, groups = ((list(args) + [None] * 7)[3:7])
        acodes = a.codes
        if rule.operands:
            acodes, w = self._kernel_operands(a, w)
        wcodes = w.codes
        if (rule.name in self.prepacked and w.np_codes is not None and not _is_const(wcodes)
                and K.conv_vnni_applicable(w.np_codes.shape[1], w.np_codes.shape[0], groups or 1,
                                          _pair(dilation or 1))):
            wcodes = _const(w.np_codes)  # VNNI kernels read pre-packed int8 (int4 values)
            w = QTensor(**{**w.__dict__, "storage": f"int8 (holds {w.fmt.name} values)"})
        conv = relax.op.nn.conv2d(acodes, wcodes, strides=stride or 1, padding=padding or 0,
                                  dilation=dilation or 1, groups=groups or 1, out_dtype=rule.acc)
        y = imp.block_builder.emit(conv)
        wconst = wcodes if _is_const(wcodes) else None
        self._record(node, "conv2d", rule, a, w, wconst)
        y = self._rescale(imp.block_builder, y, a, w, rule, 4, 1)
        if not imp._is_no_bias(bias):
            y = imp.block_builder.emit(relax.op.add(y, relax.op.reshape(bias, (1, -1, 1, 1))))
        return y

    def linear(self, node, imp):
        a, w = self._quant_inputs(node)
        rule = _match_rule(w, a, kernels=self.prepacked, kernel_ok=True)
        relax = _relax()
        if rule is None:
            wconst = self._float_weight_const(node, imp)
            if wconst is None:
                self._record(node, "linear", None, a, w)
                return imp._linear(node)
            # matmul(x, const [K, N]): what the fp32 kernel's rewrite matches
            bb = imp.block_builder
            args = imp.retrieve_args(node)
            wt = _const(wconst.value.numpy().T.copy())
            y = bb.emit(relax.op.matmul(args[0], wt, out_dtype="float32"))
            self._record(node, "linear", None, a, w, wt)
            bias = args[2] if len(args) > 2 else None
            return y if imp._is_no_bias(bias) else bb.emit(relax.op.add(y, bias))
        args = imp.retrieve_args(node)
        bias = args[2] if len(args) > 2 else None
        bb = imp.block_builder
        acodes = a.codes
        if rule.operands:
            acodes, w = self._kernel_operands(a, w)
        if rule.name in self.prepacked and w.np_codes is not None and not _is_const(w.codes):
            w = QTensor(**{**w.__dict__, "codes": _const(w.np_codes),
                           "storage": f"int8 (holds {w.fmt.name} values)"})
        if _is_const(w.codes):  # constant [K, N]: what the VNNI rewrite matches
            wt = _const(w.codes.value.numpy().T.copy())
        else:
            wt = bb.emit(relax.op.permute_dims(w.codes, [1, 0]))
        y = bb.emit(relax.op.matmul(acodes, wt, out_dtype=rule.acc))
        self._record(node, "linear", rule, a, w, wt if _is_const(wt) else None)
        y = self._rescale(bb, y, a, w, rule, len(acodes.ty.shape), -1)
        if not imp._is_no_bias(bias):
            y = bb.emit(relax.op.add(y, bias))
        return y

    def matmul(self, node, imp):
        """MatMul ``[.., M, K] × [.., K, N]``: a constant weight (per output channel, its last
        axis) or a run-time second operand (an attention MatMul, per tensor) — on the codes with
        the rule's accumulation, then one rescale along N."""
        a, w = self._quant_inputs(node)
        w_rank = len(w.value.ty.shape) if w is not None else 0
        # the bf16 kernel: a constant 2-D [K, N] weight only
        rule = _match_rule(w, a, channel_axes=(-1, w_rank - 1), kernels=self.prepacked,
                           kernel_ok=w is not None and w.np_grid is not None and w_rank == 2)
        if rule is None:
            return self._float_op("matmul.default", "matmul")(node, imp)
        bb = imp.block_builder
        acodes = a.codes
        if rule.operands:
            acodes, w = self._kernel_operands(a, w)
        y = bb.emit(_relax().op.matmul(acodes, w.codes, out_dtype=rule.acc))
        # a run-time second operand (attention) is passed on too: the kernel rewrites find their
        # layers by identity with it (``tvm_attention.attention_rewrite``); a constant one only
        # for a kernel rule with its own operands (the bf16 kernel)
        wrec = w.codes if not _is_const(w.codes) or rule.operands else None
        self._record(node, "matmul", rule, a, w, wrec)
        return self._rescale(bb, y, a, w, rule, len(y.ty.shape), -1)

    def _float_op(self, key, op_name):
        """Quantizable ops without a native rule here: TVM's own converter (fp32 on dequantized
        values), recorded so every quantizable op appears in ``executed`` in order."""
        def convert(node, imp):
            a, w = self._quant_inputs(node)
            self._record(node, op_name, None, a, w)
            if not hasattr(self, "_stock"):
                self._stock = type(imp).create_convert_map(imp)
            return self._stock[key](node)
        return convert

    def convert_map(self):
        table = {"fake_quant.default": self.fake_quant, "conv2d.default": self.conv2d,
                 "linear.default": self.linear, "matmul.default": self.matmul}
        # aten ops TVM 0.27's importer lacks when decompositions are off
        table["t.default"] = lambda node, imp: imp.block_builder.emit(
            _relax().op.permute_dims(imp.env[node.args[0]]))
        for key, op_name in (("conv1d.default", "conv1d"), ("conv_transpose1d.default", "conv_transpose1d"),
                             ("conv_transpose2d.input", "conv_transpose2d")):
            table[key] = self._float_op(key, op_name)
        return table


def _pair(v):
    return tuple(v) if isinstance(v, (list, tuple)) else (v, v)


def translate(ep, prepacked: frozenset = frozenset()):
    """ExportedProgram (with ``fliqs.fake_quant`` nodes) → (IRModule, per-layer records).

    Requires: every fake_quant scale / zero point is a buffer (constant); weights are parameters.
    Guarantees: weights are bound as constants; main takes only the user inputs.
    """
    from tvm.relax.frontend.torch import from_exported_program
    tr = _Translator(ep, prepacked)
    try:
        mod = from_exported_program(ep, custom_convert_map=tr.convert_map(),
                                    run_ep_decomposition=False, unwrap_unit_return_tuple=True)
    except FliqsError:
        raise
    except AssertionError as e:
        raise FliqsError(f"TVM's torch importer cannot translate this graph ({e}); the model uses an "
                         "operator TVM 0.27 does not support") from None
    return mod, tr.layers


# ---- compile, export, run ---------------------------------------------------------------------
def fuse_pipeline():
    """Legalize + operator fusion WITHOUT FoldConstant: packed / low-precision weights stay as
    stored and are decoded at run time; epilogues (rescale, bias, ReLU, next quantize) fuse into
    one loop nest — a hand conv kernel's into its tile write-back (``tvm_epilogue``). No
    scheduling of the other functions (that is ``tvm_schedules``' or MetaSchedule's job)."""
    from fliqs_compiler.backends.tvm_epilogue import fuse_with_kernels
    return fuse_with_kernels


@dataclass(frozen=True)
class Tuning:
    """MetaSchedule settings of one compile: ``trials`` in total, ``per_task`` each (default
    ``trials``), ``per_round`` candidates per scheduler round (default ``per_task``), the
    persistent tuning database in ``work_dir`` (default: a folder per target under the temp dir)
    and ``log`` (called with one line about what is reused and tuned)."""

    trials: int = 64
    per_task: Optional[int] = None
    per_round: Optional[int] = None
    work_dir: object = None
    log: Optional[Callable] = None


def compile_module(mod, target: Target, *, tuning: Optional[Tuning] = None, fuse: bool = True,
                      schedule: bool = True):
    """Relax IRModule → (``tvm.compile`` executable, schedule counts).

    Legalization: ``tuning``: ``_tune`` — TVM's static-shape tuning steps (zero pipeline,
    MetaSchedule with ``tuning.trials`` in total, apply the database) with a persistent database
    in ``tuning.work_dir``: tasks it already holds are not tuned again, by any later call, model or
    process; the zero pipeline runs FoldConstant, which pre-decodes constant packed (int4 / fp8 /
    fp4) weights to fp32 at build time. Else ``fuse=True`` (default): ``fuse_pipeline`` (exact:
    fp8 / bf16 rounding does not rely on casts, see ``tvm_kernels.fp_round_te``); ``fuse=False``:
    LegalizeOps alone, one function per operator.
    ``schedule=True`` (default): then ``tvm_schedules.schedule`` gives every function that is
    not already scheduled (hand VNNI kernels, MetaSchedule's tuned ones) a rule-based CPU
    schedule; ``counts`` says how many each rule took (``tvm_schedules.build`` puts back any
    that would not build: ``counts["reverted"]``). ``schedule=False``: TVM's default build —
    naive single-threaded loops outside the hand kernels (the baseline ``bench/latency.py``
    measures against). Every path but that one first gives erf / exp / tanh and the ops built on
    them their vectorizable polynomial forms (``tvm_fast_math``).
    """
    import tvm
    from tvm import relax
    from fliqs_compiler.backends import tvm_compat, tvm_fast_math, tvm_schedules
    tvm_compat.vectorizable_nearbyint()
    tgt = target.tvm()
    if tuning is not None or fuse or schedule:  # not TVM's default build: that one stays as is
        mod = tvm_fast_math.vectorizable(mod)
    if tuning is not None:
        wd = Path(tuning.work_dir or Path(tempfile.gettempdir()) / "fliqs-tvm-tune" / _safe(target.key))
        wd.mkdir(parents=True, exist_ok=True)
        mod = _tune(mod, target, wd, tuning)
    elif fuse or schedule:
        with tgt:
            mod = (fuse_pipeline() if fuse else relax.transform.LegalizeOps())(mod)
    if not schedule:
        return tvm.compile(mod, target=tgt), {}
    scheduled, counts = tvm_schedules.schedule(mod, tgt)
    ex, reverted = tvm_schedules.build(scheduled, mod, tgt)
    counts["reverted"] = len(reverted)
    return ex, counts


def _tune(mod, target: Target, work_dir: Path, tuning: Tuning, build_timeout_s: float = 300.0):
    """TVM's ``static_shape_tuning`` steps with patient builders/runners and database reuse.

    Candidates are built here for ``target``'s TVM target (an ``rpc://`` target's device target,
    resolved before any work) and timed where the target is: ``devices.device_for(target)
    .tuning_runner`` — ``LocalRunner`` on this host, MetaSchedule's ``RPCRunner`` on a device
    under an ``rpc://`` key (a one-line FliqsError naming the key when none is free then).

    Requires: a Relax module before the zero pipeline. Guarantees: every task with a valid record
    in ``work_dir``'s JSON database (from any earlier run or model: workloads are matched
    structurally) is reused, not re-tuned — only new tasks get trials (``trials`` in total,
    ``per_task`` each); hand-scheduled PrimFuncs (``tirx.is_scheduled``: the VNNI kernels) are
    never handed to MetaSchedule. Builders/runners wait ``build_timeout_s``: the default 30 s
    fails EVERY candidate on a loaded 2-core machine (measured: 0 valid samples in 12 tasks).
    ``per_round``: candidates measured per scheduler round (default ``per_task``); MetaSchedule's
    gradient scheduler first gives every task one round, then spends the rest of ``trials`` on the
    tasks with the largest expected gain — a small round with ``trials`` > tasks × round does that.
    ``log``: called with one line about what is reused and tuned."""
    from tvm import relax, transform
    trials, log = tuning.trials, tuning.log
    per_task = tuning.per_task or max(1, trials)
    per_round = tuning.per_round
    from tvm.s_tir import meta_schedule as ms
    from fliqs_compiler.backends.devices import device_for
    from fliqs_compiler.backends.tvm_compat import builder_worker_setup, import_tensor_intrin
    tgt = target.tvm()
    with tgt:
        mod = transform.Sequential([relax.transform.DecomposeOpsForInference(),
                                    relax.transform.CanonicalizeBindings(),
                                    relax.get_pipeline("zero")])(mod)
        database = ms.database.JSONDatabase(work_dir=str(work_dir))
        tasks = [t for t in ms.relax_integration.extract_tasks(mod, tgt)
                 if not _is_scheduled(t.dispatched[0])]
        todo = [t for t in tasks if database.query_tuning_record(
            t.dispatched[0], tgt, t.task_name) is None]
        if log:
            log(f"MetaSchedule: {len(tasks)} tasks, {len(tasks) - len(todo)} reused from "
                f"{work_dir}, {len(todo) if trials > 0 else 0} to tune")
        if trials > 0 and todo:
            import_tensor_intrin()  # what TuneContext imports, in seconds rather than ~25 s
            with _unnamed_handlers_detached(_MS_LOGGER):
                contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
                    todo, str(work_dir), space="post-order-apply", strategy="evolutionary")
            with device_for(target).tuning_runner(build_timeout_s) as runner:
                ms.tune.tune_tasks(
                    tasks=contexts, task_weights=weights, work_dir=str(work_dir),
                    max_trials_global=max(trials, per_task), max_trials_per_task=per_task,
                    num_trials_per_iter=min(64, max(1, per_round or per_task)), database=database,
                    builder=ms.builder.LocalBuilder(timeout_sec=build_timeout_s,
                                                    initializer=builder_worker_setup),
                    runner=runner)
        with database:  # the database already in memory: no second read of the JSON files
            mod = relax.transform.MetaScheduleApplyDatabase()(mod)
    return mod


_MS_LOGGER = "tvm.s_tir.meta_schedule"


@contextlib.contextmanager
def _unnamed_handlers_detached(logger_name: str):
    """Detach the logger's unnamed handlers while MetaSchedule writes its logging config.

    MetaSchedule's ``create_loggers`` lists the handlers already on its logger *by name* in a
    ``dictConfig``; an unnamed one (``logging.StreamHandler()`` added by an application, or the
    capture handler pytest attaches to every non-propagating logger) is ``None`` there and the
    call dies with "'NoneType' object has no attribute 'format'" — measured: every tuning after
    the first in one pytest process. They are re-attached afterwards, so they keep their records."""
    import logging
    logger = logging.getLogger(logger_name)
    unnamed = [h for h in logger.handlers if h.get_name() is None]
    for h in unnamed:
        logger.removeHandler(h)
    try:
        yield
    finally:
        for h in unnamed:
            logger.addHandler(h)


def _is_scheduled(prim_mod) -> bool:
    """True when the task's PrimFunc carries ``tirx.is_scheduled`` (our hand VNNI kernels)."""
    return any(bool(f.attrs and f.attrs.get("tirx.is_scheduled", False))
               for f in prim_mod.functions.values())


def _safe(key: str) -> str:
    import hashlib
    return hashlib.sha1(key.encode()).hexdigest()[:12]


def ir_functions(ll: str) -> dict:
    """Split LLVM IR text (``inspect_source("ll")``) into {function name: body text}."""
    return dict(re.findall(r"^define [^@]*@([\w.$]+)\((.*?)^}", ll, re.M | re.S))


def kernel_ir(fns: dict, sym: str) -> str:
    """The IR of PrimFunc ``sym``: its packed wrapper, its compute body and the parallel-loop
    bodies (``__tvm_parallel_lambda*``) they launch, followed transitively."""
    seen, todo = [], [k for k in (f"__tvm_ffi_{sym}", sym, f"{sym}_compute_") if k in fns]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.append(name)
            todo += [f for f in re.findall(r"@(__tvm_parallel_lambda[\w.]*)", fns[name]) if f in fns]
    return "\n".join(fns[k] for k in seen)


def instruction_calls(ir: str, instruction: str) -> int:
    """Calls of ``instruction``'s LLVM intrinsic (``tvm_kernels.INSTRUCTION_IR``) in ``ir``."""
    return len(re.findall(r"call [^\n]*" + K.INSTRUCTION_IR[instruction], ir))


@dataclass
class Lowered:
    """A compiled model. ``run`` / ``time_ms`` take the model's inputs (numpy, in order)."""

    path: Optional[Path]
    executable: object
    executed: dict
    target: Target
    mod: object = None
    instruction_counts: dict = field(default_factory=dict)  # kernel instructions in the module
    timing_s: dict = field(default_factory=dict)
    schedules: dict = field(default_factory=dict)  # functions per tvm_schedules rule ({} unscheduled)
    _vm: object = None

    def vm(self):
        if self._vm is None:
            import tvm
            from tvm import relax
            self._vm = relax.VirtualMachine(self.executable, tvm.cpu())
        return self._vm

    def _args(self, inputs):
        import tvm
        return [tvm.runtime.tensor(np.ascontiguousarray(x), tvm.cpu()) for x in inputs]

    def run(self, inputs) -> list:
        """Run ``main`` on numpy inputs; returns the outputs as a list of numpy arrays."""
        out = self.vm()["main"](*self._args(inputs))
        if hasattr(out, "numpy"):
            return [out.numpy()]
        return [o.numpy() for o in out]

    def time_ms(self, inputs, number: int = 1, repeat: int = 5, min_repeat_ms: int = 50) -> float:
        """Median latency in ms (``time_evaluator``: ``repeat`` runs of ≥ ``min_repeat_ms``)."""
        import tvm
        f = self.vm().time_evaluator("main", tvm.cpu(), number=number, repeat=repeat,
                                     min_repeat_ms=min_repeat_ms)
        return float(f(*self._args(inputs)).median * 1e3)


def _write_library(ex, path: Path, fcompile=None) -> None:
    """``ex.export_library`` at ``path`` (atomic), linked by ``fcompile``: None (the host's
    compiler) or ``targets.cross_compiler(target)``'s, for a target whose ``mtriple`` is not the
    host's."""
    with atomic.replacing(path, suffix=".so") as tmp:
        ex.export_library(tmp, fcompile=fcompile)


def _public_names(graph, records: list) -> list:
    """Map translated conv/linear records (in order) to ``graph.layers`` public names.

    Layers are ordered by their fx node's position in ``graph.gm``; when the counts agree they
    are zipped with the records (torch.export keeps execution order); otherwise the fx node name
    is used where it matches a layer's ``.node`` and the exported node name elsewhere."""
    order = {n.name: i for i, n in enumerate(graph.gm.graph.nodes)}
    # input-only layers (a LayerNorm / softmax / GELU input) make no record: their quantizer
    # feeds TVM's own float op on the dequantized values
    layers = sorted((L for L in getattr(graph, "layers", {}).values()
                     if not L.attrs.get("input_only")), key=lambda L: order.get(L.node, 1 << 30))
    if layers and len(layers) == len(records):
        return [L.name for L in layers]
    by_node = {L.node: L.name for L in layers}
    return [by_node.get(r.fx_name, r.fx_name) for r in records]


def offered_to_kernel(record, prepacked: frozenset) -> bool:
    """Whether a kernel of the target was offered this layer: its rule has one, or (no native
    rule) its fp32 weight was recorded for the fp32 kernel."""
    if record.rule is not None:
        return record.rule in prepacked
    return record.weight_const is not None and "fp32" in prepacked


def _kernel_storage(kernel, record) -> str:
    """A kernel layer's weight storage as the report states it (an attention MatMul's operand is
    packed per call)."""
    if not _is_const(record.weight_const):
        return f"run-time {kernel.storage} (packed per call for {kernel.name.upper()})"
    if kernel.storage_of is not None:
        return kernel.storage_of(record.weight_const, record.op)
    return f"{kernel.storage} ({kernel.name.upper()}-prepacked)"


def kernel_weights(kernels, records) -> list:
    """``[(Kernel, [weight constants of the layers of its compute rule])]``: each kernel rewrites
    only its own rule's layers ("fp32": a layer without a native rule)."""
    return [(k, [r.weight_const for r in records if r.weight_const is not None
                 and (r.rule or "fp32") == k.compute_rule]) for k in kernels]


def lower(graph, target, out_dir=None, *, tuning: Optional[Tuning] = None, vnni: bool = True,
          fuse: bool = True, schedule: bool = True, example_inputs=None) -> Lowered:
    """Lower a materialized ``Graph`` for a TVM ``target`` and compile it.

    Requires: ``graph.gm`` holds only fixed ``FormatQuantizer``s (or ``fliqs.fake_quant`` calls)
    with constant scales; ``graph.inputs`` gives the input shapes. ``target``: text or Target.
    Guarantees: ``out_dir/tvm/model.so`` (when ``out_dir``) is written atomically and loads in a
    fresh ``relax.VirtualMachine`` whose ``main`` takes only the model inputs; ``executed`` names
    the realized compute per layer public name. Bad target / unsupported format → FliqsError.
    A target whose ``mtriple`` differs from the host's (a device) is linked by its cross compiler
    (``targets.cross_compiler``): the file is then for that device, not loadable here.
    ``fuse`` / ``schedule``: see ``compile_module`` (``fuse=False, schedule=False`` is TVM's
    default build); ``Lowered.schedules`` counts the functions per schedule rule.
    """
    target = parse_target(target)
    if target.kind != "tvm":
        raise FliqsError(f"target {target.text!r} is not a TVM target; lower() needs 'llvm' or a "
                         "JSON target dict")
    # The linker for a device whose triple is not the host's, checked before any work (a missing
    # cross compiler is a one-line FliqsError, not a failure after the compile).
    fcompile = cross_compiler(target) if out_dir is not None else None
    times = {}
    t0 = time.perf_counter()
    inputs = example_inputs or graph.example_inputs()
    was_training = graph.gm.training
    try:
        ep = torch.export.export(graph.gm.eval(), tuple(inputs))
    except Exception as e:  # noqa: BLE001
        raise FliqsError(f"graph {graph.name!r}: torch.export failed ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); check the model is traceable") from None
    finally:
        graph.gm.train(was_training)
    kernels = K.kernels_for(target.caps) if vnni else []  # chosen from the target's capabilities
    prepacked = frozenset(k.compute_rule for k in kernels)
    mod, records = translate(ep, prepacked)
    times["translate"] = time.perf_counter() - t0
    names = _public_names(graph, records)
    by_name = {id(r.weight_const): n for r, n in zip(records, names) if r.weight_const is not None}
    weights = kernel_weights(kernels, records)
    mod = K.choose_layout(mod, weights)
    kernel_layers = {}  # layer name → (Kernel, symbol)
    for kernel, consts in weights:
        mod, swapped = kernel.rewrite(mod, by_name, consts)
        kernel_layers.update({n: (kernel, sym) for n, sym in swapped.items()})
    by_rule = {k.compute_rule: k for k in kernels}
    t1 = time.perf_counter()
    ex, schedules = compile_module(mod, target, tuning=tuning, fuse=fuse, schedule=schedule)
    times["compile"] = time.perf_counter() - t1
    # What each kernel really compiled to, from the optimized LLVM IR: its intrinsic calls are
    # the instructions (one each). Not the assembly: printing it re-runs LLVM's code generation,
    # measured 2.7 s of an 11 s MobileNetV2 lowering against 0.11 s for the IR.
    ir = ex.mod.imports[0].inspect_source("ll") if ex.mod.imports else ""
    fns = ir_functions(ir)
    stats = {i: instruction_calls(ir, i) for i in ("vpdpbusd", "vdpbf16ps")}
    executed = {}
    kernel_only = {rule.name for rule in COMPUTE_RULES if rule.kernel_only}
    for r, name in zip(records, names):
        # a kernel-only rule's layer is on its kernel only once its compiled code shows it; until
        # then it runs fp32 loops on the codes
        label = "fp32" if r.rule in kernel_only else (r.rule or "fp32")
        entry = {"dtype": r.dtype, "kernel": label, "weight": r.weight_fmt,
                 "activation": r.act_fmt, "weight_storage": r.storage, "op": r.op}
        kernel, sym = kernel_layers.get(name, (None, None))
        if sym is not None:
            n_dp = instruction_calls(kernel_ir(fns, sym), kernel.instruction)
            entry[kernel.instruction] = n_dp
            if n_dp:  # only what the layer's compiled function really contains
                entry["kernel"] = kernel.name
                entry["weight_storage"] = _kernel_storage(kernel, r)
            else:
                entry["fallback"] = f"no {kernel.instruction} in the compiled kernel: {kernel.fallback}"
        elif offered_to_kernel(r, prepacked):
            entry["fallback"] = ("scheduled kernel not applicable (shape/groups/layout): "
                                 + by_rule[r.rule or "fp32"].fallback)
        realized = kernel is not None and entry["kernel"] == kernel.name  # packed at lowering
        if tuning is not None and not realized and not entry["weight_storage"].startswith(("int8", "fp32")):
            entry["weight_storage"] += " (tuning pipeline's FoldConstant pre-decodes it at build time)"
        executed[name] = entry
    path = None
    if out_dir is not None:
        path = Path(out_dir) / "tvm" / "model.so"
        _write_library(ex, path, fcompile)
        meta = {"target": target.tvm_target, "executed": executed, "instructions": stats,
                "schedules": schedules}
        atomic.write_text(path.with_suffix(".json"), json.dumps(meta, indent=1))
    times["total"] = time.perf_counter() - t0
    return Lowered(path, ex, executed, target, mod, stats, times, schedules)
