"""int4 / int2 weights packed 2 / 4 per byte and unpacked inside the VNNI kernels: the packing
layout, the storage rule, exact kernels on odd shapes, and the lowered artifact that keeps them
low-bit."""
import numpy as np
import pytest
import torch
from torch import nn

from fliqs_compiler.backends import tvm_kernels as K
from fliqs_compiler.backends import tvm_packed_weights as P
from fliqs_compiler.backends.targets import parse_target
from fliqs_compiler.backends.tvm_lower import lower
from fliqs_compiler.ir.graph import Graph, InputSpec, LayerInfo
from kernel_runs import build, conv_ref_nhwc, run
from tvm_models import act_quantizer, example_input, weight_quantizer

pytestmark = pytest.mark.tvm
TARGET = parse_target("llvm")
needs_vnni = pytest.mark.skipif(not K.has_vnni(TARGET.tvm_target), reason="no AVX512-VNNI")


def _codes(rng, bits, shape):
    h = 1 << (bits - 1)
    return rng.integers(-h, h, shape).astype(np.int8)


@pytest.mark.parametrize("bits", [4, 2])
def test_pack_blocks_puts_each_block_and_k_group_in_its_field(bits):
    """Field b + B·j of byte [l, c] in packed vector (i, r) holds output channel 16(B·i + b) + l,
    input channel 4(S·r + j) + c, two's complement; half the bytes (int4) or a quarter (int2)."""
    p = P.PACKINGS[bits]
    n, k = p.lanes * 2, p.kwidth * 3
    w = _codes(np.random.default_rng(0), bits, (n, k))
    blocks = K.pack_dense_weight(w)  # [N/16, K/4, 16, 4]
    packed = P.pack_blocks(blocks, bits)
    assert packed.dtype == np.uint8 and packed.shape == (2, 3, 16, 4)
    assert packed.nbytes * 8 // bits == blocks.nbytes
    for o, c in [(0, 0), (17, 5), (n - 1, k - 1), (p.lanes + 3, p.kwidth + 2), (20, 6)]:
        byte = int(packed[o // p.lanes, c // p.kwidth, o % 16, c % 4])
        field = (byte >> (bits * p.field(o % p.lanes, c % p.kwidth))) & ((1 << bits) - 1)
        assert field - (1 << bits) * (field >> (bits - 1)) == w[o, c], (o, c)
    assert P.pack_blocks(blocks, 8) is blocks


def test_storage_bits_is_the_narrowest_that_holds_the_codes_without_much_extra_padding():
    rng = np.random.default_rng(0)
    assert P.storage_bits(_codes(rng, 2, (64, 9)), 64, 16) == 2
    assert P.storage_bits(np.array([-8, 7]), 64, 16) == 4 and P.storage_bits(np.array([-9]), 64, 16) == 8
    assert P.storage_bits(np.array([8]), 64, 16) == 8  # +8 is not an int4 code
    # int2 codes: 20 output channels pad to 32 in a 32-lane vector as in int8's 16-lane blocks;
    # 12 input channels pad to 16 in int2's 8-channel k-groups (int8: 12): int4
    assert P.storage_bits(_codes(rng, 2, (20, 8)), 20, 8) == 2
    assert P.storage_bits(_codes(rng, 2, (32, 12)), 32, 12) == 4
    assert P.storage_bits(_codes(rng, 2, (16, 8)), 16, 8) == 8  # 16 outputs: int8's one block
    assert P.storage_bits(_codes(rng, 4, (16, 9)), 16, 9) == 8
    # a 1000-class head: 1024 outputs as int4 against int8's 1008 (+1.6 %) stays packed
    assert P.storage_bits(_codes(rng, 4, (1000, 512)), 1000, 512) == 4


@needs_vnni
@pytest.mark.parametrize("bits", [4, 2])
def test_dense_packed_exact(bits):
    m, k, n = 5, 40, 32 * 3
    rng = np.random.default_rng(bits)
    a = rng.integers(0, 256, (m, k)).astype(np.uint8)
    w = _codes(rng, bits, (n, k))
    ex = build(K.dense_vnni(m, k, n, bits=bits))
    out = run(ex, a, P.pack_blocks(K.pack_dense_weight(w), bits), out_shape=(m, n))
    np.testing.assert_array_equal(out, a.astype(np.int32) @ w.astype(np.int32).T)
    assert "vpdpbusd" in ex.mod.inspect_source("asm")


# (H, W, I, O, KH, KW, stride) of the padded NHWC input: 3×3 stride 1 / 2, the 7×7 stride-2 stem
# (channels padded to 8), 1×1 stride 2, a prime width with 3 packed vectors, non-square kernels
# and strides; I a multiple of 8 and O of 32 (what the packed kernels take after padding)
CONV_SHAPES = [(11, 11, 8, 32, 3, 3, (1, 1)), (11, 11, 8, 32, 3, 3, (2, 2)),
               (29, 29, 8, 64, 7, 7, (2, 2)), (14, 14, 64, 128, 1, 1, (2, 2)),
               (13, 13, 16, 96, 3, 3, (1, 1)), (9, 12, 24, 32, 1, 3, (2, 1))]


@needs_vnni
@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("h,w_,cin,cout,kh,kw,stride", CONV_SHAPES)
def test_conv_packed_exact(bits, h, w_, cin, cout, kh, kw, stride):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (1, h, w_, cin)).astype(np.uint8)
    wt = _codes(rng, bits, (cout, cin, kh, kw))
    ex = build(K.conv2d_nhwc_vnni(1, h, w_, cin, cout, kh, kw, stride, bits=bits))
    oh, ow = (h - kh) // stride[0] + 1, (w_ - kw) // stride[1] + 1
    out = run(ex, x, P.pack_blocks(K.pack_conv_weight(wt), bits), out_shape=(1, oh, ow, cout))
    np.testing.assert_array_equal(out, conv_ref_nhwc(x, wt, stride, oh, ow))


@needs_vnni
@pytest.mark.parametrize("bits", [4, 2])
def test_packed_conv_keeps_the_int8_register_tile_and_unpacks_once_per_load(bits):
    """The packed kernels keep int8's tile (7 pixels × 32 channels, in zmm registers), and each
    packed 64-byte load is unpacked once per k-step for the whole tile, not once per pixel."""
    p = P.PACKINGS[bits]
    assert K._tile_shape(28, 128 // p.lanes, width=p.blocks) == (7, 1)
    ex = build(K.conv2d_nhwc_vnni(1, 30, 30, 128, 128, 3, 3, bits=bits))
    asm = ex.mod.inspect_source("asm")
    assert not [ln for ln in asm.splitlines() if "zmm" in ln and "(%rsp)" in ln]
    dots = asm.count("vpdpbusd")
    unpacks = asm.count("vgf2p8affineqb") + asm.count("vpandq")
    # per k-step: 7 pixels × (8 / bits) fields of vpdpbusd and one unpack op per field (measured
    # 84 / 12 for int4); unpacking per pixel would take at least one op per vpdpbusd
    assert dots >= 7 * 8 // bits and 0 < unpacks * 2 <= dots, (dots, unpacks)
    assert "vpsrad" in asm  # the scaled codes' sum shifted back in the write-back


class LowBitNet(nn.Module):
    """int8 activations; a 3×3 conv (14 → 56 channels: both padded), a 1×1 stride-2 conv and a
    Linear (120 outputs: padded) with ``fw`` weights; signed first input (shifted to u8 in the
    kernel), unsigned after ReLU."""

    def __init__(self, fw):
        super().__init__()
        torch.manual_seed(5)
        self.c1, self.c2 = nn.Conv2d(14, 56, 3, padding=1), nn.Conv2d(56, 64, 1, stride=2)
        self.fc = nn.Linear(64 * 4 * 4, 120)
        self.w = nn.ModuleList(weight_quantizer(fw, p.weight) for p in (self.c1, self.c2, self.fc))
        self.a = nn.ModuleList([act_quantizer("int8", 0.03), act_quantizer("uint8", 0.02),
                                act_quantizer("uint8", 0.02)])

    def forward(self, x):
        y = torch.relu(nn.functional.conv2d(self.a[0](x), self.w[0](self.c1.weight), self.c1.bias, padding=1))
        y = torch.relu(nn.functional.conv2d(self.a[1](y), self.w[1](self.c2.weight), self.c2.bias, stride=2))
        return nn.functional.linear(self.a[2](y.flatten(1)), self.w[2](self.fc.weight), self.fc.bias)


def _graph(m):
    gm = torch.fx.symbolic_trace(m.eval())
    g = Graph(gm, [InputSpec("x", (1, 14, 8, 8))], name="lowbit")
    nodes = [n for n in gm.graph.nodes if getattr(n.target, "__name__", "") in ("conv2d", "linear")]
    for public, node in zip(("c1", "c2", "fc"), nodes):
        g.layers[public] = LayerInfo(public, node.target.__name__, node.name)
    return g


@needs_vnni
@pytest.mark.parametrize("fw,stored", [("int4", "int4 packed 2/byte"), ("int2", "int2 packed 4/byte")])
def test_lowered_low_bit_layers_run_packed_on_vnni_and_match_the_plain_build(tmp_path, fw, stored):
    """Through ``lower``: every layer on the VNNI kernel with its weight stored packed (the report
    says so), the artifact loads in a fresh VM, and the result is bit-identical to the plain
    integer build (both sum exactly in int32) and within fp32 rescale error of torch — on inputs
    far outside the activation quantizer's range (clipping)."""
    import tvm
    from tvm import relax
    m = LowBitNet(fw).eval()
    g = _graph(m)
    fast = lower(g, "llvm", tmp_path)
    plain = lower(g, "llvm", None, vnni=False)
    for name in ("c1", "c2", "fc"):
        e = fast.executed[name]
        assert e["kernel"] == "vnni" and e["weight_storage"].startswith(stored), e
    x = example_input((1, 14, 8, 8)) * 10
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(tmp_path / "tvm" / "model.so")), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x.numpy(), tvm.cpu())).numpy()
    np.testing.assert_array_equal(out, plain.run([x.numpy()])[0])
    ref = m(x).detach().numpy()
    assert np.abs(out - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())


@needs_vnni
def test_int4_artifact_stores_half_the_weight_bytes(tmp_path):
    """The .so of an int4 model is smaller than the same model's int8 .so by about half its
    weight bytes: the weights really stay packed in the artifact."""
    sizes = {}
    for fw in ("int8", "int4"):
        m = LowBitNet(fw).eval()
        lower(_graph(m), "llvm", tmp_path / fw)
        sizes[fw] = (tmp_path / fw / "tvm" / "model.so").stat().st_size
    weight_bytes = sum(p.weight.numel() for p in (m.c1, m.c2, m.fc))  # int8: one byte each
    assert sizes["int8"] - sizes["int4"] >= 0.4 * weight_bytes, (sizes, weight_bytes)
