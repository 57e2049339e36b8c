"""Per-layer TVM latency measurement (the latency table's measure_fn)."""

import pytest

from fliqs_compiler.backends.tvm_measure import layer_graph, tvm_layer_ms
from fliqs_compiler.base.errors import FliqsError
from fliqs_compiler.ir.graph import LayerInfo

pytestmark = pytest.mark.tvm
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
