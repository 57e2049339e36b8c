"""The one-shot FLIQS search: ``run_search(graph, data, budget, options) -> SearchResult``.

A run has three phases over one weight-shared network, after the **prior** (``prior``, default
"sensitivity": before the first step the ILP choice on measured per-layer sensitivities becomes
the policy's starting point, ``sensitivity.py``; its forward passes are charged as steps):
1. **warmup** (``controller.warmup``; the recipe has none): formats are sampled without the
   policy — ``progressive`` (default) starts every decision on its most precise candidate and widens the menu towards
   the narrowest as the warmup goes on (measured: a uniform warmup over all formats pulled the
   shared weights from 92.1 % to 87.4 % on a ResNet-8); ``uniform`` samples all from the start.
2. **search** (until ``controller.freeze``): each step samples ONE configuration from the
   policy, takes one weight/scale optimizer step under it, measures its quality on a held-out
   batch (or the step's own batch) and gives the controller the reward ``Q - γ·|C/C_target - 1|``
   (``controller.py``); ``reward_samples`` > 1 adds forward-only evaluations of further sampled
   configurations on the same held-out batch to the same controller step.
3. **final stretch** (the rest): the policy's argmax, projected onto the budget
   (``projection.py``), is frozen and trained — the shared weights end adapted to the returned
   configuration, so nothing needs retraining.
The deliverable is that configuration with the shared weights as trained (``finetune`` > 0 adds
steps under it, for comparison only).

A run is a pure function of (graph, data, options): all randomness comes from one generator
seeded by ``options.seed``, and a run resumed from its checkpoint continues bit for bit.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from fliqs_compiler.cost.budget import parse_budget, resolve_budget
from fliqs_compiler.cost.model import LatencyModel, config_cost
from fliqs_compiler.base.errors import FliqsError
from fliqs_compiler.ir.graph import Graph
from fliqs_compiler.cost.model import cost_terms
from fliqs_compiler.search.checkpoint import StepLog, atomic_write_text, load_checkpoint, save_checkpoint
from fliqs_compiler.numerics import formats as F
from fliqs_compiler.search.controller import Controller, ControllerOptions, tunas_reward
from fliqs_compiler.search.parallel import map_outputs
from fliqs_compiler.search.projection import project_to_budget
from fliqs_compiler.search.sensitivity import (SENSITIVITY_SAMPLES, forward_step_equivalents,
                                               ilp_choice, measure_on_heldout,
                                               prior_logits, sensitivity_evaluations)
from fliqs_compiler.search.metrics import QUALITY, resolve_metric
from fliqs_compiler.search.trainer import TrainOptions, WeightTrainer, float_copy, needs_teacher

__all__ = ["SearchOptions", "SearchResult", "OneShotSearch", "run_search", "config_id"]


def recipe_controller() -> ControllerOptions:
    """The controller settings of the search recipe (``bench/ablations.py`` measures each): no
    warmup — the sensitivity prior (``SearchOptions.prior``) starts the policy on the ILP choice,
    so sampling is concentrated from the first step (measured at 0.14x, 300 steps: 91.17 / 91.14 %
    without a warmup, 90.70 / 91.11 % with a 15 % progressive one, seeds 0 / 1); a policy that
    learns until 60 % of the steps, at most 220 steps (``search_steps``), with standardized
    advantages and a cosine entropy penalty up to 0.3 (near one-hot by the freeze), then the final
    stretch. The cap binds from ~370 steps on: at 900 steps the policy had settled on the prior's
    pick long before 60 %, and the final stretch trains the returned configuration (measured,
    ResNet-8, INT space, 900 steps, hold-cosine, seeds 0 / 1: 0.14x 91.11 / 91.66 % with the
    freeze at 60 %, 91.68 / 91.90 % with 220 search steps; 0.25x 91.99 (seed 0) / 92.20 / 92.13).
    Without the prior, a 15 % progressive warmup (``warmup=0.15``) is what was measured best.
    ``ControllerOptions()`` alone keeps the textbook TuNAS defaults."""
    return ControllerOptions(warmup=0.0, entropy_max=0.3, freeze=0.6, search_steps=220,
                             advantage="standardized")


def recipe_train() -> TrainOptions:
    """Weight training of the recipe, shared with every baseline: distillation from the float
    model at weight 0.5 (every sampled configuration learns to match it)."""
    return TrainOptions(distill=0.5)


@dataclass
class SearchOptions:
    steps: int = 300
    seed: int = 0
    gamma: float = 0.5  # cost weight of the absolute reward
    metric: Optional[str] = None  # QUALITY key; None: chosen from the outputs (metrics.auto_metric)
    reward_batch: str = "heldout"  # heldout (a validation batch, TuNAS) | train (the step's batch)
    reward_batch_size: Optional[int] = None  # held-out batch size; None: the training batch size
    reward_metric: Optional[str] = None  # QUALITY key of the reward; None: ``metric``
    reward_samples: int = 1  # configurations judged per controller step (1 trained + forward-only)
    # Where the policy does not learn (warmup, final stretch) the held-out reward only feeds the
    # diagnostics: it is measured every ``monitor_every`` steps there (and at the last step),
    # logged as None in between. The held-out batch is drawn all the same, so the data order and
    # the trained weights do not depend on it. Why: that forward was ~a quarter of a step's time
    # (bench/search_throughput.py), spent on 40 % of the steps for a log line.
    monitor_every: int = 10
    warmup_sampling: str = "progressive"  # progressive | uniform (see the module docstring)
    # What the weights train during the search: "policy" (the recipe: the policy's argmax projected
    # onto the budget — what the final stretch would train — while the controller's sample is
    # judged forward-only on the held-out batch) or "sample" (TuNAS: the sampled configuration
    # trains, then is judged). Measured (bench/quality.py, ResNet-8, INT space, 900 steps,
    # hold-cosine, seeds 0-2): 0.14x 91.93 +/- 0.11 % with "policy", 91.84 +/- 0.13 with "sample",
    # ILP + QAT 92.03 +/- 0.11 (all three the same configuration); 0.25x 92.57 +/- 0.07 / 92.40 +/-
    # 0.09 / ILP 92.33 +/- 0.10 — "policy" above ILP at every seed. The sampled configurations'
    # weight steps were what the returned configuration lost against ILP + QAT.
    weights_follow: str = "policy"
    # Controller prior (``sensitivity.py``): "sensitivity" measures every (decision, candidate)
    # on the shared weights when the search phase begins, solves the budgeted ILP and starts the
    # policy with ``prior_probability`` on each decision's ILP pick; its forward passes over
    # ``prior_samples`` held-out samples (``SENSITIVITY_SAMPLES``, the ILP baseline's count;
    # fewer where ``prior_share`` cannot pay) are charged against ``steps``. "none": uniform logits.
    # Measured (bench/quality.py's ResNet-8, INT space, 0.14x, 300 steps, seeds 0 / 1): without
    # the prior 89.04 / 87.41 %; with it, measured after a 15 % warmup 89.19 / 89.28 %, measured
    # at the start (below) with the same warmup 90.70 / 91.11 %.
    prior: str = "sensitivity"
    # When it is measured: "start" — on the float weights before the first step (what the ILP
    # baseline measures; measured better: its configuration retrained scored 91.3 % where the
    # "search" one, on the shared weights after the warmup, scored 88.1 %); "search" — when the
    # search phase begins.
    prior_at: str = "start"
    prior_samples: int = SENSITIVITY_SAMPLES
    prior_probability: float = 0.5
    # The prior may cost at most this fraction of ``steps``: short runs measure on fewer samples
    # (below 16 samples the policy starts uniform, stated in the schedule).
    prior_share: float = 0.1
    checkpoint_every: int = 50
    finetune: int = 0  # extra steps under the final configuration (comparison only)
    train: TrainOptions = field(default_factory=recipe_train)
    controller: ControllerOptions = field(default_factory=recipe_controller)

    def __post_init__(self):
        if self.reward_batch not in ("heldout", "train"):
            raise FliqsError(f"search option reward_batch={self.reward_batch!r}: use 'heldout' or 'train'")
        if int(self.steps) < 1:
            raise FliqsError(f"search steps={self.steps}: give a positive number of steps")
        if self.warmup_sampling not in ("progressive", "uniform"):
            raise FliqsError(f"search option warmup_sampling={self.warmup_sampling!r}: use "
                             "'progressive' or 'uniform'")
        if self.weights_follow not in ("sample", "policy"):
            raise FliqsError(f"search option weights_follow={self.weights_follow!r}: use 'sample' or 'policy'")
        if self.weights_follow == "policy" and self.reward_batch != "heldout":
            raise FliqsError("search option reward_batch='train' judges the configuration the step "
                             "trained: use it with weights_follow='sample' (weights_follow='policy', "
                             "the recipe, judges the sample forward-only on reward_batch='heldout')")
        if int(self.monitor_every) < 1:
            raise FliqsError(f"search option monitor_every={self.monitor_every}: use 1 or more")
        if int(self.reward_samples) < 1:
            raise FliqsError(f"search option reward_samples={self.reward_samples}: use 1 or more")
        if self.controller.advantage == "leave_one_out" and (int(self.reward_samples) < 2
                                                             or self.reward_batch != "heldout"):
            raise FliqsError("controller advantage 'leave_one_out' compares the samples of one step "
                             "on one held-out batch: set reward_samples to 2 or more and "
                             "reward_batch='heldout'")
        if self.prior_at not in ("start", "search"):
            raise FliqsError(f"search option prior_at={self.prior_at!r}: use 'start' or 'search'")
        if self.prior not in ("none", "sensitivity"):
            raise FliqsError(f"search option prior={self.prior!r}: use 'none' or 'sensitivity'")
        if not 0.0 <= float(self.prior_share) < 1.0:
            raise FliqsError(f"search option prior_share={self.prior_share}: use a fraction in [0, 1)")
        if not 0.0 < float(self.prior_probability) < 1.0:
            raise FliqsError(f"search option prior_probability={self.prior_probability}: use a "
                             "value in (0, 1)")

    def fingerprint(self) -> str:
        """Everything that changes the trajectory (checkpoints refuse to resume across changes);
        the checkpoint interval does not, so it is left out."""
        d = dataclasses.asdict(self)
        d.pop("checkpoint_every")
        d.pop("monitor_every")  # logging only (see the field)
        return json.dumps(d, sort_keys=True)


@dataclass
class SearchResult:
    choice: list
    formats: dict  # config.json shape: {layer: {"weight": f, "activation": f}}
    cost: float
    cost_kind: str
    budget_target: Optional[float]
    quality: dict  # {"metric": str, "float": float, "final": float, ...}
    steps: int
    seconds: float
    log_path: Optional[str]
    probabilities: list = field(default_factory=list)  # final policy, per decision
    schedule: dict = field(default_factory=dict)  # phase boundaries, final-stretch facts
    # where it ran: world_size, backend (gloo / nccl / None), device, global_batch, steps_per_s
    execution: dict = field(default_factory=dict)

    def config(self, model: str) -> dict:
        return {"model": model, "formats": self.formats}

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def config_id(choice) -> str:
    return hashlib.sha1(",".join(map(str, choice)).encode()).hexdigest()[:10]


def _check_inputs(graph: Graph, data, metric: str):
    """The metric exists and its needs are met by the data."""
    if graph.space is None or not graph.space.decisions:
        raise FliqsError(f"search: graph {graph.name!r} has no searchable decisions; run the prepare "
                         "passes with --formats first")
    if metric not in QUALITY:
        raise FliqsError(f"search metric {metric!r}: use one of {', '.join(QUALITY)}")
    if QUALITY[metric][1] and not data.labeled:
        raise FliqsError(f"search metric {metric}: the data has no labels; use agreement or neg_kl")


class OneShotSearch:
    """The state of one search (shared weights, trainer, controller, generator) and its step.

    Requires / guarantees as ``run_search``, which drives it; benches call ``step`` directly to
    time one FLIQS step in isolation.
    """

    def __init__(self, graph: Graph, data, budget, options: Optional[SearchOptions] = None,
                 latency_model: Optional[LatencyModel] = None):
        self.graph, self.data, self.opts = graph, data, options or SearchOptions()
        self.space, self.gm = graph.space, graph.gm
        self.metric, self.metric_reason = resolve_metric(graph, data, self.opts.metric)
        self.reward_metric = self.opts.reward_metric or self.metric
        _check_inputs(graph, data, self.metric)
        _check_inputs(graph, data, self.reward_metric)
        if isinstance(budget, str):
            budget = parse_budget(budget)
        self.target = resolve_budget(budget, graph, latency_model) if budget is not None else None
        self.cost_kind = budget.kind if budget is not None else "bops"
        self.latency_model = latency_model
        torch.manual_seed(self.opts.seed)
        self.gen = torch.Generator().manual_seed(self.opts.seed)
        self.teacher = float_copy(self.gm)
        teach = any(needs_teacher(data, self.opts.train, m) for m in (self.metric, self.reward_metric))
        self.trainer = WeightTrainer(self.gm, data, self.opts.train, self.teacher if teach else None,
                                     metric=self.metric)
        self.parallel = self.trainer.parallel  # device and data-parallel ranks (parallel.py)
        self.teacher.to(self.trainer.device)
        # the prior's forward passes are paid for with weight steps (the same total for all methods)
        self.prior_samples, self.prior_charged = self._prior_cost(len(data.x_val))
        self.steps = max(1, int(self.opts.steps) - self.prior_charged)  # weight steps run
        self.prior: Optional[dict] = None  # set when the prior is measured
        self.controller = Controller([len(d.candidates) for d in self.space.decisions],
                                     self.opts.controller, self.steps)
        # candidates of each decision from the most precise to the narrowest (progressive warmup)
        self.precision_order = [sorted(range(len(d.candidates)),
                                       key=lambda k, d=d: -F.get(d.candidates[k]).cost_bits)
                                for d in self.space.decisions]
        self.started_at, self.resumed_s = 0, 0.0  # where this process began (a resume: later)
        self.final_choice: Optional[list] = None  # set when the final stretch begins
        self.projection_moves = 0
        self.tail: tuple = (None, 0)
        self._costs: dict = {}
        self.fingerprint = json.dumps({"options": self.opts.fingerprint(), "graph": graph.name,
                                       "target": self.target,
                                       "decisions": [list(d.candidates) for d in self.space.decisions]})

    def _prior_cost(self, heldout: int) -> tuple:
        """(held-out samples the prior measures on, weight steps it is charged)."""
        o = self.opts
        if o.prior != "sensitivity":
            return 0, 0
        evals, batch = sensitivity_evaluations(self.space), o.train.batch_size
        affordable = int(o.prior_share * int(o.steps) * 3 * batch / evals)
        n = min(int(o.prior_samples), heldout, affordable)
        if n < 16:
            return 0, 0
        return n, forward_step_equivalents(evals * n, batch)

    def cost_of(self, choice) -> float:
        key = tuple(choice)
        if key not in self._costs:
            self._costs[key] = config_cost(self.graph, self.space.formats_of(choice), self.cost_kind,
                                           self.latency_model)
        return self._costs[key]

    def phase(self, step: int) -> str:
        c = self.controller
        return "warmup" if c.in_warmup(step) else ("final" if step >= c.freeze_steps else "search")

    def _warmup_choice(self, step: int) -> list:
        """Progressive: decision d samples uniformly among its ``n`` most precise candidates,
        ``n`` growing linearly from 1 to all over the warmup; uniform: all from the start."""
        if self.opts.warmup_sampling == "uniform":
            return self.controller.sample(self.gen, uniform=True)
        frac = (step + 1) / max(1, self.controller.warmup_steps)
        choice = []
        for order in self.precision_order:
            n = min(len(order), 1 + int(frac * len(order)))
            choice.append(order[int(torch.randint(n, (1,), generator=self.gen))])
        return choice

    def _final(self) -> list:
        """The argmax projected onto the budget (computed once, when the final stretch begins)."""
        if self.final_choice is None:
            self.final_choice, self.projection_moves = self._projected_argmax()
        return self.final_choice

    def _projected_argmax(self) -> tuple:
        """(the policy's argmax projected onto the budget, now; the projection's moves)."""
        c = self.controller  # masked candidates (a decision with fewer) are no move
        log_probs = c.log_probs().detach().masked_fill(~c.mask, float("-inf"))
        return project_to_budget(c.argmax(), log_probs, self.cost_of, self.target)

    def _policy_choice(self) -> list:
        """What the final stretch would train if it began now (``weights_follow='policy'``)."""
        return list(self._projected_argmax()[0])

    def _apply_prior(self) -> None:
        """Measure the sensitivity on the weights as they are now (``prior_at``), solve the ILP at
        the budget and move the policy onto it (once; a warmup keeps sampling its own way)."""
        sens = measure_on_heldout(self.space, self.gm, self.trainer, self.data, self.prior_samples)
        choice, message = ilp_choice(sens.rows, cost_terms(self.graph, self.cost_kind, self.latency_model),
                                     self.target)
        if choice is None:  # no budgeted solution of the linear model: the policy starts uniform
            self.prior = {"choice": None, "message": message, "charged_steps": self.prior_charged}
            return
        c = self.controller
        with torch.no_grad():
            c.logits.copy_(prior_logits(choice, [len(d.candidates) for d in self.space.decisions],
                                        c.logits.shape[1], self.opts.prior_probability))
        self.prior = {"choice": choice, "message": message, "charged_steps": self.prior_charged,
                      "samples": sens.samples, "evaluations": sens.evaluations}

    def _choose(self, step: int) -> list:
        phase = self.phase(step)
        if (self.opts.prior != "none" and self.prior is None
                and (self.opts.prior_at == "start" or phase == "search")):
            if self.prior_samples:
                self._apply_prior()
            else:
                self.prior = {"choice": None, "charged_steps": 0,
                              "message": f"{self.opts.steps} steps cannot pay for the measurement"}
        if phase == "warmup":
            return self._warmup_choice(step)
        if phase == "final":
            return list(self._final())
        return self.controller.sample(self.gen)

    def step(self, step: int) -> dict:
        """Choose the step's configuration (phase rules above), take the weight step under it,
        then the controller step from its reward (and ``reward_samples - 1`` more)."""
        trainer, gen, opts = self.trainer, self.gen, self.opts
        phase = self.phase(step)
        choice = self._choose(step)
        follow_policy = phase == "search" and opts.weights_follow == "policy"
        trained = self._policy_choice() if follow_policy else choice
        run = self.tail[1] + 1 if self.tail[0] == trained else 1
        self.tail = (list(trained), run)  # the trailing run of identical trained configurations
        self.space.apply(self.gm, trained)
        # every output: the loss and the reward cover them all
        trainer.at_progress(step, self.steps)
        loss, out, y, t = trainer.train_batch(gen)
        judge = QUALITY[self.reward_metric][0]
        if opts.reward_batch == "train":
            par, n = trainer.parallel, opts.train.batch_size
            with torch.no_grad():
                seen = map_outputs(torch.Tensor.detach, out)
                quality = judge(*(par.gather(v, total=n) for v in (seen, y, t)))
            batch = None
        else:  # drawn at every step: the generator's stream must not depend on monitoring
            batch = trainer.batch("val", opts.reward_batch_size or opts.train.batch_size, gen)
            monitored = (phase == "search" or step % int(opts.monitor_every) == 0
                         or step == self.steps - 1)
            if follow_policy:  # the sample, judged on the weights trained for the policy
                self.space.apply(self.gm, choice)
            quality = trainer.quality(self.reward_metric, batch[0], batch[1],
                                      trainer.teacher_out("val", batch[2])) if monitored else None
        cost = self.cost_of(choice)
        reward = None if quality is None else tunas_reward(quality, cost, self.target, opts.gamma)
        choices, rewards = [choice], [reward]
        if phase == "search" and batch is not None:
            for _ in range(int(opts.reward_samples) - 1):  # forward-only extra samples
                extra = self.controller.sample(gen)
                self.space.apply(self.gm, extra)
                q = trainer.quality(self.reward_metric, batch[0], batch[1],
                                    trainer.teacher_out("val", batch[2]))
                choices.append(extra)
                rewards.append(tunas_reward(q, self.cost_of(extra), self.target, opts.gamma))
        if phase != "search":  # the policy does not learn; warmup rewards (progressive: the most
            # precise, costliest formats first) would only bias the baseline it starts from
            info = {"entropy": float(self.controller.entropy().detach()), "beta": 0.0,
                    "baseline": self.controller.baseline, "advantage": 0.0}
        else:
            info = self.controller.update_many(choices, rewards, step)
        return {"step": step, "phase": phase, "choice": choice, "config_id": config_id(choice),
                **({"trained": trained} if follow_policy else {}),
                "reward": reward, "cost": cost,
                "cost_ratio": None if self.target is None else cost / self.target,
                "quality": quality, "loss": loss, "entropy": info["entropy"],
                "baseline": info["baseline"], "advantage": info["advantage"], "beta": info["beta"],
                "warmup": phase == "warmup",
                "probs": [[round(v, 4) for v in row[:len(d.candidates)]]
                          for row, d in zip(self.controller.probs().tolist(), self.space.decisions)]}

    def state_dict(self, step_done: int, elapsed: float) -> dict:
        return {"fingerprint": self.fingerprint, "step": step_done, "elapsed": elapsed,
                "model": self.gm.state_dict(), "weight_optimizer": self.trainer.optimizer.state_dict(),
                "controller": self.controller.state_dict(), "generator": self.gen.get_state(),
                "torch_rng": torch.get_rng_state(), "final_choice": self.final_choice,
                "projection_moves": self.projection_moves, "tail": list(self.tail), "prior": self.prior}

    def load_state_dict(self, state: dict, where) -> tuple:
        """Restore a checkpoint; returns (next step, elapsed seconds)."""
        if state["fingerprint"] != self.fingerprint:
            raise FliqsError(f"{where}/checkpoint: written by a search with other options, model "
                             "or budget; rerun without --resume (or with the same options)")
        self.gm.load_state_dict(state["model"])
        self.trainer.optimizer.load_state_dict(state["weight_optimizer"])
        self.controller.load_state_dict(state["controller"])
        self.gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.final_choice = state.get("final_choice")
        self.projection_moves = int(state.get("projection_moves", 0))
        self.tail = tuple(state.get("tail", (None, 0)))
        self.prior = state.get("prior")
        self.started_at, self.resumed_s = int(state["step"]), float(state["elapsed"])
        return self.started_at, self.resumed_s

    def finish(self, seconds: float, log_path: Optional[str]) -> SearchResult:
        """Apply the final configuration (the trained one of the final stretch; with no final
        stretch the argmax projected onto the budget), evaluate it (and the float model),
        optional finetune."""
        metric, trainer = self.metric, self.trainer
        final = list(self._final())
        self.space.apply(self.gm, final)
        quality = {"metric": metric, "metric_reason": self.metric_reason,
                   "float": trainer.evaluate(metric, "test", model=self.teacher),  # the starting model
                   "final": trainer.evaluate(metric, "test")}
        if self.opts.finetune > 0:
            trainer.train_fixed(self.space.apply, final, self.opts.finetune, self.gen)
            quality["final_finetuned"] = trainer.evaluate(metric, "test")
            quality["finetune_steps"] = self.opts.finetune
        self.gm.to("cpu")  # export, lowering and measurement run on the host
        steps_run = max(1, self.steps - self.started_at)
        return SearchResult(choice=final, formats=self.space.formats_of(final), cost=self.cost_of(final),
                            cost_kind=self.cost_kind, budget_target=self.target, quality=quality,
                            steps=self.opts.steps, seconds=seconds, log_path=log_path,
                            probabilities=self.controller.probs().tolist(),
                            schedule=self.schedule_facts(),
                            execution={**self.parallel.describe(),
                                       "global_batch": self.opts.train.batch_size,
                                       "steps_per_s": round(steps_run / max(seconds - self.resumed_s, 1e-9), 3)})

    def schedule_facts(self) -> dict:
        """Phase boundaries and what the final stretch trained (the report states them)."""
        c, n = self.controller, self.steps
        return {"warmup_steps": c.warmup_steps, "search_steps": max(0, min(n, c.freeze_steps) - c.warmup_steps),
                "final_stretch_steps": max(0, n - c.freeze_steps),
                # the last steps that trained exactly the returned configuration
                "final_config_trained_steps": self.tail[1] if self.tail[0] == self._final() else 0,
                "projection_moves": self.projection_moves, "warmup_sampling": self.opts.warmup_sampling,
                "argmax_cost": self.cost_of(c.argmax()), "budget_target": self.target,
                "weight_steps": self.steps, "prior": self.prior}


def run_search(graph: Graph, data, budget, options: Optional[SearchOptions] = None, out_dir=None,
               resume: bool = False, latency_model: Optional[LatencyModel] = None,
               progress: bool = True) -> SearchResult:
    """Search ``graph.space`` on ``data`` under ``budget`` (``Budget``, its text, or None).

    Requires: ``graph.gm`` contains the ``SearchableQuantizer``s of ``graph.space`` (what
    ``passes.prepare`` returns); weights already trained in float (the search fine-tunes them).
    Guarantees: ``graph.gm`` ends with the trained shared weights and the final configuration
    applied; ``out_dir`` (if given) holds ``search.jsonl`` (one line per step),
    ``search_result.json``, ``search.png`` (diagnostics) and ``checkpoint/`` (every
    ``checkpoint_every`` steps and at the end);
    ``resume=True`` continues from that checkpoint and yields the same result as an
    uninterrupted run. A budget below the cheapest configuration is refused before any training.
    """
    search = OneShotSearch(graph, data, budget, options, latency_model)
    opts = search.opts
    writer = search.parallel.writer  # under data parallelism only rank 0 writes files
    start, elapsed, log = 0, 0.0, None
    if out_dir is not None:
        out_dir = Path(out_dir)
        if writer:
            out_dir.mkdir(parents=True, exist_ok=True)
        state = load_checkpoint(out_dir) if resume else None  # every rank resumes from it
        if state is not None:
            start, elapsed = search.load_state_dict(state, out_dir)
        if writer:
            log = StepLog(out_dir / "search.jsonl", keep_through_step=start - 1 if state else None)
    bar = None
    if progress and writer:
        from tqdm.auto import tqdm
        bar = tqdm(total=search.steps, initial=start, desc="FLIQS search", unit="step", dynamic_ncols=True)
    t0 = time.perf_counter() - elapsed
    try:
        for step in range(start, search.steps):
            rec = search.step(step)
            if log is not None:
                log.write(rec)
            if bar is not None:
                ratio = rec["cost_ratio"]
                shown = {} if rec["reward"] is None else {"reward": f"{rec['reward']:.3f}"}
                bar.set_postfix(**shown, H=f"{rec['entropy']:.2f}",
                                cost=f"{ratio:.2f}x" if ratio is not None else f"{rec['cost']:.3g}",
                                refresh=False)
                bar.update(1)
            done = step + 1
            if writer and out_dir is not None and (done % max(1, opts.checkpoint_every) == 0
                                                   or done == search.steps):
                save_checkpoint(out_dir, search.state_dict(done, time.perf_counter() - t0))
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
    result = search.finish(time.perf_counter() - t0, str(out_dir / "search.jsonl") if out_dir else None)
    if writer and out_dir is not None:
        atomic_write_text(out_dir / "search_result.json", json.dumps(result.as_dict(), indent=1))
        from fliqs_compiler.search.diagnostics import plot_search
        plot_search(out_dir / "search.jsonl", out_dir / "search.png")
    return result
