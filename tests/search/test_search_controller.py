"""Controller math: uniform start, moving-average baseline and advantage, REINFORCE direction,
warmup freezing, entropy schedules, masking, reward, checkpoint round trip."""
import math

import pytest
import torch

from fliqs_compiler.search.controller import (Controller, ControllerOptions, entropy_weight,
                                              tunas_reward)


def make(counts=(3, 3), steps=100, **kw):
    return Controller(counts, ControllerOptions(**kw), steps)


def test_uniform_start_and_mask():
    c = make(counts=(3, 2))
    p = c.probs()
    assert torch.allclose(p[0], torch.full((3,), 1 / 3))
    assert torch.allclose(p[1], torch.tensor([0.5, 0.5, 0.0]))
    g = torch.Generator().manual_seed(0)
    samples = [c.sample(g)[1] for _ in range(200)] + [c.sample(g, uniform=True)[1] for _ in range(200)]
    assert set(samples) == {0, 1}  # a masked candidate is never sampled
    assert c.entropy().item() == pytest.approx(math.log(3) + math.log(2), rel=1e-5)


def test_baseline_and_advantage():
    c = make(warmup=0.0, baseline_momentum=0.9)
    info = c.update([0, 0], 1.0, 0)
    assert info["advantage"] == 0.0 and c.baseline == pytest.approx(1.0)  # first reward seeds b
    info = c.update([0, 0], 2.0, 1)
    assert info["advantage"] == pytest.approx(1.0)  # r - b before the update
    assert c.baseline == pytest.approx(0.9 * 1.0 + 0.1 * 2.0)
    info = c.update([0, 0], 0.0, 2)
    assert info["advantage"] == pytest.approx(-1.1)
    assert c.baseline == pytest.approx(0.9 * 1.1)


def test_reinforce_direction():
    c = make(warmup=0.0, entropy_schedule="none")
    c.update([1, 2], 0.0, 0)
    c.update([1, 2], 1.0, 1)  # positive advantage: the chosen candidates become likelier
    p = c.probs()
    assert p[0, 1] > 1 / 3 and p[1, 2] > 1 / 3
    c.update([1, 2], -5.0, 2)  # negative advantage: less likely
    assert c.probs()[0, 1] < p[0, 1]


def test_warmup_freezes_policy_and_samples_uniformly():
    c = make(steps=100, warmup=0.25)
    assert c.warmup_steps == 25
    with torch.no_grad():
        c.logits[:] = torch.tensor([[10.0, 0.0, 0.0], [10.0, 0.0, 0.0]])
    before = c.logits.detach().clone()
    for step in range(25):
        info = c.update([1, 1], float(step), step)
        assert info["frozen"] and info["beta"] == 0.0
    assert torch.equal(c.logits.detach(), before)
    assert c.baseline is not None  # tracked during warmup
    g = torch.Generator().manual_seed(1)
    counts = torch.bincount(torch.tensor([c.sample(g, uniform=True)[0] for _ in range(600)]), minlength=3)
    assert counts.min() > 150  # uniform despite the peaked logits
    c.update([1, 1], 100.0, 25)
    assert not torch.equal(c.logits.detach(), before)


def test_entropy_schedule_values():
    assert entropy_weight("cosine", 0.2, 0.0) == pytest.approx(0.0)
    assert entropy_weight("cosine", 0.2, 0.5) == pytest.approx(0.1)
    assert entropy_weight("cosine", 0.2, 1.0) == pytest.approx(0.2)
    assert entropy_weight("cosine", 0.2, 0.25) == pytest.approx(0.2 * (1 - math.cos(math.pi / 4)) / 2)
    assert entropy_weight("linear", 0.2, 0.25) == pytest.approx(0.05)
    assert entropy_weight("constant", 0.2, 0.7) == pytest.approx(0.2)
    assert entropy_weight("none", 0.2, 0.7) == 0.0
    assert entropy_weight("cosine", 0.2, 3.0) == pytest.approx(0.2)  # clamped
    with pytest.raises(ValueError):
        entropy_weight("exp", 0.2, 0.5)
    c = make(steps=101, warmup=0.0, entropy_max=0.4)
    assert c.beta(0) == 0.0 and c.beta(50) == pytest.approx(0.2) and c.beta(100) == pytest.approx(0.4)
    w = make(steps=100, warmup=0.5, entropy_max=0.4)
    assert w.beta(10) == 0.0 and w.progress(10) == 0.0 and w.beta(99) == pytest.approx(0.4)


def test_entropy_penalty_sharpens_and_bonus_does_not():
    pen = make(warmup=0.0, entropy_schedule="constant", entropy_max=1.0, entropy_sign=1.0, steps=60)
    bon = make(warmup=0.0, entropy_schedule="constant", entropy_max=1.0, entropy_sign=-1.0, steps=60)
    with torch.no_grad():
        pen.logits[:, 0] = 0.5
        bon.logits[:, 0] = 0.5
    h0 = pen.entropy().item()
    for step in range(60):  # constant reward: zero advantage, only the entropy term acts
        pen.update([0, 0], 1.0, step)
        bon.update([0, 0], 1.0, step)
    assert pen.entropy().item() < h0 - 0.5
    assert bon.entropy().item() >= h0 - 1e-6


def test_reward():
    assert tunas_reward(0.9, 100.0, 100.0, 0.5) == pytest.approx(0.9)
    assert tunas_reward(0.9, 150.0, 100.0, 0.5) == pytest.approx(0.9 - 0.25)
    assert tunas_reward(0.9, 50.0, 100.0, 0.5) == pytest.approx(0.9 - 0.25)  # absolute: both sides
    assert tunas_reward(0.9, 50.0, None, 0.5) == pytest.approx(0.9)


def test_state_dict_round_trip():
    a = make(warmup=0.0)
    for step, r in enumerate([0.1, 0.5, 0.3]):
        a.update([step % 3, 1], r, step)
    b = make(warmup=0.0)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.logits.detach(), b.logits.detach()) and a.baseline == b.baseline
    a.update([2, 2], 0.9, 3)
    b.update([2, 2], 0.9, 3)
    assert torch.equal(a.logits.detach(), b.logits.detach())
    fresh = make()
    fresh.load_state_dict(make().state_dict())
    assert fresh.baseline is None


def test_bad_options():
    with pytest.raises(ValueError):
        ControllerOptions(entropy_schedule="exp")
    with pytest.raises(ValueError):
        ControllerOptions(warmup=1.0)
    with pytest.raises(ValueError):
        Controller([], ControllerOptions(), 10)


def _run_policy(quality_of, costs, target, gamma, steps=400, seed=0):
    """The search loop with a synthetic environment: sample one candidate per decision, reward
    with TuNAS, update; returns the final argmax. ``costs[d][c]``: cost of candidate c at d."""
    ctrl = make(counts=tuple(len(c) for c in costs), steps=steps, lr=0.1)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.Generator().manual_seed(seed + 1)
    for step in range(steps):
        choice = ctrl.sample(gen, uniform=ctrl.in_warmup(step))
        cost = sum(costs[d][c] for d, c in enumerate(choice))
        quality = quality_of(choice) + 0.01 * float(torch.randn((), generator=noise))
        ctrl.update(choice, tunas_reward(quality, cost, target, gamma), step)
    return ctrl.argmax()


# candidates in the order of the search spaces: int2, int4, int8 (bits² as the BOPs cost)
COSTS = [[4.0, 16.0, 64.0]] * 4


def test_converges_to_the_cheapest_when_quality_cannot_change():
    # the cheapest candidate last: a policy that learned nothing (argmax of equal logits → 0)
    # cannot pass
    costs = [row[::-1] for row in COSTS]
    cheapest = sum(min(row) for row in costs)
    assert _run_policy(lambda choice: 0.9, costs, target=cheapest, gamma=1.0) == [2, 2, 2, 2]


def test_converges_to_the_most_accurate_when_gamma_is_zero():
    def quality(choice):  # each layer loses accuracy at fewer bits; int8 is the best everywhere
        return 1.0 - sum((0.2, 0.05, 0.0)[c] for c in choice)
    assert _run_policy(quality, COSTS, target=16.0 * 4, gamma=0.0) == [2, 2, 2, 2]
