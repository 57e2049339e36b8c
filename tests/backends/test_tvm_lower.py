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
    assert low.instruction_counts["vpdpbusd"] >= 2


@pytest.mark.skipif(not HOST_VNNI, reason="host CPU has no AVX512-VNNI")
def test_kernel_report_from_the_ir_matches_the_machine_code():
    """``executed`` / ``instruction_counts`` read each kernel's instruction from the optimized
    LLVM IR (the assembly costs seconds to print): every function the IR says calls the VNNI
    dot product (int8 model) or vector FMAs (float model: the fp32 kernel) has that instruction
    in its machine code, and for VNNI no other function has it."""
    from asm import asm_functions, kernel_asm
    from fliqs_compiler.backends import tvm_lower as TL
    for fmt, instr in (("int8", "vpdpbusd"), ("float", "vfmadd")):
        low = lower(graph_of(ConvLinear(fmt, fmt)), "llvm")
        mod = low.executable.mod.imports[0]
        fi, fa = TL.ir_functions(mod.inspect_source("ll")), asm_functions(mod.inspect_source("asm"))
        syms = {n[:-len("_compute_")] for n in fi if n.endswith("_compute_")}
        on = {s for s in syms if TL.instruction_calls(TL.kernel_ir(fi, s), instr)}
        assert on and all(instr in kernel_asm(fa, s) for s in on), (fmt, on)
        if instr == "vpdpbusd":
            assert on == {s for s in syms if instr in kernel_asm(fa, s)}
            assert low.instruction_counts[instr] == sum(
                TL.instruction_calls(TL.kernel_ir(fi, s), instr) for s in on)
        assert any(e.get(instr, 0) > 0 for e in low.executed.values()), low.executed


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


class ResidualInt8(nn.Module):
    """A ResNet block in miniature, every conv int8: stem (3 channels, stride 2, 20 outputs: both
    padded for VNNI) → ReLU → max-pool (3, stride 2) → u8 quantizer → 3×3 conv + residual add →
    ReLU → u8 quantizer → 1×1 conv. ``groups=2`` makes the middle conv one VNNI does not take;
    ``stem="float"`` keeps the stem float (``fliqs compile`` keeps the first layer float by default)."""

    def __init__(self, groups=1, stem="int8"):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(3, 20, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(20, 20, 3, padding=1, groups=groups)
        self.c3 = nn.Conv2d(20, 16, 1)
        self.wq = nn.ModuleList(weight_quantizer(f, c.weight) for f, c in zip((stem, "int8", "int8"),
                                                                              (self.c1, self.c2, self.c3)))
        self.aq = nn.ModuleList([act_quantizer(stem, 0.03), act_quantizer("uint8", 0.02),
                                 act_quantizer("uint8", 0.03)])
        self.groups = groups

    def forward(self, x):
        c1, c2, c3 = self.c1, self.c2, self.c3
        y = torch.relu(nn.functional.conv2d(self.aq[0](x), self.wq[0](c1.weight), c1.bias, 2, 1))
        y = self.aq[1](nn.functional.max_pool2d(y, 3, 2, 1))
        z = nn.functional.conv2d(y, self.wq[1](c2.weight), c2.bias, 1, 1, 1, self.groups)
        z = self.aq[2](torch.relu(z + y))
        return nn.functional.conv2d(z, self.wq[2](c3.weight), c3.bias)


def _residual_graph(groups, stem="int8"):
    gm = torch.fx.symbolic_trace(ResidualInt8(groups, stem).eval())
    g = Graph(gm, [InputSpec("x", (1, 3, 17, 17))], name="residual")
    convs = [n for n in gm.graph.nodes if getattr(n.target, "__name__", "") == "conv2d"]
    for i, node in enumerate(convs):
        g.layers[f"c{i + 1}"] = LayerInfo(f"c{i + 1}", "conv2d", node.name)
    return g


def _activation_transposes(mod) -> int:
    """permute_dims of activations (more than one non-unit axis; a [1, C, 1, 1] scale is not)."""
    return sum(sum(int(d) > 1 for d in c.ty.shape) > 1 for c in K.calls(mod["main"], "relax.permute_dims"))


@pytest.mark.skipif(not HOST_VNNI, reason="host CPU has no AVX512-VNNI")
def test_vnni_convs_run_in_one_nhwc_layout_bit_exact():
    """Every conv on VNNI: the graph runs in NHWC from input to output (one transpose each end,
    none between convs, pooling / residual add / requantize in NHWC) and gives the plain int8
    NCHW build's output bit for bit, on in-range and far out-of-range inputs."""
    g = _residual_graph(1)
    fast, plain = lower(g, "llvm", None), lower(g, "llvm", None, vnni=False)
    assert all(fast.executed[n]["kernel"] == "vnni" for n in ("c1", "c2", "c3"))
    assert _activation_transposes(fast.mod) == 2
    assert _activation_transposes(plain.mod) == 0 and K.calls(plain.mod["main"], "relax.nn.conv2d")
    for x in (example_input((1, 3, 17, 17)), 20 * example_input((1, 3, 17, 17), seed=2)):
        out = fast.run([x.numpy()])[0]
        np.testing.assert_array_equal(out, plain.run([x.numpy()])[0])
        ref = ResidualInt8(1).eval()(x).detach().numpy()
        assert np.abs(out - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())


@pytest.mark.skipif(not HOST_VNNI, reason="host CPU has no AVX512-VNNI")
@pytest.mark.parametrize("fp32_kernel", [True, False])
def test_a_float_image_stem_does_not_keep_the_graph_out_of_nhwc(fp32_kernel, monkeypatch):
    """A float stem (3 input channels) before VNNI convs — ``fliqs compile``'s default keeps the
    first layer float — runs in NHWC too (ResNet-18: 7.8 ms vs 10.5 ms with transposes around
    every VNNI conv): on the fp32 kernel, or without it (``tvm_layout.float_stem``) as TVM's
    own conv; one transpose at each end, the result equal to the torch graph to a float rounding
    of the stem (which may move one code of the next quantizer)."""
    if not fp32_kernel:
        monkeypatch.setattr(K, "KERNELS", tuple(k for k in K.KERNELS if k is not K.FP32_KERNEL))
    g = _residual_graph(1, stem="float")
    low = lower(g, "llvm", None)
    assert low.executed["c2"]["kernel"] == "vnni"
    assert low.executed["c1"]["kernel"] == ("fp32-fma" if fp32_kernel else "fp32")
    convs = K.calls(low.mod["main"], "relax.nn.conv2d")
    assert len(convs) == (0 if fp32_kernel else 1)
    assert all(str(conv.attrs.data_layout) == "NHWC" for conv in convs)
    assert _activation_transposes(low.mod) == 2
    m = ResidualInt8(1, "float").eval()
    for x in (example_input((1, 3, 17, 17)), 20 * example_input((1, 3, 17, 17), seed=2)):
        ref = m(x).detach().numpy()
        err = np.abs(low.run([x.numpy()])[0] - ref)
        assert np.mean(err <= 1e-5 * max(1.0, np.abs(ref).max())) >= 0.95, err.max()


class InvertedInt8(nn.Module):
    """MobileNetV2's block in miniature, every conv int8: 1×1 expand (VNNI) → ReLU6 → u8 → 3×3
    depthwise (24 groups: TVM's own conv) → ReLU6 → u8 → 1×1 project (VNNI) + the input."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.expand, self.dw, self.project = nn.Conv2d(8, 24, 1), nn.Conv2d(24, 24, 3, padding=1, groups=24), nn.Conv2d(24, 8, 1)
        convs = (self.expand, self.dw, self.project)
        self.wq = nn.ModuleList(weight_quantizer("int8", c.weight) for c in convs)
        self.aq = nn.ModuleList([act_quantizer("int8", 0.03), act_quantizer("uint8", 0.03),
                                 act_quantizer("uint8", 0.03)])

    def forward(self, x):
        y = nn.functional.relu6(nn.functional.conv2d(self.aq[0](x), self.wq[0](self.expand.weight), self.expand.bias))
        y = nn.functional.conv2d(self.aq[1](y), self.wq[1](self.dw.weight), self.dw.bias, 1, 1, 1, 24)
        y = nn.functional.relu6(y)
        return nn.functional.conv2d(self.aq[2](y), self.wq[2](self.project.weight), self.project.bias) + x


@pytest.mark.skipif(not HOST_VNNI, reason="host CPU has no AVX512-VNNI")
def test_depthwise_convs_and_relu6_do_not_keep_the_graph_out_of_nhwc():
    """A depthwise conv (``tvm_layout.depthwise``: TVM's own conv, vectorized along channels in
    NHWC) between VNNI 1×1 convs, with ReLU6 (``clip``, which TVM's ConvertLayout cannot carry a
    layout through: rewritten as maximum / minimum): the graph runs in NHWC — transposes only at
    its ends (the input read twice: quantized for the first conv, raw for the residual add) —
    bit-exact against the plain NCHW int8 build on in-range and far out-of-range inputs."""
    gm = torch.fx.symbolic_trace(InvertedInt8().eval())
    g = Graph(gm, [InputSpec("x", (1, 8, 9, 9))], name="inverted")
    for i, node in enumerate(n for n in gm.graph.nodes if getattr(n.target, "__name__", "") == "conv2d"):
        g.layers[("expand", "dw", "project")[i]] = LayerInfo(("expand", "dw", "project")[i], "conv2d", node.name)
    fast, plain = lower(g, "llvm", None), lower(g, "llvm", None, vnni=False)
    assert fast.executed["expand"]["kernel"] == fast.executed["project"]["kernel"] == "vnni"
    (conv,) = K.calls(fast.mod["main"], "relax.nn.conv2d")
    assert str(conv.attrs.data_layout) == "NHWC" and int(conv.attrs.groups) == 24
    assert not K.calls(fast.mod["main"], "relax.clip")
    assert _activation_transposes(fast.mod) == 3
    for x in (example_input((1, 8, 9, 9)), 30 * example_input((1, 8, 9, 9), seed=2)):
        np.testing.assert_array_equal(fast.run([x.numpy()])[0], plain.run([x.numpy()])[0])


@pytest.mark.skipif(not HOST_VNNI, reason="host CPU has no AVX512-VNNI")
def test_a_conv_vnni_does_not_take_keeps_the_graph_in_nchw():
    """A grouped conv (plain int8 loops) among VNNI convs: no NHWC conversion (TVM's own NHWC
    convs are slower), the VNNI convs transpose at their boundaries as before; still exact."""
    g = _residual_graph(2)
    low = lower(g, "llvm", None)
    assert low.executed["c2"]["kernel"] == "int8" and low.executed["c1"]["kernel"] == "vnni"
    (conv,) = K.calls(low.mod["main"], "relax.nn.conv2d")
    assert str(conv.attrs.data_layout) == "NCHW"
    assert _activation_transposes(low.mod) == 4
    x = example_input((1, 3, 17, 17))
    ref = ResidualInt8(2).eval()(x).detach().numpy()
    assert np.abs(low.run([x.numpy()])[0] - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())
