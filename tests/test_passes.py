"""Passes: shapes/MACs, BN folding (eval + QAT), fusion, discovery, quantizer insertion,
grouping, costs, the pass manager, and the prepare → materialize → torch.export round trip."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import fx

from fliqs_compiler import passes as P
from fliqs_compiler.errors import FliqsError
from fliqs_compiler.graph import Graph, InputSpec
from fliqs_compiler.quantizers import FormatQuantizer, SearchableQuantizer

torch.set_num_threads(2)


class SmallCNN(nn.Module):
    """conv-bn-relu stem, a residual block, a strided conv, a linear head."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c3 = nn.Conv2d(8, 16, 3, stride=2)
        self.fc = nn.Linear(16, 10)
        for bn in (self.bn1, self.bn2):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.5, 0.5)

    def forward(self, x):
        y = torch.relu(self.bn1(self.c1(x)))
        y = torch.relu(y + self.bn2(self.c2(y)))
        y = torch.relu(self.c3(y)).mean((2, 3))
        return self.fc(y)


SHAPE = (2, 3, 16, 16)


def exported(module: nn.Module, shape=SHAPE, train=False) -> Graph:
    torch.manual_seed(0)
    module.train(train)
    gm = torch.export.export(module, (torch.randn(shape),)).module()
    return Graph(gm, [InputSpec("x", shape)], name="net", source="torch")


def traced(fn_module: nn.Module, shape) -> Graph:
    return Graph(fx.symbolic_trace(fn_module), [InputSpec("x", shape)], name="fx")


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    return model, exported(model)


# ---- shapes and MACs --------------------------------------------------------------------------
def test_macs_params_of_known_layers(cnn):
    _, g = cnn
    a = P.analyze(g)
    c1, c2, c3, fc = a.layers.values()
    assert (c1.op, c1.macs, c1.params) == ("conv2d", 2 * 8 * 16 * 16 * 3 * 9, 8 * 3 * 9)
    assert c2.macs == 2 * 8 * 16 * 16 * 8 * 9 and c2.attrs["bias"]  # folded BN made a bias
    assert c3.output_shape == (2, 16, 7, 7) and c3.macs == 2 * 16 * 7 * 7 * 8 * 9
    assert c3.attrs["stride"] == (2, 2)
    assert (fc.op, fc.macs, fc.params, fc.weight_shape) == ("linear", 2 * 10 * 16, 160, (10, 16))
    assert a.meta["pass_times"]["propagate_shapes"] >= 0
    assert g.layers == {}  # analyze returns a new graph


class Mixed(nn.Module):
    """Depthwise conv, conv-transpose, conv1d-free matmul with a constant weight (functional)."""

    def __init__(self):
        super().__init__()
        self.dw = nn.Parameter(torch.randn(4, 1, 3, 3))
        self.ct = nn.Parameter(torch.randn(4, 6, 2, 2))
        self.m = nn.Parameter(torch.randn(12, 5))
        self.pw = nn.Parameter(torch.randn(4, 4, 1, 1))

    def forward(self, x):
        x = F.conv2d(x, self.pw)
        x = F.conv2d(x, self.dw, None, 1, 1, 1, 4)
        x = F.conv_transpose2d(x, self.ct, stride=2)
        x = torch.flatten(x, 2)[:, :, :12]
        return torch.matmul(x, self.m)


def test_macs_grouped_conv_transpose_matmul_fx_vocabulary():
    g = traced(Mixed(), (1, 4, 5, 5))
    a = P.analyze(g, P.PrepareOptions(keep_float_first=False, keep_float_last=False))
    pw, dw, ct, mm = a.layers.values()
    assert (pw.op, dw.op, ct.op, mm.op) == ("conv2d", "conv2d", "conv_transpose2d", "matmul")
    assert dw.macs == 1 * 4 * 5 * 5 * (4 // 4) * 9 and dw.attrs["groups"] == 4
    assert ct.macs == (1 * 4 * 5 * 5) * 6 * 4 and ct.output_shape == (1, 6, 10, 10)
    assert mm.macs == 1 * 6 * 5 * 12 and mm.params == 60
    p = P.prepare(g, P.PrepareOptions(keep_float_first=False, keep_float_last=False))
    wq = p.gm.get_submodule(p.space.quantizers[(ct.name, "weight")])
    assert (wq.axis, wq.channels, wq.block_axis) == (1, 6, 0)  # conv-transpose: [Cin, Cout..]
    wq = p.gm.get_submodule(p.space.quantizers[(mm.name, "weight")])
    assert (wq.axis, wq.channels, wq.block_axis) == (1, 5, 0)  # matmul [K, N]


# ---- BN folding -------------------------------------------------------------------------------
def _no_bn(graph: Graph) -> bool:
    return not any("batch_norm" in str(n.target) for n in graph.gm.graph.nodes)


def test_bn_fold_eval_exact(cnn):
    model, g = cnn
    x = torch.randn(SHAPE)
    folded = P.run_passes(copy.deepcopy(g), [P.fold_batchnorm], check_numerics=True)
    assert _no_bn(folded) and len(folded.meta["bn_folded"]) == 2
    assert not any("num_batches_tracked" in str(n.target) for n in folded.gm.graph.nodes)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5, rtol=1e-5)


class LinBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.bn = nn.Linear(6, 5), nn.BatchNorm1d(5)
        self.ct, self.bn2 = nn.ConvTranspose2d(2, 3, 2, stride=2), nn.BatchNorm2d(3)
        for bn in (self.bn, self.bn2):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.data.uniform_(-1.5, 1.5)

    def forward(self, x):
        y = self.bn(self.fc(x.flatten(1)[:, :6]))
        z = self.bn2(self.ct(x[:, :2]))
        return y.sum() + z


def test_bn_fold_linear_and_conv_transpose_exact():
    model = LinBN().eval()
    g = exported(model, (4, 3, 2, 2))
    x = torch.randn(4, 3, 2, 2)
    folded = P.fold_batchnorm(g)
    assert len(folded.meta["bn_folded"]) == 2 and _no_bn(folded)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5, rtol=1e-5)


def test_bn_fold_functional_vocabulary():
    class FBN(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 3, 3, 3))
            self.register_buffer("rm", torch.rand(4))
            self.register_buffer("rv", torch.rand(4) + 0.5)
            self.g = nn.Parameter(torch.rand(4) + 0.5)
            self.b = nn.Parameter(torch.randn(4))

        def forward(self, x):
            return F.batch_norm(F.conv2d(x, self.w, padding=1), self.rm, self.rv, self.g, self.b,
                                eps=1e-3)

    m = FBN()
    g = traced(m, (1, 3, 6, 6))
    x = torch.randn(1, 3, 6, 6)
    folded = P.fold_batchnorm(g)
    assert folded.meta["bn_folded"] and _no_bn(folded)
    assert torch.allclose(folded(x), m(x), atol=1e-5)


def test_bn_fold_qat_train_and_eval_numerics():
    torch.manual_seed(1)
    model = SmallCNN()
    g = exported(model, train=True)  # training-mode export: BN with batch statistics
    P.manager.enable_train_eval(g.gm)
    qat = P.run_passes(g, [P.fold_batchnorm_qat], check_numerics=False)
    assert len(qat.meta["bn_folded_qat"]) == 2 and _no_bn(qat)
    assert not any("num_batches_tracked" in str(n.target) for n in qat.gm.graph.nodes)
    x = torch.randn(SHAPE)
    ref = SmallCNN()
    ref.load_state_dict(model.state_dict())
    ref.train()
    qat.gm.train()
    y_ref, y = ref(x), qat(x)
    assert torch.allclose(y, y_ref, atol=1e-5, rtol=1e-4)  # batch statistics, like unfused BN
    bn_mod = qat.gm.get_submodule(f"{qat.meta['bn_folded_qat'][0]}_bn")
    assert torch.allclose(bn_mod.running_mean, ref.bn1.running_mean, atol=1e-6)  # stats update
    ref.eval()
    qat.gm.eval()
    with torch.no_grad():
        assert torch.allclose(qat(x), ref(x), atol=1e-5, rtol=1e-4)  # running stats = eval fold
        final = P.finalize_qat_bn(qat)
        assert not any(isinstance(m, (P.bn_fold.FoldWeight, P.bn_fold.FoldedBatchNorm))
                       for m in final.gm.modules())
        assert torch.allclose(final(x), ref(x), atol=1e-5, rtol=1e-4)


def test_prepare_qat_then_materialize_folds_into_constants():
    model = SmallCNN().eval()
    g = exported(model)
    p = P.prepare(g, P.PrepareOptions(formats=["int8"], bn="qat"))
    x = torch.randn(SHAPE)
    p.gm.eval()
    with torch.no_grad():
        y = p(x)
    m = P.materialize(p, p.space.formats_of(p.space.uniform_choice("int8")))
    assert not any(isinstance(mod, P.bn_fold.FoldWeight) for mod in m.gm.modules())
    with torch.no_grad():
        assert torch.allclose(m(x), y, atol=1e-4)


# ---- fusion / discovery / keep-float ------------------------------------------------------------
def test_fusion_nonneg_and_unsigned_activation_quantizers(cnn):
    _, g = cnn
    p = P.prepare(g, P.PrepareOptions(keep_float_first=False, keep_float_last=False))
    names = list(p.layers)
    c1 = p.fx_node(p.layers[names[0]].node)
    assert c1.meta["fusion"]["act"] == "relu"
    c2 = p.fx_node(p.layers[names[1]].node)
    assert "residual_add" in c2.meta["fusion"]
    aq = [p.gm.get_submodule(p.space.quantizers[(n, "activation")]) for n in names]
    assert [q.unsigned for q in aq] == [False, True, True, True]  # raw input is signed
    assert aq[0].block_axis == 1 and aq[3].block_axis == -1


def test_keep_float_rules(cnn):
    _, g = cnn
    a = P.analyze(g)
    assert [layer.keep_float for layer in a.layers.values()] == [True, False, False, True]
    assert [layer.group for layer in a.layers.values()][0] == ""
    a = P.analyze(g, P.PrepareOptions(keep_float_first=False, keep_float_last=False,
                                      keep_float_patterns=["^conv2d_1$"]))
    assert [layer.keep_float for layer in a.layers.values()] == [False, True, False, False]
    with pytest.raises(FliqsError, match="keep-float pattern"):
        P.analyze(g, P.PrepareOptions(keep_float_patterns=["("]))


def test_act_x_act_matmul_only_with_option():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            s = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2), -1)
            return s @ x

    g = exported(Attn(), (1, 4, 8))
    base = dict(keep_float_first=False, keep_float_last=False)
    assert [layer.op for layer in P.analyze(g, P.PrepareOptions(**base)).layers.values()] == \
        ["linear", "linear"]
    p = P.prepare(g, P.PrepareOptions(quantize_act_matmul=True, **base))
    ops = [(layer.op, layer.params) for layer in p.layers.values()]
    assert ops == [("linear", 72 - 8), ("linear", 64), ("matmul", 0), ("matmul", 0)]
    ctx = list(p.layers.values())[3]
    assert p.gm.get_submodule(p.space.quantizers[(ctx.name, "activation")]).unsigned  # softmax
    x = torch.randn(1, 4, 8)
    p(x).sum().backward()


# ---- quantizer insertion, grouping, costs ------------------------------------------------------
def test_quantizer_placement_and_names(cnn):
    _, g = cnn
    p = P.prepare(g, P.PrepareOptions(formats=["int4", "int8", "fp8_e4m3"]))
    searched = [layer.name for layer in p.searched_layers()]
    assert set(p.space.quantizers) == {(n, r) for n in searched for r in ("weight", "activation")}
    for (name, role), path in p.space.quantizers.items():
        assert path == name + ("_wq" if role == "weight" else "_aq")
        q = p.gm.get_submodule(path)
        assert isinstance(q, SearchableQuantizer) and q.candidates == ("int4", "int8", "fp8_e4m3")
        qnode = next(n for n in p.gm.graph.nodes if n.op == "call_module" and n.target == path)
        assert list(qnode.users)[0].name == p.layers[name].node
        if role == "weight":
            assert (q.axis, q.block_axis) == (0, 1)
            assert q.channels == p.layers[name].weight_shape[0]
            assert qnode.args[0].op == "get_attr"
        else:
            assert q.channels is None
    n_q = sum(isinstance(m, SearchableQuantizer) for m in p.gm.modules())
    assert n_q == 2 * len(searched)


def test_grouping_tied_untied_regex_and_add_concat(cnn):
    _, g = cnn
    base = dict(keep_float_first=False, keep_float_last=False, formats=["int8", "int4"])
    tied = P.analyze(g, P.PrepareOptions(**base)).space
    assert [d.name for d in tied.decisions] == ["conv2d", "conv2d_1", "conv2d_2", "linear"]
    assert tied.decisions[0].members == [("conv2d", "weight"), ("conv2d", "activation")]
    untied = P.analyze(g, P.PrepareOptions(tie_weight_activation=False, **base))
    assert len(untied.space.decisions) == 8
    assert untied.layers["conv2d"].group == "conv2d.weight"
    rx = P.analyze(g, P.PrepareOptions(group_patterns=["^conv2d"], **base))
    assert [d.name for d in rx.space.decisions] == ["^conv2d", "linear"]
    assert {layer.group for layer in rx.layers.values()} == {"^conv2d", "linear"}
    # residual add: c2 reads relu(c1); c3 reads relu(add(relu(c1), c2)) -> tied
    add = P.analyze(g, P.PrepareOptions(tie_add_concat_inputs=True, **base))
    assert [d.name for d in add.space.decisions] == ["conv2d", "conv2d_1", "linear"]
    assert add.layers["conv2d_1"].group == add.layers["conv2d_2"].group == "conv2d_1"
    choice = add.space.uniform_choice("int4")
    assert add.space.formats_of(choice)["conv2d_2"] == {"weight": "int4", "activation": "int4"}


def test_cost_table(cnn):
    _, g = cnn
    a = P.analyze(g, P.PrepareOptions(formats=["int4", "fp8_e4m3"]))
    layer = a.layers["conv2d_1"]
    row = a.meta["cost_table"]["conv2d_1"]
    assert row["bops"]["int4/fp8_e4m3"] == layer.macs * 4 * 8
    assert row["size_bytes"]["int4"] == layer.params * 4 / 8
    assert a.meta["float_bops"] == sum(x.macs * 1024 for x in a.layers.values() if x.keep_float)
    assert "bops" not in a.meta["cost_table"]["conv2d"]  # kept in float


def test_bad_options_are_fliqs_errors(cnn):
    _, g = cnn
    with pytest.raises(FliqsError, match="unknown format 'int33'"):
        P.prepare(g, P.PrepareOptions(formats=["int33"]))
    with pytest.raises(FliqsError, match="bn option"):
        P.prepare(g, P.PrepareOptions(bn="nope"))


# ---- the searchable graph trains; materialize round trip ---------------------------------------
def test_searchable_graph_forward_backward_and_switching(cnn):
    _, g = cnn
    p = P.prepare(g, P.PrepareOptions(formats=["int4", "int8", "fp8_e4m3", "mxfp4_e2m1"]))
    p.gm.train()  # works although the graph came from ExportedProgram.module()
    assert all(m.training for m in p.gm.modules())
    x = torch.randn(SHAPE)
    outs = []
    weight = dict(p.gm.named_parameters())["conv2d_1_folded_weight"]
    for i, fmt in enumerate(("int4", "int8", "fp8_e4m3", "mxfp4_e2m1")):
        p.space.apply(p.gm, p.space.uniform_choice(fmt))
        p.gm.zero_grad()
        y = p(x)
        y.square().mean().backward()
        outs.append(y.detach())
        assert weight.grad is not None and weight.grad.abs().sum() > 0
        scale = p.gm.get_submodule("conv2d_1_wq").log_scales[i]  # learned as its logarithm
        assert (scale.grad is not None) == (fmt != "mxfp4_e2m1")  # MX: no learned scale
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])


def test_materialize_round_trip_with_config_and_export(cnn, tmp_path):
    from fliqs_compiler.config import load_config, save_config

    _, g = cnn
    p = P.prepare(g, P.PrepareOptions(formats=["int4", "int8", "fp8_e4m3"]))
    x = torch.randn(SHAPE)
    choice = [1, 2]
    p.space.apply(p.gm, choice)
    with torch.no_grad():
        y = p(x)  # initialises the chosen candidates' scales
    formats = p.space.formats_of(choice)
    formats["conv2d_2"]["activation"] = "float"  # untied in the config: allowed
    formats["conv2d"] = {"weight": "float", "activation": "float"}
    path = save_config(tmp_path / "config.json", "net", formats, extra={"note": 1})
    cfg = load_config(path, p)
    assert cfg["model"] == "net" and cfg["note"] == 1
    m = P.materialize(p, cfg)
    assert isinstance(p.gm.get_submodule("conv2d_1_wq"), SearchableQuantizer)  # input untouched
    fixed = {k: m.gm.get_submodule(v) for k, v in m.space.quantizers.items()}
    assert set(fixed) == {("conv2d_1", "weight"), ("conv2d_1", "activation"),
                          ("conv2d_2", "weight")}
    assert all(isinstance(q, FormatQuantizer) for q in fixed.values())
    assert fixed[("conv2d_1", "weight")].fmt == "int8"
    act = fixed[("conv2d_1", "activation")]  # int8 on a ReLU output executes as uint8
    assert (act.fmt, act.searched_format, act.role) == ("uint8", "int8", "activation")
    assert fixed[("conv2d_2", "weight")].fmt == "fp8_e4m3"
    assert m.meta["formats_config"]["linear"] == {"weight": "float", "activation": "float"}
    # same numbers as the searchable graph for the same formats (conv2d_2 act float now)
    p.gm.get_submodule("conv2d_2_aq").candidates  # exists
    with torch.no_grad():
        q = P.materialize(p, p.space.formats_of(choice))
        assert torch.allclose(q(x), y, atol=1e-6)
    ep = torch.export.export(m.gm, (x,))
    fq_nodes = [n for n in ep.graph.nodes if n.op == "call_function"
                and n.target == torch.ops.fliqs.fake_quant.default]
    assert len(fq_nodes) == len(m.space.quantizers) == 3


def test_materialize_rejects_bad_configs(cnn):
    _, g = cnn
    p = P.prepare(g, P.PrepareOptions(formats=["int4", "int8"]))
    with pytest.raises(FliqsError, match="unknown node.*'nope'"):
        P.materialize(p, {"nope": {"weight": "int8", "activation": "int8"}})
    with pytest.raises(FliqsError, match="unknown format 'int9'"):
        P.materialize(p, {"conv2d_1": {"weight": "int9", "activation": "int8"}})
    with pytest.raises(FliqsError, match="was not searched"):
        P.materialize(p, {"conv2d_1": {"weight": "fp8_e4m3", "activation": "int8"}})
    with pytest.raises(FliqsError, match="kept in float"):
        P.materialize(p, {"conv2d": {"weight": "int8", "activation": "int8"}})


def test_materialize_calibrates_unused_candidates(cnn):
    _, g = cnn
    p = P.prepare(g, P.PrepareOptions(formats=["int8"]))
    m = P.materialize(p, p.space.formats_of([0, 0]))
    for path in m.space.quantizers.values():
        assert m.gm.get_submodule(path).scale.abs().min() < 1.0  # not the placeholder 1.0


# ---- pass manager ------------------------------------------------------------------------------
def test_pass_manager_times_and_numeric_check(cnn):
    _, g = cnn

    def breaks(graph):
        for n in graph.gm.graph.nodes:
            if n.op == "output":
                with graph.gm.graph.inserting_before(n):
                    neg = graph.gm.graph.call_function(torch.neg, (n.args[0][0],))
                n.args = ((neg,),)
        return graph

    ok = P.run_passes(copy.deepcopy(g), [P.propagate_shapes], check_numerics=True)
    assert "propagate_shapes" in ok.meta["pass_times"]
    bad = P.manager.numeric(breaks)
    with pytest.raises(RuntimeError, match="breaks changed"):
        P.run_passes(copy.deepcopy(g), [bad], check_numerics=True)


# ---- symbolic_trace of nn.Module layers ----------------------------------------------------------
def test_symbolic_trace_modules_are_functionalized():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    g = traced(model, SHAPE)
    assert any(n.op == "call_module" for n in g.gm.graph.nodes)
    a = P.analyze(g, P.PrepareOptions(check_numerics=True))  # functionalize + fold are exact
    assert list(a.layers) == ["c1", "c2", "c3", "fc"]  # public names = module paths
    assert len(a.meta["bn_folded"]) == 2
    assert a.layers["c2"].macs == 2 * 8 * 16 * 16 * 8 * 9
    x = torch.randn(SHAPE)
    with torch.no_grad():
        assert torch.allclose(a(x), model(x), atol=1e-5)
    p = P.prepare(g, P.PrepareOptions(formats=["int8"]))
    assert set(p.space.quantizers) == {("c2", "weight"), ("c2", "activation"),
                                       ("c3", "weight"), ("c3", "activation")}
    p(x).sum().backward()


def test_untied_add_concat_groups_activations_only(cnn):
    _, g = cnn
    a = P.analyze(g, P.PrepareOptions(keep_float_first=False, keep_float_last=False,
                                      tie_weight_activation=False, tie_add_concat_inputs=True))
    names = [d.name for d in a.space.decisions]
    assert names == ["conv2d.weight", "conv2d.activation", "conv2d_1.weight",
                     "conv2d_1.activation", "conv2d_2.weight", "linear.weight",
                     "linear.activation"]
    tied = a.space.decisions[3]
    assert tied.members == [("conv2d_1", "activation"), ("conv2d_2", "activation")]
