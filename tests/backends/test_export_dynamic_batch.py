"""``model.qdq.onnx`` keeps a dynamic batch: a batch-polymorphic graph (a torch module, an ONNX
model with a symbolic leading dim) exports with a symbolic leading input / output dim
(``onnx_export.BATCH_DIM``), and a DEFAULT ``onnxruntime.InferenceSession(path)`` runs it on
batches of 1, 3 and 7 with every sample within one output LSB of the batch-1 run and of the
torch graph (the conformance matrix's measure, ``conformance_matrix.lsb_error``). A graph whose
batch is pinned (``graph.meta['batch']['pinned_by']``) keeps its static dim, and still builds
a default session (the static ViT: MatMulAddFusion only fuses static shapes)."""
from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import fliqs_compiler as fq
from conformance_matrix import LSB_SLACK, lsb_error
from fliqs_compiler import passes
from fliqs_compiler.backends import onnx_export as ox
from fliqs_compiler.numerics.quant import mse_scale
from fliqs_compiler.numerics.quantizers import FormatQuantizer
from onnx_models import make_paddle_pinned, make_vit

BATCHES = (1, 3, 7)


def _dims(values) -> list:
    return [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in values]


def _materialize(graph, config: dict, calib: torch.Tensor, **prepare):
    """``graph`` prepared (calibrated scales; ``prepare``: more PrepareOptions), ``config``
    applied and calibrated on ``calib``, materialized, with an int8 output quantizer (the unit of
    the LSB criterion) on its output."""
    fmts = sorted({f for e in config.values() for f in e.values()} - {"float"} | {"int8"})
    sg = passes.prepare(graph, passes.PrepareOptions(
        formats=fmts, tie_weight_activation=False, keep_float_first=False, keep_float_last=False,
        scale_mode="calibrated", **prepare))
    config = {L.name: config.get(L.name, {"weight": "int8", "activation": "int8"})
              for L in sg.layers.values()}
    with torch.no_grad():
        sg.space.apply(sg.gm, sg.space.choice_of(config))
        sg(calib)
    fixed = passes.materialize(sg, config)
    gm = fixed.gm
    with torch.no_grad():
        y = fixed(calib)
    y = y[0] if isinstance(y, (tuple, list)) else y
    q = FormatQuantizer("int8", mse_scale(y, "int8"))
    gm.add_submodule("out_q", q)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    value = out.args[0]
    first = value[0] if isinstance(value, (tuple, list)) else value
    with gm.graph.inserting_before(out):
        qn = gm.graph.call_module("out_q", (first,))
    out.args = ((qn, *value[1:]) if isinstance(value, (tuple, list)) else qn,)
    gm.recompile()
    return fixed, q


def _outputs(out) -> list:
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    return [np.asarray(o.detach().numpy() if torch.is_tensor(o) else o, np.float32) for o in outs]


def _check_batches(fixed, qs, path, x: np.ndarray) -> dict:
    """Per batch size: the max LSB error (over outputs ``qs[i]`` measures, and samples) of the
    default session against its own batch-1 runs and against the torch graph (and all of ``x``
    in one batch against the graph). Asserts all are within one LSB."""
    qs = qs if isinstance(qs, (list, tuple)) else [qs]
    sess = ort.InferenceSession(str(path))  # a user's session: no options at all
    name = sess.get_inputs()[0].name
    x_all, x = x, np.ascontiguousarray(x[:max(BATCHES)])
    runs = [sess.run(None, {name: x[i:i + 1]}) for i in range(len(x))]
    single = [np.concatenate([r[k] for r in runs]) for k in range(len(qs))]
    errs = {}
    for b in BATCHES:
        got = sess.run(None, {name: x[:b]})
        with torch.no_grad():
            ref = _outputs(fixed(torch.from_numpy(x[:b])))
        assert all(g.shape[0] == b for g in got[:len(qs)])
        errs[b] = (max(lsb_error(s[:b], g, q) for s, g, q in zip(single, got, qs)),
                   max(lsb_error(r, g, q) for r, g, q in zip(ref, got, qs)))
    # and every sample given, in one batch, against the graph run one sample at a time: the torch
    # graph itself is not batch invariant (its fp32 conv / matmul sum in a batch-dependent order,
    # and a fine activation grid turns one reassociation into a flipped code — measured: the
    # conformance branches' fp16 activation case, one sample of 48 at 3 LSB between torch's
    # batch-48 and batch-1 runs, ORT equal to both its own batch-1 runs and torch's)
    with torch.no_grad():
        per_sample = [_outputs(fixed(torch.from_numpy(np.ascontiguousarray(x_all[i:i + 1]))))
                      for i in range(len(x_all))]
    ref = [np.concatenate([r[k] for r in per_sample]) for k in range(len(per_sample[0]))]
    got = sess.run(None, {name: np.ascontiguousarray(x_all)})
    errs[len(x_all)] = (0.0, max(lsb_error(r, g, q) for r, g, q in zip(ref, got, qs)))
    print(f"{path}: LSB (vs batch-1 runs, vs torch) per batch {errs}")
    assert all(max(e) <= 1.0 + LSB_SLACK for e in errs.values()), errs
    return errs


# ---- a torch CNN, mixed int8 / int4 ------------------------------------------------------------
def _searched_layers(graph) -> list:
    """Every conv/linear searched (first and last included), int8 candidates."""
    return list(passes.prepare(graph, passes.PrepareOptions(
        formats=["int8"], keep_float_first=False, keep_float_last=False)).layers)


def _exported(graph, config, digits, folder):
    """(fixed graph, quantizers, model.qdq.onnx path) of ``config`` calibrated on 64 digits."""
    fixed, q = _materialize(graph, config, digits.x_train[:64])
    return fixed, q, ox.export_qdq(fixed, folder / "model.qdq.onnx")


@pytest.fixture(scope="module")
def cnn(tmp_path_factory, trained_tiny_cnn, digits):
    torch.set_num_threads(1)  # numerics only (see test_conformance's matrix fixture)
    graph = fq.load(copy.deepcopy(trained_tiny_cnn).eval(), (digits.x_train[:1],))
    names = _searched_layers(graph)
    config = {names[0]: {"weight": "int8", "activation": "int8"},
              names[1]: {"weight": "int4", "activation": "int4"},
              names[2]: {"weight": "int4", "activation": "int8"}}
    yield (graph,) + _exported(graph, config, digits, tmp_path_factory.mktemp("cnn"))
    torch.set_num_threads(2)


def test_torch_graph_exports_a_symbolic_batch(cnn):
    graph, fixed, q, path = cnn
    assert ox.batch_inputs(fixed) == [0]
    model = onnx.load(path)
    assert _dims(model.graph.input) == [[ox.BATCH_DIM, 1, 8, 8]]
    assert _dims(model.graph.output) == [[ox.BATCH_DIM, 10]]


def test_cnn_default_session_runs_batches_1_3_7(cnn, digits):
    graph, fixed, q, path = cnn
    _check_batches(fixed, q, path, digits.x_test[:64].numpy())


# ---- every ORT form fix on a symbolic batch: the conformance matrix's branches ---------------
# One case per fix (onnx_export.ORT_FORM_FIXES): the Linear → gemm_to_matmul; int4 / fp8
# activations → detach_float_bias, shield_unbuildable_q (int4 Q moved across a MaxPool) and
# protect_relu_before_unclamped_q; bf16 weights under int8 activations → shield_float_weight;
# fp16 activations into an int8-weight Linear → shield_weight_only_matmul; mxint8 weights →
# shield_blocked_weight.
FIX_CASES = [("int4", "activation"), ("fp8_e4m3", "activation"), ("bf16", "weight"),
             ("fp16", "activation"), ("mxint8", "weight")]


def _export_recording(fixed, path, monkeypatch) -> tuple:
    """(model, names of the fixes that changed it) of ``export_qdq(fixed, path)``."""
    changed = []

    def recording(fix):
        def run(model):
            before = model.SerializeToString()
            out = fix(model)
            if out.SerializeToString() != before:
                changed.append(fix.__name__)
            return out
        return run
    monkeypatch.setattr(ox, "ORT_FORM_FIXES", tuple(recording(f) for f in ox.ORT_FORM_FIXES))
    model = onnx.load(ox.export_qdq(fixed, path))
    monkeypatch.undo()
    return model, changed


@pytest.fixture(scope="module")
def branches():
    import conformance_matrix as M
    torch.set_num_threads(1)
    digits, labels = M._digits()
    cg = M.CaseGraph(FIX_CASES, M._train(digits, labels), digits[1400:1400 + 3 * M.PER_KIND])
    yield cg, cg.inputs(digits[1500:1500 + M.PER_KIND])
    torch.set_num_threads(2)


def test_every_ort_form_fix_applies_to_a_symbolic_batch(branches, monkeypatch, tmp_path):
    cg, x = branches
    model, changed = _export_recording(cg.graph, tmp_path / "dynamic.onnx", monkeypatch)
    assert _dims(model.graph.input) == [[ox.BATCH_DIM, len(FIX_CASES), 8, 8]]
    # every fix but the softmax-input barrier (no softmax here: the next test has one)
    assert changed == [f.__name__ for f in ox.ORT_FORM_FIXES if f is not ox.shield_softmax_input]
    # the same rewrites as a static export of the same graph
    monkeypatch.setattr(ox, "batch_inputs", lambda g: [])
    static, changed_static = _export_recording(cg.graph, tmp_path / "static.onnx", monkeypatch)
    assert _dims(static.graph.input)[0][0] != ox.BATCH_DIM
    assert changed_static == changed
    assert sorted(n.op_type for n in static.graph.node) == sorted(
        n.op_type for n in model.graph.node)
    _check_batches(cg.graph, cg.out_q, tmp_path / "dynamic.onnx", x)


def test_softmax_input_barrier_applies_to_a_symbolic_batch(digits, monkeypatch, tmp_path):
    """``--quantize-inputs softmax`` on an ONNX ViT with a symbolic batch: ``shield_softmax_input``
    rewrites the export, which keeps its symbolic batch and runs batches 1, 3 and 7 in a default
    session within one LSB."""
    torch.set_num_threads(1)
    graph = fq.load(make_vit(tmp_path))
    soft = [L.name for L in passes.prepare(graph, passes.PrepareOptions(
        formats=["int8"], keep_float_first=False, keep_float_last=False,
        quantize_inputs=("softmax",))).layers.values() if L.op == "softmax"]
    assert soft
    fixed, q = _materialize(graph, {n: {"weight": "float", "activation": "int8"} for n in soft},
                            digits.x_train[:64], quantize_inputs=("softmax",))
    model, changed = _export_recording(fixed, tmp_path / "vit.onnx", monkeypatch)
    torch.set_num_threads(2)
    assert "shield_softmax_input" in changed
    assert _dims(model.graph.input)[0][0] == ox.BATCH_DIM
    _check_batches(fixed, q, tmp_path / "vit.onnx", digits.x_test[:64].numpy())


# ---- an ONNX ViT with a symbolic batch (class-token Expand, attention reshapes) ---------------
@pytest.fixture(scope="module")
def vit(tmp_path_factory, digits):
    torch.set_num_threads(1)
    graph = fq.load(make_vit(tmp_path_factory.mktemp("vit_src")))
    assert graph.meta["batch"]["dynamic"]
    layers = _searched_layers(graph)
    # int8 everywhere but: int4 weights (qkv), an MX activation (mlp.0: blocked on the feature
    # axis of [batch, 17, 32] tokens, a -1 batch in its Reshapes; the weight reaches the MatMul
    # through a Transpose), mxint8 weights of two blocks (mlp.2, K = 64)
    config = {layers[1]: {"weight": "int4", "activation": "int8"},
              layers[3]: {"weight": "int8", "activation": "mxfp8_e4m3"},
              layers[4]: {"weight": "mxint8", "activation": "int8"}}
    yield _exported(graph, config, digits, tmp_path_factory.mktemp("vit"))
    torch.set_num_threads(2)


def test_vit_exports_a_symbolic_batch(vit):
    fixed, q, path = vit
    model = onnx.load(path)
    assert _dims(model.graph.input) == [[ox.BATCH_DIM, 1, 8, 8]]
    assert _dims(model.graph.output)[0][0] == ox.BATCH_DIM


def test_vit_default_session_runs_batches_1_3_7(vit, digits):
    fixed, q, path = vit
    _check_batches(fixed, q, path, digits.x_test[:64].numpy())


# ---- the same ViT with a pinned batch: static shapes, MatMulAddFusion's Reshapes -----------------
def _pinned_vit(src):
    """The ViT import with its batch pinned (as a third-party model with a fixed batch is):
    ``graph.meta['batch']['pinned_by']``, so the export keeps the static dims."""
    graph = fq.load(src)
    graph.meta["batch"] = dict(graph.meta["batch"], dynamic=False,
                               pinned_by="test: a model imported with a fixed batch")
    return graph


def _static_vit_configs(layers) -> dict:
    return {"int8": {},  # int8 everywhere
            # int4 weights and activations, fp8 layers, in both blocks
            "mixed": {layers[1]: {"weight": "int4", "activation": "int8"},
                      layers[2]: {"weight": "int8", "activation": "int4"},
                      layers[3]: {"weight": "fp8_e4m3", "activation": "fp8_e4m3"},
                      layers[6]: {"weight": "int4", "activation": "int4"},
                      layers[8]: {"weight": "int8", "activation": "fp8_e4m3"}}}


@pytest.fixture(scope="module")
def vit_src(tmp_path_factory):
    torch.set_num_threads(1)  # numerics only (see test_conformance's matrix fixture)
    yield make_vit(tmp_path_factory.mktemp("vit_static_src"))
    torch.set_num_threads(2)


@pytest.mark.parametrize("config", ["int8", "mixed"])
def test_static_batch_vit_builds_a_default_session(vit_src, digits, config, monkeypatch,
                                                   tmp_path):
    """A static-batch ViT (Linear layers as MatMul + Add on [1, 17, 32]) loads in a DEFAULT
    session and agrees with onnx.reference and the torch graph within one output LSB. Without
    ``onnx_export._matmul_bias_as_sub`` (part of ``gemm_to_matmul``) that session does not
    build (MatMulAddFusion's Reshapes: a QuantizeLinear with output_dtype INT8 and a UINT8
    zero point), and the rewrite leaves the graph's values bit-identical (onnx.reference)."""
    from onnx.reference import ReferenceEvaluator
    layers = _searched_layers(_pinned_vit(vit_src))
    fixed, q = _materialize(_pinned_vit(vit_src), _static_vit_configs(layers)[config],
                            digits.x_train[:64])
    assert ox.batch_inputs(fixed) == []
    path = ox.export_qdq(fixed, tmp_path / "model.qdq.onnx")
    model = onnx.load(path)
    assert _dims(model.graph.input) == [[1, 1, 8, 8]]
    if config == "mixed":
        stored = {t.data_type for t in model.graph.initializer}
        assert {onnx.TensorProto.INT4, onnx.TensorProto.FLOAT8E4M3FN} <= stored
    producer = {o: n for n in model.graph.node for o in n.output}
    assert not [n.name for n in model.graph.node if n.op_type == "Add"
                and any(getattr(producer.get(i), "op_type", "") == "MatMul" for i in n.input)]
    monkeypatch.setattr(ox, "_matmul_bias_as_sub", lambda m: m)
    unfixed = ox.export_qdq(fixed, tmp_path / "unfixed.onnx")
    monkeypatch.undo()
    if config == "int8":  # the test can fail: unfixed, no session at all
        with pytest.raises(Exception, match="output_dtype INT8 does not match"):
            ort.InferenceSession(str(unfixed))
    sess = ort.InferenceSession(str(path))  # a user's session: no options at all
    ref, ref_unfixed = ReferenceEvaluator(model), ReferenceEvaluator(onnx.load(unfixed))
    x = digits.x_test[:32].numpy()
    x = np.concatenate([x, 3 * x])  # held-out, and beyond the calibrated ranges
    worst = {"vs reference": 0.0, "vs torch": 0.0}
    for i in range(len(x)):
        xi = np.ascontiguousarray(x[i:i + 1])
        got = sess.run(None, {"x": xi})[0]
        want = ref.run(None, {"x": xi})[0]
        np.testing.assert_array_equal(ref_unfixed.run(None, {"x": xi})[0], want)
        with torch.no_grad():
            graph = _outputs(fixed(torch.from_numpy(xi)))[0]
        worst["vs reference"] = max(worst["vs reference"], lsb_error(want, got, q))
        worst["vs torch"] = max(worst["vs torch"], lsb_error(graph, got, q))
    print(f"static ViT {config}: default session LSB {worst}")
    assert max(worst.values()) <= 1.0 + LSB_SLACK, worst


# ---- a Paddle2ONNX-style graph: literal batch-1 targets the importer unpinned ---------------
def test_paddle_style_graph_exports_a_symbolic_batch(tmp_path, digits):
    graph = fq.load(make_paddle_pinned(tmp_path))
    assert graph.meta["batch"]["dynamic"] and graph.meta["batch"]["unpinned"]
    x = torch.randn(64, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    fixed, q = _materialize(graph, {}, x)
    path = ox.export_qdq(fixed, tmp_path / "model.qdq.onnx")
    model = onnx.load(path)
    assert _dims(model.graph.input) == [[ox.BATCH_DIM, 3, 2, 2]]
    assert [d[0] for d in _dims(model.graph.output)] == [ox.BATCH_DIM] * 2
    _check_batches(fixed, q, path, x.numpy())


# ---- pinned batches stay static ----------------------------------------------------------------
def test_batch_merge_graph_keeps_its_static_batch(tmp_path):
    """A graph that truly runs on a batch of 1 only (``graph.meta['batch']['pinned_by']`` says
    why) is exported with its static dims, and its session still matches the graph."""
    from onnx_models import make_batch_merge
    graph = fq.load(make_batch_merge(tmp_path))
    assert not graph.meta["batch"]["dynamic"] and graph.meta["batch"]["pinned_by"]
    x = torch.randn(16, 6)
    fixed, q = _materialize(graph, {}, x[:1])
    path = ox.export_qdq(fixed, tmp_path / "model.qdq.onnx")
    model = onnx.load(path)
    assert ox.batch_inputs(fixed) == []
    assert _dims(model.graph.input) == [[1, 6]] and _dims(model.graph.output) == [[3]]
    got = ort.InferenceSession(str(path)).run(None, {"x": x[:1].numpy()})[0]
    assert lsb_error(_outputs(fixed(x[:1]))[0], got, q) <= 1.0 + LSB_SLACK


def test_static_torch_export_keeps_its_static_batch():
    """A graph whose placeholders carry int sizes (a static ``torch.export``) stays static."""
    from qdq_net import make_graph
    graph, _, _ = make_graph("int8")
    assert ox.batch_inputs(graph) == []


def test_a_batch_torch_onnx_cannot_keep_symbolic_is_pinned_with_a_warning(cnn, monkeypatch,
                                                                          tmp_path, caplog):
    """Should torch.onnx refuse the symbolic batch, the export is static and says why (a
    warning, ``graph.meta['export_batch_pinned_by']``), instead of failing the run."""
    graph, fixed, q, path = cnn
    real = ox._torch_onnx

    def refuse_dynamic(g, opset, batched, kwargs):
        if batched:
            raise RuntimeError("Constraints violated (batch)! the batch was specialized")
        return real(g, opset, batched, kwargs)
    monkeypatch.setattr(ox, "_torch_onnx", refuse_dynamic)
    fixed = copy.deepcopy(fixed)
    with caplog.at_level("WARNING", logger=ox.__name__):
        model = onnx.load(ox.export_qdq(fixed, tmp_path / "pinned.onnx"))
    assert _dims(model.graph.input) == [[1, 1, 8, 8]]
    assert "Constraints violated" in fixed.meta["export_batch_pinned_by"]
    assert "static batch 1" in caplog.text
