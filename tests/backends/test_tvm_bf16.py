"""AVX512-BF16 kernels (``tvm_bf16``): ``vdpbf16ps`` in the generated code, results against a numpy
reference (exact where every partial sum is exact in fp32, within fp32 summation-order tolerance
otherwise) on odd shapes through the Relax rewrite (channel padding, stride 2, padding, 1×1, a
3-channel 7×7 stem), weight packing; and in ``lower``: fp8 / bf16 / int4-weight layers on the
kernel within the LSB contract, reported per layer, and the old path on a target without
avx512bf16."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as Fn
from torch import nn

from fliqs_compiler.backends import tvm_bf16 as B
from float_kernels import CONV_CASES, compiled_op, conv_ref, host_has
from fliqs_compiler.backends.targets import parse_target

pytestmark = pytest.mark.tvm
TARGET = parse_target("llvm")


needs_bf16 = pytest.mark.skipif(not host_has("avx512_bf16", "avx512bf16"), reason="host CPU has no AVX512-BF16")
NO_BF16 = {**(TARGET.tvm_target or {}), "mattr": ["-avx512bf16"]}  # the capability override


def test_pack_layouts_and_bits():
    w = (np.arange(32 * 6, dtype=np.float32).reshape(32, 6) - 90) / 4  # quarters: exact in bf16
    p = B.pack_dense_weight_bf16(w)
    assert p.shape == (2, 3, 16, 2) and p.dtype == np.uint16
    for n, k in [(0, 0), (17, 5), (31, 3)]:
        assert (p[n // 16, k // 2, n % 16, k % 2].astype(np.uint32) << 16).view(np.float32) == w[n, k]
    wc = np.random.default_rng(0).integers(-128, 128, (16, 4, 3, 3)).astype(np.float32)
    pc = B.pack_conv_weight_bf16(wc)
    assert pc.shape == (1, 3, 3, 2, 16, 2)
    assert (pc[0, 2, 1, 1, 5, 1].astype(np.uint32) << 16).view(np.float32) == wc[5, 3, 2, 1]
    with pytest.raises(ValueError, match="bf16"):
        B.bf16_bits(np.float32([1.0 + 2 ** -10]))  # needs more than bf16's 8 significant bits


# ---- the kernels through the Relax rewrite (padding, slicing, layouts) ------------------------------
def _compiled(build, weight):
    return compiled_op(build, weight, B.bf16_rewrite, "vdpbf16ps")


@needs_bf16
@pytest.mark.parametrize("cin,cout,k,stride,pad,hw", CONV_CASES)
def test_conv_exact_on_small_integer_codes(cin, cout, k, stride, pad, hw):
    """Codes in [-8, 8]: every product and partial sum is an integer below 2^24, so any summation
    order is exact — the kernel must equal the reference bit for bit."""
    from tvm import relax
    rng = np.random.default_rng(cin * 100 + cout)
    x = rng.integers(-8, 9, (1, cin, hw, hw)).astype(np.float32)
    w = rng.integers(-8, 9, (cout, cin, k, k)).astype(np.float32)
    run = _compiled(lambda xv, wc: relax.op.nn.conv2d(xv, wc, strides=stride, padding=pad,
                                                      out_dtype="float32"), w)
    got, n_dp = run(x)
    assert n_dp > 0
    np.testing.assert_array_equal(got, conv_ref(x, w, stride, pad).astype(np.float32))


@needs_bf16
def test_conv_nhwc_and_bf16_values_within_fp32_order_tolerance():
    """Arbitrary bf16 codes (fractions, a 1e3 range): only the fp32 summation order differs from
    the reference; an NHWC conv takes the kernel without transposes."""
    from tvm import relax
    rng = np.random.default_rng(7)

    def bf16(a):  # truncated to bf16: exact in bf16
        return (np.asarray(a, np.float32).view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)

    cin, cout = 10, 18
    x = bf16(rng.standard_normal((1, 9, 9, cin)) * 30)
    w = bf16(rng.standard_normal((cout, cin, 3, 3)))
    run = _compiled(lambda xv, wc: relax.op.nn.conv2d(
        xv, wc, strides=2, padding=1, data_layout="NHWC", out_layout="NHWC", out_dtype="float32"), w)
    got, n_dp = run(x)
    ref = conv_ref(x.transpose(0, 3, 1, 2), w, 2, 1).transpose(0, 2, 3, 1)
    bound = 9 * cin * np.abs(x).max() * np.abs(w).max() * 2.0 ** -23  # terms · max term · ulp
    assert n_dp > 0
    assert np.abs(got - ref).max() <= bound


@needs_bf16
@pytest.mark.parametrize("lead,k,n", [((5,), 38, 48), ((2, 3), 27, 10), ((1,), 1, 1)])
def test_dense_exact_on_small_integer_codes(lead, k, n):
    """matmul(x [.., K], const [K, N]): K odd (zero-padded to 2), N not a multiple of 16, leading
    dims folded into M."""
    from tvm import relax
    rng = np.random.default_rng(k)
    x = rng.integers(-16, 17, (*lead, k)).astype(np.float32)
    w = rng.integers(-16, 17, (k, n)).astype(np.float32)
    run = _compiled(lambda xv, wc: relax.op.matmul(xv, wc, out_dtype="float32"), w)
    got, n_dp = run(x)
    assert n_dp > 0
    np.testing.assert_array_equal(got, (x.astype(np.float64) @ w).astype(np.float32))


# ---- in lower(): a small CNN, kernel chosen from the target's capabilities ------------------------
class _MixedCNN(nn.Module):
    """stem 7×7/2 3→20 (fp8_e4m3 × fp8_e4m3) → ReLU → depthwise 3×3 (fp8: groups, not the kernel)
    → conv 3×3 20→24 (bf16 × bf16) → ReLU → conv 1×1 24→16 (int8 × uint8: VNNI, not bf16) →
    flatten → linear (int4 weight × fp8_e5m2 activation) → fp8_e4m3 output quantizer."""

    LAYERS = {"stem": "fp8_e4m3", "dw": "fp8_e4m3", "conv": "bf16", "pw": "int8", "fc": "int4"}

    def __init__(self, out_scale=1.0, depthwise=True):
        super().__init__()
        from tvm_models import act_quantizer, weight_quantizer
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 20, 7, stride=2, padding=3)
        self.dw = nn.Conv2d(20, 20, 3, padding=1, groups=20)
        self.depthwise = depthwise  # without it every conv is on a hand kernel: NHWC throughout
        self.conv = nn.Conv2d(20, 24, 3, padding=1)
        self.pw = nn.Conv2d(24, 16, 1)
        self.fc = nn.Linear(16 * 10 * 10, 10)
        self.wq = nn.ModuleList(weight_quantizer(f, getattr(self, n).weight)
                                for n, f in self.LAYERS.items())
        self.aq = nn.ModuleList([act_quantizer("fp8_e4m3", 0.01), act_quantizer("fp8_e4m3", 0.01),
                                 act_quantizer("bf16", 1.0), act_quantizer("uint8", 0.02),
                                 act_quantizer("fp8_e5m2", 0.001)])
        self.oq = act_quantizer("fp8_e4m3", out_scale)

    def forward(self, x):
        w = [q(getattr(self, n).weight) for q, n in zip(self.wq, self.LAYERS)]
        y = torch.relu(Fn.conv2d(self.aq[0](x), w[0], self.stem.bias, stride=2, padding=3))
        if self.depthwise:
            y = Fn.conv2d(self.aq[1](y), w[1], self.dw.bias, padding=1, groups=20)
        y = torch.relu(Fn.conv2d(self.aq[2](y), w[2], self.conv.bias, padding=1))
        y = Fn.conv2d(self.aq[3](y), w[3], self.pw.bias)
        return self.oq(Fn.linear(self.aq[4](y.flatten(1)), w[4], self.fc.bias))


def _mixed(depthwise=True):
    """(module, graph, input, torch reference) — the output quantizer calibrated on the input."""
    from fliqs_compiler.ir.graph import Graph, InputSpec, LayerInfo
    x = torch.randn((1, 3, 20, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # the output quantizer at scale 1 saturates at 448
        absmax = float(_MixedCNN(depthwise=depthwise)(x).abs().max())
        m = _MixedCNN(out_scale=absmax / 448, depthwise=depthwise).eval()
        ref = m(x).numpy()
    gm = torch.fx.symbolic_trace(m)
    g = Graph(gm, [InputSpec("x", (1, 3, 20, 20))], name="mixed")
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"
             and getattr(n.target, "__name__", "") in ("conv2d", "linear")]
    names = [n for n in _MixedCNN.LAYERS if depthwise or n != "dw"]
    assert len(names) == len(nodes)
    for public, node in zip(names, nodes):
        g.layers[public] = LayerInfo(public, node.target.__name__, node.name)
    return m, g, x, ref


@pytest.fixture(scope="module")
def mixed():
    return _mixed()


def _lsb_error(m, ref, got) -> float:
    from conformance_matrix import lsb_error
    return lsb_error(ref, np.asarray(got, np.float32), m.oq)


@needs_bf16
def test_lowered_cnn_runs_fp8_bf16_layers_on_dpbf16ps(mixed, tmp_path):
    import tvm
    from tvm import relax
    from conformance_matrix import LSB_SLACK
    from fliqs_compiler.backends.tvm_lower import lower
    m, g, x, ref = mixed
    low = lower(g, "llvm", tmp_path)
    e = low.executed
    for name in ("stem", "conv", "fc"):  # fp8 x fp8, bf16 x bf16, int4 weight x fp8 activation
        assert e[name]["kernel"] == "bf16-dpbf16ps" and e[name]["vdpbf16ps"] > 0, (name, e[name])
        assert e[name]["dtype"] == "bf16xbf16->float32"
        assert e[name]["weight_storage"] == "bf16 (BF16-DPBF16PS-prepacked)"
    assert e["dw"]["kernel"] == "fp32" and "fallback" not in e["dw"]  # grouped: the old path
    assert e["pw"]["kernel"] == "vnni"  # int8 x uint8 stays on VNNI
    # the depthwise conv is TVM's own, in NHWC with the kernels (tvm_layout.depthwise): no
    # transposes between them
    assert _transposed_kernel_outputs(low.mod) == 0
    assert low.instruction_counts["vdpbf16ps"] > 0
    got = low.run([x.numpy()])[0]
    assert _lsb_error(m, ref, got) <= 1.0 + LSB_SLACK
    assert np.abs(ref).max() > 10 * float(m.oq.scale)  # the output is not all zeros / one step
    # the exported library in a fresh VM: the imported LLVM IR micro-kernel left no symbol behind
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(low.path)), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x.numpy(), tvm.cpu()))
    np.testing.assert_array_equal((out[0] if not hasattr(out, "numpy") else out).numpy(), got)


def test_lowered_cnn_without_avx512bf16_keeps_the_old_path(mixed):
    """The capability override (``mattr: -avx512bf16``): no bf16 kernel, fp8 layers in fp32 on the
    dequantized values, bf16 x bf16 upcast; same results within the contract."""
    from conformance_matrix import LSB_SLACK
    from fliqs_compiler.backends.targets import Target
    from fliqs_compiler.backends.tvm_lower import lower
    import json
    m, g, x, ref = mixed
    target = parse_target(json.dumps(NO_BF16))
    assert isinstance(target, Target) and not target.caps.has("avx512bf16")
    low = lower(g, target)
    e = low.executed
    assert e["stem"]["kernel"] == e["fc"]["kernel"] == e["dw"]["kernel"] == "fp32"
    assert e["conv"]["kernel"] == "bf16-upcast-fp32"
    assert e["stem"]["weight_storage"] == "float8_e4m3fn"
    assert not any("vdpbf16ps" in v for v in e.values()) and low.instruction_counts["vdpbf16ps"] == 0
    assert _lsb_error(m, ref, low.run([x.numpy()])[0]) <= 1.0 + LSB_SLACK


class _MatMulHead(nn.Module):
    """``fp8(x) @ fp8(W)`` with a constant [K, N] weight (the MatMul converter, not Linear) on
    [B, T, K] tokens, per-tensor scales; K and N odd."""

    def __init__(self):
        super().__init__()
        from fliqs_compiler.numerics.quantizers import FormatQuantizer
        torch.manual_seed(0)
        self.w = nn.Parameter(torch.randn(27, 13))
        self.wq = FormatQuantizer("fp8_e4m3", torch.tensor([0.01]), role="weight")
        self.aq = FormatQuantizer("fp8_e5m2", torch.tensor([0.01]))

    def forward(self, x):
        return self.aq(x) @ self.wq(self.w)


@needs_bf16
def test_lowered_matmul_with_constant_weight_on_dpbf16ps():
    from fliqs_compiler.backends.tvm_lower import lower
    from fliqs_compiler.ir.graph import Graph, InputSpec, LayerInfo
    m = _MatMulHead().eval()
    gm = torch.fx.symbolic_trace(m)
    g = Graph(gm, [InputSpec("x", (2, 5, 27))], name="mm")
    node = next(n for n in gm.graph.nodes if n.op == "call_function" and "matmul" in str(n.target))
    g.layers["head"] = LayerInfo("head", "matmul", node.name)
    x = torch.randn((2, 5, 27), generator=torch.Generator().manual_seed(3))
    low = lower(g, "llvm")
    e = low.executed["head"]
    assert e["kernel"] == "bf16-dpbf16ps" and e["vdpbf16ps"] > 0, e
    with torch.no_grad():
        ref = m(x).numpy()
    got = low.run([x.numpy()])[0]
    # torch multiplies the dequantized values in fp32; the kernel sums exact code products and
    # scales once: only fp32 rounding order differs (a few ulps of the output's magnitude)
    assert np.abs(got - ref).max() <= 1e-6 * max(1.0, np.abs(ref).max())


def _transposed_kernel_outputs(mod) -> int:
    """permute_dims applied to a hand kernel's output (through a channel slice)."""
    from tvm import relax
    value = {b.var: b.value for blk in mod["main"].body.blocks for b in blk.bindings}

    def kernel_output(e):
        call = value.get(e)
        if not isinstance(call, relax.Call):
            return False
        if getattr(call.op, "name", "") == "relax.strided_slice":
            return kernel_output(call.args[0])
        return (getattr(call.op, "name", "") == "relax.call_tir"
                and call.args[0].name_hint.startswith(("fliqs_vnni_", "fliqs_bf16_", "fliqs_fp32_")))
    return sum(1 for v in value.values() if isinstance(v, relax.Call)
               and getattr(v.op, "name", "") == "relax.permute_dims" and kernel_output(v.args[0]))


@needs_bf16
def test_every_conv_on_a_hand_kernel_runs_in_nhwc():
    """Without the depthwise conv every conv is on VNNI or the bf16 kernel: the module runs in
    NHWC between them (``tvm_kernels._nhwc``: one transpose at the input, one at the flatten, none
    around each kernel call), within the contract."""
    from conformance_matrix import LSB_SLACK
    from fliqs_compiler.backends.tvm_lower import lower
    m, g, x, ref = _mixed(depthwise=False)
    low = lower(g, "llvm")
    kernels = {n: e["kernel"] for n, e in low.executed.items()}
    assert kernels == {"stem": "bf16-dpbf16ps", "conv": "bf16-dpbf16ps", "pw": "vnni",
                       "fc": "bf16-dpbf16ps"}
    assert _transposed_kernel_outputs(low.mod) == 0  # per call, each conv output is transposed
    assert _lsb_error(m, ref, low.run([x.numpy()])[0]) <= 1.0 + LSB_SLACK


@needs_bf16
def test_kernel_is_reported_only_when_its_instruction_is_in_the_compiled_code(mixed, monkeypatch):
    """``executed`` reads the compiled code: a kernel whose code lacked the instruction (here: the
    registry entry told to look for another one) is not reported as on the kernel."""
    from dataclasses import replace
    from fliqs_compiler.backends import tvm_kernels as K
    from fliqs_compiler.backends.tvm_lower import lower
    blind = replace(K.BF16_KERNEL, instruction="vdpbf16ps_absent")
    monkeypatch.setitem(K.INSTRUCTION_IR, "vdpbf16ps_absent", r"@llvm\.x86\.absent\.")
    monkeypatch.setattr(K, "KERNELS", tuple(blind if k is K.BF16_KERNEL else k for k in K.KERNELS))
    m, g, x, ref = mixed
    e = lower(g, "llvm").executed["stem"]
    assert e["kernel"] == "fp32" and e["vdpbf16ps_absent"] == 0 and "fallback" in e, e
