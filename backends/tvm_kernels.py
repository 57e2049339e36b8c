"""Hand-scheduled TIR kernels: u8 × s8 → s32 dense and conv2d with AVX512-VNNI (``vpdpbusd``).

Why hand schedules (measured on this project's machines): in TVM 0.27 MetaSchedule never reaches
VNNI — the stock ``dot_16x4_vnni`` intrinsic passes the wrong operand types to LLVM 22, nested
vectorization aborts ``StorageRewrite``, and tensorize cannot match Relax's ``[K, N]`` weight. Here:

- ``VNNI_INTRIN`` (``fliqs_dot_16x4_vnni``): C[16] i32 += A[4] u8 · B[16, 4] i8, implemented with
  ``llvm.x86.avx512.vpdpbusd.512`` on ``<64 x i8>`` operands (the corrected intrinsic).
- weights are pre-packed (``pack_dense_weight``: ``[N/16, K/4, 16, 4]``; ``pack_conv_weight``:
  ``[O/16, KH, KW, I/4, 16, 4]``) so the 16×4 block tensorizes;
- schedules never vectorize a loop around the tensorized block; only the init block's innermost
  loop is vectorized; the parallel loop is fused before ``decompose_reduction``;
- the conv kernel reduces into a register tile (7 output pixels × 2 channel blocks of 16 int32)
  and writes it back once (``_accumulate_in_registers``);
- int4 / int2 weights stay packed 2 / 4 per byte and are unpacked inside the kernel
  (``tvm_packed_weights``; ``bits`` of the kernel builders, ``vnni_weight_bits`` of a layer).

``dense_vnni(M, K, N)`` / ``conv2d_nhwc_vnni(...)`` return scheduled PrimFuncs (attrs
``tirx.is_scheduled`` and a unique ``global_symbol``) ready for ``relax.call_tir``;
``*_supported`` say which shapes they handle. ``vnni_rewrite(mod, ...)`` is the Relax side: a
``relax.dpl`` rewrite of integer conv2d / matmul with constant int8 weights into ``call_tir`` of
these kernels (added with ``BlockBuilder(mod).add_func``), zero-padding channel counts, shifting
signed activations to u8; anything it cannot handle (groups, dilation) stays plain int8.
``has_vnni(target_dict)`` says whether a target CPU has AVX512-VNNI. ``KERNELS`` is the registry
of every hand kernel (VNNI, attention VNNI, ``tvm_bf16``, ``tvm_fp32``) with the features it needs;
``tvm_layout.choose_layout`` runs a model NHWC when every conv is on one of them. ``fp_round_te`` is the exact
fp8 / bf16 / fp6 / fp4 rounding used for run-time activations (no casts; safe under fusion).

Measured here (2 threads, shared 2-core Zen 4, noisy): u8×s8 dense 128×1024×1024 0.64 ms,
conv 1×64×56×56 3×3 0.59 ms (stride 2: 0.17 ms), all bit-exact; inside a lowered model a
ResNet-18 3×3 64→64 conv at 56×56 runs in 1.8 ms with VNNI vs 32.5 ms as plain int8 loops.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from fliqs_compiler.backends.targets import cpu_features
from fliqs_compiler.backends.tvm_attention import attention_rewrite
from fliqs_compiler.backends.tvm_bf16 import bf16_rewrite
from fliqs_compiler.backends.tvm_fp32 import fp32_rewrite
from fliqs_compiler.backends import tvm_packed_weights as packed
from fliqs_compiler.backends.tvm_epilogue import EPILOGUE_SITE, mark_kernel_blocks
from fliqs_compiler.backends.tvm_layout import (CONV_LAYOUTS, ConvGeometry, DenseGeometry,  # noqa: F401
                                                ceil_to, choose_layout, nhwc_ready)
from fliqs_compiler.backends.tvm_relax import calls  # noqa: F401  (K.calls: kernels' callers use it)

__all__ = ["Kernel", "KERNELS", "INSTRUCTION_IR", "BF16_KERNEL", "FP32_KERNEL", "kernels_for", "leading_write_back", "schedule_dense", "choose_layout", "nhwc_ready", "ConvGeometry", "DenseGeometry", "VNNI_INTRIN", "register_intrinsics", "has_vnni", "pack_dense_weight",
           "pack_conv_weight", "dense_vnni_supported", "conv_vnni_supported",
           "conv_vnni_applicable", "dense_vnni", "conv2d_nhwc_vnni", "vnni_rewrite", "vnni_weight_bits",
           "vnni_storage", "fp_round_te"]

VNNI_INTRIN = "fliqs_dot_16x4_vnni"
_REGISTERED = False
_COUNTER = itertools.count()


def has_vnni(tvm_target: dict) -> bool:
    """True when the target dict's CPU (``mcpu`` in ``targets.CPU_FEATURES``, or ``mattr``) has
    AVX512-VNNI."""
    return "avx512vnni" in cpu_features(tvm_target)


def register_intrinsics() -> None:
    """Register the corrected VNNI tensor intrinsic once (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((4,), "uint8", offset_factor=1),
             B: T.Buffer((16, 4), "int8", offset_factor=1),
             C: T.Buffer((16,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            for i in T.serial(0, 16):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((4,), "uint8", offset_factor=1),
             B: T.Buffer((16, 4), "int8", offset_factor=1),
             C: T.Buffer((16,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            # one expression, no named temporaries: TVM 0.27 turns each `name = value` here into a
            # buffer from TVMBackendAllocWorkspace (3 allocations + frees per parallel task)
            C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                C.vload([0], dtype="int32x16"),
                T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), 16),
                              dtype="uint8x64"),
                B.vload([0, 0], dtype="int8x64"), dtype="int32x16")

    # override: a second import of this module (tests reload it) registers the same intrinsic
    TensorIntrin.register(VNNI_INTRIN, desc, impl, override=True)
    packed.register_packed_intrinsics()
    _REGISTERED = True


# ---- weight packing (numpy, done once at lowering time) ------------------------------------
def pack_dense_weight(w_nk: np.ndarray) -> np.ndarray:
    """int8 weight ``[N, K]`` (out, in) → ``[N/16, K/4, 16, 4]`` (requires N%16 == K%4 == 0)."""
    n, k = w_nk.shape
    return np.ascontiguousarray(w_nk.reshape(n // 16, 16, k // 4, 4).transpose(0, 2, 1, 3))


def pack_conv_weight(w_oihw: np.ndarray) -> np.ndarray:
    """int8 weight ``[O, I, KH, KW]`` → ``[O/16, KH, KW, I/4, 16, 4]`` (O%16 == I%4 == 0)."""
    o, i, kh, kw = w_oihw.shape
    w = w_oihw.reshape(o // 16, 16, i // 4, 4, kh, kw)  # [O16, o, I4, i, kh, kw]
    return np.ascontiguousarray(w.transpose(0, 4, 5, 2, 1, 3))


def dense_vnni_supported(m: int, k: int, n: int) -> bool:
    """Shapes the VNNI dense kernel handles: N multiple of 16, K multiple of 4."""
    return n % 16 == 0 and k % 4 == 0 and m >= 1


def conv_vnni_supported(in_ch: int, out_ch: int, groups: int, dilation=(1, 1)) -> bool:
    """Convs the VNNI kernel handles: groups 1, dilation 1, O%16 == 0, I%4 == 0 (any stride/pad)."""
    return groups == 1 and tuple(dilation) == (1, 1) and out_ch % 16 == 0 and in_ch % 4 == 0


def conv_vnni_applicable(in_ch: int, out_ch: int, groups: int, dilation=(1, 1)) -> bool:
    """Convs ``vnni_rewrite`` sends to the VNNI kernel (channels are zero-padded to fit)."""
    return conv_vnni_supported(ceil_to(in_ch, 4), ceil_to(out_ch, 16), groups, dilation)


# The accumulator tile lives in a "global"-scope buffer allocated under the parallel loop: TVM 0.27
# puts such a buffer on the stack when it is under 1024 bytes (a "local" one, or a bigger one, goes
# through TVMBackendAllocWorkspace per task), and LLVM then keeps the unrolled tile in zmm registers.
# So at most 15 tiles of 16 int32 (checked in the asm: no stack traffic in the reduction loop).
_TILE_BYTES = 1024
_MAX_TILES = _TILE_BYTES // (16 * 4) - 1


def _largest_divisor(n: int, cap: int) -> int:
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def _tile_shape(rows: int, blocks: int, max_blocks: int = 2, width: int = 1) -> tuple:
    """(row tile, channel-block tile) of the register accumulator: up to ``max_blocks`` 16-lane
    output channel blocks, then as many rows (output pixels) as fit in ``_MAX_TILES`` zmm
    accumulators. ``blocks`` counts blocks of ``width`` × 16 lanes (a packed low-bit weight's
    group, ``tvm_packed_weights``). Why, measured (1 thread, ResNet-18's conv shapes, best of 7
    interleaved rounds): 7 pixels × 2 blocks 11.0 ms for all convs vs 7 × 1 12.7, 14 × 1 12.2, C in
    memory (before) 12.2; 4 × 2 was slower on every shape it applies to."""
    ot = _largest_divisor(blocks, max(1, max_blocks // width))
    return _largest_divisor(rows, _MAX_TILES // (ot * width)), ot


def _accumulate_in_registers(sch, blk, parallel, reduction_outer, row_tile, block_tile, o16,
                             intrin: str = VNNI_INTRIN) -> None:
    """The reduction into a register tile: C's tile cached in a stack buffer under the
    ``parallel`` loop (zeroed, reduced over every reduction loop from ``reduction_outer`` with the
    16-lane ``intrin`` — VNNI's 16×4, or ``tvm_bf16``'s 16×2 — written back once), instead of
    loading and storing C in memory at every step."""
    tile = sch.cache_write(blk, 0, "global")
    sch.annotate(tile, EPILOGUE_SITE, "")  # the write-back: where tvm_epilogue fuses the consumers
    sch.reverse_compute_at(tile, parallel)
    init = sch.decompose_reduction(blk, reduction_outer)
    sch.tensorize(o16, intrin)
    sch.unroll(row_tile)
    sch.unroll(block_tile)
    _unroll_vectorize_16(sch, sch.get_loops(init)[1:])
    _unroll_vectorize_16(sch, sch.get_loops(tile)[1:])


def _unroll_vectorize_16(sch, loops) -> None:
    """A tile's zeroing / write-back loops: the last split into 16-lane vectors, the rest unrolled
    (constant offsets: what lets LLVM keep the tile in registers)."""
    *outer, last = loops
    extent = int(sch.get(last).extent)
    if extent > 16:
        lo, last = sch.split(last, [None, 16])
        outer.append(lo)
    sch.vectorize(last)
    for lp in outer:
        sch.unroll(lp)


_OPAQUE = 8  # relax OpPatternKind kOpaque


def _finish(sch, name: str):
    """Scheduled, its blocks marked for ``tvm_epilogue``, and opaque to FuseOps: AnnotateTIROpPattern
    would call a kernel whose last block is the tile's write-back "elementwise" (a pattern that
    lets FuseOps fuse it as a consumer too); ``tvm_epilogue.fuse_with_kernels`` declares the
    kernels with a write-back site fusable with their consumers where it can inline them."""
    mark_kernel_blocks(sch, name)
    func = sch.mod["main"]
    return (func.with_attr("global_symbol", name).with_attr("tirx.is_scheduled", True)
            .with_attr("op_pattern", _OPAQUE))


def _block_weight(blocks: int, inner: tuple, k: int, bits: int, name: str, scaled: bool = False):
    """The pre-packed weight placeholder ``[blocks, *inner, K/4, 16, 4]`` int8 (``bits`` 8) or the
    ``tvm_packed_weights`` uint8 vectors ``[blocks/B, *inner, K/(4S), 16, 4]``, and
    ``value(out channel, *inner, in channel) -> int32`` reading one code (``scaled``: times
    ``2^scale_shift(bits)``, ``tvm_packed_weights.decode_te``)."""
    from tvm import te
    p = packed.PACKINGS[bits]
    shape = (blocks // p.blocks, *inner, k // p.kwidth, 16, 4)
    if bits == 8:
        w = te.placeholder(shape, "int8", name=name)
        return w, lambda o, *i: w[(o // 16, *i[:-1], i[-1] // 4, o % 16, i[-1] % 4)].astype("int32")
    w = te.placeholder(shape, "uint8", name=name)

    def value(o, *i):
        c = i[-1]
        byte = w[(o // p.lanes, *i[:-1], c // p.kwidth, o % 16, c % 4)]
        return packed.decode_te(byte, p.field(o % p.lanes, c % p.kwidth), bits, scaled)
    return w, value


def leading_write_back(c, lead: tuple, shift: int = 0):
    """TE ``C_out [*lead, N]``: a dense kernel's ``[M, N]`` accumulators ``c`` written out to the
    layer's leading dims (``lead``, product M; ``>> shift`` for packed low-bit weights). Writing
    the layer's shape itself keeps the ops after the kernel elementwise in its index (no reshape
    ends the FuseOps group), so they fuse into this write-back (``tvm_epilogue``)."""
    from tvm import te
    if int(np.prod(lead)) != int(c.shape[0]):
        raise ValueError(f"leading dims {lead} do not hold {c.shape[0]} rows")

    def row(idx):  # the flat row of a [*lead] index
        flat = idx[0]
        for d, i in zip(lead[1:], idx[1:]):
            flat = flat * d + i
        return flat
    return te.compute((*lead, int(c.shape[1])), lambda *i: c[row(i[:-1]), i[-1]] >> shift if shift
                      else c[row(i[:-1]), i[-1]], name="C_out")


def schedule_dense(sch, lead: tuple, intrin: str, lanes: int = 16, kwidth: int = 1,
                   max_block_tile: int = 4, on_parallel=None):
    """The dense kernels' schedule (VNNI, ``tvm_bf16``, ``tvm_fp32``) of a function with blocks
    ``C`` (``[M, N]``, reduced over K) and ``C_out`` (``leading_write_back``): each parallel task a
    tile of up to 4 rows (never straddling two rows of ``lead``) × ``max_block_tile`` blocks of
    ``lanes`` channels, reduced ``kwidth`` input channels per ``intrin`` step, then written out by
    the task (``C_out``, the epilogue site). ``on_parallel(sch, loop)``: an extra annotation.

    C's tile stays in memory (not registers) while it accumulates: the register tile of the conv
    kernel, at most 15 accumulators (2 × 4, 4 × 2, 8 × 1), measured 5-25 % slower on 128-row
    GEMMs (128×384×1536: 0.40 ms vs 0.44-0.47; 128×1024×1024: 0.64 vs 0.67-0.80; 2 threads)."""
    blk = sch.get_sblock("C")
    i, j, kk = sch.get_loops(blk)
    n = int(sch.get(j).extent)
    io, it = sch.split(i, [None, _largest_divisor(lead[-1], 4)])
    jo, jt, jl = sch.split(j, [None, _largest_divisor(n // lanes, max_block_tile), lanes])
    ko, *kw = sch.split(kk, [None, kwidth]) if kwidth > 1 else (kk,)
    sch.reorder(io, jo, ko, it, jt, jl, *kw)
    parallel = sch.fuse(io, jo)
    sch.parallel(parallel)
    if on_parallel is not None:
        on_parallel(sch, parallel)
    write_back = sch.get_sblock("C_out")
    sch.annotate(write_back, EPILOGUE_SITE, "")
    sch.reverse_compute_at(write_back, parallel)
    init = sch.decompose_reduction(blk, ko)
    sch.tensorize(jl, intrin)
    sch.unroll(it)
    sch.unroll(jt)
    sch.vectorize(sch.get_loops(init)[-1])
    _unroll_vectorize_16(sch, sch.get_loops(write_back)[1:])  # the loops under the task's


def dense_vnni(m: int, k: int, n: int, name: str | None = None, bits: int = 8,
               lead: tuple | None = None):
    """Scheduled PrimFunc ``(A u8 [M, K], Bp i8 [N/16, K/4, 16, 4]) -> C i32 [*lead, N]`` with VNNI
    (``lead``: the layer's leading dims, product M, default ``(M,)``; ``leading_write_back``).
    ``bits`` 4 / 2: ``Bp`` is ``[N/16, K/4, L, 4]`` uint8 packed codes (``tvm_packed_weights``),
    each field read scaled and the sum shifted back in the write-back.

    Requires ``dense_vnni_supported(m, k, n)``. Builds in well under a second (no tuning).
    """
    import tvm
    from tvm import te
    register_intrinsics()
    lead = tuple(lead or (m,))
    a = te.placeholder((m, k), "uint8", name="A")
    scaled = bits < 8
    b, b_value = _block_weight(n // 16, (), k, bits, "B", scaled)
    r = te.reduce_axis((0, k), name="k")
    c = te.compute((m, n), lambda i, j: te.sum(
        a[i, r].astype("int32") * b_value(j, r), axis=r), name="C")
    out = leading_write_back(c, lead, packed.scale_shift(bits) if scaled else 0)
    sch = tvm.s_tir.Schedule(te.create_prim_func([a, b, out]))
    p = packed.PACKINGS[bits]
    schedule_dense(sch, lead, p.intrin(scaled), lanes=p.lanes, kwidth=p.kwidth,
                   max_block_tile=max(1, 4 // p.blocks))
    return _finish(sch, name or f"fliqs_dense_vnni_{next(_COUNTER)}")


def conv2d_nhwc_vnni(n: int, hp: int, wp: int, cin: int, cout: int, kh: int, kw: int,
                     stride=(1, 1), name: str | None = None, bits: int = 8):
    """Scheduled PrimFunc: ``(A u8 [N, Hp, Wp, I] (already padded), Wp i8 [O/16, KH, KW, I/4, 16, 4])
    -> C i32 [N, OH, OW, O]`` (implicit GEMM, VNNI on the 16 output channels × 4 input channels;
    a tile of output pixels × channel blocks accumulated in registers over KH, KW and I).
    ``bits`` 4 / 2: ``Wp`` is ``[O/16, KH, KW, I/4, L, 4]`` uint8 packed codes, unpacked per block.

    Requires ``conv_vnni_supported``; any stride. The caller pads and transposes to NHWC.
    """
    import tvm
    from tvm import te
    register_intrinsics()
    sh, sw = stride
    oh, ow = (hp - kh) // sh + 1, (wp - kw) // sw + 1
    a = te.placeholder((n, hp, wp, cin), "uint8", name="A")
    # packed codes scaled to the byte's top bits (one op to unpack; tvm_packed_weights), the sum
    # shifted back in the tile's write-back
    scaled = bits < 8
    w, w_value = _block_weight(cout // 16, (kh, kw), cin, bits, "W", scaled)
    rh = te.reduce_axis((0, kh), name="rh")
    rw = te.reduce_axis((0, kw), name="rw")
    rc = te.reduce_axis((0, cin), name="rc")
    c = te.compute((n, oh, ow, cout), lambda b, y, x, o: te.sum(
        a[b, y * sh + rh, x * sw + rw, rc].astype("int32")
        * w_value(o, rh, rw, rc), axis=[rh, rw, rc]), name="C")
    out = (te.compute(c.shape, lambda *i: c(*i) >> packed.scale_shift(bits), name="C_shift")
           if scaled else c)
    sch = tvm.s_tir.Schedule(te.create_prim_func([a, w, out]))
    blk = sch.get_sblock("C")
    b, y, x, o, lh, lw, lc = sch.get_loops(blk)
    p = packed.PACKINGS[bits]
    xt_f, ot_f = _tile_shape(ow, cout // p.lanes, width=p.blocks)
    xo, xt = sch.split(x, [None, xt_f])
    oo, ot, o16 = sch.split(o, [None, ot_f, p.lanes])
    co, c4 = sch.split(lc, [None, p.kwidth])
    sch.reorder(b, y, xo, oo, lh, lw, co, xt, ot, o16, c4)
    fused = sch.fuse(b, y, xo, oo)
    sch.parallel(fused)
    _accumulate_in_registers(sch, blk, fused, lh, xt, ot, o16, p.intrin(scaled))
    if scaled:  # the shift in the write-back: the tile's only consumer
        sch.reverse_compute_inline(sch.get_sblock("C_shift"))
    return _finish(sch, name or f"fliqs_conv2d_vnni_{next(_COUNTER)}")


def vnni_weight_bits(weight_const, op: str) -> int:
    """The bits a VNNI layer's constant integer weight is stored in (``tvm_packed_weights``):
    ``op`` "conv2d" (OIHW) or a dense layer's ``[K, N]``."""
    codes = weight_const.value.numpy()
    out_ch, in_ch = codes.shape[:2] if op == "conv2d" else codes.shape[::-1]
    return packed.storage_bits(codes, out_ch, in_ch)


def vnni_storage(weight_const, op: str) -> str:
    """The report's words for a VNNI layer's weight storage."""
    return packed.storage_text(vnni_weight_bits(weight_const, op))


# ---- Relax wiring: relax.dpl rewrite of integer conv/matmul with constant weights -------------
def vnni_rewrite(mod, names: dict, weight_consts: list):
    """Rewrite ``matmul(u8|s8 [..., M, K], const s8 [K, N], out int32)`` (static shapes; the leading
    dims fold into M) and ``conv2d(u8|s8 NCHW, const
    s8 OIHW, out int32)`` into ``call_tir`` of the hand VNNI kernels with pre-packed weights.

    ``weight_consts``: the layers' integer weight constants; ``names``: ``{id(const): public name}``
    (the constant is found by identity with ``same_as``). Signed (s8) activations are shifted to u8
    (+128) and corrected with the per-channel weight sums (conv pads with 128 ≡ 0). Channel counts are zero-padded to
    multiples of 16 (out) / 4 (in) and the output sliced; grouped / dilated convs are left unchanged
    (plain int8 loops). Each kernel call transposes NCHW↔NHWC around itself unless the module is
    already NHWC (``choose_layout``). Returns ``(mod, {name: symbol})``.
    """
    import tvm
    from tvm import relax
    from tvm.relax.dpl import is_const, is_op, wildcard

    bb = relax.BlockBuilder(mod)
    done: dict = {}
    op = relax.op

    def layer_name(c):
        for w in weight_consts:
            if w is not None and w.same_as(c):
                return names.get(id(w))
        return None

    def to_u8(a):
        """(u8 tensor, True) or (s8 shifted by +128 as u8, False)."""
        if a.ty.dtype == "uint8":
            return a, True
        return op.astype(op.add(op.astype(a, "int32"), relax.const(128, "int32")), "uint8"), False

    def add_kernel(prim, name):
        sym = f"fliqs_vnni_{_sanitize(name)}"
        while sym in done.values():  # two public names that sanitize alike
            sym += "_"
        prim = prim.with_attr("global_symbol", sym)
        return bb.add_func(prim, sym), sym

    data, w_pat = wildcard(), is_const()
    mm = is_op("relax.matmul")(data, w_pat)
    cv = is_op("relax.nn.conv2d")(data, w_pat)

    def rewrite_matmul(call, matches):
        a, w = matches[data], matches[w_pat]
        name = layer_name(w)
        if (name is None or str(call.attrs.out_dtype) != "int32" or w.ty.dtype != "int8"
                or a.ty.dtype not in ("uint8", "int8") or len(a.ty.shape) < 2
                or not all(isinstance(d, tvm.tirx.IntImm) for d in list(a.ty.shape))):
            return call
        bits = vnni_weight_bits(w, "linear")
        p = packed.PACKINGS[bits]
        g = DenseGeometry.of(a, w, in_step=p.kwidth, out_step=p.lanes)
        wn = g.padded_weight(w, np.int8)
        gv, sym = add_kernel(dense_vnni(g.m, g.kp, g.np_, bits=bits, lead=g.lead), name)
        au8, unsigned = to_u8(a)
        wp = relax.const(packed.pack_blocks(pack_dense_weight(wn), bits))
        y = relax.call_tir(gv, [g.kernel_input(au8), wp],
                           relax.TensorType(g.leading_output_shape, "int32"))
        if not unsigned:
            y = op.subtract(y, relax.const((128 * wn.astype(np.int32).sum(1)).astype(np.int32)))
        done[name] = sym
        return g.layer_output(y)

    def rewrite_conv(call, matches):
        a, w = matches[data], matches[w_pat]
        name = layer_name(w)
        if name is None or not _conv_takes_vnni(call):
            return call
        bits = vnni_weight_bits(w, "conv2d")
        p = packed.PACKINGS[bits]
        g = ConvGeometry.of(call, in_step=p.kwidth, out_step=p.lanes)
        wn = g.padded_weight(w, np.int8)
        au8, unsigned = to_u8(a)
        x = g.kernel_input(au8, pad_value=0.0 if unsigned else 128.0)
        gv, sym = add_kernel(conv2d_nhwc_vnni(g.nb, g.hp, g.wp, g.ci, g.co, g.kh, g.kw, g.stride,
                                              bits=bits), name)
        y = relax.call_tir(gv, [x, relax.const(packed.pack_blocks(pack_conv_weight(wn), bits))],
                           relax.TensorType(g.kernel_output_shape, "int32"))
        if not unsigned:
            y = op.subtract(y, relax.const((128 * wn.astype(np.int32).sum((1, 2, 3))).astype(np.int32)))
        done[name] = sym
        return g.layer_output(y)

    return rewrite_main(bb, mod, [(mm, rewrite_matmul), (cv, rewrite_conv)]), done


def rewrite_main(bb, mod, rules):
    """``mod`` with ``main`` rewritten by each ``(pattern, rewrite)`` of ``rules`` in turn
    (``relax.dpl.rewrite_call``) and the functions the rewrites added to ``bb`` (a
    ``BlockBuilder(mod)``), normalized."""
    from tvm import relax
    from tvm.relax.dpl import rewrite_call
    main = mod["main"]
    for pattern, rewrite in rules:
        main = rewrite_call(pattern, rewrite, main)
    new = bb.get()
    new[new.get_global_var("main")] = main
    return relax.transform.Normalize()(new)


def _conv_takes_vnni(call) -> bool:
    """An integer conv2d the VNNI kernel computes: u8/s8 data (NCHW or NHWC), constant s8 OIHW
    weight, int32 out, groups 1, dilation 1 (channel counts are padded)."""
    from tvm.ir.expr import Constant
    a, w = call.args[0], call.args[1]
    at = call.attrs
    if (not isinstance(w, Constant) or str(at.out_dtype) != "int32" or w.ty.dtype != "int8"
            or a.ty.dtype not in ("uint8", "int8") or str(at.data_layout) not in CONV_LAYOUTS
            or str(at.kernel_layout) != "OIHW" or str(at.out_layout) != str(at.data_layout)):
        return False
    cin = int(a.ty.shape[CONV_LAYOUTS[str(at.data_layout)].nhwc[3]])
    return conv_vnni_applicable(cin, int(w.ty.shape[0]), int(at.groups),
                                [int(d) for d in at.dilation])


def _conv_takes_float(call) -> bool:
    """A float32 conv2d with a constant float32 OIHW weight, groups 1, dilation 1: what the float
    kernels (``tvm_bf16``, ``tvm_fp32``, through ``tvm_float_rewrite``) compute."""
    from tvm.ir.expr import Constant
    from fliqs_compiler.backends.tvm_float_rewrite import float_conv_applicable
    a, w = call.args[0], call.args[1]
    at = call.attrs
    return (isinstance(w, Constant) and str(at.out_dtype) in ("float32", "") and w.ty.dtype == "float32"
            and a.ty.dtype == "float32" and str(at.data_layout) in CONV_LAYOUTS
            and str(at.kernel_layout) == "OIHW" and str(at.out_layout) == str(at.data_layout)
            and float_conv_applicable(int(at.groups), [int(d) for d in at.dilation]))



def _sanitize(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in str(name))


# ---- exact float rounding without casts (safe under operator fusion) -------------------------
def fp_round_te(x, mbits: int, max_finite: float, min_normal: float, min_subnormal: float):
    """TE: round float32 ``x`` to nearest-even on a float grid with ``mbits`` mantissa bits,
    saturating at ±``max_finite``; below ``min_normal`` the grid is uniform with step
    ``min_subnormal`` (pass ``min_normal=0`` for formats sharing f32's exponent range, e.g. bf16).
    NaN stays NaN.

    Why: TVM 0.27 legalizes fp8 / bf16 *compute* to f32, so inside a fused kernel a
    f32→fp8→f32 (or bf16) cast pair is a no-op (measured: 1956 / 4096 fp8 and 4096 / 4096 bf16
    values unrounded under FuseOps). Integer arithmetic on the f32 bit pattern is not touched:
    add half an ulp (minus one, plus the kept LSB: ties to even) and clear the dropped bits.
    """
    from tvm import te, tirx
    shift = 23 - mbits
    half = (1 << (shift - 1)) - 1
    mask = ~((1 << shift) - 1)

    def f(*i):
        v = x(*i)
        c = tirx.max(tirx.min(v, tirx.const(max_finite, "float32")),
                     tirx.const(-max_finite, "float32"))
        bits = tirx.reinterpret("int32", c)
        lsb = tirx.bitwise_and(tirx.shift_right(bits, tirx.const(shift, "int32")),
                               tirx.const(1, "int32"))
        rounded = tirx.reinterpret("float32", tirx.bitwise_and(
            bits + tirx.const(half, "int32") + lsb, tirx.const(mask, "int32")))
        if min_normal > 0:
            step = tirx.const(min_subnormal, "float32")
            sub = tirx.round(c / step) * step  # exact: a power-of-two step
            rounded = tirx.Select(tirx.abs(c) < tirx.const(min_normal, "float32"), sub, rounded)
        return tirx.Select(v != v, v, rounded)

    return te.compute(x.shape, f, name="fp_round")


# ---- which kernels a target gets: chosen from its capabilities, as data -------------------------
# Each kernel instruction as the optimized LLVM IR calls it (``tvm_lower.instruction_calls``):
# TVM emits the VNNI / bf16 dot products as these x86 intrinsics and the fp32 kernel's
# multiply-adds as vector FMAs; each call is one instruction in the machine code.
INSTRUCTION_IR = {"vpdpbusd": r"@llvm\.x86\.avx512\.vpdpbusd\.",
                  "vdpbf16ps": r"@llvm\.x86\.avx512bf16\.dpbf16ps\.",
                  "vfmadd": r"@llvm\.(?:fma|fmuladd)\.v\d+f32\("}


@dataclass(frozen=True)
class Kernel:
    """A scheduled kernel for the layers one compute rule (``tvm_lower.COMPUTE_RULES``) matched,
    available on targets whose capabilities have every feature in ``needs``. ``rewrite(mod,
    names, weight_consts) -> (mod, {layer name: kernel symbol})`` swaps it in after translation.
    A layer is reported on the kernel only when its compiled function contains ``instruction``
    (its intrinsic in the LLVM IR, ``INSTRUCTION_IR``);
    ``storage``: its pre-packed weight dtype; ``fallback``: what a layer of ``compute_rule`` the
    rewrite could not take runs as. The rewrite sees only the weights of its own rule's layers
    (``compute_rule``; "fp32" for layers without a native rule)."""

    name: str
    compute_rule: str
    needs: tuple
    rewrite: object
    instruction: str = "vpdpbusd"
    storage: str = "int8"
    storage_of: object = None  # (weight constant, op) -> the report's storage words (else ``storage``)
    fallback: str = "plain int8 loops"
    takes_conv: object = None  # call -> bool: a conv2d the rewrite computes (``choose_layout``)


# Attention MatMuls (act x act, tvm_attention) after the weight kernel: each rewrite finds its
# layers by identity with the operand the translator recorded, so the order does not matter.
ATTENTION_KERNEL = Kernel("vnni", compute_rule="int8", needs=("avx512vnni",), rewrite=attention_rewrite)
# bf16-exact codes (fp8 / bf16 / fp6 / fp4, int <= 8 bits; not int8 x int8, which the int8 rule
# takes first) on vdpbf16ps (tvm_bf16); without avx512bf16 the rule does not match (tvm_lower).
BF16_KERNEL = Kernel("bf16-dpbf16ps", compute_rule="bf16-dpbf16ps", needs=("avx512bf16",),
                     rewrite=bf16_rewrite, instruction="vdpbf16ps", storage="bf16",
                     fallback="fp32 loops on the codes", takes_conv=_conv_takes_float)
# Float layers (no native rule; their weight a constant fp32 tensor) on fp32 FMA (tvm_fp32).
FP32_KERNEL = Kernel("fp32-fma", compute_rule="fp32", needs=("avx512f",), rewrite=fp32_rewrite,
                     instruction="vfmadd", storage="fp32",
                     fallback="fp32 loops (generic schedule)", takes_conv=_conv_takes_float)
KERNELS = (Kernel("vnni", compute_rule="int8", needs=("avx512vnni",), rewrite=vnni_rewrite,
                  takes_conv=_conv_takes_vnni, storage_of=vnni_storage),
           ATTENTION_KERNEL, BF16_KERNEL, FP32_KERNEL)


def kernels_for(caps) -> list:
    """The kernels of ``KERNELS`` a target with capabilities ``caps`` can run."""
    return [k for k in KERNELS if caps.has(*k.needs)]
