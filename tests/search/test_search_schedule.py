"""The search's schedule and its result: progressive warmup widens the menu, the final stretch
trains exactly the returned configuration, the result meets its budget (projection), several
reward samples per step, standardized advantages, search.png and per-step probabilities."""
import json
import math

import pytest
import torch

from fliqs_compiler.cost.model import config_cost
from fliqs_compiler.search import ControllerOptions, SearchOptions, TrainOptions, run_search
from fliqs_compiler.search.controller import Controller
from fliqs_compiler.search.projection import project_to_budget
from examples.toy_models import make_searchable

FORMATS = ["int2", "int4", "int8"]


def searchable(model, digits):
    import copy
    return make_searchable(copy.deepcopy(model), digits.x_train[:1], FORMATS, name="tiny")


def opts(steps=60, **kw):
    """Schedule arithmetic is checked without the prior (it charges steps); its tests ask for it."""
    kw.setdefault("prior", "none")
    ctrl = kw.pop("controller", {})
    train = kw.pop("train", {})
    return SearchOptions(steps=steps, seed=0, reward_batch_size=64, checkpoint_every=10 ** 6,
                         train=TrainOptions(**{"batch_size": 32, **train}),
                         controller=ControllerOptions(**{"warmup": 0.2, "freeze": 0.6, **ctrl}), **kw)


# -- projection ----------------------------------------------------------------------------------
COST = [[1.0, 4.0, 16.0]] * 3  # per decision: int2, int4, int8


def cost_of(choice):
    return sum(COST[d][k] for d, k in enumerate(choice))


def test_projection_downgrades_what_the_policy_cares_least_about():
    logp = torch.log(torch.tensor([[0.05, 0.05, 0.9], [0.3, 0.3, 0.4], [0.05, 0.05, 0.9]]))
    choice, moves = project_to_budget([2, 2, 2], logp, cost_of, target=36.0)
    assert cost_of(choice) <= 36.0 and moves >= 1
    assert choice[0] == 2 and choice[2] == 2 and choice[1] < 2  # the undecided layer pays


def test_projection_fills_an_unused_budget_and_never_overshoots():
    logp = torch.log(torch.full((3, 3), 1 / 3))
    choice, _ = project_to_budget([0, 0, 0], logp, cost_of, target=24.0)
    assert 21.0 <= cost_of(choice) <= 24.0  # 16 + 4 + 1 = 21 is the best fill of 24
    masked = logp.clone()
    masked[:, 2] = float("-inf")  # a masked candidate is never chosen
    choice, _ = project_to_budget([0, 0, 0], masked, cost_of, target=100.0)
    assert choice == [1, 1, 1]
    assert project_to_budget([2, 2, 2], logp, cost_of, None) == ([2, 2, 2], 0)


# -- controller: freeze, several samples, standardized advantage ---------------------------------
def test_controller_freezes_after_freeze_fraction():
    c = Controller([3, 3], ControllerOptions(warmup=0.1, freeze=0.5), 100)
    assert c.freeze_steps == 50 and not c.frozen(20) and c.frozen(5) and c.frozen(50)
    c.update([0, 0], 0.0, 20)
    c.update([1, 1], 1.0, 21)
    before = c.logits.detach().clone()
    info = c.update([1, 1], 5.0, 60)
    assert info["frozen"] and torch.equal(before, c.logits.detach())
    assert c.beta(49) == pytest.approx(c.options.entropy_max, rel=1e-6)  # schedule ends at freeze


def test_search_steps_caps_the_search_phase_of_long_schedules():
    short = Controller([3], ControllerOptions(warmup=0.1, freeze=0.6, search_steps=40), 100)
    assert short.freeze_steps == 50  # 10 warmup + 40: the cap binds
    long = Controller([3], ControllerOptions(warmup=0.1, freeze=0.6, search_steps=40), 1000)
    assert long.freeze_steps == 140 and long.beta(139) == pytest.approx(long.options.entropy_max, rel=1e-6)
    loose = Controller([3], ControllerOptions(warmup=0.1, freeze=0.6, search_steps=400), 100)
    assert loose.freeze_steps == 60  # the fraction binds
    with pytest.raises(ValueError, match="search_steps"):
        ControllerOptions(search_steps=0)


def test_update_many_is_the_mean_of_single_updates_direction():
    c = Controller([3], ControllerOptions(warmup=0.0, entropy_schedule="none"), 10)
    c.update([0], 0.0, 0)  # seed the baseline at 0
    c.update_many([[1], [2], [0]], [1.0, -1.0, 0.0], 1)
    p = c.probs()[0]
    assert p[1] > 1 / 3 > p[2]


def test_standardized_advantage_is_scale_free():
    def run(scale):
        c = Controller([3, 3], ControllerOptions(warmup=0.0, entropy_schedule="none",
                                                 advantage="standardized"), 50)
        g = torch.Generator().manual_seed(0)
        for step in range(30):
            choice = c.sample(g)
            c.update(choice, scale * (float(choice[0] == 2) + 0.01 * (step % 3)), step)
        return c.probs()
    assert torch.allclose(run(1.0), run(1000.0), atol=1e-4)
    assert run(1.0)[0, 2] > 0.5


def test_leave_one_out_advantage_ignores_what_the_samples_share():
    """Samples of one step are judged on one batch: a large per-step offset common to them (the
    batch's difficulty) must not change what leave_one_out learns, and the better candidate wins."""
    def run(noise, advantage):
        c = Controller([3, 3], ControllerOptions(warmup=0.0, entropy_schedule="none", lr=0.05,
                                                 advantage=advantage), 60)
        g, batch = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
        for step in range(40):
            offset = noise * float(torch.randn(1, generator=batch))  # the same for every sample
            choices = [c.sample(g) for _ in range(4)]
            c.update_many(choices, [offset + 0.01 * float(ch[0] == 2) for ch in choices], step)
        return c.probs()
    quiet, noisy = run(0.0, "leave_one_out"), run(5.0, "leave_one_out")
    assert torch.allclose(quiet, noisy, atol=1e-5)  # the shared offset cancels exactly
    assert noisy[0, 2] > 0.6
    assert not torch.allclose(run(0.0, "standardized"), run(5.0, "standardized"), atol=1e-2)


def test_leave_one_out_needs_several_samples_on_one_batch():
    with pytest.raises(Exception, match="reward_samples"):
        SearchOptions(controller=ControllerOptions(advantage="leave_one_out"))
    SearchOptions(reward_samples=2, controller=ControllerOptions(advantage="leave_one_out"))


# -- the search ----------------------------------------------------------------------------------
def test_progressive_warmup_starts_on_the_most_precise_formats(trained_tiny_cnn, digits, tmp_path):
    g = searchable(trained_tiny_cnn, digits)
    run_search(g, digits, "bops=0.3x", opts(steps=50, controller={"warmup": 0.4}), out_dir=tmp_path,
               progress=False)
    rows = [json.loads(l) for l in (tmp_path / "search.jsonl").read_text().splitlines()]
    warm = [r for r in rows if r["phase"] == "warmup"]
    assert len(warm) == 20
    int8 = FORMATS.index("int8")
    assert all(k == int8 for k in warm[0]["choice"])  # first step: most precise only
    assert any(FORMATS.index("int2") in r["choice"] for r in warm[-5:])  # menu widened by the end


def test_result_meets_budget_and_final_stretch_trains_it(trained_tiny_cnn, digits, tmp_path):
    g = searchable(trained_tiny_cnn, digits)
    res = run_search(g, digits, "bops=0.3x", opts(steps=60), out_dir=tmp_path, progress=False)
    assert res.cost <= res.budget_target * 1.02
    assert res.cost >= res.budget_target * 0.6  # projection fills the budget, not far below it
    rows = [json.loads(l) for l in (tmp_path / "search.jsonl").read_text().splitlines()]
    final = [r for r in rows if r["phase"] == "final"]
    assert len(final) == 24  # 40 % of 60 steps
    assert all(r["choice"] == res.choice for r in final)
    assert res.schedule["final_config_trained_steps"] >= 24
    assert res.schedule["final_stretch_steps"] == 24
    # probabilities per layer are logged at every step and frozen in the final stretch
    assert len(rows[0]["probs"]) == g.space.num_decisions
    assert final[0]["probs"] == final[-1]["probs"]
    assert (tmp_path / "search.png").stat().st_size > 10_000
    assert config_cost(g, res.formats, "bops") == pytest.approx(res.cost)


def test_tight_budget_is_met_even_when_the_policy_prefers_more(trained_tiny_cnn, digits):
    # gamma 0: the policy only sees quality and prefers int8; the result must still fit
    g = searchable(trained_tiny_cnn, digits)
    res = run_search(g, digits, "bops=0.15x", opts(steps=40, gamma=0.0), progress=False)
    assert res.cost <= res.budget_target * 1.02


def test_weights_can_follow_the_policy_while_samples_are_judged(trained_tiny_cnn, digits, tmp_path):
    """``weights_follow='policy'``: each search step trains the policy's budget-projected argmax
    and judges the controller's sample forward-only; both are logged, the result meets its budget."""
    from fliqs_compiler.base.errors import FliqsError
    g = searchable(trained_tiny_cnn, digits)
    res = run_search(g, digits, "bops=0.3x", opts(steps=40, weights_follow="policy"), out_dir=tmp_path,
                     progress=False)
    rows = [json.loads(l) for l in (tmp_path / "search.jsonl").read_text().splitlines()]
    search = [r for r in rows if r["phase"] == "search"]
    assert search and all("trained" in r and r["reward"] is not None for r in search)
    for r in search:
        assert config_cost(g, g.space.formats_of(r["trained"]), "bops") <= res.budget_target * 1.02
    assert any(r["trained"] != r["choice"] for r in search)  # the samples explore beyond it
    assert all("trained" not in r for r in rows if r["phase"] != "search")
    assert res.cost <= res.budget_target * 1.02
    with pytest.raises(FliqsError, match="weights_follow='sample'"):
        SearchOptions(weights_follow="policy", reward_batch="train")
    with pytest.raises(FliqsError, match="weights_follow"):
        SearchOptions(weights_follow="argmax")


def test_reward_samples_and_distillation_run(trained_tiny_cnn, digits):
    g = searchable(trained_tiny_cnn, digits)
    res = run_search(g, digits, "bops=0.4x", opts(steps=30, reward_samples=3, train={"distill": 0.5}),
                     progress=False)
    assert math.isfinite(res.quality["final"]) and res.cost <= res.budget_target * 1.02


# -- the sensitivity prior -----------------------------------------------------------------------
def test_prior_logits_put_the_stated_probability_on_the_pick():
    from fliqs_compiler.search.sensitivity import prior_logits
    logits = prior_logits([2, 0, 0], [3, 3, 1], 3, 0.6)
    p = torch.softmax(logits.masked_fill(torch.tensor([[False] * 3] * 2 + [[False, True, True]]), -1e9), -1)
    assert p[0, 2] == pytest.approx(0.6) and p[0, 0] == pytest.approx(0.2)
    assert p[1, 0] == pytest.approx(0.6) and p[2, 0] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        prior_logits([0], [3], 3, 1.0)


def test_ilp_choice_is_the_cheapest_loss_under_the_budget():
    import numpy as np
    from fliqs_compiler.cost.model import CostTerm
    from fliqs_compiler.search.sensitivity import ilp_choice
    sens = [[3.0, 1.0, 0.0], [0.5, 0.1, 0.0], [9.0, 2.0, 0.0]]  # int2, int4, int8 per decision
    cost = (0.0, [CostTerm((d,), np.array(COST[d])) for d in range(3)])
    choice, msg = ilp_choice(sens, cost, target=24.0)
    assert msg == "ok" and cost_of(choice) <= 24.0
    assert choice == [1, 1, 2]  # loss 1.1 at cost 24 beats [1, 0, 2] (1.5) and [2, 0, 0] (9.5)
    assert ilp_choice(sens, cost, target=1.0)[0] is None  # below the cheapest: no solution


def test_ilp_choice_prices_an_untied_layer_by_the_product_of_its_widths():
    """Weight and activation as separate decisions: the layer costs bits_w x bits_a, which a
    per-decision linear model gets wrong in the cheap corner (it once let the ILP pick 2.4x the
    budget). The MILP's pair variables price every combination exactly: brute force agrees."""
    import itertools
    import numpy as np
    from fliqs_compiler.cost.model import CostTerm
    from fliqs_compiler.search.sensitivity import ilp_choice
    bits = np.array([2.0, 4.0, 8.0])
    rng = np.random.default_rng(0)
    for trial in range(20):
        macs = rng.uniform(1, 10, size=2)  # two untied layers: decisions (0, 1) and (2, 3)
        terms = [CostTerm((0, 1), macs[0] * np.outer(bits, bits)), CostTerm((2, 3), macs[1] * np.outer(bits, bits))]
        sens = np.sort(rng.uniform(0, 5, size=(4, 3)), axis=1)[:, ::-1].tolist()  # fewer bits, more loss
        target = float(rng.uniform(8, 64)) * macs.sum()

        def exact(c):
            return sum(t.table[c[t.decisions[0]], c[t.decisions[1]]] for t in terms)
        feasible = [c for c in itertools.product(range(3), repeat=4) if exact(c) <= target]
        choice, msg = ilp_choice(sens, (0.0, terms), target)
        if not feasible:
            assert choice is None
            continue
        assert msg == "ok" and exact(choice) <= target + 1e-9, (trial, choice)
        best = min(sum(sens[d][k] for d, k in enumerate(c)) for c in feasible)
        assert sum(sens[d][k] for d, k in enumerate(choice)) == pytest.approx(best)


def test_cost_terms_reproduce_config_cost_on_an_untied_graph(trained_tiny_cnn, digits):
    """``cost_terms`` is exact for every configuration of a real untied space, in BOPs and size."""
    import itertools
    import random
    from fliqs_compiler.cost.model import cost_terms
    g = make_searchable(trained_tiny_cnn, digits.x_train[:1], FORMATS, tied=False, name="tiny")
    space = g.space
    assert any(len(t.decisions) == 2 for t in cost_terms(g, "bops")[1])
    rng = random.Random(0)
    for kind in ("bops", "size"):
        constant, terms = cost_terms(g, kind)
        for _ in range(30):
            choice = [rng.randrange(len(d.candidates)) for d in space.decisions]
            got = constant + sum(t.table[tuple(choice[d] for d in t.decisions)] for t in terms)
            assert got == pytest.approx(config_cost(g, space.formats_of(choice), kind))


def test_expected_cost_is_the_mean_over_independent_draws():
    import numpy as np
    from fliqs_compiler.cost.model import CostTerm
    from fliqs_compiler.search.baselines import expected_cost
    bits = np.array([2.0, 4.0, 8.0])
    cost = (5.0, [CostTerm((0, 1), np.outer(bits, bits)), CostTerm((2,), bits)])
    probs = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.4, 0.0], [0.0, 0.0, 1.0]])
    p = probs.numpy()
    want = 5.0 + (p[0] @ bits) * (p[1] @ bits) + 8.0
    assert float(expected_cost(cost, probs)) == pytest.approx(want)


def test_sensitivity_prior_starts_the_policy_on_the_ilp_pick_and_is_charged(trained_tiny_cnn, digits,
                                                                           tmp_path):
    from fliqs_compiler.search.sensitivity import forward_step_equivalents, sensitivity_evaluations
    g = searchable(trained_tiny_cnn, digits)
    o = opts(steps=60, prior="sensitivity", prior_samples=96, prior_probability=0.7, prior_share=0.5)
    res = run_search(g, digits, "bops=0.3x", o, out_dir=tmp_path, progress=False)
    charged = forward_step_equivalents(sensitivity_evaluations(g.space) * 96, 32)
    assert charged >= 1 and res.schedule["weight_steps"] == 60 - charged
    rows = [json.loads(l) for l in (tmp_path / "search.jsonl").read_text().splitlines()]
    assert len(rows) == 60 - charged  # the prior's forward passes were paid with weight steps
    prior = res.schedule["prior"]
    assert prior["choice"] is not None and prior["charged_steps"] == charged
    first = next(r for r in rows if r["phase"] == "search")
    # one controller step after the prior: each decision's top candidate is still its ILP pick
    for d, row in enumerate(first["probs"]):
        assert row.index(max(row)) == prior["choice"][d] and max(row) > 0.55
    assert res.cost <= res.budget_target * 1.02


def test_ilp_baseline_and_prior_share_one_sensitivity_measurement(trained_tiny_cnn, digits):
    """prior_at="start" measures the float weights before the first step, as the ILP baseline
    does: on the same samples both solve to the same configuration, warmup or not."""
    from fliqs_compiler.search import baselines as B
    from fliqs_compiler.search.oneshot import OneShotSearch
    g = searchable(trained_tiny_cnn, digits)
    o = opts(steps=40, prior="sensitivity", prior_samples=64, prior_share=0.5)
    search = OneShotSearch(copy_graph(g), digits, "bops=0.3x", o)
    assert search.phase(0) == "warmup"
    search.step(0)
    ilp = B.sensitivity_ilp(g, digits, "bops=0.3x", o, sens_samples=64)
    assert search.prior["choice"] == ilp.choice


def test_prior_at_search_is_measured_when_the_search_phase_begins(trained_tiny_cnn, digits, tmp_path):
    g = searchable(trained_tiny_cnn, digits)
    o = opts(steps=40, prior="sensitivity", prior_at="search", prior_share=0.5)
    res = run_search(g, digits, "bops=0.3x", o, out_dir=tmp_path, progress=False)
    rows = [json.loads(l) for l in (tmp_path / "search.jsonl").read_text().splitlines()]
    warm = [r for r in rows if r["phase"] == "warmup"]
    assert warm and all(abs(max(p) - 1 / 3) < 1e-3 for r in warm for p in r["probs"])  # uniform until then
    first = next(r for r in rows if r["phase"] == "search")
    assert [p.index(max(p)) for p in first["probs"]] == res.schedule["prior"]["choice"]


def copy_graph(g):
    import copy
    return copy.deepcopy(g)


# -- learning-rate schedule ----------------------------------------------------------------------
def test_cosine_schedule_sets_every_groups_rate_from_the_step(trained_tiny_cnn, digits):
    from fliqs_compiler.search.trainer import WeightTrainer
    g = searchable(trained_tiny_cnn, digits)
    trainer = WeightTrainer(g.gm, digits, TrainOptions(batch_size=16, lr=1e-3, scale_lr=1e-2,
                                                       lr_schedule="cosine"))
    assert [grp["lr"] for grp in trainer.optimizer.param_groups] == [1e-3, 1e-2]
    for step, factor in [(0, 1.0), (5, 0.5), (9, 0.5 * (1 + math.cos(math.pi * 0.9)))]:
        trainer.at_progress(step, 10)
        assert [grp["lr"] for grp in trainer.optimizer.param_groups] == pytest.approx(
            [1e-3 * factor, 1e-2 * factor])
    flat = WeightTrainer(g.gm, digits, TrainOptions(batch_size=16, lr=1e-3))
    flat.at_progress(9, 10)
    assert flat.optimizer.param_groups[0]["lr"] == 1e-3  # constant: the default
    with pytest.raises(ValueError, match="lr_schedule='linear'"):
        TrainOptions(lr_schedule="linear")
    held = WeightTrainer(g.gm, digits, TrainOptions(batch_size=16, lr=1e-3, lr_schedule="hold-cosine"))
    rates = []
    for step in (0, 5, 6, 8, 9):
        held.at_progress(step, 10)
        rates.append(held.optimizer.param_groups[0]["lr"])
    # full rate until the final stretch (0.6 of the run), then its own cosine: 1, .5 at 0.8
    assert rates[:3] == pytest.approx([1e-3] * 3)
    assert rates[3:] == pytest.approx([5e-4, 1e-3 * 0.5 * (1 + math.cos(math.pi * 0.75))])


def test_the_search_steps_on_the_schedule(trained_tiny_cnn, digits, monkeypatch):
    """Every weight step of the search sets its rate from (step, weight steps) first."""
    from fliqs_compiler.search.trainer import WeightTrainer
    seen = []
    original = WeightTrainer.at_progress
    monkeypatch.setattr(WeightTrainer, "at_progress",
                        lambda self, step, steps: (seen.append((step, steps)), original(self, step, steps)))
    r = run_search(searchable(trained_tiny_cnn, digits), digits, "bops=0.5x",
                   opts(steps=12, train={"lr_schedule": "cosine"}), progress=False)
    assert seen == [(i, 12) for i in range(12)] and r.steps == 12
    fp = [SearchOptions(train=TrainOptions(lr_schedule=s)).fingerprint() for s in ("constant", "cosine")]
    assert fp[0] != fp[1]  # a checkpoint of one schedule never resumes the other
