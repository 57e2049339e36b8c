"""Projecting a configuration onto the budget: the search's result must meet the budget it was
given (never overshoot silently) and should not leave much of it unused.

``project_to_budget`` starts from the policy's argmax and moves one decision at a time, greedily
by log-probability per unit of cost: while over the budget, the downgrade that loses the least
probability per cost saved; then, while some upgrade still fits, the one that loses the least
(or gains the most) probability per cost spent. Each move changes one decision, so the result
stays as close to what the policy preferred as the budget allows.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

__all__ = ["project_to_budget"]


def _best_move(choice, log_probs, cost_fn, cost, ok, score):
    best = None
    for d, row in enumerate(log_probs):
        for k in range(len(row)):
            if k == choice[d] or not torch.isfinite(row[k]):
                continue
            trial = list(choice)
            trial[d] = k
            c = cost_fn(trial)
            if not ok(c, cost):
                continue
            s = score(float(row[k] - row[choice[d]]), c - cost)
            if best is None or s > best[0]:
                best = (s, trial, c)
    return best


def project_to_budget(choice: Sequence[int], log_probs: torch.Tensor, cost_fn: Callable,
                      target: Optional[float]) -> tuple:
    """``(choice', moves)``: ``choice`` moved onto ``cost_fn(choice') <= target``, then filled up
    towards the target. ``log_probs[d, k]`` (−inf for masked candidates) ranks the moves.
    Requires the cheapest configuration to fit (budgets are checked up front)."""
    choice, moves = list(choice), 0
    if target is None:
        return choice, moves
    cost = cost_fn(choice)
    while cost > target:  # downgrade: least log-probability lost per unit of cost saved
        best = _best_move(choice, log_probs, cost_fn, cost, lambda c, cur: c < cur,
                          lambda dlp, dc: dlp / -dc)
        if best is None:
            break
        _, choice, cost = best
        moves += 1
    while True:  # upgrade while it fits: most log-probability per unit of cost spent
        best = _best_move(choice, log_probs, cost_fn, cost,
                          lambda c, cur: cur < c <= target, lambda dlp, dc: dlp / dc)
        if best is None:
            return choice, moves
        _, choice, cost = best
        moves += 1
