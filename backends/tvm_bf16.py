"""Hand-scheduled TIR kernels on AVX512-BF16 (``vdpbf16ps``): dense and NHWC conv2d whose operands
are bf16-exact codes (fp8 / bf16 / fp6 / fp4 grid values, integer codes of at most 8 bits) with
fp32 accumulation.

Why this shape (measured on this project's Zen 4 with TVM 0.27 / LLVM 22):

- TVM legalizes every ``bfloat16`` value to f32 before LLVM (``BF16ComputeLegalize`` runs
  unconditionally), and a ``vdpbf16ps`` tensor intrinsic written in TIR fails LLVM verification
  (it gets ``<32 x float>`` operands; ``llvm.x86.avx512bf16.dpbf16ps.512`` takes ``(<16 x float>,
  <32 x bfloat>, <32 x bfloat>)``). So bf16 data is kept as ``uint16`` bit patterns in TIR — storage
  only, nothing legalizes it — and the 16×2 micro-kernel is a tiny function in LLVM IR text
  (``_LLVM_IR``: bitcast ``<32 x i16>`` to ``<32 x bfloat>``, call the intrinsic) imported into each
  kernel with the ``pragma_import_llvm`` loop annotation (TVM links it as ``available_externally``
  + ``alwaysinline``, so it inlines and leaves no symbol; several kernels in one module each import
  it without a clash) and called with ``T.call_extern`` by value, like the VNNI intrinsic's
  ``call_llvm_pure_intrin``.
- ``BF16_INTRIN`` (``fliqs_dot_16x2_bf16``): C[16] f32 += A[2] bf16 · B[16, 2] bf16. Its
  description computes the same thing portably (the bf16 bits shifted into an f32), so an
  untensorized block would still be correct.
- weights are pre-packed at lowering time to bf16 bits (``pack_dense_weight_bf16``:
  ``[N/16, K/2, 16, 2]``; ``pack_conv_weight_bf16``: ``[O/16, KH, KW, I/2, 16, 2]``, uint16);
  activations (the f32 codes ``x / s_x`` on the format's grid, low 16 bits zero) become their high
  16 bits in one elementwise function that FuseOps merges into the quantizer producing them.
- schedules are the VNNI kernels' (``tvm_kernels``): register tile, parallel loop fused before
  ``decompose_reduction``, no vectorized loop around the tensorized block.

Numerics: the product of two bf16 values is exact in fp32 and ``vdpbf16ps`` adds each into the
fp32 accumulator with round-to-nearest-even (DAZ/FTZ: irrelevant for code values), so a layer
differs from an fp32 conv of the same codes only by summation order; the caller rescales once
(fl(acc)·fl(s_x·s_w), then bias), like the int8 rule.

Measured here (2 threads, shared 2-core Zen 4, load ~3, noisy), kernel alone, NHWC: 3×3 conv
64→64 at 56×56 1.09 ms (VNNI on the same shape 0.52), stride 2 64→128 0.58 ms (VNNI 0.26), 512→512
at 7×7 1.66 ms (VNNI 0.54): ``vdpbf16ps`` does half of ``vpdpbusd``'s multiply-adds per
instruction and reads twice the weight bytes. ResNet-18 mixed int8 / int4 / fp8_e4m3 (7 fp8
layers), ``bench/latency.py --scheduled --no-bf16-baseline``, load ~4: 15.9 ms vs 31.5 ms with the
fp8 layers in fp32 (1.98×, NHWC between convs; ``bench/results/latency_bf16_kernel.json``).

``bf16_rewrite(mod, names, weight_consts)`` is the Relax side (a ``tvm_kernels.Kernel``'s
``rewrite``): ``tvm_float_rewrite.float_rewrite`` (shared with the fp32 kernel) with ``BF16_OPS``,
for the constant f32 code weights ``tvm_lower`` records for the ``bf16-dpbf16ps`` compute rule.
"""
from __future__ import annotations

import itertools

import numpy as np

from fliqs_compiler.backends.tvm_float_rewrite import FloatKernelOps, float_rewrite

__all__ = ["BF16_INTRIN", "register_intrinsics", "bf16_bits", "pack_dense_weight_bf16",
           "pack_conv_weight_bf16", "dense_bf16", "conv2d_nhwc_bf16",
           "bf16_rewrite"]

BF16_INTRIN = "fliqs_dot_16x2_bf16"
_MICRO = "fliqs_dpbf16ps_16x2"  # the LLVM IR function the intrinsic calls
_LLVM_IR = r"""
define <16 x float> @fliqs_dpbf16ps_16x2(<16 x float> %c, i32 %a, <32 x i16> %b) #0 {
  %av = insertelement <16 x i32> poison, i32 %a, i64 0
  %ab = shufflevector <16 x i32> %av, <16 x i32> poison, <16 x i32> zeroinitializer
  %ac = bitcast <16 x i32> %ab to <32 x bfloat>
  %bc = bitcast <32 x i16> %b to <32 x bfloat>
  %r = call <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float> %c, <32 x bfloat> %ac, <32 x bfloat> %bc)
  ret <16 x float> %r
}
declare <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float>, <32 x bfloat>, <32 x bfloat>)
attributes #0 = { alwaysinline nounwind "target-features"="+avx512f,+avx512bf16" }
"""
_REGISTERED = False
_COUNTER = itertools.count()


def _f32_of_bits(x):
    """TIR: the f32 whose high 16 bits are the uint16 ``x`` (bf16 → f32, exact)."""
    from tvm import tirx
    return tirx.reinterpret("float32", tirx.shift_left(tirx.Cast("uint32", x),
                                                       tirx.const(16, "uint32")))


def register_intrinsics() -> None:
    """Register the 16×2 bf16 tensor intrinsic once (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((2,), "uint16", offset_factor=1),
             B: T.Buffer((16, 2), "uint16", offset_factor=1),
             C: T.Buffer((16,), "float32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:2], B[0:16, 0:2])
            T.writes(C[0:16])
            for i in T.serial(0, 16):
                for k in T.serial(0, 2):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.reinterpret(
                            "float32", T.shift_left(T.Cast("uint32", A[vk]), T.uint32(16))) \
                            * T.reinterpret("float32", T.shift_left(T.Cast("uint32", B[vi, vk]),
                                                                    T.uint32(16)))

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((2,), "uint16", offset_factor=1),
             B: T.Buffer((16, 2), "uint16", offset_factor=1),
             C: T.Buffer((16,), "float32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:2], B[0:16, 0:2])
            T.writes(C[0:16])
            # one expression (no named temporaries: see tvm_kernels' VNNI intrinsic); the pair of
            # A's bf16 codes travels as one i32, broadcast inside the IR function
            C[T.ramp(T.int32(0), 1, 16)] = T.call_extern(
                "float32x16", _MICRO, C.vload([0], dtype="float32x16"),
                T.reinterpret(A.vload([0], "uint16x2"), dtype="int32"),
                B.vload([0, 0], dtype="uint16x32"))

    TensorIntrin.register(BF16_INTRIN, desc, impl, override=True)
    _REGISTERED = True


# ---- numpy side (lowering time) ----------------------------------------------------------------
def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 values exact in bf16 → their bf16 bit patterns (uint16). Raises ValueError when a
    value is not exact in bf16 (nonzero low 16 bits): codes only, never rounding here."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    if np.any(u & 0xFFFF):
        raise ValueError("bf16_bits: values not exactly representable in bf16")
    return (u >> 16).astype(np.uint16)


def pack_dense_weight_bf16(w_nk: np.ndarray) -> np.ndarray:
    """f32 codes ``[N, K]`` (out, in) → bf16 bits ``[N/16, K/2, 16, 2]`` (N%16 == K%2 == 0)."""
    n, k = w_nk.shape
    return np.ascontiguousarray(bf16_bits(w_nk).reshape(n // 16, 16, k // 2, 2).transpose(0, 2, 1, 3))


def pack_conv_weight_bf16(w_oihw: np.ndarray) -> np.ndarray:
    """f32 codes ``[O, I, KH, KW]`` → bf16 bits ``[O/16, KH, KW, I/2, 16, 2]`` (O%16 == I%2 == 0)."""
    o, i, kh, kw = w_oihw.shape
    w = bf16_bits(w_oihw).reshape(o // 16, 16, i // 2, 2, kh, kw)  # [O16, o, I2, i, kh, kw]
    return np.ascontiguousarray(w.transpose(0, 4, 5, 2, 1, 3))


# ---- scheduled PrimFuncs -------------------------------------------------------------------------
def _with_import(sch, loop):
    """Import the micro-kernel's LLVM IR into the function (an AttrStmt at ``loop``)."""
    sch.annotate(loop, "pragma_import_llvm", _LLVM_IR)


def dense_bf16(m: int, k: int, n: int, name: str | None = None, lead: tuple | None = None):
    """Scheduled PrimFunc ``(A u16 [M, K], Bp u16 [N/16, K/2, 16, 2]) -> C f32 [*lead, N]`` (bf16
    bits in, fp32 accumulation with ``vdpbf16ps``; ``lead``: the layer's leading dims, default
    ``(M,)``, ``tvm_kernels.leading_write_back``). Requires N % 16 == 0, K % 2 == 0. The VNNI
    dense schedule (``tvm_kernels.schedule_dense``), 2 input channels per step."""
    import tvm
    from tvm import te
    from fliqs_compiler.backends import tvm_kernels as K
    register_intrinsics()
    lead = tuple(lead or (m,))
    a = te.placeholder((m, k), "uint16", name="A")
    b = te.placeholder((n // 16, k // 2, 16, 2), "uint16", name="B")
    r = te.reduce_axis((0, k), name="k")
    c = te.compute((m, n), lambda i, j: te.sum(
        _f32_of_bits(a[i, r]) * _f32_of_bits(b[j // 16, r // 2, j % 16, r % 2]), axis=r), name="C")
    sch = tvm.s_tir.Schedule(te.create_prim_func([a, b, K.leading_write_back(c, lead)]))
    K.schedule_dense(sch, lead, BF16_INTRIN, kwidth=2, on_parallel=_with_import)
    return K._finish(sch, name or f"fliqs_dense_bf16_{next(_COUNTER)}")


def conv2d_nhwc_bf16(n: int, hp: int, wp: int, cin: int, cout: int, kh: int, kw: int,
                     stride=(1, 1), name: str | None = None):
    """Scheduled PrimFunc ``(A u16 [N, Hp, Wp, I] (already padded), Wp u16 [O/16, KH, KW, I/2, 16,
    2]) -> C f32 [N, OH, OW, O]``: implicit GEMM, ``vdpbf16ps`` on 16 output × 2 input channels, the
    VNNI conv's register tile (output pixels × channel blocks) reduced over KH, KW and I.
    Requires O % 16 == 0, I % 2 == 0; any stride. The caller pads and transposes to NHWC."""
    import tvm
    from tvm import te
    from fliqs_compiler.backends import tvm_kernels as K
    register_intrinsics()
    sh, sw = stride
    oh, ow = (hp - kh) // sh + 1, (wp - kw) // sw + 1
    a = te.placeholder((n, hp, wp, cin), "uint16", name="A")
    w = te.placeholder((cout // 16, kh, kw, cin // 2, 16, 2), "uint16", name="W")
    rh = te.reduce_axis((0, kh), name="rh")
    rw = te.reduce_axis((0, kw), name="rw")
    rc = te.reduce_axis((0, cin), name="rc")
    c = te.compute((n, oh, ow, cout), lambda b, y, x, o: te.sum(
        _f32_of_bits(a[b, y * sh + rh, x * sw + rw, rc])
        * _f32_of_bits(w[o // 16, rh, rw, rc // 2, o % 16, rc % 2]), axis=[rh, rw, rc]), name="C")
    sch = tvm.s_tir.Schedule(te.create_prim_func([a, w, c]))
    blk = sch.get_sblock("C")
    b, y, x, o, lh, lw, lc = sch.get_loops(blk)
    xt_f, ot_f = K._tile_shape(ow, cout // 16)
    xo, xt = sch.split(x, [None, xt_f])
    oo, ot, o16 = sch.split(o, [None, ot_f, 16])
    co, c2 = sch.split(lc, [None, 2])
    sch.reorder(b, y, xo, oo, lh, lw, co, xt, ot, o16, c2)
    fused = sch.fuse(b, y, xo, oo)
    sch.parallel(fused)
    _with_import(sch, fused)
    K._accumulate_in_registers(sch, blk, fused, lh, xt, ot, o16, intrin=BF16_INTRIN)
    return K._finish(sch, name or f"fliqs_conv2d_bf16_{next(_COUNTER)}")


def _bits_func(shape):
    """PrimFunc ``f32 [shape] -> u16 [shape]``: the high 16 bits (bf16 codes: the low half is 0)."""
    from tvm import te, tirx
    # int64 extents, like the legalized ops FuseOps merges this with (FuseTIR rejects an int32
    # buffer mapped to the same Relax var as an int64 one)
    shape = tuple(tirx.IntImm("int64", int(d)) for d in shape)
    x = te.placeholder(shape, "float32", name="X")
    y = te.compute(shape, lambda *i: tirx.Cast("uint16", tirx.shift_right(
        tirx.reinterpret("uint32", x(*i)), tirx.const(16, "uint32"))), name="bits")
    return te.create_prim_func([x, y])


# ---- Relax wiring --------------------------------------------------------------------------------
def _operand(bb):
    """f32 codes → their bf16 bits (``uint16``), one elementwise function per shape and module."""
    from tvm import relax
    bits_fns: dict = {}

    def to_bits(x, shape):
        if shape not in bits_fns:
            sym = f"fliqs_bf16_bits_{next(_COUNTER)}"
            bits_fns[shape] = bb.add_func(_bits_func(shape).with_attr("global_symbol", sym), sym)
        return relax.call_tir(bits_fns[shape], [x], relax.TensorType(shape, "uint16"))
    return to_bits


BF16_OPS = FloatKernelOps(prefix="fliqs_bf16", k_step=2, operand=_operand,
                          pack_dense=pack_dense_weight_bf16, pack_conv=pack_conv_weight_bf16,
                          dense=dense_bf16, conv=conv2d_nhwc_bf16)


def bf16_rewrite(mod, names: dict, weight_consts: list):
    """``tvm_float_rewrite.float_rewrite`` onto the kernels above: float32 matmul / conv2d whose
    constant weight is one of ``weight_consts`` — the bf16-exact codes ``tvm_lower`` emits for the
    ``bf16-dpbf16ps`` rule — as ``call_tir`` with pre-packed bf16 weights and the activation's
    bf16 bits. Returns ``(mod, {name: symbol})``."""
    return float_rewrite(mod, names, weight_consts, BF16_OPS)
