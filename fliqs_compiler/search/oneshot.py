"""The one-shot FLIQS search: ``run_search(graph, data, budget, options) -> SearchResult``.

Each step samples ONE configuration (uniform during warmup, else from the policy), applies it to
the shared weights, takes one weight/scale optimizer step under it, measures its quality on a
held-out batch (or the step's own batch), and gives the controller the reward
``Q - γ·|C/C_target - 1|`` (``controller.py``). The deliverable is the argmax configuration with
the shared weights as trained; nothing is retrained (``finetune`` > 0 adds steps under the final
configuration, for comparison only).

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

from ..budget import parse_budget, resolve_budget
from ..cost import LatencyModel, config_cost
from ..errors import FliqsError
from ..graph import Graph
from .checkpoint import StepLog, atomic_write_text, load_checkpoint, save_checkpoint
from .controller import Controller, ControllerOptions, tunas_reward
from .trainer import (QUALITY, TrainOptions, WeightTrainer, default_metric,
                      first_output, float_copy)

__all__ = ["SearchOptions", "SearchResult", "OneShotSearch", "run_search", "config_id"]


@dataclass
class SearchOptions:
    steps: int = 300
    seed: int = 0
    gamma: float = 0.5  # cost weight of the absolute reward
    metric: Optional[str] = None  # QUALITY key; None: accuracy with labels, agreement without
    reward_batch: str = "heldout"  # heldout (a validation batch, TuNAS) | train (the step's batch)
    reward_batch_size: Optional[int] = None  # held-out batch size; None: the training batch size
    checkpoint_every: int = 50
    finetune: int = 0  # extra steps under the final configuration (comparison only)
    train: TrainOptions = field(default_factory=TrainOptions)
    controller: ControllerOptions = field(default_factory=ControllerOptions)

    def __post_init__(self):
        if self.reward_batch not in ("heldout", "train"):
            raise FliqsError(f"search option reward_batch={self.reward_batch!r}: use 'heldout' or 'train'")
        if int(self.steps) < 1:
            raise FliqsError(f"search steps={self.steps}: give a positive number of steps")

    def fingerprint(self) -> str:
        """Everything that changes the trajectory (checkpoints refuse to resume across changes);
        the checkpoint interval does not, so it is left out."""
        d = dataclasses.asdict(self)
        d.pop("checkpoint_every")
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

    def config(self, model: str) -> dict:
        return {"model": model, "formats": self.formats}

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def config_id(choice) -> str:
    return hashlib.sha1(",".join(map(str, choice)).encode()).hexdigest()[:10]


def _check_inputs(graph: Graph, data, metric: str):
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
        self.metric = self.opts.metric or default_metric(data)
        _check_inputs(graph, data, self.metric)
        if isinstance(budget, str):
            budget = parse_budget(budget)
        self.target = resolve_budget(budget, graph, latency_model) if budget is not None else None
        self.cost_kind = budget.kind if budget is not None else "bops"
        self.latency_model = latency_model
        torch.manual_seed(self.opts.seed)
        self.gen = torch.Generator().manual_seed(self.opts.seed)
        self.teacher = float_copy(self.gm)
        needs_teacher = (not data.labeled) or QUALITY[self.metric][2]
        self.trainer = WeightTrainer(self.gm, data, self.opts.train, self.teacher if needs_teacher else None)
        self.controller = Controller([len(d.candidates) for d in self.space.decisions],
                                     self.opts.controller, self.opts.steps)
        self._costs: dict = {}
        self.fingerprint = json.dumps({"options": self.opts.fingerprint(), "graph": graph.name,
                                       "target": self.target,
                                       "decisions": [list(d.candidates) for d in self.space.decisions]})

    def cost_of(self, choice) -> float:
        key = tuple(choice)
        if key not in self._costs:
            self._costs[key] = config_cost(self.graph, self.space.formats_of(choice), self.cost_kind,
                                           self.latency_model)
        return self._costs[key]

    def step(self, step: int) -> dict:
        """Sample one configuration, take the weight step and the controller step under it."""
        trainer, gen, opts = self.trainer, self.gen, self.opts
        uniform = self.controller.in_warmup(step)
        choice = self.controller.sample(gen, uniform=uniform)
        self.space.apply(self.gm, choice)
        x, y, idx = trainer.batch("train", opts.train.batch_size, gen)
        t = trainer.teacher_out("train", idx) if y is None else None
        self.gm.train()
        out = first_output(self.gm(x))
        loss = trainer.loss(out, y, t)
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        trainer.optimizer.step()
        if opts.reward_batch == "train":
            quality = QUALITY[self.metric][0](out.detach(), y, t if t is not None else trainer.teacher_out("train", idx))
        else:
            xv, yv, vidx = trainer.batch("val", opts.reward_batch_size or opts.train.batch_size, gen)
            quality = trainer.quality(self.metric, xv, yv, trainer.teacher_out("val", vidx))
        cost = self.cost_of(choice)
        reward = tunas_reward(quality, cost, self.target, opts.gamma)
        info = self.controller.update(choice, reward, step)
        return {"step": step, "choice": choice, "config_id": config_id(choice), "reward": reward,
                "cost": cost, "cost_ratio": None if self.target is None else cost / self.target,
                "quality": quality, "loss": float(loss.detach()), "entropy": info["entropy"],
                "baseline": info["baseline"], "advantage": info["advantage"], "beta": info["beta"],
                "warmup": uniform}

    def state_dict(self, step_done: int, elapsed: float) -> dict:
        return {"fingerprint": self.fingerprint, "step": step_done, "elapsed": elapsed,
                "model": self.gm.state_dict(), "weight_optimizer": self.trainer.optimizer.state_dict(),
                "controller": self.controller.state_dict(), "generator": self.gen.get_state(),
                "torch_rng": torch.get_rng_state()}

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
        return int(state["step"]), float(state["elapsed"])

    def finish(self, seconds: float, log_path: Optional[str]) -> SearchResult:
        """Apply the argmax configuration, evaluate it (and the float model), optional finetune."""
        metric, trainer = self.metric, self.trainer
        final = self.controller.argmax()
        self.space.apply(self.gm, final)
        quality = {"metric": metric,
                   "float": trainer.evaluate(metric, "test", model=self.teacher),  # the starting model
                   "final": trainer.evaluate(metric, "test")}
        if self.opts.finetune > 0:
            trainer.train_fixed(self.space.apply, final, self.opts.finetune, self.gen)
            quality["final_finetuned"] = trainer.evaluate(metric, "test")
            quality["finetune_steps"] = self.opts.finetune
        return SearchResult(choice=final, formats=self.space.formats_of(final), cost=self.cost_of(final),
                            cost_kind=self.cost_kind, budget_target=self.target, quality=quality,
                            steps=self.opts.steps, seconds=seconds, log_path=log_path,
                            probabilities=self.controller.probs().tolist())


def run_search(graph: Graph, data, budget, options: Optional[SearchOptions] = None, out_dir=None,
               resume: bool = False, latency_model: Optional[LatencyModel] = None,
               progress: bool = True) -> SearchResult:
    """Search ``graph.space`` on ``data`` under ``budget`` (``Budget``, its text, or None).

    Requires: ``graph.gm`` contains the ``SearchableQuantizer``s of ``graph.space`` (what
    ``passes.prepare`` returns); weights already trained in float (the search fine-tunes them).
    Guarantees: ``graph.gm`` ends with the trained shared weights and the final configuration
    applied; ``out_dir`` (if given) holds ``search.jsonl`` (one line per step),
    ``search_result.json`` and ``checkpoint/`` (every ``checkpoint_every`` steps and at the end);
    ``resume=True`` continues from that checkpoint and yields the same result as an
    uninterrupted run. A budget below the cheapest configuration is refused before any training.
    """
    search = OneShotSearch(graph, data, budget, options, latency_model)
    opts = search.opts
    start, elapsed, log = 0, 0.0, None
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        state = load_checkpoint(out_dir) if resume else None
        if state is not None:
            start, elapsed = search.load_state_dict(state, out_dir)
        log = StepLog(out_dir / "search.jsonl", keep_through_step=start - 1 if state else None)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=opts.steps, initial=start, desc="FLIQS search", unit="step", dynamic_ncols=True)
    t0 = time.perf_counter() - elapsed
    try:
        for step in range(start, opts.steps):
            rec = search.step(step)
            if log is not None:
                log.write(rec)
            if bar is not None:
                ratio = rec["cost_ratio"]
                bar.set_postfix(reward=f"{rec['reward']:.3f}", H=f"{rec['entropy']:.2f}",
                                cost=f"{ratio:.2f}x" if ratio is not None else f"{rec['cost']:.3g}",
                                refresh=False)
                bar.update(1)
            done = step + 1
            if out_dir is not None and (done % max(1, opts.checkpoint_every) == 0 or done == opts.steps):
                save_checkpoint(out_dir, search.state_dict(done, time.perf_counter() - t0))
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
    result = search.finish(time.perf_counter() - t0, str(out_dir / "search.jsonl") if out_dir else None)
    if out_dir is not None:
        atomic_write_text(out_dir / "search_result.json", json.dumps(result.as_dict(), indent=1))
    return result
