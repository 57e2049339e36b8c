"""The Relax side shared by the float-accumulating hand kernels (``tvm_bf16``: ``vdpbf16ps`` on
bf16 codes; ``tvm_fp32``: fp32 FMA): one ``relax.dpl`` rewrite of float32 ``matmul`` / ``conv2d``
with a recorded constant weight into ``call_tir`` of a kernel with a pre-packed weight.

What differs between the kernels is data (``FloatKernelOps``): how many input channels a step
consumes (2 bf16 values per ``vdpbf16ps`` lane, 1 per FMA), how the activation reaches the
kernel's operand dtype, how the weight is packed, and the PrimFunc builders. Channel counts are
zero-padded (out to 16, in to the step; zero weights make any activation padding inert) and the
output sliced; convs run NHWC inside the kernel, with a transpose around it only when the module
is still NCHW (``tvm_layout.choose_layout`` decides).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

__all__ = ["FloatKernelOps", "float_rewrite", "float_conv_applicable"]


def float_conv_applicable(groups: int, dilation=(1, 1)) -> bool:
    """Convs the float kernels compute (channel counts are zero-padded): groups 1, dilation 1."""
    return int(groups) == 1 and tuple(int(d) for d in dilation) == (1, 1)


@dataclass(frozen=True)
class FloatKernelOps:
    """One float kernel family, as data for ``float_rewrite``.

    ``prefix``: symbol prefix of the kernels; ``k_step``: input channels per multiply-add lane;
    ``operand(bb) -> (x, shape) -> expr``: the activation as the kernel reads it (per module, so
    helper functions can be shared); ``pack_dense([N, K] f32)`` / ``pack_conv([O, I, KH, KW] f32)``:
    the pre-packed weight; ``dense(m, k, n)`` / ``conv(n, hp, wp, cin, cout, kh, kw, stride)``:
    scheduled PrimFuncs."""

    prefix: str
    k_step: int
    operand: Callable
    pack_dense: Callable
    pack_conv: Callable
    dense: Callable
    conv: Callable


def float_rewrite(mod, names: dict, weight_consts: list, ops: FloatKernelOps):
    """Rewrite ``matmul(f32 [..., M, K], const f32 [K, N], out f32)`` and ``conv2d(f32 NCHW|NHWC,
    const f32 OIHW, out f32, groups 1, dilation 1)`` whose constant is one of ``weight_consts``
    (by identity; ``names``: ``{id(const): public name}``) into ``call_tir`` of ``ops``' kernels.
    Returns ``(mod, {name: symbol})``."""
    import tvm
    from tvm import relax
    from tvm.relax.dpl import is_const, is_op, wildcard
    from fliqs_compiler.backends import tvm_kernels as K

    bb = relax.BlockBuilder(mod)
    done: dict = {}
    op = relax.op
    operand = ops.operand(bb)

    def layer_name(c):
        for w in weight_consts:
            if w is not None and w.same_as(c):
                return names.get(id(w))
        return None

    def add_kernel(prim, name):
        sym = f"{ops.prefix}_{K._sanitize(name)}"
        while sym in done.values():
            sym += "_"
        return bb.add_func(prim.with_attr("global_symbol", sym), sym), sym

    def static(e):
        return all(isinstance(d, tvm.tirx.IntImm) for d in list(e.ty.shape))

    data, w_pat = wildcard(), is_const()
    mm = is_op("relax.matmul")(data, w_pat)
    cv = is_op("relax.nn.conv2d")(data, w_pat)

    def rewrite_matmul(call, matches):
        a, w = matches[data], matches[w_pat]
        name = layer_name(w)
        if (name is None or str(call.attrs.out_dtype) not in ("float32", "") or w.ty.dtype != "float32"
                or a.ty.dtype != "float32" or len(a.ty.shape) < 2 or len(w.ty.shape) != 2
                or not static(a)):
            return call
        g = K.DenseGeometry.of(a, w, in_step=ops.k_step)
        gv, sym = add_kernel(ops.dense(g.m, g.kp, g.np_, lead=g.lead), name)
        y = relax.call_tir(gv, [operand(g.kernel_input(a), (g.m, g.kp)),
                                relax.const(ops.pack_dense(g.padded_weight(w, np.float32)))],
                           relax.TensorType(g.leading_output_shape, "float32"))
        done[name] = sym
        return g.layer_output(y)

    def rewrite_conv(call, matches):
        a, w = matches[data], matches[w_pat]
        name = layer_name(w)
        if name is None or not K._conv_takes_float(call) or not static(a):
            return call
        g = K.ConvGeometry.of(call, in_step=ops.k_step)
        wn = g.padded_weight(w, np.float32)
        x = g.kernel_input(a, pad_value=0.0)
        gv, sym = add_kernel(ops.conv(g.nb, g.hp, g.wp, g.ci, g.co, g.kh, g.kw, g.stride), name)
        y = relax.call_tir(gv, [operand(x, (g.nb, g.hp, g.wp, g.ci)), relax.const(ops.pack_conv(wn))],
                           relax.TensorType(g.kernel_output_shape, "float32"))
        done[name] = sym
        return g.layer_output(y)

    return K.rewrite_main(bb, mod, [(mm, rewrite_matmul), (cv, rewrite_conv)]), done
