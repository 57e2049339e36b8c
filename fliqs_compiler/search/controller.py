"""The FLIQS controller: one categorical policy per decision, trained with REINFORCE.

docs/method.md ("Controller") is the spec. Free logits ``[num_decisions, max_candidates]``
start equal (uniform policy; decisions with fewer candidates are masked). Each step samples one
candidate per decision. During warmup (first ``warmup`` fraction of the steps) samples are
uniform and the logits frozen; the moving-average baseline is still tracked so it is warm when
learning starts. After warmup: ``A = r - b`` (``b`` before this step's update; the first reward
seeds ``b``), ``b ← m·b + (1-m)·r``, loss ``-A·Σ_d log π_d(a_d) + sign·β(s)·Σ_d H(π_d)``
minimised with Adam (β1 = 0 by default, as TuNAS). ``β(s)`` follows an entropy schedule over
the normalised post-warmup step ``s ∈ [0, 1]``; ``sign = +1`` (default, the authors' code)
penalises entropy so the policy becomes near one-hot before the end, ``-1`` makes it an
exploration bonus.

``advantage='standardized'`` divides ``r - b`` by a moving estimate of the reward's standard
deviation (same momentum as ``b``): the policy's step size then no longer depends on the scale
of the reward, so one learning rate serves accuracy, loss and latency rewards alike.
``update`` takes one or several (configuration, reward) samples of the same step: several
forward-only evaluations per weight step give a lower-variance gradient for little time.
``advantage='leave_one_out'`` compares those samples with each other (each against the mean of
the others, RLOO): they were judged on the same held-out batch, so how hard that batch was —
3–4 accuracy points of noise on 128 images, more than most format changes are worth — cancels.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

__all__ = ["ControllerOptions", "Controller", "ENTROPY_SCHEDULES", "entropy_weight", "tunas_reward"]

ENTROPY_SCHEDULES = {
    "cosine": lambda s: (1.0 - math.cos(math.pi * s)) / 2.0,
    "constant": lambda s: 1.0,
    "linear": lambda s: s,
    "none": lambda s: 0.0,
}


def entropy_weight(schedule: str, beta_max: float, s: float) -> float:
    """β(s) for ``schedule`` in ``ENTROPY_SCHEDULES``; ``s`` is clamped to [0, 1]."""
    if schedule not in ENTROPY_SCHEDULES:
        raise ValueError(f"unknown entropy schedule {schedule!r}; use one of {', '.join(ENTROPY_SCHEDULES)}")
    return float(beta_max) * ENTROPY_SCHEDULES[schedule](min(1.0, max(0.0, float(s))))


def tunas_reward(quality: float, cost: float, target: Optional[float], gamma: float) -> float:
    """TuNAS absolute reward ``Q - γ·|C/C_target - 1|`` (``target`` None: no cost term)."""
    if target is None:
        return float(quality)
    return float(quality) - float(gamma) * abs(float(cost) / float(target) - 1.0)


ADVANTAGES = ("raw", "standardized", "leave_one_out")


@dataclass
class ControllerOptions:
    lr: float = 0.05
    beta1: float = 0.0  # TuNAS
    beta2: float = 0.999
    baseline_momentum: float = 0.95
    warmup: float = 0.25  # fraction of the steps with uniform sampling and a frozen policy
    entropy_schedule: str = "cosine"  # cosine | constant | linear | none
    entropy_max: float = 0.05  # β_max
    entropy_sign: float = 1.0  # +1: penalty (near one-hot at the end); -1: exploration bonus
    # raw: r - b | standardized: (r - b) / running std of r | leave_one_out: with several samples
    # per step (``SearchOptions.reward_samples``), all judged on the same held-out batch,
    # r_i - mean of the others, over its running std — the batch's own difficulty cancels
    advantage: str = "raw"
    # Fraction of the steps after which the policy stops learning (the search's final stretch
    # trains the chosen configuration); 1.0: learns to the end. The entropy schedule spans
    # [warmup, freeze].
    freeze: float = 1.0
    # At most this many steps of policy learning after the warmup (None: ``freeze`` alone): the
    # search then lasts a fixed number of controller steps and a longer schedule goes to the
    # final stretch, which trains the returned configuration.
    search_steps: Optional[int] = None

    def __post_init__(self):
        if self.entropy_schedule not in ENTROPY_SCHEDULES:
            raise ValueError(f"entropy_schedule {self.entropy_schedule!r}: use one of "
                             f"{', '.join(ENTROPY_SCHEDULES)}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup {self.warmup}: use a fraction in [0, 1)")
        if not self.warmup < self.freeze <= 1.0:
            raise ValueError(f"freeze {self.freeze}: use a fraction in (warmup, 1]")
        if self.search_steps is not None and int(self.search_steps) < 1:
            raise ValueError(f"search_steps {self.search_steps}: use 1 or more (or None)")
        if self.advantage not in ADVANTAGES:
            raise ValueError(f"advantage {self.advantage!r}: use one of {', '.join(ADVANTAGES)}")


class Controller:
    """Policy over ``candidate_counts[d]`` candidates per decision, for ``total_steps`` steps.

    Requires: at least one decision, each with ≥ 1 candidate. Guarantees: ``sample`` is a pure
    function of the generator state and the logits; ``update`` leaves logits untouched during
    warmup; ``state_dict``/``load_state_dict`` round-trip everything (logits, Adam, baseline).
    """

    def __init__(self, candidate_counts: Sequence[int], options: ControllerOptions, total_steps: int):
        counts = [int(c) for c in candidate_counts]
        if not counts or min(counts) < 1:
            raise ValueError("the controller needs at least one decision with at least one candidate")
        self.options = options
        self.total_steps = int(total_steps)
        self.warmup_steps = int(round(options.warmup * self.total_steps))
        self.freeze_steps = max(self.warmup_steps + 1, int(round(options.freeze * self.total_steps)))
        if options.search_steps is not None:
            self.freeze_steps = min(self.freeze_steps, self.warmup_steps + int(options.search_steps))
        k = max(counts)
        self.mask = torch.zeros(len(counts), k, dtype=torch.bool)
        for d, c in enumerate(counts):
            self.mask[d, :c] = True
        self.logits = torch.zeros(len(counts), k, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.logits], lr=options.lr,
                                          betas=(options.beta1, options.beta2))
        self.baseline: Optional[float] = None
        self.reward_var: Optional[float] = None  # moving variance of the reward (standardized)

    # -- policy ----------------------------------------------------------------------------
    def log_probs(self) -> torch.Tensor:
        masked = torch.where(self.mask, self.logits, torch.full_like(self.logits, -1e9))
        return torch.log_softmax(masked, dim=-1)

    def probs(self) -> torch.Tensor:
        return self.log_probs().detach().exp()

    def entropy(self) -> torch.Tensor:
        """Σ over decisions of each categorical's entropy (nats)."""
        lp = self.log_probs()
        return -(lp.exp() * lp).sum()

    def in_warmup(self, step: int) -> bool:
        return step < self.warmup_steps

    def frozen(self, step: int) -> bool:
        """The policy does not learn at ``step`` (warmup, or after ``freeze``)."""
        return self.in_warmup(step) or step >= self.freeze_steps

    def progress(self, step: int) -> float:
        """Normalised step s ∈ [0, 1] between warmup and freeze (0 during warmup)."""
        span = max(1, self.freeze_steps - self.warmup_steps - 1)
        return min(1.0, max(0.0, (step - self.warmup_steps) / span))

    def beta(self, step: int) -> float:
        if self.in_warmup(step):
            return 0.0
        o = self.options
        return entropy_weight(o.entropy_schedule, o.entropy_max, self.progress(step))

    def sample(self, generator: torch.Generator, uniform: bool = False) -> list:
        """One candidate index per decision (uniform over valid candidates if ``uniform``)."""
        p = self.mask.float() if uniform else self.probs()
        return torch.multinomial(p, 1, generator=generator).squeeze(1).tolist()

    def argmax(self) -> list:
        return self.probs().argmax(dim=-1).tolist()

    # -- learning --------------------------------------------------------------------------
    def update(self, choice: Sequence[int], reward: float, step: int) -> dict:
        """One REINFORCE step for ``choice`` with ``reward`` at ``step``; returns the numbers logged."""
        return self.update_many([choice], [reward], step)

    def _advantages(self, rewards: Sequence[float]) -> list:
        """Advantages against the baseline before this step; then the baseline (and the reward
        variance) move towards each reward in turn."""
        m = self.options.baseline_momentum
        if self.baseline is None:  # the first reward seeds the baseline
            self.baseline = float(rewards[0])
        n = len(rewards)
        paired = self.options.advantage == "leave_one_out" and n > 1
        if paired:
            total = float(sum(rewards))
            advantages = [float(r) - (total - float(r)) / (n - 1) for r in rewards]
        else:
            advantages = [float(r) - self.baseline for r in rewards]
        var = self.reward_var
        for r, a in zip(rewards, advantages):
            d = a if paired else float(r) - self.baseline
            var = d * d if var is None else m * var + (1.0 - m) * d * d
            self.baseline = m * self.baseline + (1.0 - m) * float(r)
        self.reward_var = var
        if self.options.advantage != "raw":
            std = math.sqrt(var) if var else 0.0
            advantages = [a / max(std, 1e-6) if std > 0 else 0.0 for a in advantages]
        return advantages

    def update_many(self, choices: Sequence[Sequence[int]], rewards: Sequence[float], step: int) -> dict:
        """One REINFORCE step from several samples of the same policy (mean of their terms)."""
        advantages = self._advantages(rewards)
        advantage = sum(advantages) / len(advantages)
        beta = self.beta(step)
        if self.frozen(step):
            with torch.no_grad():
                ent = float(self.entropy())
            return {"advantage": advantage, "baseline": self.baseline, "entropy": ent, "beta": 0.0,
                    "frozen": True}
        lp = self.log_probs()
        idx = torch.as_tensor([list(c) for c in choices], dtype=torch.long)  # [samples, decisions]
        chosen = lp.gather(1, idx.t()).sum(0)  # Σ_d log π_d(a_d) per sample
        ent = -(lp.exp() * lp).sum()
        loss = -(torch.as_tensor(advantages) * chosen).mean() + self.options.entropy_sign * beta * ent
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return {"advantage": advantage, "baseline": self.baseline, "entropy": float(ent.detach()),
                "beta": beta, "frozen": False}

    # -- checkpointing ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        """A snapshot (copies, not views of the live optimizer state)."""
        return {"logits": self.logits.detach().clone(), "optimizer": copy.deepcopy(self.optimizer.state_dict()),
                "baseline": float("nan") if self.baseline is None else float(self.baseline),
                "reward_var": float("nan") if self.reward_var is None else float(self.reward_var)}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.logits.copy_(state["logits"])
        self.optimizer.load_state_dict(state["optimizer"])
        b = float(state["baseline"])
        self.baseline = None if math.isnan(b) else b
        v = float(state.get("reward_var", float("nan")))
        self.reward_var = None if math.isnan(v) else v
