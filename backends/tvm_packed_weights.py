"""Low-bit weights kept low-bit inside the VNNI kernels: int4 codes packed two per byte, int2 four
per byte, unpacked in the kernel's inner loop, right before ``vpdpbusd``.

The VNNI kernels (``tvm_kernels``) multiply a block of 16 output channels × 4 input channels
(64 int8 values) per ``vpdpbusd``. Packed (``Packing``), the ``8 / bits`` fields of each byte of
one 64-byte vector hold ``blocks`` such blocks of neighbouring output channels × ``ksteps``
neighbouring groups of 4 input channels: field ``f = b + blocks · j`` of byte ``[l, c]`` is output
channel ``16 b + l``, input channel ``4 j + c``. One load then feeds ``8 / bits`` ``vpdpbusd``.
No lane shuffles; the kernel's output channels step by ``16 · blocks``, its input channels by
``4 · ksteps``.

The kernels read each field *scaled* (``decode_te(scaled=True)``): shifted to the top of the byte
and masked, it is the int8 value ``code · 2^(8 − bits)`` — one ``vpandq`` (top field) or one
``vgf2p8affineqb`` (shift and mask) per field, no sign-extension — and the kernel shifts the int32
sum back (``scale_shift``; exact). Measured, 1 thread, against the int8 kernel on the same shapes:
ResNet-18's 3×3 convs int4 1.07×, int2 1.13× (the plain ``(field ^ half) − half`` decode: 1.2× /
1.25×); dense 4096² at batch 1 int4 0.55× (memory-bound), 49 × 256 × 1024 0.74× (the plain decode
1.19×: a 1-row tile unpacks per row).

int4 packs 2 blocks × 1 k-step, int2 2 × 2: both keep the int8 kernel's register tile of
7 output pixels × 32 channels (int2 as 4 blocks × 1 k-step had a 2-pixel tile and took 1.9×).

Why inside the kernel and not at load into an arena: a Relax VM has no "run once at load" step
a user's fresh ``VirtualMachine`` would take, and unpacking per call outside the kernel costs a
pass over every weight per inference. ``storage_bits`` picks the narrowest of 2 / 4 / 8 bits that
holds every code of a layer (what a layer's format guarantees), so the artifact stores what the
search chose; it widens the storage where the packed kernel would compute much more padding than
int8's (16 out, 4 in).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Packing", "PACKINGS", "storage_bits", "storage_text", "pack_blocks", "decode_te",
           "register_packed_intrinsics", "scale_shift"]

_BASE_INTRIN = "fliqs_dot_16x4_vnni"
_REGISTERED: set = set()


@dataclass(frozen=True)
class Packing:
    """How ``bits``-wide codes share a 64-byte vector: ``blocks`` 16-channel output blocks ×
    ``ksteps`` groups of 4 input channels (``blocks · ksteps == 8 / bits``)."""

    bits: int
    blocks: int
    ksteps: int

    @property
    def lanes(self) -> int:
        """Output channels per packed vector (the kernel's output-channel step)."""
        return 16 * self.blocks

    @property
    def kwidth(self) -> int:
        """Input channels per packed vector (the kernel's reduction step)."""
        return 4 * self.ksteps

    def intrin(self, scaled: bool = False) -> str:
        """The VNNI tensor intrinsic's registered name (``scaled``: ``decode_te``'s scaled form)."""
        if self.bits == 8:
            return _BASE_INTRIN
        return f"{_BASE_INTRIN}_i{self.bits}{'s' if scaled else ''}"

    def field(self, lane, k):
        """The field of output channel ``lane`` (of ``lanes``), input channel ``k`` (of
        ``kwidth``); works on ints and TIR expressions."""
        return lane // 16 + self.blocks * (k // 4)


PACKINGS = {8: Packing(8, 1, 1), 4: Packing(4, 2, 1), 2: Packing(2, 2, 2)}


def _ceil(v: int, m: int) -> int:
    return -(-v // m) * m


# How much more padding than int8's a packed layer may compute: 1/16 lets a 1000-class head (1024
# channels as int4, 1008 as int8) stay packed, but not a 16-channel layer (32 as int4) or a
# 3-channel stem as int2 (8 input channels against int8's 4).
_MAX_EXTRA_PADDING = 1 / 16


def storage_bits(codes: np.ndarray, out_channels: int, in_channels: int) -> int:
    """The narrowest of ``PACKINGS`` whose two's complement range holds every code and whose
    packed vector pads the channels at most ``_MAX_EXTRA_PADDING`` more than int8's 16 × 4."""
    lo, hi = (int(codes.min()), int(codes.max())) if codes.size else (0, 0)
    limit = _ceil(out_channels, 16) * _ceil(in_channels, 4) * (1 + _MAX_EXTRA_PADDING)
    return next(b for b, p in sorted(PACKINGS.items())
                if -(1 << (b - 1)) <= lo and hi < (1 << (b - 1))
                and _ceil(out_channels, p.lanes) * _ceil(in_channels, p.kwidth) <= limit)


def storage_text(bits: int) -> str:
    """The report's words for a VNNI layer's weight storage."""
    if bits == 8:
        return "int8 (VNNI-prepacked)"
    return f"int{bits} packed {8 // bits}/byte (VNNI-prepacked, unpacked in the kernel)"


def pack_blocks(block_packed: np.ndarray, bits: int) -> np.ndarray:
    """An int8 weight in the kernel's block order (axis 0: 16-channel output blocks; axis -3:
    groups of 4 input channels; last two axes ``[16, 4]``) → ``[blocks / B, …, K4 / S, 16, 4]``
    uint8 (``B, S`` = the packing's ``blocks, ksteps``), field ``b + B j`` holding block
    ``B i + b``, k-group ``S r + j``. Requires both counts divisible. ``bits == 8``: unchanged."""
    if bits == 8:
        return block_packed
    p = PACKINGS[bits]
    nb, *mid, k4, _, _ = block_packed.shape
    w = (block_packed.astype(np.uint8) & ((1 << bits) - 1)).reshape(
        nb // p.blocks, p.blocks, *mid, k4 // p.ksteps, p.ksteps, 16, 4)
    out = np.zeros((nb // p.blocks, *mid, k4 // p.ksteps, 16, 4), np.uint8)
    for b in range(p.blocks):
        for j in range(p.ksteps):
            out |= (w[:, b, ..., j, :, :] << (bits * p.field(16 * b, 4 * j))).astype(np.uint8)
    return np.ascontiguousarray(out)


def decode_te(byte, field, bits: int, scaled: bool = False):
    """TE / TIR: the signed int32 code in ``field`` of a packed ``byte`` (the kernels' compute
    definition; the intrinsic's description repeats it exactly). ``scaled``: the code times
    ``2^(8 - bits)`` — the field moved to the byte's top bits and the rest masked off, which is
    its two's complement value scaled, with no sign-extension step (``scale_shift``)."""
    from tvm import tirx
    if scaled:
        top = ((1 << bits) - 1) << (8 - bits)
        value = tirx.bitwise_and(tirx.shift_left(byte, tirx.Cast("uint8", 8 - bits - field * bits)),
                                 tirx.const(top, "uint8"))
        return tirx.Cast("int32", tirx.Cast("int8", value))
    mask, half = (1 << bits) - 1, 1 << (bits - 1)
    value = tirx.bitwise_and(tirx.shift_right(byte, tirx.Cast("uint8", field * bits)),
                             tirx.const(mask, "uint8"))
    return (tirx.Cast("int32", tirx.Cast("int8", tirx.bitwise_xor(value, tirx.const(half, "uint8"))))
            - half)


def scale_shift(bits: int) -> int:
    """The arithmetic right shift that brings a sum of ``scaled`` codes back (exact: every term
    is a multiple of ``2^(8 - bits)``; u8 × the scaled s8 stays within vpdpbusd's 16-bit
    products, 255 × −128)."""
    return 8 - bits


def _field(B, f, bits: int, scaled: bool):
    """TIR: field ``f`` (a loop variable, unrolled) of the 64-byte block ``B`` as the ``int8x64``
    operand of ``vpdpbusd`` (``decode_te``'s two forms, on 64 lanes)."""
    from tvm import tirx

    def vec(v, dtype="uint8"):
        return tirx.Broadcast(tirx.const(v, dtype) if isinstance(v, int) else tirx.Cast(dtype, v), 64)
    v = B.vload([0, 0], dtype="uint8x64")
    if scaled:
        top = ((1 << bits) - 1) << (8 - bits)
        return tirx.reinterpret("int8x64", tirx.bitwise_and(
            tirx.shift_left(v, vec(8 - bits - f * bits)), vec(top)))
    x = tirx.bitwise_and(tirx.shift_right(v, vec(f * bits)), vec((1 << bits) - 1))
    half = 1 << (bits - 1)
    return tirx.reinterpret("int8x64", tirx.bitwise_xor(x, vec(half))) - vec(half, "int8")


def _dot(A, B, C, b, j, p: "Packing", scaled: bool):
    """TIR: ``C[16 b : 16 b + 16] += A[4 j : 4 j + 4] · field (b, j) of B`` (one ``vpdpbusd``), as
    one expression (see ``tvm_kernels.register_intrinsics``: named temporaries become workspace
    allocations)."""
    from tvm import tirx
    return tirx.call_llvm_pure_intrin(
        "int32x16", "llvm.x86.avx512.vpdpbusd.512",
        C.vload([16 * b], dtype="int32x16"),
        tirx.reinterpret("uint8x64", tirx.Broadcast(
            tirx.reinterpret("int32", A.vload([4 * j], "uint8x4")), 16)),
        _field(B, p.field(16 * b, 4 * j), p.bits, scaled))


def register_packed_intrinsics() -> None:
    """Register the packed-weight VNNI intrinsics (C[lanes] i32 += A[kwidth] u8 ·
    decode(B[16, 4] u8)), plain and ``scaled``, once per process."""
    for bits, p in PACKINGS.items():
        if bits != 8 and bits not in _REGISTERED:
            for scaled in (False, True):
                _register(p, scaled)
            _REGISTERED.add(bits)


def _register(p: Packing, scaled: bool) -> None:
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T
    n, kn, bits = p.lanes, p.kwidth, p.bits

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((kn,), "uint8", offset_factor=1),
             B: T.Buffer((16, 4), "uint8", offset_factor=1),
             C: T.Buffer((n,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:n], A[0:kn], B[0:16, 0:4])
            T.writes(C[0:n])
            for i in T.serial(0, n):
                for k in T.serial(0, kn):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * decode_te(
                            B[vi % 16, vk % 4], p.field(vi, vk), bits, scaled)

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((kn,), "uint8", offset_factor=1),
             B: T.Buffer((16, 4), "uint8", offset_factor=1),
             C: T.Buffer((n,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:n], A[0:kn], B[0:16, 0:4])
            T.writes(C[0:n])
            for j in T.unroll(p.ksteps):
                for b in T.unroll(p.blocks):
                    C[T.ramp(b * 16, 1, 16)] = _dot(A, B, C, b, j, p, scaled)

    TensorIntrin.register(p.intrin(scaled), desc, impl, override=True)
