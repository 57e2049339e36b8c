"""Attention MatMuls (activation × activation int8) on the hand VNNI batched kernel
(``backends/tvm_attention.py``): the kernel and the Relax rewrite are bit-exact against numpy
int32 matmuls on odd shapes and every operand signedness, unnamed / constant / broadcast MatMuls
are left alone, and through ``lower`` a ViT's attention MatMuls run (and are reported) on the
kernel with the same output as the plain int8 build and the QDQ model in onnxruntime.

``lower`` names an attention layer for the rewrite by passing its second operand's codes
(``tvm_lower._Translator.matmul`` → ``_record(..., wconst=w.codes)``)."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from torch import nn

from asm import asm_functions, kernel_asm
from fliqs_compiler.backends import tvm_attention as A
from fliqs_compiler.backends import tvm_kernels as K
from fliqs_compiler.backends import tvm_lower as TL
from fliqs_compiler.backends.targets import parse_target
from fliqs_compiler.ir.graph import Graph, InputSpec, LayerInfo
from tvm_models import act_quantizer

pytestmark = pytest.mark.tvm
TARGET = parse_target("llvm")
needs_vnni = pytest.mark.skipif(not K.has_vnni(TARGET.tvm_target), reason="no AVX512-VNNI")
NO_VNNI = '{"kind": "llvm", "mcpu": "znver4", "mattr": ["-avx512vnni"]}'


def _codes(shape, dtype, rng):
    lo, hi = (0, 256) if dtype == "uint8" else (-128, 128)
    return rng.integers(lo, hi, shape).astype(dtype)


def test_attention_kernel_is_in_kernels():
    """On by default: ``lower`` applies it on every target with AVX512-VNNI."""
    assert K.ATTENTION_KERNEL in K.KERNELS
    assert K.ATTENTION_KERNEL in K.kernels_for(TARGET.caps) or not K.has_vnni(TARGET.tvm_target)


# ---- the kernel ------------------------------------------------------------------------------
@needs_vnni
@pytest.mark.parametrize("start", [None, "cols", "rows", "both"])
def test_batch_matmul_vnni_exact_and_uses_vpdpbusd(start):
    """The kernel alone, with each shape of start term (added to every tile it writes)."""
    import tvm
    b, m, k, n = 3, 4, 12, 48  # one full 4-row tile, 3 column blocks
    rng = np.random.default_rng(0)
    a, w = _codes((b, m, k), "uint8", rng), _codes((b, k, n), "int8", rng)
    packed = np.ascontiguousarray(w.reshape(b, k // 4, 4, n // 16, 16).transpose(0, 3, 1, 4, 2))
    shape = {None: None, "cols": (b, 1, n), "rows": (b, m, 1), "both": (b, m, n)}[start]
    prim = A.batch_matmul_vnni(b, m, k, n, start=shape)
    ex = tvm.compile(tvm.IRModule({"main": prim.with_attr("global_symbol", "main")}),
                     target=TARGET.tvm())
    out = tvm.runtime.tensor(np.zeros((b, m, n), np.int32), tvm.cpu())
    ref = a.astype(np.int32) @ w.astype(np.int32)
    args = [tvm.runtime.tensor(a), tvm.runtime.tensor(packed)]
    if shape is not None:
        s = rng.integers(-40000, 40000, shape).astype(np.int32)
        args.append(tvm.runtime.tensor(s))
        ref = ref + s
    ex["main"](*args, out)
    np.testing.assert_array_equal(out.numpy(), ref)
    assert "vpdpbusd" in ex.mod.inspect_source("asm")


def test_plan_folds_or_declines_batch_dims():
    assert A.plan([1, 4, 50, 16], [1, 4, 16, 50]) == (4, 50, 16, 50)
    assert A.plan([2, 6, 12], [12, 20]) == (1, 12, 12, 20)  # a rank-2 right side: rows fold
    assert A.plan([2, 4, 5, 8], [1, 4, 8, 5]) is None  # broadcast batch: plain loops
    assert A.plan([5, 8], [7, 3]) is None


# ---- the Relax rewrite -----------------------------------------------------------------------
def _matmul_module(a_shape, b_shape, a_dtype, b_dtype, const_b=None):
    from tvm import relax
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(a_shape, a_dtype))
    params = [x]
    if const_b is None:
        y = relax.Var("y", relax.TensorType(b_shape, b_dtype))
        params.append(y)
    else:
        y = relax.const(const_b)
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.op.matmul(x, y, out_dtype="int32")))
        bb.emit_func_output(out)
    return bb.get(), (params[1] if const_b is None else None)


def _rewritten(mod, right, name="att"):
    return A.attention_rewrite(mod, {id(right): name}, [right])


def _run(mod, *arrays):
    import tvm
    from tvm import relax
    ex, _ = TL.compile_module(mod, TARGET)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(a) for a in arrays]).numpy()
    return out, ex.mod.imports[0].inspect_source("asm")


SHAPES = [((1, 3, 17, 7), (1, 3, 7, 19)),  # Q·Kᵀ-like: K % 4, N % 16, M % 4 all non-zero
          ((2, 5, 9), (2, 9, 33)),  # A·V-like, 3 column blocks (one padded)
          ((1, 4, 6, 12), (12, 20))]  # a rank-2 right operand: the left rows fold
# Q·Kᵀ is int8 × int8, A·V uint8 × int8 (softmax codes); a uint8 right side is exact too
SIGNS = [("int8", "int8"), ("uint8", "int8"), ("int8", "uint8"), ("uint8", "uint8")]


@needs_vnni
@pytest.mark.parametrize("shapes,signs", [(s, g) for s, g in itertools.product(SHAPES, SIGNS)
                                          if s is SHAPES[0] or g in SIGNS[:2]])
def test_rewrite_is_bit_exact_on_odd_shapes(shapes, signs):
    (a_shape, b_shape), (a_dtype, b_dtype) = shapes, signs
    mod, right = _matmul_module(a_shape, b_shape, a_dtype, b_dtype)
    new, done = _rewritten(mod, right)
    assert done == {"att": "fliqs_vnni_att"}
    rng = np.random.default_rng(1)
    a, b = _codes(a_shape, a_dtype, rng), _codes(b_shape, b_dtype, rng)
    out, asm = _run(new, a, b)
    np.testing.assert_array_equal(out, np.matmul(a.astype(np.int64), b.astype(np.int64)))
    assert "vpdpbusd" in kernel_asm(asm_functions(asm), "fliqs_vnni_att")


@needs_vnni
def test_extremes_do_not_overflow_the_corrections():
    """All -128 × all -128 (the largest shifted product) over a long K."""
    mod, right = _matmul_module((1, 2, 4, 300), (1, 2, 300, 16), "int8", "int8")
    new, _ = _rewritten(mod, right)
    a = np.full((1, 2, 4, 300), -128, np.int8)
    out, _ = _run(new, a, np.full((1, 2, 300, 16), -128, np.int8))
    assert (out == 300 * 128 * 128).all()


def _flattened_requantized_module(shape, signs, qmax):
    """``clip(round(x·yᵀ-like product · s), -qmax-1, qmax)`` flattened to ``[B, M·N]``: the
    conformance matrix's Branch tail (t·tᵀ, flatten, the next int5-7 quantizer). The epilogue's
    innermost loop runs over M·N, so a per-column correction is read at ``n = j % N``."""
    from tvm import relax
    (b, m, k), n = shape, shape[1]
    a_dtype, b_dtype = signs
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((b, m, k), a_dtype))
    y = relax.Var("y", relax.TensorType((b, k, n), b_dtype))
    op = relax.op
    with bb.function("main", [x, y]):
        with bb.dataflow():
            acc = bb.emit(op.matmul(x, y, out_dtype="int32"))
            flat = op.reshape(op.astype(acc, "float32"), (b, m * n))
            v = op.round(op.multiply(flat, relax.const(np.float32(1 / 1024))))
            v = op.minimum(op.maximum(v, relax.const(np.float32(-qmax - 1))),
                           relax.const(np.float32(qmax)))
            out = bb.emit_output(bb.emit(op.astype(v, "int8")))
        bb.emit_func_output(out)
    return bb.get(), y


@needs_vnni
@pytest.mark.parametrize("qmax", [15, 31, 63], ids=["int5", "int6", "int7"])
@pytest.mark.parametrize("signs", SIGNS, ids="x".join)
def test_flattened_epilogue_reads_each_column_correction(signs, qmax):
    """Regression (conformance int5-7 activation cases, 21-31 LSB): the corrections were a
    ``[B, 1, N]`` tensor subtracted after the kernel; fused with a flatten to ``[B, M·N]`` the
    epilogue read it at ``j % N``, which the LLVM of TVM 0.27 vectorized (AVX-512, 16 lanes) as a
    contiguous load — lanes N..15 took the next batch's corrections. N = 8 as in t·tᵀ."""
    shape = (48, 8, 16)
    mod, right = _flattened_requantized_module(shape, signs, qmax)
    new, done = _rewritten(mod, right)
    assert done == {"att": "fliqs_vnni_att"}
    rng = np.random.default_rng(3)
    a = _codes(shape, signs[0], rng)
    b = _codes((shape[0], shape[2], shape[1]), signs[1], rng)
    out, _ = _run(new, a, b)
    acc = np.matmul(a.astype(np.int64), b.astype(np.int64)).reshape(shape[0], -1)
    ref = np.clip(np.round(acc.astype(np.float32) * np.float32(1 / 1024)), -qmax - 1, qmax)
    np.testing.assert_array_equal(out, ref.astype(np.int8))


def test_unnamed_constant_and_float_matmuls_are_left_alone():
    mod, right = _matmul_module((1, 2, 5, 8), (1, 2, 8, 5), "int8", "int8")
    assert A.attention_rewrite(mod, {}, [])[1] == {}  # not a layer the caller named
    cmod, _ = _matmul_module((5, 8), (8, 16), "uint8", "int8",
                             const_b=np.ones((8, 16), np.int8))  # a weight: tvm_kernels' kernel
    new, done = A.attention_rewrite(cmod, {}, [])
    assert done == {} and "call_tir" not in new.script()
    fmod, fright = _matmul_module((1, 2, 5, 8), (1, 2, 8, 5), "float32", "float32")
    assert _rewritten(fmod, fright)[1] == {}


# ---- through lower(): a two-head attention with int8 codes on both sides ----------------------
class Attention(nn.Module):
    """softmax(Q·Kᵀ)·V on [1, 2, 5, 6] heads: T = 5 and head dim 6 pad to 16 / 8 in both MatMuls.
    Q, K, V int8 codes; the softmax output uint8 (non-negative), as fliqs quantizes it."""

    def __init__(self, operand=("int8", 0.02), probs=("uint8", 1 / 255)):
        super().__init__()
        self.q, self.k, self.v = (act_quantizer(*operand) for _ in range(3))
        self.p = act_quantizer(*probs)

    def forward(self, q, k, v):
        s = torch.matmul(self.q(q), self.k(k.transpose(-2, -1)))
        return torch.matmul(self.p(s.softmax(-1)), self.v(v))


def _attention_graph(**formats):
    m = Attention(**formats).eval()
    gm = torch.fx.symbolic_trace(m)
    g = Graph(gm, [InputSpec(n, (1, 2, 5, 6)) for n in "qkv"], name="attention")
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.matmul]
    for public, node in zip(("att.scores", "att.context"), nodes):
        g.layers[public] = LayerInfo(public, "matmul", node.name)
    return m, g


def _qkv(scale=1.0, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(1, 2, 5, 6, generator=gen) for _ in range(3)]


@needs_vnni
def test_lowered_attention_runs_on_vnni_and_equals_plain_int8():
    m, g = _attention_graph()
    fast, plain = TL.lower(g, "llvm"), TL.lower(g, NO_VNNI)
    for name, dtype in (("att.scores", "int8xint8->int32"), ("att.context", "uint8xint8->int32")):
        assert fast.executed[name]["dtype"] == dtype
        assert fast.executed[name]["kernel"] == "vnni" and fast.executed[name]["vpdpbusd"] > 0
    for x in (_qkv(), _qkv(8.0)):  # ×8: Q, K, V saturate their int8 grids
        arrays = [t.numpy() for t in x]
        out = fast.run(arrays)[0]
        np.testing.assert_array_equal(out, plain.run(arrays)[0])
        ref = m(*x).detach().numpy()
        assert np.abs(out - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())


@needs_vnni
def test_without_vnni_in_the_target_the_rewrite_is_not_applied():
    _, g = _attention_graph()
    assert "avx512vnni" not in parse_target(NO_VNNI).caps.features
    low = TL.lower(g, NO_VNNI)
    assert low.instruction_counts["vpdpbusd"] == 0 and "fliqs_vnni" not in low.mod.script()
    for name in ("att.scores", "att.context"):
        assert low.executed[name]["kernel"] == "int8"
    x = [t.numpy() for t in _qkv()]
    np.testing.assert_array_equal(low.run(x)[0], TL.lower(g, "llvm", vnni=False).run(x)[0])


@pytest.mark.parametrize("fmt", ["bf16", "fp8_e4m3", "fp8_e5m2"])
def test_float_format_attention_lowers_off_the_int8_kernel_and_matches_torch(fmt):
    """Q·Kᵀ and A·V with both operands in a float format (the softmax output too) take the float
    path: no int8 kernel, the grid's values exact, fp32 accumulation; within fp32 summation-order
    error of the torch graph, saturating inputs included."""
    m, g = _attention_graph(operand=(fmt, 0.05), probs=(fmt, 1 / 16))
    low = TL.lower(g, "llvm")
    for name in ("att.scores", "att.context"):
        assert low.executed[name]["kernel"] != "vnni", low.executed[name]
        assert "int8" not in low.executed[name]["dtype"], low.executed[name]
    for x in (_qkv(), _qkv(40.0)):
        ref = m(*x).detach().numpy()
        out = low.run([t.numpy() for t in x])[0]
        assert np.abs(out - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())


# ---- end to end: a ViT, all int8, lowered, a fresh VM on the .so vs onnxruntime -------------
@needs_vnni
def test_vit_attention_on_vnni_end_to_end(tmp_path, digits):
    import onnxruntime as ort
    from fliqs_compiler.backends.builtin import open_tvm
    from onnx_models import make_vit
    from tvm_models import lower_all_int8
    res = lower_all_int8(make_vit(tmp_path), tmp_path)
    executed = json.loads((res.out_dir / "tvm" / "model.json").read_text())["executed"]
    attention = {n: e for n, e in executed.items() if n.endswith(("attn/MatMul", "attn/MatMul_1"))}
    assert len(attention) == 4, sorted(executed)
    for n, e in attention.items():
        assert e["kernel"] == "vnni" and e["vpdpbusd"] > 0, (n, e)
        assert e["weight_storage"].startswith("run-time int8"), e  # packed per call, not prepacked
    x = digits.x_test[:8].numpy()
    x = np.concatenate([x, 3.0 * x])  # ×3: beyond every calibrated range
    sess = ort.InferenceSession(str(res.onnx_path))
    run = open_tvm(res.out_dir / "tvm" / "model.so")  # a fresh VirtualMachine on the file
    y_tvm = np.concatenate([run([row[None]])[0] for row in x])
    y_ort = sess.run(None, {"x": x})[0]
    assert (y_tvm.argmax(1) == y_ort.argmax(1)).all()
    numerics = res.report["numerics"]  # the conformance check: no further from torch than ORT
    assert numerics["tvm_max_abs_err"] <= max(1e-3, 1.5 * numerics["onnxruntime_max_abs_err"])
