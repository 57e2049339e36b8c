"""Hand-scheduled fp32 TIR kernels (AVX-512 FMA): dense and NHWC conv2d for the layers that stay
float — unquantized layers (``fliqs compile`` keeps the first and last float by default) and
formats dequantized to fp32 at lowering (MX) — so they run on the same register-tiled schedule as
the integer kernels, and a model with float layers among the VNNI / bf16 ones can stay NHWC.

- ``FMA_INTRIN`` (``fliqs_fma_16x1_f32``): C[16] f32 += A[1] · B[16] f32, one ``llvm.fma.v16f32``
  (a broadcast of A; LLVM emits ``vbroadcastss`` + ``vfmadd231ps``);
- weights pre-packed at lowering (``pack_dense_weight_f32``: ``[N/16, K, 16]``;
  ``pack_conv_weight_f32``: ``[O/16, KH, KW, I, 16]``), so each step loads 16 output channels;
- the schedules are the VNNI kernels' (``tvm_kernels``): the conv reduces KH, KW and I into a
  register tile of output pixels × 16-channel blocks (the inner loop keeps every accumulator in
  a zmm register: checked in the assembly), parallel over the rest.

Numerics: an fp32 conv / matmul with fused multiply-adds in the kernel's summation order; the
result differs from an unfused or differently ordered sum only by rounding (tests bound it).

``fp32_rewrite`` is the Relax side (``tvm_float_rewrite.float_rewrite`` with ``FP32_OPS``): float32
matmul / conv2d whose constant weight ``tvm_lower`` recorded as a float layer's.
"""
from __future__ import annotations

import itertools

import numpy as np

from fliqs_compiler.backends.tvm_float_rewrite import FloatKernelOps, float_rewrite

__all__ = ["FMA_INTRIN", "register_intrinsics", "pack_dense_weight_f32", "pack_conv_weight_f32",
           "dense_f32", "conv2d_nhwc_f32", "fp32_rewrite", "FP32_OPS"]

FMA_INTRIN = "fliqs_fma_16x1_f32"
_REGISTERED = False
_COUNTER = itertools.count()


def register_intrinsics() -> None:
    """Register the 16-lane fp32 FMA tensor intrinsic once (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((1,), "float32", offset_factor=1),
             B: T.Buffer((16,), "float32", offset_factor=1),
             C: T.Buffer((16,), "float32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:1], B[0:16])
            T.writes(C[0:16])
            for i in T.serial(0, 16):
                with T.sblock("update"):
                    vi = T.axis.remap("S", [i])
                    C[vi] = C[vi] + A[0] * B[vi]

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((1,), "float32", offset_factor=1),
             B: T.Buffer((16,), "float32", offset_factor=1),
             C: T.Buffer((16,), "float32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:1], B[0:16])
            T.writes(C[0:16])
            C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.fma.v16f32"), T.broadcast(A[0], 16),
                B.vload([0], dtype="float32x16"), C.vload([0], dtype="float32x16"),
                dtype="float32x16")

    TensorIntrin.register(FMA_INTRIN, desc, impl, override=True)
    _REGISTERED = True


# ---- weight packing (numpy, lowering time) -----------------------------------------------------
def pack_dense_weight_f32(w_nk: np.ndarray) -> np.ndarray:
    """``[N, K]`` (out, in) → ``[N/16, K, 16]`` (N % 16 == 0)."""
    n, k = w_nk.shape
    return np.ascontiguousarray(np.asarray(w_nk, np.float32).reshape(n // 16, 16, k).transpose(0, 2, 1))


def pack_conv_weight_f32(w_oihw: np.ndarray) -> np.ndarray:
    """``[O, I, KH, KW]`` → ``[O/16, KH, KW, I, 16]`` (O % 16 == 0)."""
    o, i, kh, kw = w_oihw.shape
    w = np.asarray(w_oihw, np.float32).reshape(o // 16, 16, i, kh, kw)
    return np.ascontiguousarray(w.transpose(0, 3, 4, 2, 1))


# ---- scheduled PrimFuncs -----------------------------------------------------------------------
def dense_f32(m: int, k: int, n: int, name: str | None = None, lead: tuple | None = None):
    """Scheduled PrimFunc ``(A f32 [M, K], Bp f32 [N/16, K, 16]) -> C f32 [*lead, N]`` (N % 16 ==
    0; ``lead``: the layer's leading dims, default ``(M,)``, ``tvm_kernels.leading_write_back``):
    the VNNI dense schedule (``tvm_kernels.schedule_dense``) with one input channel per step."""
    import tvm
    from tvm import te
    from fliqs_compiler.backends import tvm_kernels as K
    register_intrinsics()
    lead = tuple(lead or (m,))
    a = te.placeholder((m, k), "float32", name="A")
    b = te.placeholder((n // 16, k, 16), "float32", name="B")
    r = te.reduce_axis((0, k), name="k")
    c = te.compute((m, n), lambda i, j: te.sum(a[i, r] * b[j // 16, r, j % 16], axis=r), name="C")
    sch = tvm.s_tir.Schedule(te.create_prim_func([a, b, K.leading_write_back(c, lead)]))
    K.schedule_dense(sch, lead, FMA_INTRIN)
    return K._finish(sch, name or f"fliqs_dense_f32_{next(_COUNTER)}")


def conv2d_nhwc_f32(n: int, hp: int, wp: int, cin: int, cout: int, kh: int, kw: int,
                    stride=(1, 1), name: str | None = None):
    """Scheduled PrimFunc ``(A f32 [N, Hp, Wp, I] (already padded), Wp f32 [O/16, KH, KW, I, 16]) ->
    C f32 [N, OH, OW, O]``: implicit GEMM, an FMA on 16 output channels per input channel, the VNNI
    conv's register tile (output pixels × channel blocks) reduced over KH, KW and I. Requires
    O % 16 == 0; any stride and input channel count. The caller pads and transposes to NHWC."""
    import tvm
    from tvm import te
    from fliqs_compiler.backends import tvm_kernels as K
    register_intrinsics()
    sh, sw = stride
    oh, ow = (hp - kh) // sh + 1, (wp - kw) // sw + 1
    a = te.placeholder((n, hp, wp, cin), "float32", name="A")
    w = te.placeholder((cout // 16, kh, kw, cin, 16), "float32", name="W")
    rh = te.reduce_axis((0, kh), name="rh")
    rw = te.reduce_axis((0, kw), name="rw")
    rc = te.reduce_axis((0, cin), name="rc")
    c = te.compute((n, oh, ow, cout), lambda b, y, x, o: te.sum(
        a[b, y * sh + rh, x * sw + rw, rc] * w[o // 16, rh, rw, rc, o % 16], axis=[rh, rw, rc]),
        name="C")
    sch = tvm.s_tir.Schedule(te.create_prim_func([a, w, c]))
    blk = sch.get_sblock("C")
    b, y, x, o, lh, lw, lc = sch.get_loops(blk)
    xt_f, ot_f = K._tile_shape(ow, cout // 16)
    xo, xt = sch.split(x, [None, xt_f])
    oo, ot, o16 = sch.split(o, [None, ot_f, 16])
    sch.reorder(b, y, xo, oo, lh, lw, lc, xt, ot, o16)
    fused = sch.fuse(b, y, xo, oo)
    sch.parallel(fused)
    K._accumulate_in_registers(sch, blk, fused, lh, xt, ot, o16, intrin=FMA_INTRIN)
    return K._finish(sch, name or f"fliqs_conv2d_f32_{next(_COUNTER)}")


# ---- Relax wiring --------------------------------------------------------------------------------
FP32_OPS = FloatKernelOps(prefix="fliqs_fp32", k_step=1, operand=lambda bb: lambda x, shape: x,
                          pack_dense=pack_dense_weight_f32, pack_conv=pack_conv_weight_f32,
                          dense=dense_f32, conv=conv2d_nhwc_f32)


def fp32_rewrite(mod, names: dict, weight_consts: list):
    """``tvm_float_rewrite.float_rewrite`` onto the kernels above: float32 matmul / conv2d whose
    constant weight is one of ``weight_consts`` (a float layer's, recorded by ``tvm_lower``).
    Returns ``(mod, {name: symbol})``."""
    return float_rewrite(mod, names, weight_consts, FP32_OPS)
