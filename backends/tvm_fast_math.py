"""Transcendental float ops as vectorizable polynomials: erf, exp, tanh and what is built on them
(GELU, tanh-GELU, sigmoid, SiLU, softmax).

Why, measured (2 threads, this project's Zen 4, [1, 128, 1536] fp32 / softmax over [6, 128, 128],
scheduled by ``tvm_schedules``): TVM 0.27 lowers ``erf`` / ``exp`` / ``tanh`` to one libm call per
element on LLVM (no vector math library is linked), which stops the loop's vectorization: erf
1.53 ms vs 0.027 with ``topi.fast_erf``, tanh 0.55 vs 0.024, exp 0.20 vs 0.026, softmax 0.18 vs
0.073. In the 12-block, 384-wide encoder of ``bench/latency.py`` (all Linears int8) the GELU
epilogues alone took ~1.1 ms a block, ~45 % of the run.

Accuracy (measured over 4M points against float64): ``fast_erf`` ≤ 4.5e-7 absolute (7 float32
ulp), ``fast_tanh`` ≤ 4.0e-7, ``fast_exp`` ≤ 3.6e-6 relative. The references differ among
themselves by as much: torch's vectorized erf / exp, onnxruntime's MLAS erf and libm are separate
approximations, so a float op feeding a quantizer already flips an occasional rounding between
any two runtimes; the artifact checks allow for that (``ort_backend.CASCADE_ROW_SHARE``).

``vectorizable(mod)``: a Relax pass (graph in → graph out) that replaces every float32 call of an
op in ``FAST`` by ``call_te`` of its polynomial form; other dtypes keep TVM's lowering (float16
GELU goes through float32 there anyway).
"""
from __future__ import annotations

import math

__all__ = ["FAST", "vectorizable"]


def _sigmoid(x):
    from tvm import tirx, topi
    one = tirx.const(1.0, x.dtype)
    return one / (one + topi.fast_exp(-x))  # fast_exp clamps |x| ≤ 88.4: no inf / nan


def _gelu(x):
    """x · Φ(x) — TVM's own legalization of ``relax.nn.gelu`` with ``fast_erf``."""
    from tvm import tirx, topi
    half = tirx.const(0.5, x.dtype)
    return x * (half + topi.fast_erf(x * tirx.const(0.5 ** 0.5, x.dtype)) * half)


def _gelu_tanh(x):
    """TVM's legalization of ``relax.nn.gelu_tanh`` with ``fast_tanh``."""
    from tvm import tirx, topi
    c = tirx.const(math.sqrt(2.0 / math.pi), x.dtype)
    inner = c * x * (tirx.const(1.0, x.dtype) + tirx.const(0.044715, x.dtype) * x * x)
    return tirx.const(0.5, x.dtype) * x * (tirx.const(1.0, x.dtype) + topi.fast_tanh(inner))


def _silu(x):
    return x * _sigmoid(x)


def _softmax(x, axis):
    from tvm import topi
    return topi.nn.fast_softmax(x, axis)


def _op(name):
    def get(x, *_):
        from tvm import topi
        return getattr(topi, name)(x)
    return get


# relax op name → (TE function of the input (and the call's attrs), attrs it needs)
FAST = {
    "relax.erf": (_op("fast_erf"), ()),
    "relax.exp": (_op("fast_exp"), ()),
    "relax.tanh": (_op("fast_tanh"), ()),
    "relax.sigmoid": (_sigmoid, ()),
    "relax.nn.silu": (_silu, ()),
    "relax.nn.gelu": (_gelu, ()),
    "relax.nn.gelu_tanh": (_gelu_tanh, ()),
    "relax.nn.softmax": (_softmax, ("axis",)),
}


def vectorizable(mod):
    """``mod`` with every float32 call of a ``FAST`` op in its Relax functions replaced by
    ``call_te`` of the polynomial form (module docstring); the rest unchanged."""
    from fliqs_compiler.backends.tvm_relax import rewrite_calls

    def rewrite(builder, call):
        entry = FAST.get(getattr(call.op, "name", None))
        if entry is None or len(call.args) != 1 or str(getattr(call.args[0].ty, "dtype", "")) != "float32":
            return None
        fn, attrs = entry
        return builder.call_te(fn, call.args[0], *[getattr(call.attrs, a) for a in attrs],
                               primfunc_name_hint=f"fast_{call.op.name.rsplit('.', 1)[-1]}")
    return rewrite_calls(mod, rewrite)
