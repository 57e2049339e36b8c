"""Shared by the integer kernels' tests (``test_tvm_kernels``, ``test_tvm_packed_weights``): one
scheduled PrimFunc compiled for the host, run on numpy arrays, and an exact NHWC conv reference."""
from __future__ import annotations

import numpy as np

from fliqs_compiler.backends.targets import parse_target

TARGET = parse_target("llvm")


def build(prim):
    """``prim`` compiled for the host target as the module's ``main``."""
    import tvm
    return tvm.compile(tvm.IRModule({"main": prim.with_attr("global_symbol", "main")}),
                       target=TARGET.tvm())


def run(ex, *arrays, out_shape):
    """``ex["main"](*arrays, out)`` with a zeroed int32 ``out`` of ``out_shape``; returns it."""
    import tvm
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.zeros(out_shape, np.int32), dev)
    ex["main"](*[tvm.runtime.tensor(a, dev) for a in arrays], out)
    return out.numpy()


def conv_ref_nhwc(x, wt, stride, oh, ow):
    """Exact int64 conv of an already padded NHWC ``x`` with an OIHW ``wt``."""
    kh, kw = wt.shape[2:]
    ref = np.zeros((x.shape[0], oh, ow, wt.shape[0]), np.int64)
    for dy in range(kh):
        for dx in range(kw):
            patch = x[:, dy:dy + stride[0] * oh:stride[0], dx:dx + stride[1] * ow:stride[1], :]
            ref += patch.astype(np.int64) @ wt[:, :, dy, dx].astype(np.int64).T
    return ref
