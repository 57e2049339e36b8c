"""``tvm_fast_math``: erf / exp / tanh and the ops built on them compile to vectorized
polynomials (no scalar libm call left in the loop) and stay within float32 noise of the exact
function, on values far outside any calibration range too."""
import math
import re

import numpy as np
import pytest
import torch

pytest.importorskip("tvm")
from tvm import relax  # noqa: E402

from fliqs_compiler.backends import tvm_fast_math  # noqa: E402
from fliqs_compiler.backends.targets import parse_target  # noqa: E402
from fliqs_compiler.backends.tvm_lower import compile_module  # noqa: E402

_SQRT_2_PI = math.sqrt(2.0 / math.pi)
# op name → (relax op, float64 torch reference)
OPS = {
    "relax.erf": (relax.op.erf, torch.erf),
    "relax.exp": (relax.op.exp, torch.exp),
    "relax.tanh": (relax.op.tanh, torch.tanh),
    "relax.sigmoid": (relax.op.sigmoid, torch.sigmoid),
    "relax.nn.silu": (relax.op.nn.silu, torch.nn.functional.silu),
    "relax.nn.gelu": (relax.op.nn.gelu, torch.nn.functional.gelu),
    "relax.nn.gelu_tanh": (relax.op.nn.gelu_tanh,
                           lambda x: torch.nn.functional.gelu(x, approximate="tanh")),
    "relax.nn.softmax": (lambda x: relax.op.nn.softmax(x, -1), lambda x: torch.softmax(x, -1)),
}
_LIBM = re.compile(r"call\w*\s+\S*\b(erff?|expf?|tanhf?)\b")


def _module(op, shape, dtype="float32"):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, dtype))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(op(x))
        bb.emit_func_output(y)
    return bb.get()


def _run(mod, x):
    import tvm
    ex, _ = compile_module(mod, parse_target("llvm"))
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    return out, ex.mod.imports[0].inspect_source("asm")


def test_every_fast_op_is_tested():
    assert set(OPS) == set(tvm_fast_math.FAST)


@pytest.mark.parametrize("name", sorted(OPS))
def test_fast_op_matches_the_exact_function_without_libm_calls(name):
    op, ref = OPS[name]
    rng = np.random.default_rng(0)
    # normal values, then far outside any calibration range (saturation, exp's clamp)
    x = np.concatenate([rng.normal(0, 3, 4 * 250), np.linspace(-120, 120, 3 * 250)])
    x = x.reshape(7, 250).astype(np.float32)
    if name == "relax.exp":
        x = np.clip(x, -87, 87)  # exp overflows float32 beyond: inf in every runtime
    got, asm = _run(_module(op, x.shape), x)
    want = ref(torch.from_numpy(x).double()).numpy()
    assert np.isfinite(got).all()
    tol = 4e-6 if name in ("relax.exp", "relax.nn.softmax") else 1e-6
    np.testing.assert_allclose(got, want, rtol=tol, atol=1e-6)
    assert not _LIBM.search(asm), f"{name}: a scalar libm call is left in the compiled loop"


def test_without_the_rewrite_gelu_calls_libm():
    """The check above can fail: TVM's own lowering of GELU calls ``erff`` per element."""
    x = np.linspace(-4, 4, 64, dtype=np.float32).reshape(1, 64)
    _, asm = _run(_module(relax.op.nn.gelu, x.shape), x)
    assert not _LIBM.search(asm)
    ex, _ = compile_module(_module(relax.op.nn.gelu, x.shape), parse_target("llvm"), fuse=False,
                           schedule=False)  # TVM's default build: no rewrite
    assert _LIBM.search(ex.mod.imports[0].inspect_source("asm"))


def test_other_dtypes_keep_tvm_lowering():
    mod = _module(relax.op.nn.gelu, (4, 8), "float16")
    out = tvm_fast_math.vectorizable(mod)
    calls = [b.value for b in out["main"].body.blocks[0].bindings]
    assert [c.op.name for c in calls] == ["relax.nn.gelu"]
