"""TVM lowering: real integer compute, packed low-bit weights, exact activation quantizers,
the exported library, and the realized precision reported in ``executed``."""

import numpy as np
import pytest
import torch
from torch import nn

from fliqs_compiler.backends import tvm_kernels as K
from fliqs_compiler.backends.targets import parse_target
from fliqs_compiler.backends.tvm_lower import lower
from fliqs_compiler.base.errors import FliqsError
from fliqs_compiler.ir.graph import Graph, InputSpec, LayerInfo
from tvm_models import (ActOnly, ConvLinear, act_quantizer, example_input, graph_of,
                        weight_quantizer)

pytestmark = pytest.mark.tvm
HOST_VNNI = K.has_vnni(parse_target("llvm").tvm_target)


def test_int8_conv_linear_integer_compute_matches_torch(tmp_path):
    m = ConvLinear("int8", "int8")
    g = graph_of(m)
    low = lower(g, "llvm", tmp_path, vnni=False)
    x = example_input()
    ref = m(x).detach().numpy()
    out = low.run([x.numpy()])[0]
    # int32 accumulation + one fp32 rescale vs torch's fp32 conv of dequantized values
    assert np.abs(out - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())
    conv, fc = low.executed["features.conv"], low.executed["head.fc"]
    assert conv["dtype"] == "int8xint8->int32" and conv["kernel"] == "int8"
    assert fc["dtype"] == "uint8xint8->int32"  # after ReLU: unsigned activation
    assert conv["weight_storage"] == "int8"
    # the lowered Relax really contains integer conv / matmul with int32 accumulation
    text = low.mod.script()
    assert 'out_dtype="int32"' in text and '"uint8"' in text and '"int8"' in text


def test_model_so_loads_in_fresh_vm_and_takes_only_inputs(tmp_path):
    import tvm
    from tvm import relax
    m = ConvLinear("int8", "int8")
    lower(graph_of(m), "llvm", tmp_path)
    path = tmp_path / "tvm" / "model.so"
    assert path.exists() and (tmp_path / "tvm" / "model.json").exists()
    assert not list((tmp_path / "tvm").glob("*.tmp*"))
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(path)), tvm.cpu())
    x = example_input()
    out = vm["main"](tvm.runtime.tensor(x.numpy(), tvm.cpu())).numpy()
    assert out.shape == (1, 16)
    assert np.abs(out - m(x).detach().numpy()).max() < 1e-4
    with pytest.raises(Exception):
        vm["main"](tvm.runtime.tensor(x.numpy(), tvm.cpu()), tvm.runtime.tensor(x.numpy(), tvm.cpu()))


@pytest.mark.skipif(not HOST_VNNI, reason="host CPU has no AVX512-VNNI")
def test_vnni_kernel_realized_and_exact(tmp_path):
    m = ConvLinear("int8", "int8")
    g = graph_of(m)
    low = lower(g, "llvm", None, vnni=True)
    x = example_input()
    ref = m(x).detach().numpy()
    assert np.abs(low.run([x.numpy()])[0] - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())
    for name in ("features.conv", "head.fc"):
        e = low.executed[name]
        assert e["kernel"] == "vnni" and e["vpdpbusd"] > 0, e
    assert low.executed["features.conv"]["dtype"] == "int8xint8->int32"  # s8 shifted to u8
    assert low.asm_stats["vpdpbusd"] >= 2


class TokenLinear(nn.Module):
    """A transformer's Linear on [B, T, C] tokens, int8 weight per channel, int8/uint8 input;
    N = 20 is not a multiple of 16 (the kernel pads and slices)."""

    def __init__(self, fa):
        super().__init__()
        torch.manual_seed(3)
        self.fc = nn.Linear(12, 20)
        self.wq, self.aq = weight_quantizer("int8", self.fc.weight), act_quantizer(fa, 0.02)

    def forward(self, x):
        return nn.functional.linear(self.aq(x), self.wq(self.fc.weight), self.fc.bias)


@pytest.mark.skipif(not HOST_VNNI, reason="host CPU has no AVX512-VNNI")
@pytest.mark.parametrize("fa", ["int8", "uint8"])
def test_vnni_kernel_for_linear_on_tokens(fa):
    """[1, 6, 12] tokens: the leading dims fold into the GEMM's rows, the result is reshaped back;
    exact against the plain int8 build (both sum exactly in int32) and torch."""
    m = TokenLinear(fa).eval()
    gm = torch.fx.symbolic_trace(m)
    g = Graph(gm, [InputSpec("x", (1, 6, 12))], name="tokens")
    node = next(n for n in gm.graph.nodes if getattr(n.target, "__name__", "") == "linear")
    g.layers["tok.fc"] = LayerInfo("tok.fc", "linear", node.name)
    x = torch.randn(1, 6, 12, generator=torch.Generator().manual_seed(2)).abs()
    fast, plain = lower(g, "llvm", None, vnni=True), lower(g, "llvm", None, vnni=False)
    assert fast.executed["tok.fc"]["kernel"] == "vnni" and plain.executed["tok.fc"]["kernel"] == "int8"
    out = fast.run([x.numpy()])[0]
    assert out.shape == (1, 6, 20)
    np.testing.assert_array_equal(out, plain.run([x.numpy()])[0])
    ref = m(x).detach().numpy()
    assert np.abs(out - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())


@pytest.mark.skipif(not HOST_VNNI, reason="host CPU has no AVX512-VNNI")
def test_vnni_falls_back_for_grouped_conv():
    class G(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(16, 2, 3, 3) * 0.1)
            self.wq, self.aq = weight_quantizer("int8", self.w), act_quantizer("int8")

        def forward(self, x):
            return nn.functional.conv2d(self.aq(x), self.wq(self.w), None, 1, 1, 1, 2)

    m = G().eval()
    g = Graph(torch.fx.symbolic_trace(m), [InputSpec("x", (1, 4, 6, 6))])
    low = lower(g, "llvm")
    (e,) = low.executed.values()
    assert e["kernel"] == "int8" and "fallback" in e and e["dtype"] == "int8xint8->int32"
    x = example_input((1, 4, 6, 6))
    assert np.abs(low.run([x.numpy()])[0] - m(x).detach().numpy()).max() < 1e-5


def test_non_tvm_targets_refused():
    g = Graph(torch.fx.symbolic_trace(ActOnly("int8", 0.1).eval()), [InputSpec("x", (8,))])
    with pytest.raises(FliqsError, match="not a TVM target"):
        lower(g, "ort")
    with pytest.raises(FliqsError, match="not known yet"):  # an unresolved device target
        lower(g, "rpc://h:9190/k")


class ConvRequant(nn.Module):
    """int8 conv whose output is quantized again (int8): integer accumulation must reproduce the
    fake-quant graph's codes exactly."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c = nn.Conv2d(16, 32, 3, padding=1)
        self.aq, self.wq, self.oq = act_quantizer("int8", 0.03), weight_quantizer("int8", self.c.weight), act_quantizer("int8", 0.02)

    def forward(self, x):
        return self.oq(nn.functional.conv2d(self.aq(x), self.wq(self.c.weight), self.c.bias, padding=1))


@pytest.mark.parametrize("vnni", [False, pytest.param(True, marks=pytest.mark.skipif(
    not HOST_VNNI, reason="no AVX512-VNNI"))])
def test_int8_requantized_output_bit_exact_vs_torch_and_close_to_ort(tmp_path, vnni):
    m = ConvRequant().eval()
    g = Graph(torch.fx.symbolic_trace(m), [InputSpec("x", (1, 16, 14, 14))], name="requant")
    x = example_input((1, 16, 14, 14))
    out = lower(g, "llvm", vnni=vnni).run([x.numpy()])[0]
    np.testing.assert_array_equal(out, m(x).detach().numpy())
    try:
        from fliqs_compiler.backends.onnx_export import export_qdq
        from fliqs_compiler.backends.ort_backend import run_onnx
    except ImportError:
        pytest.skip("ONNX export backend not available")
    ort_out = np.asarray(run_onnx(export_qdq(g, tmp_path / "m.onnx"), [x.numpy()])[0])
    # onnxruntime's fused QLinearConv rounds a handful of ties differently (measured: 3 / 6272)
    diff = np.abs(ort_out - out)
    assert diff.max() <= 0.02 + 1e-6 and (diff > 0).mean() < 0.01


def test_pipeline_graph_lowers_with_public_layer_names(tmp_path):
    """A graph from the real passes (fq.load → prepare → materialize), mixed formats: every
    quantized layer appears in ``executed`` under its public name with the realized dtype."""
    import fliqs_compiler as fq
    from fliqs_compiler import passes
    from examples.toy_models import TinyCNN
    torch.manual_seed(0)
    x = example_input((1, 1, 8, 8))
    sg = passes.prepare(fq.load(TinyCNN().eval(), (x,)), passes.PrepareOptions(
        formats=["int8", "int4", "fp8_e4m3"], keep_float_first=False, keep_float_last=False,
        scale_mode="calibrated"))
    names = list(sg.layers)
    mix = ["int8", "int4", "fp8_e4m3"]
    formats = {n: {"weight": mix[i % 3], "activation": "int8" if i % 3 < 2 else "fp8_e4m3"}
               for i, n in enumerate(names)}
    with torch.no_grad():
        sg.space.apply(sg.gm, sg.space.choice_of(formats))
        sg(x)
    mg = passes.materialize(sg, formats)
    low = lower(mg, "llvm", tmp_path)
    assert set(low.executed) == set(names)
    for i, n in enumerate(names):
        e = low.executed[n]
        assert e["weight"] == mix[i % 3]
        assert e["dtype"].endswith("->int32") == (i % 3 < 2), (n, e)
    ref = mg(x).detach().numpy()
    out = low.run([x.numpy()])[0]
    # a 1-ulp difference before a later quantizer may flip one of its rounding steps
    assert np.abs(out - ref).max() <= 0.05 * max(1.0, np.abs(ref).max())


class SequenceLinear(nn.Module):
    """int8 linear with per-output-channel weight scales on [B, T, C] inputs (OCR / transformer
    heads): the rescale's channels are the LAST axis, whatever T is."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(16, 7)
        self.aq, self.wq = act_quantizer("int8", 0.0123457), weight_quantizer("int8", self.fc.weight)

    def forward(self, x0, x1, x2):
        return tuple(nn.functional.linear(self.aq(x), self.wq(self.fc.weight), self.fc.bias)
                     for x in (x0, x1, x2))


def test_linear_on_sequences_rescales_the_channel_axis():
    # T = 5: the old axis-1 scale [1, 7, 1] did not broadcast (compile error); T = 7 = N: it
    # did, scaling time steps by channel scales; T = 1: it broadcast to a [B, 7, 7] output
    m = SequenceLinear().eval()
    shapes = [(2, 5, 16), (2, 7, 16), (2, 1, 16)]
    g = Graph(torch.fx.symbolic_trace(m), [InputSpec(f"x{i}", s) for i, s in enumerate(shapes)])
    xs = [example_input(s, seed=i) for i, s in enumerate(shapes)]
    low = lower(g, "llvm")
    for ref, out in zip(m(*xs), low.run([x.numpy() for x in xs])):
        assert out.shape == ref.shape
        assert np.abs(out - ref.detach().numpy()).max() <= 1e-5
