"""Hand VNNI kernels: exact u8 x s8 -> s32 results, ``vpdpbusd`` in the generated code, weight
packing layouts."""
import numpy as np
import pytest

from fliqs_compiler.backends import tvm_kernels as K
from fliqs_compiler.backends.targets import parse_target
from kernel_runs import build, conv_ref_nhwc, run

pytestmark = pytest.mark.tvm
TARGET = parse_target("llvm")
needs_vnni = pytest.mark.skipif(not K.has_vnni(TARGET.tvm_target), reason="no AVX512-VNNI")


def test_pack_layouts():
    w = np.arange(32 * 8, dtype=np.int64).reshape(32, 8).astype(np.int8)
    p = K.pack_dense_weight(w)
    assert p.shape == (2, 2, 16, 4)
    for n, k in [(0, 0), (17, 5), (31, 7)]:
        assert p[n // 16, k // 4, n % 16, k % 4] == w[n, k]
    wc = np.random.default_rng(0).integers(-128, 128, (16, 8, 3, 3)).astype(np.int8)
    pc = K.pack_conv_weight(wc)
    assert pc.shape == (1, 3, 3, 2, 16, 4)
    assert pc[0, 2, 1, 1, 5, 3] == wc[5, 7, 2, 1]


def test_has_vnni_reads_target_data():
    assert K.has_vnni({"kind": "llvm", "mcpu": "znver4"})
    assert K.has_vnni({"kind": "llvm", "mcpu": "x86-64", "mattr": ["+avx512vnni"]})
    assert not K.has_vnni({"kind": "llvm", "mcpu": "haswell"})


@needs_vnni
def test_dense_vnni_exact_and_uses_vpdpbusd():
    m, k, n = 8, 64, 48
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (m, k)).astype(np.uint8)
    w = rng.integers(-128, 128, (n, k)).astype(np.int8)
    ex = build(K.dense_vnni(m, k, n))
    out = run(ex, a, K.pack_dense_weight(w), out_shape=(m, n))
    np.testing.assert_array_equal(out, a.astype(np.int32) @ w.astype(np.int32).T)
    assert "vpdpbusd" in ex.mod.inspect_source("asm")


# (H, W, I, O, KH, KW, stride) of the padded NHWC input: 3×3 stride 1 / 2, the 7×7 stride-2 stem
# (3 channels padded to 4), 1×1 stride 2 (downsample), a prime width with 3 channel blocks (the
# register tile: 13 pixels × 1 block), non-square kernels and strides
CONV_SHAPES = [(11, 11, 8, 32, 3, 3, (1, 1)), (11, 11, 8, 32, 3, 3, (2, 2)),
               (29, 29, 4, 64, 7, 7, (2, 2)), (14, 14, 64, 128, 1, 1, (2, 2)),
               (15, 15, 16, 48, 3, 3, (1, 1)), (9, 12, 12, 16, 1, 3, (2, 1))]


@needs_vnni
@pytest.mark.parametrize("h,w_,cin,cout,kh,kw,stride", CONV_SHAPES)
def test_conv_vnni_exact(h, w_, cin, cout, kh, kw, stride):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (1, h, w_, cin)).astype(np.uint8)  # already padded NHWC
    wt = rng.integers(-128, 128, (cout, cin, kh, kw)).astype(np.int8)
    ex = build(K.conv2d_nhwc_vnni(1, h, w_, cin, cout, kh, kw, stride))
    oh, ow = (h - kh) // stride[0] + 1, (w_ - kw) // stride[1] + 1
    out = run(ex, x, K.pack_conv_weight(wt), out_shape=(1, oh, ow, cout))
    np.testing.assert_array_equal(out, conv_ref_nhwc(x, wt, stride, oh, ow))
    assert "vpdpbusd" in ex.mod.inspect_source("asm")


@needs_vnni
def test_conv_vnni_accumulates_in_registers():
    """The accumulator tile is a small stack buffer (no TVMBackendAllocWorkspace per parallel
    task) and the reduction loop runs on zmm registers: no zmm spill/reload to the stack."""
    ex = build(K.conv2d_nhwc_vnni(1, 30, 30, 128, 128, 3, 3))
    assert "TVMBackendAllocWorkspace" not in ex.mod.inspect_source("ll")
    asm = ex.mod.inspect_source("asm")
    assert asm.count("vpdpbusd") >= 14
    assert not [ln for ln in asm.splitlines() if "zmm" in ln and "(%rsp)" in ln]


@pytest.mark.parametrize("rows,blocks,want", [(56, 4, (7, 2)), (7, 32, (7, 2)), (112, 4, (7, 2)),
                                              (13, 3, (13, 1)), (16, 1, (8, 1)), (1, 63, (1, 1))])
def test_register_tile_fits(rows, blocks, want):
    xt, ot = K._tile_shape(rows, blocks)
    assert (xt, ot) == want and xt * ot * 16 * 4 < 1024


def test_support_predicates():
    assert K.dense_vnni_supported(1, 512, 1008) and not K.dense_vnni_supported(1, 510, 1000)
    assert K.conv_vnni_supported(64, 64, 1) and not K.conv_vnni_supported(64, 64, 2)
    assert K.conv_vnni_applicable(3, 20, 1)  # padded to 4 / 32 channels
    assert not K.conv_vnni_applicable(3, 20, 1, (2, 2))


@needs_vnni
def test_tuning_pipeline_keeps_hand_vnni_kernels(tmp_path):
    """MetaSchedule is never handed our scheduled VNNI PrimFuncs (``tirx.is_scheduled``), and the
    tuning pipeline (zero pipeline + apply database; 0 trials here) still runs them with VNNI."""
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    from fliqs_compiler.backends.tvm_lower import Tuning, _is_scheduled, lower
    from fliqs_compiler.backends.tvm_measure import layer_graph
    from fliqs_compiler.ir.graph import LayerInfo
    conv = LayerInfo("c", "conv2d", "n", weight_shape=(32, 16, 3, 3), input_shape=(1, 16, 8, 8),
                     attrs={"stride": 1, "padding": 1})
    said = []
    low = lower(layer_graph(conv, "int8", "uint8"), "llvm",
                tuning=Tuning(trials=0, work_dir=tmp_path, log=said.append))
    assert low.executed["c"]["kernel"] == "vnni" and low.executed["c"]["vpdpbusd"] > 0
    with TARGET.tvm():
        tasks = ms.relax_integration.extract_tasks(relax.get_pipeline("zero")(low.mod),
                                                   TARGET.tvm())
    flagged = {t.task_name for t in tasks if _is_scheduled(t.dispatched[0])}
    assert flagged and all(n.startswith("fliqs_vnni") for n in flagged)
    assert said == [f"MetaSchedule: {len(tasks) - len(flagged)} tasks, 0 reused from {tmp_path}, "
                    "0 to tune"]
    assert low.run([np.ones((1, 16, 8, 8), np.float32)])[0].shape == (1, 32, 8, 8)
