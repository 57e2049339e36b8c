"""fp32 FMA kernels (``tvm_fp32``): FMAs in the generated code, results against a float64 reference
(exact on small-integer values, within fp32 summation-order tolerance otherwise) on odd shapes
through the Relax rewrite; and in ``lower``: float layers on the kernel, NHWC throughout when every
conv is on a hand kernel, a grouped conv falling back with the reason, low-bit weights decoded at
run time left alone, the old path on a target without AVX-512, a fresh VM on the exported
library."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as Fn
from torch import nn

from fliqs_compiler.backends import tvm_fp32 as F32
from fliqs_compiler.backends.targets import parse_target
from float_kernels import CONV_CASES, compiled_op, conv_ref, host_has

pytestmark = pytest.mark.tvm
TARGET = parse_target("llvm")


needs_avx512 = pytest.mark.skipif(not host_has("avx512f", "avx512f"), reason="host CPU has no AVX-512")


def test_pack_layouts():
    w = np.arange(32 * 5, dtype=np.float32).reshape(32, 5)
    p = F32.pack_dense_weight_f32(w)
    assert p.shape == (2, 5, 16)
    for n, k in [(0, 0), (17, 4), (31, 2)]:
        assert p[n // 16, k, n % 16] == w[n, k]
    wc = np.random.default_rng(0).standard_normal((16, 3, 3, 2)).astype(np.float32)
    pc = F32.pack_conv_weight_f32(wc)
    assert pc.shape == (1, 3, 2, 3, 16) and pc[0, 2, 1, 1, 5] == wc[5, 1, 2, 1]


def _compiled(build, weight):
    return compiled_op(build, weight, F32.fp32_rewrite, "vfmadd")


@needs_avx512
@pytest.mark.parametrize("cin,cout,k,stride,pad,hw", CONV_CASES)
def test_conv_exact_on_small_integers(cin, cout, k, stride, pad, hw):
    """Values in [-8, 8]: every partial sum is an integer below 2^24, exact in any order."""
    from tvm import relax
    rng = np.random.default_rng(cin * 100 + cout)
    x = rng.integers(-8, 9, (1, cin, hw, hw)).astype(np.float32)
    w = rng.integers(-8, 9, (cout, cin, k, k)).astype(np.float32)
    got, n_fma = _compiled(lambda xv, wc: relax.op.nn.conv2d(xv, wc, strides=stride, padding=pad,
                                                             out_dtype="float32"), w)(x)
    assert n_fma > 0
    np.testing.assert_array_equal(got, conv_ref(x, w, stride, pad).astype(np.float32))


@needs_avx512
def test_conv_nhwc_within_fp32_order_tolerance():
    from tvm import relax
    rng = np.random.default_rng(7)
    cin, cout = 10, 18
    x = (rng.standard_normal((1, 9, 9, cin)) * 30).astype(np.float32)
    w = rng.standard_normal((cout, cin, 3, 3)).astype(np.float32)
    got, n_fma = _compiled(lambda xv, wc: relax.op.nn.conv2d(
        xv, wc, strides=2, padding=1, data_layout="NHWC", out_layout="NHWC", out_dtype="float32"), w)(x)
    ref = conv_ref(x.transpose(0, 3, 1, 2), w, 2, 1).transpose(0, 2, 3, 1)
    bound = 9 * cin * np.abs(x).max() * np.abs(w).max() * 2.0 ** -23  # terms · max term · ulp
    assert n_fma > 0 and np.abs(got - ref).max() <= bound


@needs_avx512
@pytest.mark.parametrize("lead,k,n", [((5,), 38, 48), ((2, 3), 27, 10), ((1,), 1, 1)])
def test_dense_exact_on_small_integers(lead, k, n):
    """matmul(x [.., K], const [K, N]): N not a multiple of 16, leading dims folded into M."""
    from tvm import relax
    rng = np.random.default_rng(k)
    x = rng.integers(-16, 17, (*lead, k)).astype(np.float32)
    w = rng.integers(-16, 17, (k, n)).astype(np.float32)
    got, n_fma = _compiled(lambda xv, wc: relax.op.matmul(xv, wc, out_dtype="float32"), w)(x)
    assert n_fma > 0
    np.testing.assert_array_equal(got, (x.astype(np.float64) @ w).astype(np.float32))


# ---- in lower() -------------------------------------------------------------------------------------
class _FloatEnds(nn.Module):
    """stem 7×7/2 3→20 float → ReLU → [depthwise 3×3 float] → conv 3×3 20→24 int8 → ReLU →
    conv 1×1 24→16 fp8_e4m3 weight (decoded at run time: not an fp32 constant) or float →
    flatten → linear float."""

    def __init__(self, depthwise: bool, pw_format: str = "float"):
        super().__init__()
        from tvm_models import act_quantizer, weight_quantizer
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 20, 7, stride=2, padding=3)
        self.dw = nn.Conv2d(20, 20, 3, padding=1, groups=20) if depthwise else None
        self.conv = nn.Conv2d(20, 24, 3, padding=1)
        self.pw = nn.Conv2d(24, 16, 1)
        self.fc = nn.Linear(16 * 10 * 10, 10)
        self.wq = weight_quantizer("int8", self.conv.weight)
        self.aq = act_quantizer("uint8", 0.05)
        self.pwq = weight_quantizer(pw_format, self.pw.weight)
        self.pwa = act_quantizer(pw_format, 0.05)

    def forward(self, x):
        y = torch.relu(self.stem(x))
        if self.dw is not None:
            y = self.dw(y)
        y = torch.relu(Fn.conv2d(self.aq(y), self.wq(self.conv.weight), self.conv.bias, padding=1))
        y = Fn.conv2d(self.pwa(y), self.pwq(self.pw.weight), self.pw.bias)
        return self.fc(y.flatten(1))


def _lowered(depthwise: bool, pw_format: str = "float", target="llvm", out_dir=None):
    from fliqs_compiler.backends.tvm_lower import lower
    from fliqs_compiler.ir.graph import Graph, InputSpec, LayerInfo
    m = _FloatEnds(depthwise, pw_format).eval()
    gm = torch.fx.symbolic_trace(m)
    g = Graph(gm, [InputSpec("x", (1, 3, 20, 20))], name="float-ends")
    nodes = [n for n in gm.graph.nodes if (n.op == "call_module" and n.target in ("stem", "dw", "fc"))
             or (n.op == "call_function" and getattr(n.target, "__name__", "") == "conv2d")]
    names = ["stem"] + (["dw"] if depthwise else []) + ["conv", "pw", "fc"]
    assert len(nodes) == len(names)
    for public, node in zip(names, nodes):
        g.layers[public] = LayerInfo(public, "conv2d", node.name)
    x = torch.randn((1, 3, 20, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = m(x).numpy()
    return lower(g, target, out_dir), x, ref


def _kernel_transposes(mod) -> int:
    from test_tvm_bf16 import _transposed_kernel_outputs
    return _transposed_kernel_outputs(mod)


@needs_avx512
def test_float_layers_on_the_kernel_and_nhwc_throughout(tmp_path):
    import tvm
    from tvm import relax
    low, x, ref = _lowered(depthwise=False, out_dir=tmp_path)
    e = low.executed
    by_kernel = {n: v["kernel"] for n, v in e.items()}
    assert set(by_kernel.values()) == {"fp32-fma", "vnni"}, by_kernel
    float_layers = [n for n, k in by_kernel.items() if k == "fp32-fma"]
    assert len(float_layers) == 3  # stem, pw, fc
    for n in float_layers:
        assert e[n]["vfmadd"] > 0 and e[n]["weight_storage"] == "fp32 (FP32-FMA-prepacked)"
    assert _kernel_transposes(low.mod) == 0  # NHWC between the kernels
    got = low.run([x.numpy()])[0]
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
    # the exported library in a fresh VM
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(low.path)), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x.numpy(), tvm.cpu()))
    np.testing.assert_array_equal((out[0] if not hasattr(out, "numpy") else out).numpy(), got)


@needs_avx512
def test_depthwise_conv_falls_back_to_tvm_conv_in_nhwc():
    """A float depthwise conv is not the FMA kernel's (groups > 1): TVM's own conv computes it, in
    NHWC like the kernels around it (``tvm_layout.depthwise``), reading HWIO weights."""
    from fliqs_compiler.backends import tvm_kernels as K
    low, x, ref = _lowered(depthwise=True)
    e = low.executed
    dw = next(v for n, v in e.items() if n == "dw")
    assert dw["kernel"] == "fp32" and "not applicable" in dw["fallback"], dw
    assert e["stem"]["kernel"] == "fp32-fma"
    (conv,) = K.calls(low.mod["main"], "relax.nn.conv2d")
    assert (str(conv.attrs.data_layout), str(conv.attrs.kernel_layout)) == ("NHWC", "HWIO")
    assert _kernel_transposes(low.mod) == 0  # NHWC between the kernels
    got = low.run([x.numpy()])[0]
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


@needs_avx512
def test_low_bit_weights_decoded_at_run_time_are_left_alone():
    """An fp8 weight on a target without avx512bf16 stays 8-bit (decoded per call), not fp32."""
    target = json.dumps({**(TARGET.tvm_target or {}), "mattr": ["-avx512bf16"]})
    low, x, ref = _lowered(depthwise=False, pw_format="fp8_e4m3", target=target)
    pw = low.executed["pw"]
    assert pw["kernel"] == "fp32" and pw["weight_storage"] == "float8_e4m3fn" and "fallback" not in pw
    assert low.executed["fc"]["kernel"] == "fp32-fma"


def test_without_avx512_the_generic_path():
    """The capability override (``mattr: -avx512f``): no fp32 kernel, the float layers on the
    generic schedules, same results."""
    target = parse_target(json.dumps({"kind": "llvm", "mcpu": "haswell"}))
    assert not target.caps.has("avx512f")
    low, x, ref = _lowered(depthwise=False, target=target)
    assert {v["kernel"] for v in low.executed.values()} == {"fp32", "int8"}
    assert not any("fallback" in v for v in low.executed.values())
    got = low.run([x.numpy()])[0]
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
