"""TVM lowering, per format: packed / low-precision weight storage decodes exactly, run-time
activation quantizers are bit-exact (with and without fusion), bf16 compute, MX refusal."""

import numpy as np
import pytest
import torch
from torch import nn

from fliqs_compiler.backends.tvm_lower import lower
from fliqs_compiler.base.errors import FliqsError
from fliqs_compiler.ir.graph import Graph, InputSpec, LayerInfo
from fliqs_compiler.numerics.quantizers import FormatQuantizer
from tvm_models import ActOnly, ConvLinear, act_quantizer, example_input, graph_of

pytestmark = pytest.mark.tvm


WEIGHT_STORAGE = {
    "int4": "int4 packed 2/byte (uint8) + LUT unpack",
    "uint4": "uint4 packed 2/byte (uint8) + LUT unpack",  # nibbles 8..15 are not negative
    "uint8": "fp32 (dequantized uint8)",  # levels 128..255 do not fit int8 codes
    "fp4_e2m1": "fp4_e2m1 packed 2/byte (uint8) + LUT unpack",
    "fp8_e4m3": "float8_e4m3fn",
    "fp8_e5m2": "float8_e5m2",
    "bf16": "bfloat16",
}


class WeightBranches(nn.Module):
    """One conv + one linear per weight format, float activations, all from the same input."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.branches = nn.ModuleList(ConvLinear(fw, "float", cin=5, cout=7, nout=9)
                                      for fw in WEIGHT_STORAGE)

    def forward(self, x):
        return tuple(b(x) for b in self.branches)


def test_low_bit_weights_decode_exactly():
    """Float activations, quantized weights: the only error left is fp32 accumulation order, so
    any decode error (a wrong nibble, a wrong LUT entry) would show up far above 2e-6. Odd sizes
    leave the last packed byte half-filled."""
    m = WeightBranches().eval()
    gm = torch.fx.symbolic_trace(m)
    g = Graph(gm, [InputSpec("x", (1, 5, 8, 8))])
    ops = [n for n in gm.graph.nodes if n.op == "call_function"
           and getattr(n.target, "__name__", "") in ("conv2d", "linear")]
    for fw, pair in zip(WEIGHT_STORAGE, zip(ops[0::2], ops[1::2])):
        for kind, node in zip(("conv", "fc"), pair):
            g.layers[f"{fw}.{kind}"] = LayerInfo(f"{fw}.{kind}", kind, node.name)
    low = lower(g, "llvm", vnni=False)
    x = example_input((1, 5, 8, 8))
    for fw, ref, out in zip(WEIGHT_STORAGE, m(x), low.run([x.numpy()])):
        ref = ref.detach().numpy()
        assert np.abs(out - ref).max() <= 2e-6 * max(1.0, np.abs(ref).max()), fw
        for kind in ("conv", "fc"):
            e = low.executed[f"{fw}.{kind}"]
            assert e["weight_storage"] == WEIGHT_STORAGE[fw] and e["weight"] == fw, e
    assert '"uint8"' in low.mod.script()  # the packed nibbles are uint8 constants


ACT_CASES = [("int8", 0.05), ("uint8", 0.02), ("int4", 0.3), ("fp8_e4m3", 0.01),
             ("fp8_e5m2", 0.001), ("fp4_e2m1", 0.5), ("fp6_e3m2", 0.1), ("bf16", 1.0),
             ("fp16", 1.0)]


class ActBranches(nn.Module):
    def __init__(self):
        super().__init__()
        self.qs = nn.ModuleList(act_quantizer(fmt, scale) for fmt, scale in ACT_CASES)

    def forward(self, x):
        return tuple(q(x * (i + 1)) for i, q in enumerate(self.qs))


@pytest.mark.parametrize("fuse", [False, True])
def test_activation_quantizers_bit_exact(fuse):
    """Run-time quantizers equal fliqs fake_quant bit for bit, subnormals, ties and saturation
    included, also with operator fusion (what the tuning pipeline does): TVM's own f32->fp8 cast
    is wrong below the smallest normal and fused fp8/bf16 cast pairs are dropped; we use neither."""
    m = ActBranches().eval()
    g = Graph(torch.fx.symbolic_trace(m), [InputSpec("x", (4096,))])
    low = lower(g, "llvm", fuse=fuse)
    gen = torch.Generator().manual_seed(0)
    mag = torch.tensor([1e-4, 1e-2, 1.0, 100.0, 1e5])[torch.randint(0, 5, (4096,), generator=gen)]
    x = torch.randn(4096, generator=gen) * mag
    x[:6] = torch.tensor([0.5, 1.5, 2.5, -2.5, 0.0, -0.0]) * 0.05  # exact int8 ties
    for (fmt, _), ref, out in zip(ACT_CASES, m(x), low.run([x.numpy()])):
        np.testing.assert_array_equal(out, ref.numpy(), err_msg=fmt)


def test_bf16_compute_accumulates_in_fp32():
    m = ConvLinear("bf16", "bf16")
    g = graph_of(m)
    low = lower(g, "llvm")
    x = example_input()
    ref = m(x).detach().numpy()
    assert np.abs(low.run([x.numpy()])[0] - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())
    assert low.executed["features.conv"]["dtype"] == "bf16xbf16->float32"


def test_mx_activation_is_a_clear_error():
    m = ActOnly("float", 1.0)
    m.q = FormatQuantizer("mxfp8_e4m3", torch.ones(1), block_axis=0)
    g = Graph(torch.fx.symbolic_trace(m.eval()), [InputSpec("x", (64,))])
    with pytest.raises(FliqsError, match="mxfp8_e4m3"):
        lower(g, "llvm")


@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3"])
def test_per_channel_runtime_quantizer_broadcasts_on_its_axis(fmt):
    m = ActOnly("float", 1.0)
    m.q = FormatQuantizer(fmt, torch.tensor([0.01, 0.1, 1.0]), axis=1)
    g = Graph(torch.fx.symbolic_trace(m.eval()), [InputSpec("x", (2, 3, 5))])
    x = example_input((2, 3, 5)) * 10
    np.testing.assert_array_equal(lower(g, "llvm").run([x.numpy()])[0], m(x).numpy())


class _TiesModule(nn.Module):
    """fake_quant with scales as buffers, fed values exactly halfway between grid points."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale_half", torch.tensor(0.5))
        self.register_buffer("scale_one", torch.tensor(1.0))

    def forward(self, x):
        import fliqs_compiler as fq
        return fq.fake_quant(x, "int8", self.scale_half) + fq.fake_quant(x * 3, "int4", self.scale_one)


def test_torch_module_lowers_directly_and_rounds_ties_to_even():
    """A graph from the torch frontend lowers without passes, and TVM rounds ties like torch."""
    import fliqs_compiler as fq
    x = torch.tensor([[0.25, 0.75, 1.25, -0.25, -1.25, 1.75, 0.5, 2.5]])
    graph = fq.load(_TiesModule(), (x,))
    got = np.asarray(lower(graph, "llvm").run([x])[0])
    np.testing.assert_array_equal(got, graph(x).numpy())
    np.testing.assert_array_equal(got, [[1, 3, 5, -1, -5, 7, 2.5, 9.5]])
