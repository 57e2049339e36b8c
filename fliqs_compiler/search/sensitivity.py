"""Measured per-decision sensitivity and the budgeted choice it implies (HAWQ-style), shared by
the ``ilp`` baseline and the FLIQS controller prior.

- ``measure_sensitivity``: forward-only. For every decision d and candidate k, the loss increase
  on one fixed held-out batch when d alone moves from the reference configuration (the most
  precise candidate everywhere) to k. The same batch for every trial: the differences are paired,
  so a few hundred samples rank candidates far better than independent batches would.
- ``ilp_choice``: minimise the summed sensitivity subject to the budget with
  ``scipy.optimize.milp``; the cost is exact (``cost.model.cost_terms``: per-layer terms over one
  decision, or two when a layer's weight and activation are separate decisions).
- ``prior_logits``: controller logits that put probability ``p`` on each decision's ILP pick and
  share the rest equally; the REINFORCE search then starts where the ILP ends and corrects it
  with measured rewards of whole configurations (interactions the additive model misses).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from fliqs_compiler.numerics import formats as F

__all__ = ["SENSITIVITY_SAMPLES", "Sensitivity", "most_precise", "measure_sensitivity", "ilp_choice",
           "prior_logits", "forward_step_equivalents", "sensitivity_evaluations", "measure_on_heldout"]

# Held-out samples the per-(decision, candidate) sensitivity is measured on, by the ILP baseline
# and by the search's prior alike (the prior takes fewer where its share of the steps cannot pay).
# Measured (bench/quality.py, ResNet-8, INT space, 900 steps, hold-cosine, 3 seeds): the search
# with its prior on 512 samples 92.40 +/- 0.09 % at 0.25x (256: 92.17 +/- 0.05, 2 seeds) and
# 91.84 +/- 0.13 % at 0.14x (256: 91.79 +/- 0.16); ILP on 512: 92.33 / 92.03 %.
SENSITIVITY_SAMPLES = 512


def most_precise(space) -> list:
    """Each decision's candidate with the most bits."""
    return [max(range(len(d.candidates)), key=lambda k: F.get(d.candidates[k]).cost_bits)
            for d in space.decisions]


def sensitivity_evaluations(space) -> int:
    """Forward passes ``measure_sensitivity`` makes: the reference, then one per decision and
    candidate other than the reference's."""
    return 1 + sum(len(d.candidates) - 1 for d in space.decisions)


def forward_step_equivalents(forward_samples: int, batch_size: int) -> int:
    """Weight-update steps that cost as much as ``forward_samples`` forward-only samples (a
    training step is about one forward and two backward passes of its batch)."""
    return int(math.ceil(forward_samples / (3.0 * max(1, batch_size))))


@dataclass
class Sensitivity:
    reference: list  # the configuration every trial starts from
    base_loss: float
    rows: list  # rows[d][k]: loss increase when decision d alone takes candidate k
    evaluations: int
    samples: int


@torch.no_grad()
def measure_sensitivity(space, gm, loss_of_output: Callable, x, y, t,
                        reference: Optional[Sequence[int]] = None,
                        forward: Optional[Callable] = None) -> Sensitivity:
    """Sensitivity of every (decision, candidate) on the batch ``(x, y, t)``; leaves ``gm``
    in training mode unchanged apart from the applied configuration (the reference).
    ``forward(gm, x)``: how the outputs are computed (default ``gm(x)``; the trainer's spreads
    the batch over data-parallel ranks)."""
    forward = forward or (lambda model, inputs: model(inputs))
    ref = list(most_precise(space) if reference is None else reference)
    was_training = gm.training
    gm.eval()

    def loss_of(choice):
        space.apply(gm, choice)
        return float(loss_of_output(forward(gm, x), y, t))  # every output (the trainer's loss)

    base = loss_of(ref)
    rows = []
    for d, decision in enumerate(space.decisions):
        row = []
        for k in range(len(decision.candidates)):
            if k == ref[d]:
                row.append(0.0)
                continue
            trial = list(ref)
            trial[d] = k
            row.append(loss_of(trial) - base)
        rows.append(row)
    space.apply(gm, ref)
    gm.train(was_training)
    return Sensitivity(ref, base, rows, sensitivity_evaluations(space), int(len(x)))


def measure_on_heldout(space, gm, trainer, data, samples: int) -> Sensitivity:
    """``measure_sensitivity`` on the first ``samples`` validation samples with the trainer's
    loss: cross-entropy with labels, distillation from the teacher without (the ILP baseline and
    the FLIQS prior measure the same way)."""
    n = min(int(samples), len(data.x_val))
    y = data.y_val[:n].to(trainer.device) if data.y_val is not None else None
    t = trainer.teacher_out("val", torch.arange(n)) if y is None else None
    return measure_sensitivity(space, gm, trainer.loss, data.x_val[:n], y, t,
                               forward=trainer.forward)


def ilp_choice(sens_rows: Sequence[Sequence[float]], cost, target: Optional[float]):
    """(choice, note): the configuration of least summed sensitivity whose cost fits ``target``;
    ``None`` and the solver's message when the MILP fails. ``cost``: ``cost.model.cost_terms``'
    ``(constant, terms)``, exact: a two-decision term gets one variable per candidate pair, tied
    to the two one-hot choices by its row and column sums (so it equals their product)."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    constant, terms = cost
    sizes = [len(r) for r in sens_rows]
    start = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    pairs = [t for t in terms if len(t.decisions) == 2]
    nx = int(start[-1])
    pair_start = nx + np.concatenate([[0], np.cumsum([t.table.size for t in pairs])]).astype(int)
    nvar = int(pair_start[-1])
    objective = np.zeros(nvar)
    objective[:nx] = np.concatenate([np.asarray(r, dtype=float) for r in sens_rows])
    equalities = []  # (coefficients, right-hand side)
    for d, n in enumerate(sizes):
        row = np.zeros(nvar)
        row[start[d]:start[d] + n] = 1
        equalities.append(row)
    budget = np.zeros(nvar)
    for t in terms:
        if len(t.decisions) == 1:
            d = t.decisions[0]
            budget[start[d]:start[d] + sizes[d]] += t.table
    for t, p0 in zip(pairs, pair_start):
        (d1, d2), (n1, n2) = t.decisions, t.table.shape
        budget[p0:p0 + t.table.size] = t.table.ravel()
        y = np.arange(t.table.size).reshape(n1, n2) + p0
        for k in range(n1):  # Σ_j y[k, j] = x[d1, k]
            row = np.zeros(nvar)
            row[y[k, :]], row[start[d1] + k] = 1, -1
            equalities.append(row)
        for k in range(n2):  # Σ_i y[i, k] = x[d2, k]
            row = np.zeros(nvar)
            row[y[:, k]], row[start[d2] + k] = 1, -1
            equalities.append(row)
    rhs = np.array([1.0] * len(sizes) + [0.0] * (len(equalities) - len(sizes)))
    constraints = [LinearConstraint(np.array(equalities), rhs, rhs)]
    if target is not None:
        constraints.append(LinearConstraint(budget[None, :], -np.inf, target - constant))
    res = milp(c=objective, constraints=constraints, integrality=np.ones(nvar), bounds=Bounds(0, 1))
    if not res.success:
        return None, str(res.message)
    x = np.round(res.x)
    return [int(np.argmax(x[start[d]:start[d] + n])) for d, n in enumerate(sizes)], "ok"


def prior_logits(choice: Sequence[int], candidate_counts: Sequence[int], width: int,
                 p: float) -> torch.Tensor:
    """Logits ``[decisions, width]`` giving ``choice[d]`` probability ``p`` (the rest shared
    equally; a single-candidate decision keeps probability 1)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"prior probability {p}: use a value in (0, 1)")
    logits = torch.zeros(len(choice), width)
    for d, (k, n) in enumerate(zip(choice, candidate_counts)):
        if n > 1:
            logits[d, k] = math.log(p * (n - 1) / (1.0 - p))
    return logits
