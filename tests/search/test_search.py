"""One-shot search on digits with a tiny hand-built searchable CNN: determinism under a seed,
the budget binds, the step log and checkpoint, resume after SIGKILL = uninterrupted run,
label-free mode, and the baselines (SIGKILL + resume: test_search_resume.py) in the same harness."""
import copy
import dataclasses
import json

import pytest
import torch

from fliqs_compiler.base.errors import FliqsError
from fliqs_compiler.search import ControllerOptions, SearchOptions, run_search
from fliqs_compiler.search.checkpoint import StepLog, load_checkpoint
from examples.toy_models import TinyCNN, make_searchable

FORMATS = ["int2", "int4", "int8"]


@pytest.fixture(scope="module")
def float_state(trained_tiny_cnn, tmp_path_factory):
    path = tmp_path_factory.mktemp("float") / "tiny.pt"
    torch.save(trained_tiny_cnn.state_dict(), path)
    return path


def searchable(float_state, digits, formats=FORMATS, tied=True):
    model = TinyCNN()
    model.load_state_dict(torch.load(float_state, weights_only=True))
    return make_searchable(model, digits.x_train[:1], formats, tied=tied, name="tiny")


def opts(steps=40, seed=0, **kw):
    return SearchOptions(steps=steps, seed=seed, gamma=1.0, reward_batch_size=64, checkpoint_every=10,
                         controller=ControllerOptions(lr=0.1, entropy_max=0.1), **kw)


def test_deterministic_under_seed(float_state, digits, tmp_path):
    runs = []
    for i in range(2):
        g = searchable(float_state, digits)
        r = run_search(g, digits, "bops=0.4x", opts(steps=20, seed=7), out_dir=tmp_path / f"r{i}", progress=False)
        runs.append((r, (tmp_path / f"r{i}" / "search.jsonl").read_text(), g.gm.state_dict()))
    (a, log_a, sd_a), (b, log_b, sd_b) = runs
    assert a.choice == b.choice and a.quality == b.quality and a.cost == b.cost
    assert log_a == log_b
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    g = searchable(float_state, digits)
    c = run_search(g, digits, "bops=0.4x", opts(steps=20, seed=8), out_dir=tmp_path / "r2", progress=False)
    assert (tmp_path / "r2" / "search.jsonl").read_text() != log_a  # the seed matters


def test_monitoring_interval_changes_only_the_log(float_state, digits, tmp_path):
    """``monitor_every`` skips the held-out reward where the policy does not learn; the weights,
    the policy and the result must be those of measuring it at every step."""
    runs = []
    for every in (1, 4):
        g = searchable(float_state, digits)
        o = opts(steps=24, seed=3, monitor_every=every)
        o.controller = dataclasses.replace(o.controller, freeze=0.6)  # a final stretch to skip in
        r = run_search(g, digits, "bops=0.4x", o, out_dir=tmp_path / f"m{every}", progress=False)
        runs.append((r, StepLog.read(tmp_path / f"m{every}" / "search.jsonl"), g.gm.state_dict()))
    (a, log_a, sd_a), (b, log_b, sd_b) = runs
    assert a.choice == b.choice and a.quality == b.quality and a.probabilities == b.probabilities
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert all(r["quality"] is not None for r in log_a)
    skipped = [r["step"] for r in log_b if r["quality"] is None]
    assert skipped and all(log_b[i]["phase"] != "search" and i % 4 for i in skipped)
    assert [r["choice"] for r in log_a] == [r["choice"] for r in log_b]


def test_log_and_checkpoint_contents(float_state, digits, tmp_path):
    g = searchable(float_state, digits)
    r = run_search(g, digits, "bops=0.4x", opts(steps=20), out_dir=tmp_path, progress=False)
    recs = StepLog.read(tmp_path / "search.jsonl")
    ran = r.schedule["weight_steps"]  # 20 less the steps charged for the sensitivity prior
    assert 16 <= ran < 20 and r.schedule["prior"]["charged_steps"] == 20 - ran
    assert [x["step"] for x in recs] == list(range(ran))
    for key in ("choice", "config_id", "reward", "cost", "quality", "entropy", "baseline", "warmup"):
        assert key in recs[0]
    assert recs[0]["warmup"] and not recs[-1]["warmup"]  # 25 % warmup
    state = load_checkpoint(tmp_path)  # weights_only=True load
    assert state["step"] == ran and set(state) >= {"model", "weight_optimizer", "controller",
                                                  "generator", "torch_rng"}
    assert any(k.endswith("scales.0") for k in state["model"])  # per-format scales saved
    saved = json.loads((tmp_path / "search_result.json").read_text())
    assert saved["choice"] == r.choice and r.log_path.endswith("search.jsonl")
    assert r.formats == g.space.formats_of(r.choice) and set(r.formats) == {"conv1", "conv2", "fc"}


def test_search_respects_budget(float_state, digits):
    g = searchable(float_state, digits)
    r = run_search(g, digits, "bops=0.25x", opts(steps=100), progress=False)
    int8 = g.space.formats_of(g.space.uniform_choice("int8"))
    from fliqs_compiler.cost.model import config_cost
    assert abs(r.cost / r.budget_target - 1) <= 0.3, (r.formats, r.cost / r.budget_target)
    assert r.cost < 0.5 * config_cost(g, int8, "bops")
    assert r.quality["final"] > 0.85 and r.quality["float"] > 0.9
    assert max(max(p) for p in r.probabilities) > 0.5  # the policy has committed


def test_impossible_budget_refused_up_front(float_state, digits, tmp_path):
    g = searchable(float_state, digits, formats=["int4", "int8"])
    with pytest.raises(FliqsError, match="impossible"):
        run_search(g, digits, "bops=0.1x", opts(), out_dir=tmp_path, progress=False)
    assert not (tmp_path / "search.jsonl").exists()


def test_label_free_mode_uses_teacher(float_state, digits):
    from dataclasses import replace
    unlabeled = replace(digits, y_train=None, y_val=None, y_test=None, num_classes=None)
    g = searchable(float_state, digits, tied=False)
    assert g.space.num_decisions == 6
    r = run_search(g, unlabeled, "bops=0.4x", opts(steps=20), progress=False)
    assert r.quality["metric"] == "agreement" and r.quality["float"] == 1.0
    assert 0.5 < r.quality["final"] <= 1.0
    with pytest.raises(FliqsError, match="no labels"):
        run_search(g, unlabeled, None, opts(steps=2, metric="accuracy"), progress=False)


def test_finetune_option(float_state, digits):
    g = searchable(float_state, digits)
    r = run_search(g, digits, None, opts(steps=10, finetune=5), progress=False)
    assert r.budget_target is None and r.quality["finetune_steps"] == 5 and "final_finetuned" in r.quality


def test_resume_with_other_options_refused(float_state, digits, tmp_path):
    g = searchable(float_state, digits)
    run_search(g, digits, "bops=0.4x", opts(steps=6), out_dir=tmp_path, progress=False)
    g = searchable(float_state, digits)
    with pytest.raises(FliqsError, match="rerun without --resume"):
        run_search(g, digits, "bops=0.5x", opts(steps=6), out_dir=tmp_path, resume=True, progress=False)


def test_baselines_same_harness(float_state, digits):
    from fliqs_compiler.search import baselines as B
    g = searchable(float_state, digits)
    o = opts(steps=12)
    uni = B.uniform(g, digits, "bops=0.3x", o, formats=["int4", "int8"])
    assert [u.name for u in uni] == ["uniform-int4", "uniform-int8"] and uni[1].cost == 4 * uni[0].cost
    rnd = B.random_search(g, digits, "bops=0.3x", o, n=3)
    target = 0.3 * uni[1].cost
    assert rnd.cost <= target and rnd.extra["tried"] == 3
    ilp = B.sensitivity_ilp(g, digits, "bops=0.3x", o)
    assert ilp.cost <= target + 1e-6 and len(ilp.extra["sensitivity"]) == 3
    dn = B.dnas(g, digits, "bops=0.3x", o)
    assert dn.method == "dnas" and 0.0 <= dn.quality <= 1.0
    for r in uni + [rnd, ilp, dn]:
        assert 0.0 <= r.quality <= 1.0 and r.seconds > 0
    assert not bool(g.gm.conv1.wq.initialized.any())  # baselines work on copies: graph untouched


def test_fixed_fine_tunes_from_a_trained_graph(float_state, digits):
    """``fixed(start=...)`` continues from the search's weights and scales (the +N fine-tune
    comparison), not from float: at learning rate 0 it evaluates exactly what the search returned."""
    from fliqs_compiler.search import baselines as B
    g = searchable(float_state, digits)
    found = copy.deepcopy(g)
    res = run_search(found, digits, "bops=0.3x", opts(steps=12), progress=False)
    base = opts(steps=1)
    frozen = dataclasses.replace(base, train=dataclasses.replace(base.train, lr=0.0, scale_lr=0.0))
    again = B.fixed(g, digits, res.choice, frozen, start=found)
    assert again.quality == pytest.approx(res.quality["final"]) and "from the given weights" in again.notes
    for name, t in found.gm.state_dict().items():  # the search's scales and weights, unchanged
        assert torch.equal(again.graph.gm.state_dict()[name], t), name
    def weights(graph):
        return torch.cat([p.detach().flatten() for p in graph.gm.parameters()])
    cold = B.fixed(g, digits, res.choice, frozen)  # from float: the float weights, fresh scales
    assert not torch.equal(weights(cold.graph), weights(found))
    tuned = B.fixed(g, digits, res.choice, dataclasses.replace(base, steps=3), start=found)
    assert not torch.equal(weights(tuned.graph), weights(found))  # it trained
    assert torch.equal(weights(found), weights(again.graph))  # on a copy: the start is untouched


def test_float_copy_and_bypass_match_the_float_model(float_state, digits):
    from fliqs_compiler.numerics.quantizers import SearchableQuantizer
    from fliqs_compiler.search import bypass_quantizers, float_copy
    model = TinyCNN()
    model.load_state_dict(torch.load(float_state, weights_only=True))
    g = make_searchable(model, digits.x_train[:1], FORMATS)
    x = digits.x_val[:32]
    with torch.no_grad():
        ref = model(x)
        g.space.apply(g.gm, g.space.uniform_choice("int2"))
        quant = g.gm(x)
        assert not torch.allclose(quant, ref, atol=1e-3)  # int2 really quantizes
        assert torch.equal(float_copy(g.gm)(x), ref)
        with bypass_quantizers(g.gm):
            assert torch.equal(g.gm(x), ref)
        assert torch.equal(g.gm(x), quant)  # quantizers are back
    assert sum(isinstance(m, SearchableQuantizer) for m in g.gm.modules()) == 6
