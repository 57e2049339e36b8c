"""Quality signals beyond classification (``search/trainer.py``: ``QUALITY``, ``auto_metric``,
``choose_metric``, the teacher losses): each metric's values on hand-made tensors, the automatic
choice on real imported models (classifier with / without labels, a mean-pooled encoder, a
multi-output conv model), short end-to-end searches that state the metric and why, a user
callable through the API, and ``--metric`` on the CLI."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import fliqs_compiler as fq
from fliqs_compiler.base.errors import FliqsError
from fliqs_compiler.cli.main import cli
from fliqs_compiler.data.sources import Dataset
from fliqs_compiler.driver import api
from fliqs_compiler.driver.api import DEMO_MODEL
from fliqs_compiler.search.trainer import (QUALITY, SQNR_CAP_DB, TEACHER_LOSSES, OutputInfo,
                                           TrainOptions, WeightTrainer, auto_metric,
                                           choose_metric, float_copy, register_metric)

from cli_runs import assert_contract

pytestmark = pytest.mark.usefixtures("no_debug_env")


def q(name, out, t, y=None):
    return QUALITY[name].fn(out, y, t)


# ---- models (imported through the torch front door) --------------------------------------------
class Encoder(nn.Module):
    """A tiny sentence encoder: per-token MLP, then the mean over the sequence → [N, 12]."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 12)

    def forward(self, x):  # x: [N, L, 8]
        return self.b(torch.relu(self.a(x))).mean(1)


class TwoHeads(nn.Module):
    """A detector-like conv model: a trunk and two dense heads ([N, 4, 8, 8] and [N, 2, 8, 8])."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(1, 8, 3, padding=1)
        self.h1 = nn.Conv2d(8, 4, 1)
        self.h2 = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = torch.relu(self.c(x))
        return self.h1(y), self.h2(y)


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.c(x)).mean((2, 3)))  # a CNN's GAP + linear head: logits


def _random_data(shape, n=64, labels=None) -> Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn((n, *shape), generator=g)
    y = None if labels is None else torch.randint(labels, (n,), generator=g)
    return Dataset(x_train=x[16:], y_train=None if y is None else y[16:], x_val=x[:16],
                   y_val=None if y is None else y[:16], num_classes=labels, description="random")


def _load(model, shape):
    torch.manual_seed(0)
    return fq.load(model.eval(), example_inputs=(torch.randn(1, *shape),))


NO_KEEP = dict(keep_float_first=False, keep_float_last=False)  # two-layer models: search both


# ---- values on hand-made tensors ---------------------------------------------------------------
def test_cosine_values():
    t = torch.randn(5, 7)
    assert q("cosine", t.clone(), t) == pytest.approx(1.0)
    assert q("cosine", -t, t) == pytest.approx(-1.0)
    assert q("cosine", 3.0 * t, t) == pytest.approx(1.0)  # scale-free
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # one sample identical, one orthogonal
    assert q("cosine", a, b) == pytest.approx(0.5)  # mean over samples of per-sample cosine
    maps = torch.randn(3, 2, 4, 4)  # per sample over all its features
    assert q("cosine", maps, maps.clone()) == pytest.approx(1.0)


def test_sqnr_values():
    t = torch.randn(4000, 8, generator=torch.Generator().manual_seed(1))
    assert q("sqnr", t.clone(), t) == SQNR_CAP_DB  # noise-free: capped, finite
    assert math.isfinite(q("sqnr", t.clone(), t))
    noise = 0.1 * torch.randn(t.shape, generator=torch.Generator().manual_seed(2))
    expected = 10 * math.log10(float((t ** 2).sum()) / float((noise ** 2).sum()))
    assert q("sqnr", t + noise, t) == pytest.approx(expected, abs=1e-6)
    assert q("sqnr", t + noise, t) == pytest.approx(20.0, abs=0.3)  # unit signal, σ = 0.1 noise
    assert q("sqnr", torch.zeros_like(t), t) == pytest.approx(0.0, abs=1e-9)  # noise = signal
    assert q("sqnr", t + 10 * noise, t) < q("sqnr", t + noise, t)


def test_relative_mse_values():
    t = torch.randn(6, 3, 5)
    assert q("neg_rel_mse", t.clone(), t) == 0.0
    assert q("neg_rel_mse", torch.zeros_like(t), t) == pytest.approx(-1.0)
    assert q("neg_rel_mse", 2 * t, t) == pytest.approx(-1.0)
    assert q("neg_rel_mse", 1.1 * t, t) == pytest.approx(-0.01, rel=1e-6)


def test_classification_metrics_and_first_output():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    y = torch.tensor([0, 1, 0, 1])
    assert q("accuracy", logits, None, y) == 0.5
    flipped = logits[:, [1, 0, 2]]
    assert q("agreement", logits, logits.clone()) == 1.0
    assert q("agreement", flipped, logits) == 0.25  # only the third row keeps its argmax
    # label metrics read the first output only
    assert q("accuracy", (logits, torch.randn(4, 9)), None, y) == 0.5


def test_multi_output_mean_reduction_and_pairing():
    a, b = torch.randn(8, 5), torch.randn(8, 2, 3, 3)
    assert q("cosine", (a, -b), (a, b)) == pytest.approx(0.0)  # mean of 1 and -1
    noise = 0.1 * torch.randn(b.shape, generator=torch.Generator().manual_seed(3))
    s_b = q("sqnr", b + noise, b)
    assert q("sqnr", (a.clone(), b + noise), (a, b)) == pytest.approx((SQNR_CAP_DB + s_b) / 2)
    # a caller passing only the first output is paired with the first float output
    assert q("cosine", a.clone(), (a, b)) == pytest.approx(1.0)
    # integer outputs (e.g. indices) are not measured
    idx = torch.arange(8)
    assert q("neg_rel_mse", (a.clone(), idx), (a, idx)) == 0.0


def test_teacher_losses_are_paired_in_the_registry():
    pairs = {m: QUALITY[m].teacher_loss for m in ("accuracy", "agreement", "cosine", "sqnr",
                                                     "neg_rel_mse", "neg_mse")}
    assert pairs == {"accuracy": "kl", "agreement": "kl", "cosine": "cosine", "sqnr": "rel_mse",
                     "neg_rel_mse": "rel_mse", "neg_mse": "mse"}
    assert all(loss in TEACHER_LOSSES for loss in pairs.values())
    t = torch.randn(4, 6)
    assert float(TEACHER_LOSSES["cosine"](t.clone(), t, 1.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(TEACHER_LOSSES["cosine"](-t, t, 1.0)) == pytest.approx(2.0, abs=1e-6)
    assert float(TEACHER_LOSSES["rel_mse"](torch.zeros_like(t), t, 1.0)) == pytest.approx(1.0)
    assert float(TEACHER_LOSSES["rel_mse"](100 * t, 100 * t + 100, 1.0)) == pytest.approx(
        float(TEACHER_LOSSES["rel_mse"](t, t + 1, 1.0)), rel=1e-5)  # scale-free


def test_label_free_loss_matches_metric_and_covers_every_output():
    g = _load(TwoHeads(), (1, 8, 8))
    data = _random_data((1, 8, 8))
    teacher = float_copy(g.gm)
    x = data.x_train[:8]
    with torch.no_grad():
        t = tuple(teacher(x))
    for metric, name in (("sqnr", "rel_mse"), ("cosine", "cosine")):
        tr = WeightTrainer(g.gm, data, TrainOptions(), teacher, metric=metric)
        h1, h2 = t[0] + 0.5, t[1] * 0.0  # perturb both outputs
        want = (TEACHER_LOSSES[name](h1, t[0], 1.0) + TEACHER_LOSSES[name](h2, t[1], 1.0)) / 2
        assert float(tr.loss((h1, h2), None, t)) == pytest.approx(float(want), rel=1e-6)
        assert float(tr.loss((t[0], h2), None, t)) > 0  # the second output alone counts
    forced = WeightTrainer(g.gm, data, TrainOptions(teacher_loss="cosine"), teacher, metric="sqnr")
    want = (TEACHER_LOSSES["cosine"](t[0] + 0.5, t[0], 1.0) + TEACHER_LOSSES["cosine"](t[1], t[1], 1.0)) / 2
    assert float(forced.loss((t[0] + 0.5, t[1]), None, t)) == pytest.approx(float(want), rel=1e-6)
    with pytest.raises(ValueError, match="teacher_loss"):
        TrainOptions(teacher_loss="huber")
    auto = WeightTrainer(g.gm, data, TrainOptions(), teacher)  # no metric: chosen like the search's
    assert auto.loss_metric() == "sqnr"
    enc = _load(Encoder(), (6, 8))
    assert WeightTrainer(enc.gm, _random_data((6, 8)), TrainOptions(),
                         float_copy(enc.gm)).loss_metric() == "cosine"


# ---- the automatic choice ----------------------------------------------------------------------
def test_auto_metric_rule_table():
    logits, emb = OutputInfo((2, 10)), OutputInfo((2, 16), "", True)
    assert auto_metric([logits], labeled=True)[0] == "accuracy"
    assert auto_metric([logits], labeled=False)[0] == "agreement"
    assert auto_metric([logits, logits], labeled=False)[0] == "agreement"
    assert auto_metric([emb], labeled=False)[0] == "cosine"
    assert auto_metric([OutputInfo((2, 16), "text_embeds")], labeled=False)[0] == "cosine"
    assert auto_metric([OutputInfo((2, 3, 8, 8))], labeled=False)[0] == "sqnr"
    assert auto_metric([OutputInfo((2,))], labeled=False)[0] == "sqnr"  # 1-D regression
    assert auto_metric([OutputInfo((2, 1))], labeled=False)[0] == "sqnr"  # one column
    assert auto_metric([logits, OutputInfo((2, 4, 8, 8))], labeled=False)[0] == "sqnr"  # mixed
    assert auto_metric([logits, OutputInfo((2, 4, 8, 8))], labeled=True)[0] == "accuracy"
    name, reason = auto_metric([emb], labeled=False)
    assert "embedding" in reason and "[N, 16]" in reason


def test_choose_classifier_with_and_without_labels(digits, trained_tiny_cnn):
    g = _load(Classifier(), (1, 8, 8))
    assert choose_metric(g.gm, digits, g.output_names)[0] == "accuracy"
    unlabeled = replace(digits, y_train=None, y_val=None, y_test=None, num_classes=None)
    name, reason = choose_metric(g.gm, unlabeled, g.output_names)
    assert name == "agreement" and "logits" in reason
    tiny = _load(trained_tiny_cnn, (1, 8, 8))  # conv → conv → flatten → linear
    assert choose_metric(tiny.gm, unlabeled, tiny.output_names)[0] == "agreement"


def test_choose_embedding_and_multi_output():
    enc = _load(Encoder(), (6, 8))
    name, reason = choose_metric(enc.gm, _random_data((6, 8)), enc.output_names)
    assert name == "cosine", reason
    assert "embedding [N, 12]" in reason
    heads = _load(TwoHeads(), (1, 8, 8))
    name, reason = choose_metric(heads.gm, _random_data((1, 8, 8)), heads.output_names)
    assert name == "sqnr" and "[N, 4, 8, 8]" in reason and "[N, 2, 8, 8]" in reason


# ---- short searches end to end -----------------------------------------------------------------
def test_embedding_model_search_uses_cosine(tmp_path):
    torch.manual_seed(0)
    res = api.search_only(Encoder().eval(), example_inputs=(torch.randn(1, 6, 8),), formats="int4,int8",
                         budget="bops=0.5x", steps=24, out=tmp_path / "o", progress=False,
                         prepare_options=NO_KEEP)
    quality = res["quality"]
    assert quality["metric"] == "cosine" and "embedding" in quality["metric_reason"]
    assert quality["float"] == pytest.approx(1.0)
    assert 0.5 < quality["final"] <= 1.0 + 1e-9
    saved = json.loads((tmp_path / "o" / "config.json").read_text())
    assert saved["quality"]["metric"] == "cosine" and saved["quality"]["metric_reason"]
    steps = [json.loads(line) for line in (tmp_path / "o" / "search.jsonl").read_text().splitlines()]
    steps = [s for s in steps if s["quality"] is not None]  # the steps whose reward was measured
    assert all(-1.0 <= s["quality"] <= 1.0 + 1e-9 for s in steps)  # the reward's Q is a cosine
    assert any(s["quality"] < 1.0 - 1e-6 for s in steps)


def test_multi_output_conv_model_compiles_with_sqnr(tmp_path):
    torch.manual_seed(0)
    res = fq.compile(TwoHeads().eval(), example_inputs=(torch.randn(1, 1, 8, 8),), target="ort",
                     formats="int4,int8", budget="bops=0.5x", steps=20, out=tmp_path / "o",
                     progress=False, layer_latency=False, prepare_options=NO_KEEP)
    report = json.loads(res.report_path.read_text())
    assert_contract(report)
    quality = report["quality"]
    assert quality["metric"] == "sqnr" and "mean over outputs" in quality["metric_reason"]
    assert quality["float"] == SQNR_CAP_DB and 5.0 < quality["final"] < SQNR_CAP_DB
    assert report["search"]["search_quality"]["metric"] == "sqnr"
    md = res.out_dir.joinpath("report.md").read_text()
    assert "quality metric" in md and "dB" in md


def test_user_callable_metric_is_the_quality(tmp_path):
    calls = []

    def closeness(outputs, float_outputs, labels):
        """7 − relative squared error: a distinctive value that only this function produces."""
        calls.append(labels)
        err = float(((outputs - float_outputs) ** 2).sum() / (float_outputs ** 2).sum())
        return 7.0 - err

    torch.manual_seed(0)
    res = fq.compile(Classifier().eval(), example_inputs=(torch.randn(1, 1, 8, 8),), target="ort",
                     formats="int4,int8", budget="bops=0.5x", steps=12, out=tmp_path / "o",
                     progress=False, layer_latency=False, prepare_options=NO_KEEP, metric=closeness)
    quality = res.report["quality"]
    assert quality["metric"] == "custom:closeness" and "given" in quality["metric_reason"]
    assert quality["float"] == 7.0  # the float model against itself
    assert 6.0 < quality["final"] < 7.0
    assert calls and all(y is None for y in calls)  # no labels here
    steps = [json.loads(line) for line in (res.out_dir / "search.jsonl").read_text().splitlines()]
    steps = [s for s in steps if s["quality"] is not None]  # the steps whose reward was measured
    assert all(6.0 < s["quality"] <= 7.0 for s in steps)  # the reward's Q came from it
    assert len(calls) >= len(steps)


def test_given_metric_overrides_and_label_check(tmp_path, digits):
    with pytest.raises(FliqsError, match="--metric"):
        fq.compile(str(DEMO_MODEL), target="ort", metric="f1", steps=2, out=tmp_path / "x",
                   progress=False)
    with pytest.raises(FliqsError, match="no labels"):
        api.search_only(str(DEMO_MODEL), metric="accuracy", steps=2, out=tmp_path / "y",
                       progress=False)
    res = api.search_only(str(DEMO_MODEL), metric="sqnr", formats="int8,bf16", budget="bops=1.5x",
                         steps=3, out=tmp_path / "z", progress=False)
    assert res["quality"]["metric"] == "sqnr" and res["quality"]["metric_reason"] == "given (--metric sqnr)"
    # the weights were trained with the teacher loss of the given metric (the run's fingerprint)
    from fliqs_compiler.search.checkpoint import load_checkpoint
    options = json.loads(json.loads(load_checkpoint(tmp_path / "z")["fingerprint"])["options"])
    assert options["metric"] == "sqnr" and options["train"]["teacher_loss"] == "rel_mse"


def test_register_metric_rejects_unknown_teacher_loss():
    with pytest.raises(ValueError, match="teacher_loss"):
        register_metric("custom:bad", lambda o, f, y: 0.0, teacher_loss="huber")
    assert "custom:bad" not in QUALITY


# ---- CLI ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["compile", "search"])
def test_cli_bad_metric_is_checked_before_the_model(command, tmp_path):
    """A bad --metric is reported even though the model path does not exist: it is checked
    before the model is looked at."""
    argv = [command, str(tmp_path / "missing.onnx"), "--metric", "f1score", "--quiet",
            "--out", str(tmp_path / "o")] + (["--target", "ort"] if command == "compile" else [])
    result = CliRunner().invoke(cli, argv)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.stderr
    assert "--metric" in lines[0] and "f1score" in lines[0] and "missing.onnx" not in lines[0]
    for name in ("accuracy", "agreement", "cosine", "sqnr", "neg_rel_mse"):
        assert name in lines[0]


def test_cli_metric_reaches_the_search(tmp_path):
    out = tmp_path / "o"
    result = CliRunner().invoke(cli, ["search", str(DEMO_MODEL), "--metric", "cosine", "--steps", "3",
                                      "--formats", "int8,bf16", "--budget", "bops=1.5x", "--quiet",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    saved = json.loads((out / "config.json").read_text())
    assert saved["quality"]["metric"] == "cosine"
    assert saved["quality"]["metric_reason"] == "given (--metric cosine)"
