"""Shared by the float kernels' tests (``tvm_bf16``, ``tvm_fp32``): one op through a kernel's Relax
rewrite, compiled like ``lower`` does, and a float64 conv reference."""
from __future__ import annotations

import numpy as np

CONV_CASES = [  # (cin, cout, k, stride, pad, hw): odd channel counts, stride 2, 1x1, the stem
    (3, 20, 7, 2, 3, 19),
    (5, 17, 3, 1, 1, 9),
    (6, 33, 3, 2, 1, 11),
    (8, 16, 1, 1, 0, 7),
    (7, 24, 1, 2, 0, 9),
]


def host_has(cpuinfo_flag: str, feature: str) -> bool:
    """The host CPU has ``feature``: /proc/cpuinfo's flag where it exists, and the host target's
    capabilities (``mcpu`` → ``targets.CPU_FEATURES``) that lowering chooses kernels by."""
    from fliqs_compiler.backends.targets import parse_target
    try:
        with open("/proc/cpuinfo") as f:
            flag = f" {cpuinfo_flag}" in f.read()
    except OSError:
        flag = True
    return flag and parse_target("llvm").caps.has(feature)


def compiled_op(build, weight, rewrite, instruction: str, target=None):
    """A one-op Relax module (``build(x, w_const)`` → the op) rewritten by ``rewrite`` (a kernel's
    ``(mod, names, consts) -> (mod, done)``) and compiled like ``lower`` does: ``run(x) -> (numpy
    output, count of ``instruction`` in the layer's kernel)``."""
    import tvm
    from tvm import relax
    from fliqs_compiler.backends.targets import parse_target
    from asm import asm_functions
    from fliqs_compiler.backends.tvm_lower import compile_module
    target = target or parse_target("llvm")

    def run(x):
        bb = relax.BlockBuilder()
        xv = relax.Var("x", relax.TensorType(x.shape, "float32"))
        wc = relax.const(weight)
        with bb.function("main", [xv]):
            with bb.dataflow():
                out = bb.emit_output(build(xv, wc))
            bb.emit_func_output(out)
        mod, done = rewrite(bb.get(), {id(wc): "layer"}, [wc])
        assert list(done) == ["layer"]
        ex, _ = compile_module(mod, target)
        fns = asm_functions(ex.mod.imports[0].inspect_source("asm"))
        n = sum(body.count(instruction) for sym, body in fns.items() if done["layer"] in sym)
        vm = relax.VirtualMachine(ex, tvm.cpu())
        return vm["main"](tvm.runtime.tensor(x)).numpy(), n
    return run


def conv_ref(x_nchw, w, stride, pad):
    """float64 conv (exact for small-integer cases)."""
    x = np.pad(x_nchw.astype(np.float64), [(0, 0), (0, 0), (pad, pad), (pad, pad)])
    o, _, kh, kw = w.shape
    oh, ow = (x.shape[2] - kh) // stride + 1, (x.shape[3] - kw) // stride + 1
    out = np.zeros((x.shape[0], o, oh, ow))
    for i in range(kh):
        for j in range(kw):
            patch = x[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride]
            out += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j].astype(np.float64))
    return out
