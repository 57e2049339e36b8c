"""Epilogues fused into the hand conv and dense kernels' write-back (``tvm_epilogue``): the int32
accumulators never become a tensor, the results are identical to the unfused build, and a kernel
whose group cannot be inlined keeps its epilogue separate."""
import numpy as np
import pytest
import torch
from torch import nn

from fliqs_compiler.backends import tvm_epilogue as E
from fliqs_compiler.backends import tvm_kernels as K
from fliqs_compiler.backends import tvm_lower as TL
from fliqs_compiler.backends.targets import parse_target
from fliqs_compiler.ir.graph import Graph, InputSpec, LayerInfo
from test_tvm_lower import _residual_graph
from tvm_models import act_quantizer, example_input, weight_quantizer

pytestmark = pytest.mark.tvm
needs_vnni = pytest.mark.skipif(not K.has_vnni(parse_target("llvm").tvm_target), reason="no AVX512-VNNI")


def _plain(mod):
    from tvm import relax, transform
    return transform.Sequential([relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                                 relax.transform.FuseOps(), relax.transform.FuseTIR()])(mod)


def _kernel_calls(mod) -> list:
    """(callee name, output dtype, callee has every block a kernel block) of each call_tir in
    ``main`` whose callee holds a hand conv kernel's write-back."""
    import tvm
    from tvm import relax, s_tir
    out = []

    def visit(e):
        if isinstance(e, relax.Call) and getattr(e.op, "name", None) == "relax.call_tir":
            func = mod[e.args[0]]
            if isinstance(func, tvm.tirx.PrimFunc) and E._kernel_ids(func):
                sch = s_tir.Schedule(func)
                only_kernel = all(E._annotation(sch, b, E.KERNEL_BLOCK) for b in E._blocks(sch))
                out.append((e.args[0].name_hint, str(e.ty.dtype), only_kernel))
    relax.analysis.post_order_visit(mod["main"].body, visit)
    return out


@needs_vnni
@pytest.mark.parametrize("groups", [1, 2])
def test_conv_epilogues_run_in_the_kernel_write_back_and_match_the_unfused_build(tmp_path, groups):
    """The miniature ResNet block: padded channels (a slice), the residual add, ReLU and the next
    quantizer all computed in the write-back — no int32 accumulator tensor between functions —
    in NHWC (groups 1); in NCHW around a grouped conv (groups 2) the part before the transpose.
    Bit-identical to the unfused build on inputs far outside the quantizers' range."""
    import tvm
    from tvm import relax
    low = TL.lower(_residual_graph(groups), "llvm", tmp_path)
    fused = TL.fuse_pipeline()(low.mod)
    calls = _kernel_calls(fused)
    merged = [c for c in calls if c[0].startswith("fused_")]
    assert all(only_kernel for _, _, only_kernel in calls), calls
    if groups == 1:  # NHWC: every kernel with its whole epilogue, up to the next quantizer
        assert len(merged) == 3 and all(dt != "int32" for _, dt, _ in merged), calls
    else:  # NCHW: FuseOps ends a group at a layout transpose; the grouped conv is plain int8
        assert len(calls) == 2 and merged, calls
    x = example_input((1, 3, 17, 17)) * 8
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(tmp_path / "tvm" / "model.so")), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x.numpy(), tvm.cpu())).numpy()
    # the reference: the same module with the plain pipeline (kernels opaque), scheduled alike
    plain = relax.VirtualMachine(_compile_plain(low.mod), tvm.cpu())
    np.testing.assert_array_equal(out, plain["main"](tvm.runtime.tensor(x.numpy(), tvm.cpu())).numpy())


def _compile_plain(mod):
    from fliqs_compiler.backends import tvm_schedules
    tgt = parse_target("llvm").tvm()
    with tgt:
        plain = _plain(mod)
    scheduled, _ = tvm_schedules.schedule(plain, tgt)
    ex, _ = tvm_schedules.build(scheduled, plain, tgt)
    return ex


@needs_vnni
def test_fp32_kernel_takes_its_epilogue_too():
    """A float stem on the fp32 FMA kernel (``tvm_fp32``): bias, ReLU and the quantizer fuse in."""
    low = TL.lower(_residual_graph(1, stem="float"), "llvm", None)
    calls = _kernel_calls(TL.fuse_pipeline()(low.mod))
    assert len(calls) == 3 and all(only for _, _, only in calls), calls
    assert any(dt == "uint8" for _, dt, _ in calls)  # a conv whose epilogue ends in the u8 quantizer


@needs_vnni
def test_a_group_that_cannot_be_inlined_keeps_its_kernel_opaque(monkeypatch):
    """When a merged group cannot be inlined, its kernel is made opaque and the fusion redone: the
    module then equals the plain pipeline's (each kernel called on its own, int32 out)."""
    low = TL.lower(_residual_graph(1), "llvm", None)
    monkeypatch.setattr(E, "inline_epilogue", lambda func: None)
    calls = _kernel_calls(E.fuse_with_kernels(low.mod))
    assert len(calls) == 3 and all(n.startswith("fliqs_vnni") and dt == "int32" for n, dt, _ in calls), calls


def test_indices_are_not_narrowed_where_int32_would_overflow():
    """A tensor of 2^31 elements or more keeps int64 indices (then no kernel takes an epilogue in
    that module); an ordinary one is narrowed."""
    from tvm import relax

    def legal(shape):
        bb = relax.BlockBuilder()
        x = relax.Var("x", relax.TensorType(shape, "float32"))
        with bb.function("main", [x]):
            with bb.dataflow():
                y = bb.emit_output(relax.op.add(x, x))
            bb.emit_func_output(y)
        return relax.transform.LegalizeOps()(bb.get())
    assert E._narrowed(legal((1, 3, 8, 8))) is not None
    assert E._narrowed(legal((2 ** 16, 2 ** 15 + 1))) is None


class TokenMLP(nn.Module):
    """A transformer MLP on [B, T, 32] tokens: s8 input → Linear(32, 64) → GELU → u8 →
    Linear(64, 32) + residual → s8 → Linear(32, 40) (a head of 40 outputs: computed as 48,
    sliced). Every Linear int8 (the VNNI dense kernel), or the middle one ``middle``: "float"
    (the fp32 FMA kernel) or "fp8_e4m3" (the bf16 kernel)."""

    def __init__(self, middle: str = "int8"):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.head = nn.Linear(32, 64), nn.Linear(64, 32), nn.Linear(32, 40)
        self.wq = nn.ModuleList(weight_quantizer(f, m.weight) for f, m in
                                zip(("int8", middle, "int8"), (self.fc1, self.fc2, self.head)))
        self.aq = nn.ModuleList([act_quantizer("int8", 0.03),
                                 act_quantizer("uint8" if middle == "int8" else middle, 0.02),
                                 act_quantizer("int8", 0.05)])

    def forward(self, x):
        h = nn.functional.gelu(nn.functional.linear(self.aq[0](x), self.wq[0](self.fc1.weight), self.fc1.bias))
        y = nn.functional.linear(self.aq[1](h), self.wq[1](self.fc2.weight), self.fc2.bias) + x
        return nn.functional.linear(self.aq[2](y), self.wq[2](self.head.weight), self.head.bias)


def _token_graph(shape, middle="int8"):
    gm = torch.fx.symbolic_trace(TokenMLP(middle).eval())
    g = Graph(gm, [InputSpec("x", shape)], name="tokens")
    for i, node in enumerate(n for n in gm.graph.nodes if getattr(n.target, "__name__", "") == "linear"):
        g.layers[f"fc{i + 1}"] = LayerInfo(f"fc{i + 1}", "linear", node.name)
    return g


MIDDLE_KERNEL = {"int8": "vnni", "float": "fp32-fma", "fp8_e4m3": "bf16-dpbf16ps"}


@needs_vnni
@pytest.mark.parametrize("shape,middle", [((1, 12, 32), "int8"), ((2, 5, 32), "int8"),
                                          ((2, 5, 32), "float"), ((1, 12, 32), "fp8_e4m3")],
                         ids=["1x12", "2x5", "2x5-fp32", "1x12-bf16"])
def test_dense_epilogues_run_in_the_kernel_write_back_and_match_the_unfused_build(tmp_path, shape, middle):
    """The Linears on [B, T, C] tokens — on the VNNI dense kernel, and the middle one on the fp32
    or bf16 one too — write the layer's leading dims themselves, so their
    epilogues (s8 shift correction, the head's slice of its padded channels, rescale, bias, GELU,
    residual add, next quantizer) fuse into the write-back: no int32 tensor between functions.
    Bit-identical to the unfused build, on inputs far outside the quantizers' range; rows of 5
    tokens (a tile of 1 row)."""
    import tvm
    from tvm import relax
    if middle == "fp8_e4m3" and not parse_target("llvm").caps.has("avx512bf16"):
        pytest.skip("no AVX512-BF16")
    low = TL.lower(_token_graph(shape, middle), "llvm", tmp_path)
    kernels = [low.executed[f"fc{i}"]["kernel"] for i in (1, 2, 3)]
    assert kernels == ["vnni", MIDDLE_KERNEL[middle], "vnni"], low.executed
    calls = _kernel_calls(TL.fuse_pipeline()(low.mod))
    assert len(calls) == 3 and all(only for _, _, only in calls), calls
    assert all(name.startswith("fused_") and dt != "int32" for name, dt, _ in calls), calls
    x = example_input(shape) * 20
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(tmp_path / "tvm" / "model.so")), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x.numpy(), tvm.cpu())).numpy()
    plain = relax.VirtualMachine(_compile_plain(low.mod), tvm.cpu())
    np.testing.assert_array_equal(out, plain["main"](tvm.runtime.tensor(x.numpy(), tvm.cpu())).numpy())
    ref = TokenMLP(middle).eval()(x).detach().numpy()
    assert np.abs(out - ref).max() <= 0.05 * np.abs(ref).max()  # the fake-quant graph, to a few codes
