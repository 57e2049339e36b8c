"""Transformers through the main job: a ViT trained here on digits (both torch exporters) and a
torch encoder calling ``scaled_dot_product_attention``, with the attention MatMuls searched.

Checked the way users run the artifacts: ``model.qdq.onnx`` in a default
``onnxruntime.InferenceSession`` and ``tvm/model.so`` in a fresh ``relax.VirtualMachine``, on
held-out digits and the same digits scaled ×3 (outside the calibration range)."""
from __future__ import annotations

import contextlib
import copy
import io
import json
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn
from torch.nn import functional as Fn

import fliqs_compiler as fq
from fliqs_compiler import passes as P
from fliqs_compiler.driver import api
from onnx_models import TinyViT

pytestmark = pytest.mark.tvm
PROBABILITY_FORMATS = {"int8", "uint8", "fp8_e4m3", "fp8_e5m2", "bf16", "fp16"}


@pytest.fixture(scope="module")
def trained_vit(digits):
    """TinyViT (width 32, 2 blocks, 4 heads) trained in float on digits (300 steps, seed 0)."""
    from examples.toy_models import train_float
    torch.manual_seed(0)
    model = train_float(TinyViT(), digits.x_train, digits.y_train, 300, seed=0)
    with torch.no_grad():
        acc = (model(digits.x_test).argmax(1) == digits.y_test).float().mean().item()
    assert acc > 0.85, acc  # a model worth quantizing
    return model


def _export(model, folder, dynamo: bool):
    path = folder / f"vit_{'dynamo' if dynamo else 'legacy'}.onnx"
    kwargs = dict(dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17) \
        if not dynamo else dict(dynamic_shapes=({0: torch.export.Dim("batch")},), opset_version=18)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(copy.deepcopy(model).eval(), (torch.randn(2, 1, 8, 8),), str(path),
                          dynamo=dynamo, input_names=["x"], output_names=["logits"], **kwargs)
    return path


def _inputs(digits, n: int = 48) -> np.ndarray:
    x = digits.x_test[:n].numpy()
    return np.concatenate([x, 3.0 * x])  # ×3: beyond every calibrated activation range


def _tvm_outputs(so_path, x: np.ndarray) -> np.ndarray:
    import tvm
    from tvm import relax
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(so_path)), tvm.cpu())
    out = []
    for row in x:
        y = vm["main"](tvm.runtime.tensor(row[None], tvm.cpu()))
        out.append((y[0] if not hasattr(y, "numpy") else y).numpy())
    return np.concatenate(out)


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_vit_compiles_with_attention_searched(trained_vit, digits, tmp_path, dynamo):
    path = _export(trained_vit, tmp_path, dynamo)
    res = api.compile(str(path), target="llvm", data="digits", formats="int4,int8,fp8_e4m3",
                      budget="bops=0.6x", steps=30, out=tmp_path / "out", progress=False)
    rep = res.report
    attention = [la for la in rep["layers"] if la["op"] == "matmul"]
    assert len(attention) == 4 and not any(la["keep_float"] for la in attention)  # 2 per block
    # the A·V MatMul reads the softmax: only formats of >= 8 bits (grouping.OPERAND_RULES)
    contexts = attention[1::2]
    assert all(la["format_a"] in PROBABILITY_FORMATS for la in contexts), contexts
    assert rep["quality"]["metric"] == "accuracy"
    assert rep["totals"]["bops"] <= rep["budget"]["value"] * 1.001
    # integer attention on the codes where both operands are int8-representable
    for la in attention:
        if la["format_w"].startswith("int") and la["format_a"].startswith("int"):
            assert la["executed_dtype"].endswith("int8->int32"), la
    # the artifacts as users run them: default ORT session, fresh TVM VM
    x = _inputs(digits)
    sess = ort.InferenceSession(str(res.onnx_path))
    y_ort = sess.run(None, {"x": x})[0]
    for batch in (1, 7):  # a symbolic batch in the QDQ model
        assert np.allclose(sess.run(None, {"x": x[:batch]})[0], y_ort[:batch], atol=1e-5)
    acc = (y_ort[:48].argmax(1) == digits.y_test[:48].numpy()).mean()
    assert acc > 0.6, acc
    y_tvm = _tvm_outputs(res.out_dir / "tvm" / "model.so", x)
    assert (y_tvm.argmax(1) == y_ort.argmax(1)).mean() >= 0.97
    assert np.abs(y_tvm - y_ort).max() <= 0.05 * np.abs(y_ort).max()


def test_int8_attention_lowers_to_integer_matmuls(trained_vit, tmp_path, digits):
    """All searched layers int8 (the attention MatMuls included): Q·Kᵀ as int8×int8 and A·V as
    uint8×int8 (the softmax output is non-negative) with int32 accumulation, exact against the
    quantized torch graph within the integer rescale's rounding."""
    from tvm_models import lower_all_int8
    res = lower_all_int8(_export(trained_vit, tmp_path, dynamo=False), tmp_path)
    by_name = {la["node"]: la for la in res.report["layers"]}
    names = list(by_name)
    scores = [n for n in names if n.endswith("attn/MatMul")]
    contexts = [n for n in names if n.endswith("attn/MatMul_1")]
    assert len(scores) == len(contexts) == 2
    assert all(by_name[n]["executed_dtype"] == "int8xint8->int32" for n in scores)
    assert all(by_name[n]["executed_dtype"] == "uint8xint8->int32" for n in contexts)
    # no further from the torch graph than the default ORT session is (a LayerNorm output ~1e-7
    # apart can flip one code, which propagates: ort_backend.CASCADE_ROW_SHARE)
    numerics = res.report["numerics"]
    assert numerics["tvm_max_abs_err"] <= max(1e-3, 1.5 * numerics["onnxruntime_max_abs_err"])
    x = _inputs(digits, 16)
    y_ort = ort.InferenceSession(str(res.onnx_path)).run(None, {"x": x})[0]
    y_tvm = _tvm_outputs(res.out_dir / "tvm" / "model.so", x)
    assert (y_tvm.argmax(1) == y_ort.argmax(1)).all()


class SdpaEncoder(nn.Module):
    """A sentence-embedding-style encoder: pre-norm attention via ``F.scaled_dot_product_attention``
    and a GELU MLP over [N, T, D] tokens, mean-pooled → [N, D]."""

    def __init__(self, dim: int = 16, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, t, 3, self.heads, d // self.heads) \
            .permute(2, 0, 3, 1, 4)
        a = Fn.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return (x + self.mlp(x)).mean(1)


def test_sdpa_is_decomposed_into_searchable_matmuls():
    torch.manual_seed(0)
    model = SdpaEncoder().eval()
    graph = fq.load(model, example_inputs=(torch.randn(1, 6, 16),))
    x = torch.randn(3, 6, 16)  # another batch: the import is batch-polymorphic
    with torch.no_grad():
        assert torch.allclose(graph.gm(x), model(x), atol=1e-5)
    layers = P.analyze(graph).layers
    attention = [la for la in layers.values() if la.op == "matmul"]
    assert [la.name.rsplit(".", 1)[1] for la in attention] == ["scores", "context"]
    assert all(la.attrs["act_x_act"] and not la.keep_float for la in attention)


@pytest.mark.parametrize("kwargs", [dict(is_causal=True), dict(scale=0.3),
                                    dict(mask="bool"), dict(mask="float")])
def test_sdpa_decomposition_is_exact(kwargs):
    class Attn(nn.Module):
        def forward(self, q, k, v, m):
            opts = {key: val for key, val in kwargs.items() if key != "mask"}
            return Fn.scaled_dot_product_attention(q, k, v, attn_mask=m if "mask" in kwargs else None,
                                                   **opts)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 5, 4, generator=g) for _ in range(3))
    m = torch.rand(1, 1, 5, 5, generator=g) > 0.3 if kwargs.get("mask") == "bool" \
        else torch.randn(1, 1, 5, 5, generator=g)
    if kwargs.get("mask") == "bool":
        m[..., 0] = True  # every row keeps a key
    graph = fq.load(Attn(), example_inputs=(q, k, v, m))
    assert not any("scaled_dot_product" in str(n.target) for n in graph.gm.graph.nodes)
    assert torch.allclose(graph.gm(q, k, v, m), Attn()(q, k, v, m), atol=1e-6)


def test_dropout_sdpa_stays_one_node():
    class Drop(nn.Module):
        def forward(self, q, k, v):
            return Fn.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    q = torch.randn(1, 2, 5, 4)
    graph = fq.load(Drop(), example_inputs=(q, q, q))
    assert any("scaled_dot_product" in str(n.target) for n in graph.gm.graph.nodes)


def test_encoder_search_uses_cosine_and_searches_attention(tmp_path):
    torch.manual_seed(0)
    res = api.search_only(SdpaEncoder().eval(), example_inputs=(torch.randn(1, 6, 16),),
                          formats="int4,int8", budget="bops=0.7x", steps=12, out=tmp_path,
                          progress=False)
    config = json.loads((tmp_path / "config.json").read_text())["formats"]
    assert {"scaled_dot_product_attention.scores",
            "scaled_dot_product_attention.context"} <= set(config)
    assert config["scaled_dot_product_attention.context"]["activation"] == "int8"  # the rule
    assert res["quality"]["metric"] == "cosine"


def test_cli_keeps_attention_float_on_request(trained_vit, tmp_path):
    from click.testing import CliRunner
    from fliqs_compiler.cli.main import cli
    path = _export(trained_vit, tmp_path, dynamo=False)
    out = tmp_path / "o"
    result = CliRunner().invoke(cli, ["search", str(path), "--data", "digits", "--steps", "3",
                                      "--attention-matmuls", "float", "--quiet", "--out", str(out)])
    assert result.exit_code == 0, result.output
    names = set(json.loads((out / "config.json").read_text())["formats"])
    assert names and not any(n.endswith(("attn/MatMul", "attn/MatMul_1")) for n in names)
    bad = CliRunner().invoke(cli, ["search", str(path), "--attention-matmuls", "int8"])
    assert bad.exit_code == 2 and "--attention-matmuls" in bad.output


def test_cli_group_and_keep_float_patterns(trained_vit, tmp_path):
    from click.testing import CliRunner
    from fliqs_compiler.cli.main import cli
    path = _export(trained_vit, tmp_path, dynamo=False)
    out = tmp_path / "o"
    result = CliRunner().invoke(cli, ["search", str(path), "--data", "digits", "--steps", "4",
                                      "--group", "attn/(qkv|proj)/", "--keep-float", "mlp",
                                      "--budget", "bops=0.6x", "--quiet", "--out", str(out)])
    assert result.exit_code == 0, result.output
    formats = json.loads((out / "config.json").read_text())["formats"]
    searched = {n: f for n, f in formats.items() if f.get("weight", "float") != "float"}
    assert searched and not any("mlp" in n for n in searched)
    tied = {json.dumps(f, sort_keys=True) for n, f in searched.items() if "qkv" in n or "proj" in n}
    assert len(tied) == 1  # one decision for every qkv and proj Linear
    bad = CliRunner().invoke(cli, ["search", str(path), "--group", "attn/("])
    assert bad.exit_code == 2 and "--group 'attn/('" in bad.output
    assert "Traceback" not in bad.output


INPUT_OPS = ("layer_norm", "softmax", "gelu")


def _fed_by_dequantize(model_path) -> dict:
    """ONNX op type → [is its data input a DequantizeLinear output, seen through the Max(x, -inf)
    barrier of ``onnx_export.shield_softmax_input``] for LayerNormalization, Softmax and the Div
    that starts an exported erf GELU."""
    import onnx
    g = onnx.load(str(model_path)).graph
    producer = {o: n for n in g.node for o in n.output}
    erf_inputs = {n.input[0] for n in g.node if n.op_type == "Erf"}

    def source(name):
        node = producer.get(name)
        return source(node.input[0]) if node is not None and node.op_type == "Max" else node
    fed = {}
    for n in g.node:
        if n.op_type in ("LayerNormalization", "Softmax") or \
                (n.op_type == "Div" and n.output[0] in erf_inputs):
            fed.setdefault(n.op_type, []).append(
                getattr(source(n.input[0]), "op_type", None) == "DequantizeLinear")
    return fed


@pytest.mark.slow
def test_vit_compiles_with_ln_softmax_gelu_inputs_searched(trained_vit, digits, tmp_path):
    """``quantize_inputs``: one activation-only decision per LayerNorm / softmax / GELU input,
    searched with the rest; the QDQ model puts a Q/DQ before each of those ops and runs in a
    default onnxruntime session; the TVM library agrees."""
    path = _export(trained_vit, tmp_path, dynamo=False)
    res = api.compile(str(path), target="llvm", data="digits", formats="int4,int8,fp8_e4m3",
                      budget="bops=0.6x", steps=16, out=tmp_path / "out", progress=False,
                      prepare_options={"quantize_inputs": ("layernorm", "softmax", "gelu")})
    rep = res.report
    rows = [la for la in rep["layers"] if la["op"] in INPUT_OPS]
    assert sorted(la["op"] for la in rows) == ["gelu"] * 2 + ["layer_norm"] * 5 + ["softmax"] * 2
    for la in rows:  # searched, no weight, no BOPs
        assert not la["keep_float"] and la["format_w"] == "float" and la["bops"] == 0, la
        assert la["format_a"] in ({"int4", "int8", "fp8_e4m3"} if la["op"] != "softmax"
                                  else PROBABILITY_FORMATS), la
    config = json.loads((res.out_dir / "config.json").read_text())["formats"]
    assert {la["node"] for la in rows} <= set(config)
    assert rep["totals"]["bops"] <= rep["budget"]["value"] * 1.001
    assert _fed_by_dequantize(res.onnx_path) == {"LayerNormalization": [True] * 5,
                                                 "Softmax": [True] * 2, "Div": [True] * 2}
    x = _inputs(digits)  # held-out digits and the same ×3
    y_ort = ort.InferenceSession(str(res.onnx_path)).run(None, {"x": x})[0]
    assert rep["numerics"]["onnxruntime_default_lsb"] <= 2.0  # against the quantized graph
    acc = (y_ort[:48].argmax(1) == digits.y_test[:48].numpy()).mean()
    assert acc > 0.6, acc
    y_tvm = _tvm_outputs(res.out_dir / "tvm" / "model.so", x)
    assert (y_tvm.argmax(1) == y_ort.argmax(1)).mean() >= 0.97
    assert np.abs(y_tvm - y_ort).max() <= 0.05 * np.abs(y_ort).max()


@pytest.mark.slow
def test_int8_ln_softmax_gelu_inputs_lower(trained_vit, digits, tmp_path):
    """A config with every LayerNorm / softmax / GELU input int8 (the dynamo export): ``fliqs
    lower`` quantizes exactly those inputs; ORT (default session) and TVM agree with the quantized
    torch graph."""
    from tvm_models import lower_all_int8
    res = lower_all_int8(_export(trained_vit, tmp_path, dynamo=True), tmp_path,
                         options=P.PrepareOptions(quantize_inputs="layernorm,softmax,gelu"))
    rows = {la["node"]: la for la in res.report["layers"] if la["op"] in INPUT_OPS}
    assert len(rows) == 9 and all(la["format_a"] == "int8" and la["format_w"] == "float"
                                  for la in rows.values())
    assert _fed_by_dequantize(res.onnx_path)["LayerNormalization"] == [True] * 5
    numerics = res.report["numerics"]
    assert numerics["onnxruntime_default_lsb"] <= 2.0
    assert numerics["tvm_max_abs_err"] <= max(1e-3, 1.5 * numerics["onnxruntime_max_abs_err"])
    x = _inputs(digits, 16)
    y_ort = ort.InferenceSession(str(res.onnx_path)).run(None, {"x": x})[0]
    y_tvm = _tvm_outputs(res.out_dir / "tvm" / "model.so", x)
    assert (y_tvm.argmax(1) == y_ort.argmax(1)).all()


def test_cli_quantize_inputs(trained_vit, tmp_path):
    from click.testing import CliRunner
    from fliqs_compiler.cli.main import cli
    path = _export(trained_vit, tmp_path, dynamo=False)
    out = tmp_path / "o"
    result = CliRunner().invoke(cli, ["search", str(path), "--data", "digits", "--steps", "3",
                                      "--quantize-inputs", "softmax,gelu", "--quiet",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    formats = json.loads((out / "config.json").read_text())["formats"]
    assert sum(n.endswith("/Softmax") for n in formats) == 2
    assert sum(n.endswith("/Erf") for n in formats) == 2
    assert not any(n.endswith("LayerNormalization") for n in formats)
    assert all(formats[n]["weight"] == "float" for n in formats if n.endswith(("/Softmax", "/Erf")))


@pytest.mark.parametrize("command", [["search"], ["compile", "--target", "llvm"]])
def test_cli_quantize_inputs_bad_value_is_one_line(demo_model, command):
    from click.testing import CliRunner
    from fliqs_compiler.cli.main import cli
    bad = CliRunner().invoke(cli, [command[0], str(demo_model), *command[1:],
                                   "--quantize-inputs", "layernorm,batchnorm"])
    assert bad.exit_code == 2, bad.output
    assert bad.output.strip().count("\n") == 0 and "--quantize-inputs 'batchnorm'" in bad.output
