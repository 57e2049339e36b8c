"""Baselines in the same harness as FLIQS (same graph, data, step count, budget, batches).

- ``uniform``: every searched layer in one format, QAT for the same number of steps.
- ``random``: N random configurations within the budget; each is QAT-trained for steps/N steps
  from the same starting weights, the best on the validation split is reported on the test split.
- ``ilp`` (HAWQ-like): per-decision sensitivity = measured validation-loss increase when that
  decision alone drops from the most precise candidate to each other candidate; minimise the
  summed sensitivity under the budget with ``scipy.optimize.milp`` (the exact cost of
  ``cost.model.cost_terms``, untied layers' bits_w x bits_a included); then QAT for the same steps.
- ``dnas``: differentiable branching (EdMIPS/FBNet-like) — every quantizer runs all K candidates
  and mixes them with softmax(α) of its decision; the loss adds ``γ·|E[C]/C_target - 1|``
  (``expected_cost``: exact under independent draws);
  final = argmax α, shared weights, no retraining. K× activation memory: the comparison point.
Each returns a ``BaselineResult``; none modifies the graph passed in (they work on deep copies).
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import torch
from torch import nn

from fliqs_compiler.cost.budget import parse_budget, resolve_budget
from fliqs_compiler.cost.model import config_cost, cost_terms
from fliqs_compiler.ir.graph import Graph
from fliqs_compiler.numerics.quantizers import SearchableQuantizer
from fliqs_compiler.search.oneshot import SearchOptions
from fliqs_compiler.search.projection import project_to_budget
from fliqs_compiler.search.sensitivity import (SENSITIVITY_SAMPLES, forward_step_equivalents,
                                               ilp_choice, measure_on_heldout)
from fliqs_compiler.search.metrics import resolve_metric
from fliqs_compiler.search.trainer import WeightTrainer, float_copy, needs_teacher

__all__ = ["BaselineResult", "uniform", "fixed", "random_search", "sensitivity_ilp", "dnas", "DNASMixer",
           "dnas_wrap", "expected_cost", "BASELINES"]


@dataclass
class BaselineResult:
    name: str
    method: str
    choice: list
    formats: dict
    cost: float
    quality: float
    steps: int
    seconds: float
    notes: str = ""
    extra: dict = field(default_factory=dict)
    graph: Optional[Graph] = field(default=None, repr=False, compare=False)  # trained, config applied

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("graph")
        return d


def _setup(graph: Graph, data, options: SearchOptions):
    g = copy.deepcopy(graph)
    metric = resolve_metric(g, data, options.metric)[0]
    teacher = float_copy(g.gm) if needs_teacher(data, options.train, metric) else None
    torch.manual_seed(options.seed)
    return (g, WeightTrainer(g.gm, data, options.train, teacher, metric=metric), metric,
            torch.Generator().manual_seed(options.seed))


def _target(graph, budget, latency):
    if budget is None:
        return None, "bops"
    b = parse_budget(budget) if isinstance(budget, str) else budget
    return resolve_budget(b, graph, latency), b.kind


def _result(name, method, g, choice, kind, latency, quality, steps, t0, notes="", **extra):
    g.space.apply(g.gm, choice)
    return BaselineResult(name, method, list(choice), g.space.formats_of(choice),
                          config_cost(g, g.space.formats_of(choice), kind, latency), quality, steps,
                          time.perf_counter() - t0, notes, extra, graph=g)


def uniform(graph: Graph, data, budget, options: SearchOptions, formats: Optional[Sequence[str]] = None,
            latency=None) -> list:
    """One QAT run per format shared by all decisions (``formats`` default: every candidate of
    the space). A decision an operand rule keeps from that format (``grouping.OPERAND_RULES``)
    takes its nearest wider candidate, as the search must: the notes say which."""
    _, kind = _target(graph, budget, latency)
    space = graph.space
    every = list(dict.fromkeys(c for d in space.decisions for c in d.candidates))
    out = []
    for fmt in (formats or every):
        t0 = time.perf_counter()
        g, trainer, metric, gen = _setup(graph, data, options)
        choice = g.space.uniform_choice(fmt, nearest=True)
        trainer.train_fixed(g.space.apply, choice, options.steps, gen)
        swapped = space.substitutes(fmt)
        note = f"QAT, all searched layers {fmt}, {options.steps} steps"
        if swapped:
            note += (f" ({len(swapped)} decision(s) at " +
                     ", ".join(sorted(set(swapped.values()))) + " by an operand rule)")
        out.append(_result(f"uniform-{fmt}", "uniform", g, choice, kind, latency,
                           trainer.evaluate(metric, "test"), options.steps, t0, note))
    return out


def fixed(graph: Graph, data, choice: Sequence[int], options: SearchOptions, latency=None,
          start: Optional[Graph] = None) -> BaselineResult:
    """QAT of one given configuration for ``options.steps`` steps from the float weights (how a
    search's configuration is judged apart from its one-shot weights) or, with ``start``, from
    that trained graph's weights and scales (a fine-tune of a search's result; the teacher stays
    the float model of ``graph``)."""
    t0 = time.perf_counter()
    g, trainer, metric, gen = _setup(graph, data, options)
    if start is not None:
        g.gm.load_state_dict(start.gm.state_dict())  # in place: the optimizer keeps its tensors
    trainer.train_fixed(g.space.apply, choice, options.steps, gen)
    origin = "the given weights" if start is not None else "float"
    return _result("fixed", "fixed", g, choice, "bops", latency, trainer.evaluate(metric, "test"),
                   options.steps, t0, f"QAT of the given configuration from {origin}, {options.steps} steps")


def random_search(graph: Graph, data, budget, options: SearchOptions, n: int = 8, latency=None,
                  max_tries: int = 20000, band: float = 0.1) -> BaselineResult:
    """Best of ``n`` random configurations near the budget (cost in [(1-band)·T, T]: a random
    search that rejection-samples far below the budget is no competitor), each QAT-trained for
    steps // n steps; the band widens when too few configurations fall into it."""
    t0 = time.perf_counter()
    target, kind = _target(graph, budget, latency)
    space = graph.space
    gen = torch.Generator().manual_seed(options.seed + 1)
    configs, lo = [], 0.0 if target is None else (1.0 - band) * target
    for tries in range(max_tries):
        choice = [int(torch.randint(len(d.candidates), (1,), generator=gen)) for d in space.decisions]
        cost = config_cost(graph, space.formats_of(choice), kind, latency)
        if target is None or lo <= cost <= target:
            configs.append(choice)
            if len(configs) == n:
                break
        if tries % 2000 == 1999:
            lo *= 0.5  # few configurations this close to the budget: widen the band
    each = max(1, options.steps // max(1, len(configs)))
    best = None
    for choice in configs:
        g, trainer, metric, g_gen = _setup(graph, data, options)
        trainer.train_fixed(g.space.apply, choice, each, g_gen)
        val = trainer.evaluate(metric, "val")
        if best is None or val > best[0]:
            best = (val, choice, trainer.evaluate(metric, "test"), g)
    val, choice, test_q, g = best
    return _result("random", "random", g, choice, kind, latency, test_q, each * len(configs), t0,
                   f"best (by val) of {len(configs)} random in-budget configs, each QAT {each} steps "
                   "from the same float weights", val_quality=val, tried=len(configs))


def sensitivity_ilp(graph: Graph, data, budget, options: SearchOptions, latency=None,
                    sens_samples: int = SENSITIVITY_SAMPLES, charge_sensitivity: bool = True) -> BaselineResult:
    """HAWQ-like: measured per-decision loss sensitivity + MILP under the budget, then QAT.
    ``charge_sensitivity``: the sensitivity passes count toward ``options.steps`` (QAT gets
    the rest), so the method costs what the others do."""
    t0 = time.perf_counter()
    target, kind = _target(graph, budget, latency)
    g, trainer, metric, gen = _setup(graph, data, options)
    space = g.space
    sens = measure_on_heldout(space, g.gm, trainer, data, sens_samples)
    n = sens.samples
    choice, message = ilp_choice(sens.rows, cost_terms(g, kind, latency), target)
    if choice is None:
        choice = list(sens.reference)
        note = f"MILP failed ({message}); fell back to the most precise configuration"
    else:
        note = "sensitivity = measured val-loss increase per (decision, format); MILP; then QAT"
    evals = sens.evaluations
    charged = forward_step_equivalents(evals * n, options.train.batch_size) if charge_sensitivity else 0
    qat = max(0, options.steps - charged)
    trainer.train_fixed(space.apply, choice, qat, gen)
    return _result("ilp", "ilp", g, choice, kind, latency, trainer.evaluate(metric, "test"),
                   options.steps, t0, f"{note}, {qat} QAT steps ({charged} charged for {evals} "
                   f"sensitivity passes of {n} samples)", sensitivity=sens.rows, qat_steps=qat)


class DNASMixer(nn.Module):
    """Runs a SearchableQuantizer in all its candidates and mixes them: Σ_k softmax(α_d)_k q_k(x)."""

    def __init__(self, quantizer: SearchableQuantizer, alphas: nn.Parameter, decision: int):
        super().__init__()
        self.q = quantizer
        self.decision = decision
        object.__setattr__(self, "_alphas", alphas)  # shared, not a parameter of this module

    def forward(self, x):
        k = len(self.q.candidates)
        w = torch.softmax(self._alphas[self.decision, :k], dim=0)
        out = 0
        for i in range(k):
            self.q.active = i
            out = out + w[i] * self.q(x)
        return out


def dnas_wrap(graph: Graph):
    """A deep copy of ``graph`` whose quantizers are ``DNASMixer``s, and the α parameter."""
    g = copy.deepcopy(graph)
    space = g.space
    alphas = nn.Parameter(torch.zeros(space.num_decisions, space.max_candidates))
    for d, decision in enumerate(space.decisions):
        for member in decision.members:
            path = space.quantizers[member]
            parent, _, leaf = path.rpartition(".")
            owner = g.gm.get_submodule(parent) if parent else g.gm
            setattr(owner, leaf, DNASMixer(g.gm.get_submodule(path), alphas, d))
    return g, alphas


def expected_cost(cost, probs: torch.Tensor) -> torch.Tensor:
    """The expected cost (``cost.model.cost_terms``' ``(constant, terms)``) when each decision d
    draws its candidate independently from ``probs[d]`` (``[decisions, max candidates]``)."""
    constant, terms = cost
    total = torch.tensor(float(constant))
    for t in terms:
        p = [probs[d, :n] for d, n in zip(t.decisions, t.table.shape)]
        joint = p[0] if len(p) == 1 else p[0][:, None] * p[1][None, :]
        total = total + (joint * torch.as_tensor(t.table, dtype=joint.dtype)).sum()
    return total


def dnas(graph: Graph, data, budget, options: SearchOptions, latency=None, alpha_lr: float = 0.01) -> BaselineResult:
    """DNAS branching search for ``options.steps`` steps (α frozen during the warmup fraction)."""
    t0 = time.perf_counter()
    target, kind = _target(graph, budget, latency)
    g, alphas = dnas_wrap(graph)
    metric = resolve_metric(graph, data, options.metric)[0]
    trainer = WeightTrainer(g.gm, data, options.train,
                            float_copy(graph.gm) if needs_teacher(data, options.train, metric) else None,
                            metric=metric)
    cost = cost_terms(graph, kind, latency)
    k = graph.space.max_candidates
    mask = torch.tensor([[i < len(d.candidates) for i in range(k)] for d in graph.space.decisions])
    aopt = torch.optim.Adam([alphas], lr=alpha_lr)
    gen = torch.Generator().manual_seed(options.seed)
    torch.manual_seed(options.seed)
    warm = int(round(options.controller.warmup * options.steps))
    for step in range(options.steps):
        trainer.at_progress(step, options.steps)
        x, y, idx = trainer.batch("train", options.train.batch_size, gen)
        t = trainer.teacher_out("train", idx)
        g.gm.train()
        loss = trainer.loss(g.gm(x), y, t)
        if target is not None:
            p = torch.softmax(alphas.masked_fill(~mask, -1e9), dim=-1)
            expected = expected_cost(cost, p)
            loss = loss + options.gamma * torch.abs(expected / target - 1.0)
        trainer.optimizer.zero_grad(set_to_none=True)
        aopt.zero_grad(set_to_none=True)
        loss.backward()
        trainer.optimizer.step()
        if step >= warm:
            aopt.step()
    logp = torch.log_softmax(alphas.detach().masked_fill(~mask, float("-inf")), -1)
    choice, _ = project_to_budget(logp.argmax(-1).tolist(), logp,
                                  lambda c: config_cost(graph, graph.space.formats_of(c), kind, latency),
                                  target)  # the argmax alone ignores the budget
    final = copy.deepcopy(graph)
    prefixes = [f"{path}.q." for path in graph.space.quantizers.values()]

    def unwrap(key: str) -> str:
        for pre in prefixes:
            if key.startswith(pre):
                return pre[:-2] + key[len(pre):]
        return key
    final.gm.load_state_dict({unwrap(k2): v for k2, v in g.gm.state_dict().items()})
    ftrainer = WeightTrainer(final.gm, data, options.train, trainer.teacher)
    final.space.apply(final.gm, choice)
    return _result("dnas", "dnas", final, choice, kind, latency, ftrainer.evaluate(metric, "test"),
                   options.steps, t0, f"DNAS branching (all K candidates mixed), {options.steps} steps, "
                   "argmax α projected onto the budget, no retraining")


# the budgeted methods (``fixed`` takes a configuration instead of a budget, so is not here)
BASELINES = {"uniform": uniform, "random": random_search, "ilp": sensitivity_ilp, "dnas": dnas}
