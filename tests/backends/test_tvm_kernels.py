"""Hand VNNI kernels: exact u8 x s8 -> s32 results, ``vpdpbusd`` in the generated code, weight
packing layouts."""
import numpy as np
import pytest

from fliqs_compiler.backends import tvm_kernels as K
from fliqs_compiler.backends.targets import parse_target

pytestmark = pytest.mark.tvm
TARGET = parse_target("llvm")
needs_vnni = pytest.mark.skipif(not K.has_vnni(TARGET.tvm_target), reason="no AVX512-VNNI")


def _build(prim):
    import tvm
    return tvm.compile(tvm.IRModule({"main": prim.with_attr("global_symbol", "main")}),
                       target=TARGET.tvm())


def _run(ex, *arrays, out_shape):
    import tvm
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.zeros(out_shape, np.int32), dev)
    ex["main"](*[tvm.runtime.tensor(a, dev) for a in arrays], out)
    return out.numpy()


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
    ex = _build(K.dense_vnni(m, k, n))
    out = _run(ex, a, K.pack_dense_weight(w), out_shape=(m, n))
    np.testing.assert_array_equal(out, a.astype(np.int32) @ w.astype(np.int32).T)
    assert "vpdpbusd" in ex.mod.inspect_source("asm")


@needs_vnni
@pytest.mark.parametrize("stride", [(1, 1), (2, 2)])
def test_conv_vnni_exact(stride):
    n, h, w_, cin, cout, kh, kw = 1, 9, 9, 8, 32, 3, 3
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (n, h + 2, w_ + 2, cin)).astype(np.uint8)  # already padded NHWC
    wt = rng.integers(-128, 128, (cout, cin, kh, kw)).astype(np.int8)
    ex = _build(K.conv2d_nhwc_vnni(n, h + 2, w_ + 2, cin, cout, kh, kw, stride))
    oh, ow = (h + 2 - kh) // stride[0] + 1, (w_ + 2 - kw) // stride[1] + 1
    out = _run(ex, x, K.pack_conv_weight(wt), out_shape=(n, oh, ow, cout))
    ref = np.zeros((n, oh, ow, cout), np.int64)
    for dy in range(kh):
        for dx in range(kw):
            patch = x[:, dy:dy + stride[0] * oh:stride[0], dx:dx + stride[1] * ow:stride[1], :]
            ref += patch.astype(np.int64) @ wt[:, :, dy, dx].astype(np.int64).T
    np.testing.assert_array_equal(out, ref)
    assert "vpdpbusd" in ex.mod.inspect_source("asm")


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
