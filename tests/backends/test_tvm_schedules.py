"""Rule-based schedules (``backends/tvm_schedules.py``): every function of an untuned build is
scheduled, and the scheduled build computes what TVM's default build computes — bit for bit on
integer paths, within float rounding on fp32 — on odd shapes, with and without VNNI."""
import json
import re

import numpy as np
import pytest
import torch
from torch import nn

from fliqs_compiler.backends import tvm_kernels as K
from fliqs_compiler.backends import tvm_schedules as S
from fliqs_compiler.backends.targets import parse_target
from fliqs_compiler.backends.tvm_lower import lower
from fliqs_compiler.ir.graph import Graph, InputSpec
from tvm_models import act_quantizer, weight_quantizer

pytestmark = pytest.mark.tvm
HOST = parse_target("llvm")
NO_VNNI = json.dumps(dict(HOST.tvm_target, mattr=["-avx512vnni"]))  # the portable int8 path here
SHAPE = (1, 3, 11, 11)


class OddShapes(nn.Module):
    """Channel counts that are not multiples of 16 or 4, a stride-2 padded 3×3 conv, a 1×1 conv,
    a depthwise conv, a padded 3×3 max pool, a global average pool, a linear and a softmax."""

    def __init__(self, fmt: str):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.c2 = nn.Conv2d(3, 20, 3, 2, 1), nn.Conv2d(20, 12, 1)
        self.dw, self.fc = nn.Conv2d(12, 12, 3, 1, 1, groups=12), nn.Linear(12, 10)
        self.wq = nn.ModuleList(weight_quantizer(fmt, m.weight) for m in (self.c1, self.c2, self.dw, self.fc))
        unsigned = "uint8" if fmt == "int8" else fmt
        self.aq = nn.ModuleList([act_quantizer(fmt, 0.03)] + [act_quantizer(unsigned, 0.02)] * 3)

    def forward(self, x):
        y = torch.relu(nn.functional.conv2d(self.aq[0](x), self.wq[0](self.c1.weight), self.c1.bias,
                                            stride=2, padding=1))
        y = torch.relu(nn.functional.conv2d(self.aq[1](y), self.wq[1](self.c2.weight), self.c2.bias))
        y = nn.functional.conv2d(self.aq[2](y), self.wq[2](self.dw.weight), self.dw.bias, padding=1,
                                 groups=12)
        y = nn.functional.max_pool2d(torch.relu(y), 3, 2, 1)
        y = nn.functional.adaptive_avg_pool2d(y, 1).flatten(1)
        return torch.softmax(nn.functional.linear(self.aq[3](y), self.wq[3](self.fc.weight),
                                                  self.fc.bias), -1)


def _graph(m, shape):
    return Graph(torch.fx.symbolic_trace(m.eval()), [InputSpec("x", shape)], name="odd")


def _input(shape, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).numpy()


@pytest.mark.parametrize("fmt,target", [
    ("int8", "llvm"), ("int8", NO_VNNI), ("float", "llvm")],
    ids=["int8-host", "int8-no-vnni", "fp32"])
def test_scheduled_build_matches_default_build(fmt, target):
    g, x = _graph(OddShapes(fmt), SHAPE), _input(SHAPE)
    plain = lower(g, target, schedule=False)
    low = lower(g, target)
    assert plain.schedules == {}
    assert low.schedules["unscheduled"] == 0 and low.schedules["reverted"] == 0
    assert low.schedules["contraction"] + low.schedules["loops"] >= 3
    got, ref = low.run([x])[0], plain.run([x])[0]
    if fmt == "int8":
        np.testing.assert_array_equal(got, ref)  # integer accumulation, same float epilogue
    else:
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7)
    vnni = [e for e in low.executed.values() if e["kernel"] == "vnni"]
    assert bool(vnni) == (fmt == "int8" and K.has_vnni(parse_target(target).tvm_target))
    # the float layers (all of them, or the int8 model's float ones) on the fp32 kernel
    fma = [e for e in low.executed.values() if e["kernel"] == "fp32-fma"]
    assert bool(fma) == (fmt == "float" and parse_target(target).caps.has("avx512f"))
    assert (low.schedules["kept"] > 0) == bool(vnni or fma)  # hand kernels are left as scheduled


class Attention(nn.Module):
    """LayerNorm → single-head attention (softmax) → GELU MLP, 7 tokens of width 12."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.norm, self.qkv, self.mlp = nn.LayerNorm(12), nn.Linear(12, 36), nn.Linear(12, 12)

    def forward(self, x):
        q, k, v = self.qkv(self.norm(x)).chunk(3, -1)
        a = torch.softmax(q @ k.transpose(-2, -1) * 12 ** -0.5, -1) @ v
        return nn.functional.gelu(self.mlp(a)) + x


def test_layernorm_softmax_take_tvm_reduction_rule():
    g, x = _graph(Attention(), (1, 7, 12)), _input((1, 7, 12))
    low, plain = lower(g, "llvm"), lower(g, "llvm", schedule=False)
    assert low.schedules["dlight.cpu.Reduction"] >= 1 and low.schedules["unscheduled"] == 0
    np.testing.assert_allclose(low.run([x])[0], plain.run([x])[0], rtol=1e-5, atol=1e-6)


def _scheduled_allocs(build_op, shape):
    """(scheduled PrimFunc's intermediate buffer shapes, module) of one legalized Relax op on a
    float32 NHWC input of ``shape``."""
    from tvm import relax
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function("main", [x]):
        bb.emit_func_output(bb.emit(build_op(x)))
    tgt = HOST.tvm()
    with tgt:
        mod = relax.transform.LegalizeOps()(bb.get())
    scheduled, _ = S.schedule(mod, tgt)
    (prim,) = [f for gv, f in scheduled.functions_items() if gv.name_hint != "main"]
    text = re.sub(r"T\.int64\((\d+)\)", r"\1", prim.script())
    allocs = re.findall(r"sblock_alloc_buffer\(\(([0-9, ]+)\)", text)
    return [tuple(int(d) for d in a.split(",")) for a in allocs], scheduled, mod


def test_pool_reads_its_input_in_place_of_a_padded_copy():
    """A padded max pool reads its input directly (the pad inlined: no padded copy of it), a
    padded conv keeps its padded copy (inlined there it would run once per multiply-accumulate);
    the pool's result equals TVM's unscheduled build."""
    import tvm
    from tvm import relax
    shape = (1, 13, 13, 20)
    pool = lambda x: relax.op.nn.max_pool2d(x, (3, 3), (2, 2), (1, 1, 1, 1), layout="NHWC")
    allocs, scheduled, plain = _scheduled_allocs(pool, shape)
    assert (1, 15, 15, 20) not in allocs, allocs
    w = relax.const(np.ones((3, 3, 1, 20), np.float32))
    conv = lambda x: relax.op.nn.conv2d(x, w, padding=(1, 1), groups=20, data_layout="NHWC",
                                       kernel_layout="HWIO")
    assert (1, 15, 15, 20) in _scheduled_allocs(conv, shape)[0]  # the control
    x = _input(shape)
    outs = []
    for mod in (scheduled, plain):
        ex, reverted = S.build(mod, plain, HOST.tvm()) if mod is scheduled else (
            tvm.compile(mod, target=HOST.tvm()), [])
        assert not reverted
        outs.append(relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy())
    np.testing.assert_array_equal(outs[0], outs[1])


def test_unbuildable_schedule_is_put_back():
    """A schedule that TVM cannot build (nested vectorized loops abort StorageRewrite) is reverted
    to the plain function and the module still builds and runs."""
    import tvm
    from tvm import relax, s_tir
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def add_one(a: T.Buffer((8, 16), "float32"), b: T.Buffer((8, 16), "float32")):
        for i, j in T.grid(8, 16):
            with T.sblock("b"):
                vi, vj = T.axis.remap("SS", [i, j])
                b[vi, vj] = a[vi, vj] + T.float32(1)

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((8, 16), "float32"))
    with bb.function("main", [x]):
        gv = bb.add_func(add_one, "add_one")
        out = bb.emit(relax.call_tir(gv, [x], relax.TensorType((8, 16), "float32")))
        bb.emit_func_output(out)
    plain = bb.get()
    sch = s_tir.Schedule(plain["add_one"])
    i, j = sch.get_loops(sch.get_sblock("b"))
    sch.vectorize(i)
    sch.vectorize(j)
    broken = plain.__class__(dict(plain.functions_items()))
    broken[broken.get_global_var("add_one")] = sch.mod["main"].with_attr(S.SCHEDULED_ATTR, True)
    ex, reverted = S.build(broken, plain, HOST.tvm())
    assert reverted == ["add_one"]
    vm = relax.VirtualMachine(ex, tvm.cpu())
    a = np.arange(128, dtype=np.float32).reshape(8, 16)
    np.testing.assert_array_equal(vm["main"](tvm.runtime.tensor(a, tvm.cpu())).numpy(), a + 1)


def test_layer_latency_micro_model_is_scheduled():
    """The per-layer latency table times the same schedules the model's artifact gets."""
    from fliqs_compiler.backends.tvm_measure import tvm_layer_ms
    from fliqs_compiler.ir.graph import LayerInfo
    layer = LayerInfo("c", "conv2d", "n", weight_shape=(20, 12, 3, 3), input_shape=(1, 12, 9, 9),
                      attrs={"stride": 2, "padding": 1})
    # without avx512bf16 (capability override) the fp8 conv runs in fp32: the contraction rule
    no_bf16 = json.dumps(dict(HOST.tvm_target, mattr=["-avx512bf16"]))
    ms, low = tvm_layer_ms(layer, "fp8_e4m3", "fp8_e4m3", no_bf16, return_lowered=True)
    assert ms > 0 and low.schedules["contraction"] == 1 and low.schedules["unscheduled"] == 0
    # with it, the hand bf16 kernel (tvm_bf16), like in the model's artifact
    ms, low = tvm_layer_ms(layer, "fp8_e4m3", "fp8_e4m3", "llvm", return_lowered=True)
    on_kernel = [e["kernel"] for e in low.executed.values()] == ["bf16-dpbf16ps"]
    assert ms > 0 and low.schedules["unscheduled"] == 0
    assert on_kernel == HOST.caps.has("avx512bf16"), low.executed
