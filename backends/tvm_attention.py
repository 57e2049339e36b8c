"""Attention MatMuls (activation × activation, both sides int8 codes) on AVX512-VNNI.

``tvm_kernels`` covers Linears, whose constant weight is packed once at lowering time. An
attention MatMul — Q·Kᵀ (``int8 × int8``) and A·V (``uint8 × int8``: the softmax output is
non-negative), what ``tvm_lower`` emits for int8 codes on both sides — multiplies two run-time
tensors, so here the second operand is packed at run time by plain Relax ops (pad, reshape,
permute: one injective function after FuseOps, fused with the quantize that makes the codes) and
the batched kernel runs on the packed block:

- ``batch_matmul_vnni(B, M, K, N, start=...)``: ``A u8 [B, M, K] × Bp s8 [B, N/16, K/4, 16, 4]
  (+ S i32, broadcast) → i32 [B, M, N]`` with the corrected ``tvm_kernels.VNNI_INTRIN``
  (``vpdpbusd``: u8 × s8), the dense kernel's schedule with the batch fused into the parallel
  loop; the optional start term ``S`` (the exactness corrections below) is added per tile.
- ``attention_rewrite``: the ``relax.dpl`` rewrite of ``matmul(u8|s8, u8|s8, out int32)`` with
  neither operand constant and static shapes. Exactness: a signed left operand is shifted to u8
  (+128) and corrected with the run-time column sums of the right one (−128·Σₖ B[k, n]); an
  unsigned right operand (not emitted by ``tvm_lower`` today, whose integer rule wants int8 there,
  but cheap to keep exact) is shifted to s8 (−128) and corrected with the row sums of the left one
  (+128·Σₖ A[m, k]). Both corrections are the kernel's start term, never an op after it
  (``_emit`` says why). K is zero-padded to a multiple of 4 (zero B rows: any A padding is
  inert), N to 16 and M to the row tile, and the result sliced.
"""
from __future__ import annotations

import itertools

import numpy as np

__all__ = ["batch_matmul_vnni", "attention_rewrite", "plan"]

_COUNTER = itertools.count()
_INT8 = ("uint8", "int8")


def _row_tile(m: int) -> int:
    """Rows per register tile: 4 (M padded to it) unless M is smaller."""
    return min(m, 4)


def batch_matmul_vnni(b: int, m: int, k: int, n: int, name: str | None = None, *,
                      start: tuple | None = None):
    """Scheduled PrimFunc ``(A u8 [B, M, K], Bp s8 [B, N/16, K/4, 16, 4][, S i32 start]) -> C i32
    [B, M, N]``: ``C = A·B (+ S)``, ``S`` of shape ``start`` — ``(B, 1, N)``, ``(B, M, 1)`` or
    ``(B, M, N)``, broadcast like numpy — added to each tile as it is written.

    Requires K % 4 == 0, N % 16 == 0 and M a multiple of ``_row_tile(M)`` (the rewrite pads).
    The tile is the dense kernel's (rows × 16-column blocks of int32 accumulators); the batch
    joins the parallel loop, so batch × heads spreads over the threads even when M is small.
    """
    import tvm
    from tvm import te
    from fliqs_compiler.backends import tvm_kernels as K  # here: it imports this module
    K.register_intrinsics()
    a = te.placeholder((b, m, k), "uint8", name="A")
    bp = te.placeholder((b, n // 16, k // 4, 16, 4), "int8", name="B")
    r = te.reduce_axis((0, k), name="k")
    acc = te.compute((b, m, n), lambda x, i, j: te.sum(
        a[x, i, r].astype("int32") * bp[x, j // 16, r // 4, j % 16, r % 4].astype("int32"),
        axis=r), name="acc")
    ins = [a, bp]
    if start is not None:
        s = te.placeholder(tuple(start), "int32", name="S")
        ins.append(s)
        acc = te.compute((b, m, n), lambda x, i, j: acc[x, i, j] + s[
            x, i if start[1] != 1 else 0, j if start[2] != 1 else 0], name="C")
    sch = tvm.s_tir.Schedule(te.create_prim_func(ins + [acc]))
    blk = sch.get_sblock("acc")
    bl, i, j, kk = sch.get_loops(blk)
    io, it = sch.split(i, [None, _row_tile(m)])
    jo, jt, j16 = sch.split(j, [None, K._largest_divisor(n // 16, 4), 16])
    ko, k4 = sch.split(kk, [None, 4])
    sch.reorder(bl, io, jo, ko, it, jt, j16, k4)
    # parallel before decompose_reduction, never a vectorized loop around the tensorized block
    # (tvm_kernels' module notes say why)
    fused = sch.fuse(bl, io, jo)
    sch.parallel(fused)
    if start is not None:
        _add_start_per_tile(sch, fused)
    init = sch.decompose_reduction(blk, ko)
    sch.tensorize(j16, K.VNNI_INTRIN)
    sch.unroll(it)
    sch.unroll(jt)
    sch.vectorize(sch.get_loops(init)[-1])
    return K._finish(sch, name or f"fliqs_bmm_vnni_{next(_COUNTER)}")


def _add_start_per_tile(sch, parallel) -> None:
    """``C = acc + S`` computed per tile under the parallel loop, in 16-lane vectors: the
    accumulator tile shrinks to the thread's own block and is read back while still in cache."""
    out = sch.get_sblock("C")
    sch.reverse_compute_at(out, parallel)
    *_, last = sch.get_loops(out)
    _, lanes = sch.split(last, [None, 16])
    sch.vectorize(lanes)


def plan(a_shape, b_shape):
    """``(batch, M, K, N)`` when ``[..., M, K] × [..., K, N]`` maps onto the batched kernel (the
    same leading dims, or a rank-2 right operand: the left leading dims fold into M), else None."""
    if len(a_shape) < 2 or len(b_shape) < 2 or a_shape[-1] != b_shape[-2]:
        return None
    *lead, m, k = a_shape
    n = b_shape[-1]
    size = int(np.prod(lead)) if lead else 1
    if len(b_shape) == 2:
        return 1, size * m, k, n
    if list(b_shape[:-2]) != lead:
        return None  # broadcast batch dims: left to the plain int8 loops
    return size, m, k, n


def _static_shape(e):
    import tvm
    dims = list(e.ty.shape) if getattr(e.ty, "shape", None) is not None else None
    if dims is None or not all(isinstance(d, tvm.tirx.IntImm) for d in dims):
        return None
    return [int(d) for d in dims]


def _left_u8(op, relax, a, dtype):
    """(u8 tensor, needs the −128·colsum(B) correction)."""
    if dtype == "uint8":
        return a, False
    return op.astype(op.add(op.astype(a, "int32"), relax.const(128, "int32")), "uint8"), True


def _right_s8(op, relax, b, dtype):
    """(s8 tensor, needs the +128·rowsum(A) correction)."""
    if dtype == "int8":
        return b, False
    return op.astype(op.subtract(op.astype(b, "int32"), relax.const(128, "int32")), "int8"), True


def _pack_right(op, b3, batch, k, n, kp, np_):
    """s8 ``[B, K, N]`` → ``[B, N/16, K/4, 16, 4]`` (zero-padded): the kernel's 16×4 blocks."""
    if kp != k or np_ != n:
        b3 = op.nn.pad(b3, [0, 0, 0, kp - k, 0, np_ - n])
    b5 = op.reshape(b3, [batch, kp // 4, 4, np_ // 16, 16])
    return op.permute_dims(b5, [0, 3, 1, 4, 2])


def attention_rewrite(mod, names: dict, weight_consts: list):
    """Rewrite ``matmul(u8|s8 x, u8|s8 y, out int32)`` with neither side constant and static
    shapes into ``call_tir`` of ``batch_matmul_vnni`` (``Kernel.rewrite`` protocol, see
    ``tvm_kernels.Kernel``). Returns ``(mod, {layer name: kernel symbol})``.

    A MatMul is the layer ``names[id(v)]`` when its right operand ``same_as`` the Relax var ``v``
    in ``weight_consts`` (the caller passes each attention layer's second-operand codes there).
    MatMuls the caller did not name are left alone: ``executed`` reports a layer's kernel from
    the returned names, so an unnamed one on the kernel would be reported as plain int8 loops.
    """
    from tvm import relax
    from tvm.ir.expr import Constant
    from tvm.relax.dpl import is_op, wildcard
    from fliqs_compiler.backends import tvm_kernels as K

    bb = relax.BlockBuilder(mod)
    op = relax.op
    done: dict = {}
    taken = {gv.name_hint for gv in mod.get_global_vars()}
    x_pat, y_pat = wildcard(), wildcard()
    mm = is_op("relax.matmul")(x_pat, y_pat)

    def symbol(name):
        sym = f"fliqs_vnni_{K._sanitize(name)}"
        while sym in taken:
            sym += "_"
        taken.add(sym)
        return sym

    def rewrite(call, matches):
        if not isinstance(call, relax.Call):  # a var matched through its (declined) binding
            return call
        a, b = call.args[0], call.args[1]  # the bound vars (the match may hold their values)
        if (str(call.attrs.out_dtype) != "int32" or isinstance(a, Constant)
                or isinstance(b, Constant) or a.ty.dtype not in _INT8
                or b.ty.dtype not in _INT8):
            return call
        a_shape, b_shape = _static_shape(a), _static_shape(b)
        p = plan(a_shape, b_shape) if a_shape and b_shape else None
        if p is None:
            return call
        name = next((names.get(id(w)) for w in weight_consts
                     if w is not None and w.same_as(b)), None)
        if name is None:  # unnamed: it could not be reported as 'vnni', so it stays as it is
            return call
        batch, m, k, n = p
        sym = symbol(name)
        y = _emit(bb, op, relax, a, b, batch, m, k, n, sym)
        y = op.reshape(y, a_shape[:-1] + [n])
        done[name] = sym
        return y

    from fliqs_compiler.backends.tvm_kernels import rewrite_main
    return rewrite_main(bb, mod, [(mm, rewrite)]), done


def _emit(bb, op, relax, a, b, batch, m, k, n, sym):
    """The kernel call on ``[batch, m, k] × [batch | -, k, n]``: the exact int32 product
    ``[batch, m, n]``, the sign corrections included.

    Why the corrections go into the kernel (its start term), not into a subtraction after it: a
    ``[B, 1, N]`` correction broadcast over M and fused with a consumer that flattens M·N (the
    conformance Branch: t·tᵀ, flatten, next quantizer) is read at ``j % N`` in one loop over M·N;
    the LLVM of TVM 0.27 vectorizes that (AVX-512, 16 lanes, N = 8) as a contiguous load, so lanes
    N..15 read the next batch's corrections (measured: 21-31 LSB at int5-7). The kernel adds them
    per tile in its own 16-column vectors; its consumers read only the product."""
    from fliqs_compiler.backends import tvm_kernels as K
    kp, np_ = K.ceil_to(k, 4), K.ceil_to(n, 16)
    tile = _row_tile(m)
    mp = K.ceil_to(m, tile)
    a3 = op.reshape(a, [batch, m, k])
    b3 = op.reshape(b, [batch, k, n])
    au8, fix_cols = _left_u8(op, relax, a3, a.ty.dtype)
    bs8, fix_rows = _right_s8(op, relax, b3, b.ty.dtype)
    if mp != m or kp != k:
        au8 = op.nn.pad(au8, [0, 0, 0, mp - m, 0, kp - k])
    start = _start(op, relax, a3, bs8, fix_cols, fix_rows, mp - m, np_ - n)
    prim = batch_matmul_vnni(batch, mp, kp, np_,
                             start=_start_shape(batch, mp, np_, fix_cols, fix_rows))
    gv = bb.add_func(prim.with_attr("global_symbol", sym), sym)
    args = [au8, _pack_right(op, bs8, batch, k, n, kp, np_)] + ([start] if start is not None else [])
    y = relax.call_tir(gv, args, relax.TensorType((batch, mp, np_), "int32"))
    if mp != m or np_ != n:
        y = op.strided_slice(y, axes=[1, 2], begin=[0, 0], end=[m, n])
    return y


def _start_shape(batch, mp, np_, fix_cols, fix_rows):
    """The shape of the kernel's start term: per column, per row, or both (None: no term)."""
    if not (fix_cols or fix_rows):
        return None
    return (batch, mp if fix_rows else 1, np_ if fix_cols else 1)


def _start(op, relax, a3, bs8, fix_cols, fix_rows, pad_m, pad_n):
    """The exactness corrections as the kernel's start term, zero-padded to its M / N (None when
    both operands need no shift): ``−128·Σₖ b'`` per column ((a + 128)·b' = a·b' + 128·Σₖ b')
    plus ``+128·Σₖ a`` per row (a·(b − 128) = a·b − 128·Σₖ a, a the original left operand)."""
    c128 = relax.const(128, "int32")
    start = None
    if fix_cols:
        s = op.negative(op.multiply(c128, op.sum(op.astype(bs8, "int32"), axis=[1], keepdims=True)))
        start = op.nn.pad(s, [0, 0, 0, 0, 0, pad_n]) if pad_n else s
    if fix_rows:
        s = op.multiply(c128, op.sum(op.astype(a3, "int32"), axis=[2], keepdims=True))
        s = op.nn.pad(s, [0, 0, 0, pad_m, 0, 0]) if pad_m else s
        start = s if start is None else op.add(start, s)
    return start
