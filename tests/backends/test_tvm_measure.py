"""Per-layer TVM latency measurement (the latency table's measure_fn)."""

import json
import pytest

from fliqs_compiler.backends import tvm_kernels as K
from fliqs_compiler.backends.targets import parse_target
from fliqs_compiler.backends.tvm_measure import layer_graph, tvm_layer_ms
from fliqs_compiler.base.errors import FliqsError
from fliqs_compiler.ir.graph import LayerInfo

pytestmark = pytest.mark.tvm
HOST_VNNI = K.has_vnni(parse_target("llvm").tvm_target)
CONV = LayerInfo("blk.conv", "conv2d", "n", weight_shape=(16, 8, 3, 3), input_shape=(1, 8, 8, 8),
                 attrs={"stride": 2, "padding": 1})


def test_layer_ms_positive_and_reports_realized_kernel():
    ms, low = tvm_layer_ms(CONV, "int8", "uint8", "llvm", repeat=2, min_repeat_ms=5,
                           return_lowered=True)
    assert ms > 0
    assert low.executed["blk.conv"]["dtype"] == "uint8xint8->int32"
    # cached on the second call: same number, no recompilation
    assert tvm_layer_ms(CONV, "int8", "uint8", "llvm") == ms


def test_layer_graph_matches_layer_shape():
    g = layer_graph(CONV, "fp8_e4m3", "bf16")
    import torch
    out = g(torch.randn(CONV.input_shape))
    assert tuple(out.shape) == (1, 16, 4, 4)
    assert list(g.layers) == ["blk.conv"]


def test_unsupported_layer_is_fliqs_error():
    with pytest.raises(FliqsError, match="no TVM micro-benchmark"):
        tvm_layer_ms(LayerInfo("t", "conv_transpose2d", "n", weight_shape=(1, 1, 1, 1),
                               input_shape=(1, 1, 2, 2)), "int8", "int8")
    with pytest.raises(FliqsError, match="shape propagation"):
        tvm_layer_ms(LayerInfo("t", "linear", "n"), "int8", "int8")


@pytest.mark.slow
def test_tuned_layer_uses_persistent_database(tmp_path):
    """MetaSchedule (1 trial, ~1-4 min on 2 shared cores): the candidate builds, a record lands in
    the on-disk database, the tuned kernel runs, and a later tuning call (another process would do
    the same) reuses the record instead of tuning again."""
    import numpy as np

    from fliqs_compiler.backends.tvm_lower import Tuning, lower
    fc = LayerInfo("fc", "linear", "n", weight_shape=(64, 128), input_shape=(1, 128))
    naive = tvm_layer_ms(fc, "float", "float", "llvm")
    tuned = tvm_layer_ms(fc, "float", "float", "llvm", Tuning(trials=1, per_task=1, work_dir=tmp_path))
    records = (tmp_path / "database_tuning_record.json").read_text().strip().splitlines()
    assert records, "no tuning record: every candidate failed to build"
    assert naive > 0 and tuned > 0  # (which is faster is a benchmark's question: bench/latency.py)
    said = []
    again = lower(layer_graph(fc, "float", "float"), "llvm",
                  tuning=Tuning(trials=1, per_task=1, work_dir=tmp_path, log=said.append))
    assert said == [f"MetaSchedule: 1 tasks, 1 reused from {tmp_path}, 0 to tune"]  # nothing re-tuned
    assert (tmp_path / "database_tuning_record.json").read_text().strip().splitlines() == records
    assert again.time_ms([np.ones((1, 128), np.float32)], repeat=2) > 0


def test_tuning_setup_survives_unnamed_handlers_on_the_meta_schedule_logger(tmp_path):
    """An unnamed handler on MetaSchedule's logger (an application's ``StreamHandler()``, or
    pytest's capture handler on every non-propagating logger) made MetaSchedule's logging setup
    fail with "'NoneType' object has no attribute 'format'"; the handler keeps its place."""
    import logging

    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    import torch

    from fliqs_compiler.backends.targets import parse_target
    from fliqs_compiler.backends.tvm_lower import _MS_LOGGER, _unnamed_handlers_detached, translate
    fc = LayerInfo("fc", "linear", "n", weight_shape=(8, 16), input_shape=(1, 16))
    g = layer_graph(fc, "float", "float")
    mod, _ = translate(torch.export.export(g.gm.eval(), tuple(g.example_inputs())))
    tgt = parse_target("llvm").tvm()  # carries -num-cores, as MetaSchedule requires
    with tgt:
        tasks = ms.relax_integration.extract_tasks(relax.get_pipeline("zero")(mod), tgt)
    logger = logging.getLogger(_MS_LOGGER)
    mine = logging.StreamHandler()
    logger.addHandler(mine)
    try:
        with pytest.raises(AttributeError, match="format"), tgt:  # MetaSchedule's own behaviour
            ms.relax_integration.extracted_tasks_to_tune_contexts(tasks, str(tmp_path))
        with _unnamed_handlers_detached(_MS_LOGGER):
            with tgt:
                contexts, _ = ms.relax_integration.extracted_tasks_to_tune_contexts(
                    tasks, str(tmp_path))
        assert len(contexts) == len(tasks) >= 1
        assert mine in logger.handlers
    finally:
        logger.removeHandler(mine)


def test_matmul_layers_measure_with_their_own_operand_layout():
    """A MatMul's constant weight is [K, N] (not square here: a transposed weight fails to
    trace); an attention MatMul's second operand is a run-time input of the micro-model."""
    fc = LayerInfo("m", "matmul", "n", weight_shape=(24, 40), input_shape=(1, 5, 24),
                   attrs={"act_x_act": False})
    ms, low = tvm_layer_ms(fc, "int8", "int8", "llvm", repeat=2, min_repeat_ms=5,
                           return_lowered=True)
    assert ms > 0 and low.executed["m"]["dtype"] == "int8xint8->int32"
    att = LayerInfo("att", "matmul", "n", weight_shape=(1, 4, 8, 17), input_shape=(1, 4, 17, 8),
                    attrs={"act_x_act": True})
    g = layer_graph(att, "int8", "int8")
    assert [spec.shape for spec in g.inputs] == [(1, 4, 17, 8), (1, 4, 8, 17)]
    ms, low = tvm_layer_ms(att, "int8", "int8", "llvm", repeat=2, min_repeat_ms=5,
                           return_lowered=True)
    assert ms > 0 and low.executed["att"]["dtype"] == "int8xint8->int32"


def _permutation_to(mod, start, stop) -> tuple:
    """The axis order in which data reaches ``stop`` from ``start`` in ``main`` ("param": its
    input; "kernel": the VNNI ``call_tir``; "output"), composing the permute_dims on the way
    (elementwise ops, casts and pads keep the order): (0, 1, 2, 3) when no transpose is left."""
    from tvm import relax
    main = mod["main"]
    order = {}
    result = {}
    if start == "param":
        order[main.params[0]] = (0, 1, 2, 3)
    for block in main.body.blocks:
        for b in block.bindings:
            v = b.value
            if not isinstance(v, relax.Call):
                if isinstance(v, relax.Var) and v in order:
                    order[b.var] = order[v]
                continue
            name = getattr(v.op, "name", "")
            args = list(v.args[1].fields) if name == "relax.call_tir" else list(v.args)
            src = next((a for a in args if isinstance(a, relax.Var) and a in order), None)
            if name == "relax.call_tir":
                if stop == "kernel" and src is not None:
                    return order[src]
                if start == "kernel":
                    order[b.var] = (0, 1, 2, 3)
                continue
            if src is None:
                continue
            p = order[src]
            order[b.var] = tuple(p[int(a)] for a in v.attrs.axes) if name == "relax.permute_dims" else p
            result["output"] = order[b.var]
    return result[stop]


@pytest.mark.skipif(not HOST_VNNI, reason="host CPU has no AVX512-VNNI")
def test_conv_micro_model_in_nhwc_runs_the_kernel_without_transposes():
    """A VNNI conv measured for a model that runs NHWC (every conv on VNNI) takes and returns NHWC
    like the artifact: no transpose between the input and the kernel nor after it; NCHW (a mixed
    model) keeps the transposes each VNNI call makes there. Both compute the same values."""
    import numpy as np

    from fliqs_compiler.backends.tvm_measure import layer_inputs
    conv = LayerInfo("blk.conv", "conv2d", "n", weight_shape=(32, 16, 3, 3),
                     input_shape=(1, 16, 14, 14), attrs={"stride": 1, "padding": 1})
    _, nchw = tvm_layer_ms(conv, "int8", "uint8", repeat=1, min_repeat_ms=1, return_lowered=True)
    _, nhwc = tvm_layer_ms(conv, "int8", "uint8", repeat=1, min_repeat_ms=1, return_lowered=True,
                           layout="NHWC")
    assert nchw.executed["blk.conv"]["kernel"] == nhwc.executed["blk.conv"]["kernel"] == "vnni"
    assert _permutation_to(nhwc.mod, "param", "kernel") == (0, 1, 2, 3)
    assert _permutation_to(nhwc.mod, "kernel", "output") == (0, 1, 2, 3)
    assert _permutation_to(nchw.mod, "param", "kernel") != (0, 1, 2, 3)
    assert _permutation_to(nchw.mod, "kernel", "output") != (0, 1, 2, 3)
    (x,) = layer_inputs(conv)
    (x_nhwc,) = layer_inputs(conv, layout="NHWC")
    assert x_nhwc.shape == (1, 14, 14, 16)
    x_nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(nhwc.run([x_nhwc])[0], nchw.run([x])[0].transpose(0, 2, 3, 1),
                               rtol=1e-6, atol=1e-6)
    # a linear has no layout: the same micro-model either way
    fc = LayerInfo("fc", "linear", "n", weight_shape=(8, 16), input_shape=(1, 16))
    assert layer_inputs(fc, layout="NHWC")[0].shape == (1, 16)


def _layers(fmt_c2="int8", keep_float_c2=False, groups_c2=1):
    """Graph stand-in (``model_layout`` reads ``graph.layers``): two convs and a linear."""
    from types import SimpleNamespace
    c1 = LayerInfo("c1", "conv2d", "n1", weight_shape=(16, 3, 3, 3), input_shape=(1, 3, 8, 8),
                   attrs={"stride": 1, "padding": 1})
    c2 = LayerInfo("c2", "conv2d", "n2", weight_shape=(16, 16 // groups_c2, 3, 3),
                   input_shape=(1, 16, 8, 8), attrs={"stride": 1, "padding": 1, "groups": groups_c2})
    c2.keep_float = keep_float_c2
    fc = LayerInfo("fc", "linear", "n3", weight_shape=(10, 64), input_shape=(1, 64))
    formats = {"c1": {"weight": "int8", "activation": "int8"},
               "c2": {"weight": fmt_c2, "activation": fmt_c2},
               "fc": {"weight": "fp8_e4m3", "activation": "fp8_e4m3"}}
    if keep_float_c2:
        del formats["c2"]
    return SimpleNamespace(layers={"c1": c1, "c2": c2, "fc": fc}), formats


def test_model_layout_is_nhwc_only_when_every_conv_is_on_a_hand_kernel():
    """The rule ``lower`` applies (``tvm_layout.choose_layout``): NHWC iff every conv runs on a
    hand kernel of the target — VNNI, the bf16 kernel for fp8, the fp32 kernel for a float-kept
    conv — or is a float stem; a grouped conv, or an fp8 conv on a target without avx512bf16
    (decoded per call, not on a kernel), keeps the model NCHW; linears do not matter. The
    chosen-formats table of a TVM backend is then a table of its own (``tvm-nhwc``: the layout is
    in every cache key)."""
    from fliqs_compiler.backends.builtin import TvmBackend
    from fliqs_compiler.backends.latency_table import LatencyTable
    from fliqs_compiler.backends.tvm_measure import model_layout
    from fliqs_compiler.backends.registry import TuningOptions
    target = parse_target("llvm")
    caps = target.caps
    vnni = K.has_vnni(target.tvm_target)
    g, formats = _layers()
    assert model_layout(g, formats, target) == ("NHWC" if vnni else "NCHW")
    assert model_layout(*_layers("fp8_e4m3"), target) == (
        "NHWC" if vnni and caps.has("avx512bf16") else "NCHW")
    assert model_layout(*_layers(keep_float_c2=True), target) == (
        "NHWC" if vnni and caps.has("avx512f") else "NCHW")
    assert model_layout(*_layers("int8", groups_c2=4), target) == "NCHW"
    no_bf16 = parse_target(json.dumps({**target.tvm_target, "mattr": ["-avx512bf16"]}))
    assert model_layout(*_layers("fp8_e4m3"), no_bf16) == "NCHW"
    backend = TvmBackend()
    m = backend.measure_layer_in(target, TuningOptions(), None, g, formats)
    assert m.table == ("tvm-nhwc" if vnni else "tvm")
    assert backend.measure_layer_in(target, TuningOptions(), None, *_layers("int8", groups_c2=4)).table == "tvm"
    assert backend.measure_layer(target, TuningOptions(), None).table == "tvm"
    keys = {LatencyTable(target.key, name).key(g.layers["c1"], "int8", "int8")
            for name in ("tvm", "tvm-nhwc")}
    assert len(keys) == 2
