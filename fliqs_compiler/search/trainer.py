"""Weight training and evaluation under a sampled format configuration (shared by the one-shot
search and the baselines).

``WeightTrainer`` owns the batches (drawn from one ``torch.Generator``, so a run is a pure
function of its seed), the weight optimizer (weights and per-format scales of the
``SearchableQuantizer``s), the loss (cross-entropy with labels; with no labels, knowledge
distillation from the float model) and the evaluation in a quality signal (``metrics.py``:
``QUALITY``, the automatic choice; re-exported here).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as Fn
from torch import nn

from fliqs_compiler.data.sources import Dataset
from fliqs_compiler.search import parallel
from fliqs_compiler.search.float_view import bypass_quantizers, float_copy  # noqa: F401
from fliqs_compiler.search.metrics import (QUALITY, SQNR_CAP_DB, TEACHER_LOSSES, Metric, OutputInfo,  # noqa: F401
                                           auto_metric, choose_metric, custom_metric, default_metric,
                                           describe_outputs, first_output, float_outputs, outputs_of,
                                           output_kind, pack_outputs, paired_outputs, register_metric)

__all__ = ["TrainOptions", "WeightTrainer", "LR_SCHEDULES", "QUALITY", "Metric", "TEACHER_LOSSES", "float_copy",
           "bypass_quantizers", "first_output", "outputs_of", "default_metric", "auto_metric",
           "choose_metric", "describe_outputs", "OutputInfo", "output_kind", "register_metric",
           "custom_metric", "needs_teacher", "weight_optimizer", "SQNR_CAP_DB", "float_outputs",
           "pack_outputs"]


# factor on the learning rates at fraction t ∈ [0, 1) of a training run; a pure function of the
# step, so a resumed run continues on the same schedule with nothing extra to checkpoint
def _cosine(t: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * min(max(t, 0.0), 1.0)))


# hold-cosine: constant until HOLD_UNTIL, then a cosine to 0 — in the search, the final stretch
# (the recipe freezes the policy at 0.6: ``oneshot.recipe_controller``) gets its own
# full decay while the policy learns at the full rate; a baseline's QAT run the same shape
HOLD_UNTIL = 0.6
LR_SCHEDULES = {
    "constant": lambda t: 1.0,
    "cosine": _cosine,
    "hold-cosine": lambda t: 1.0 if t < HOLD_UNTIL else _cosine((t - HOLD_UNTIL) / (1.0 - HOLD_UNTIL)),
}


@dataclass
class TrainOptions:
    """How weights and scales are trained — shared by the search and every baseline, so all
    methods train the same way."""
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adam"  # adam | sgd (momentum 0.9)
    weight_decay: float = 0.0
    kd_temperature: float = 1.0
    # Forward-only passes (teacher outputs, validation, test) in chunks of this size. Measured
    # on a 2-core box, ResNet-8 on 28×28: 0.10 ms/image at 128-256, 0.36 at 1024, 0.74 at 4096
    # (large activations fall out of cache and page-fault); 1024 made the teacher pass over
    # 54k training images cost ~30 s per run, more than 300 training steps.
    eval_batch_size: int = 256
    # Adam step on the log of every learned scale: a relative change per step (1e-2 ≈ 1 %).
    scale_lr: float = 1e-2
    # Weight of distillation from the float model when labels exist: loss = (1-d)·CE + d·KD.
    # Every sampled configuration learns to match the float model (in-place distillation as in
    # BigNAS); without labels the loss is pure KD whatever this is.
    distill: float = 0.0
    # The distillation / label-free loss, a ``TEACHER_LOSSES`` name; None: the metric's own
    # (``QUALITY[metric].teacher_loss``: KL for logits, 1 − cosine for embeddings, relative MSE
    # for SQNR). The driver sets it from the search metric.
    teacher_loss: Optional[str] = None
    # Learning-rate schedule over one training run (the search's weight steps, a baseline's QAT
    # steps), an ``LR_SCHEDULES`` name: the factor on ``lr`` and ``scale_lr`` at each step.
    lr_schedule: str = "constant"

    def __post_init__(self):
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule={self.lr_schedule!r}: use one of {', '.join(LR_SCHEDULES)}")
        if not 0.0 <= float(self.distill) <= 1.0:
            raise ValueError(f"distill={self.distill}: use a weight in [0, 1]")
        if self.teacher_loss is not None and self.teacher_loss not in TEACHER_LOSSES:
            raise ValueError(f"teacher_loss={self.teacher_loss!r}: use one of {', '.join(TEACHER_LOSSES)}")


def needs_teacher(data: Dataset, options: TrainOptions, metric: Optional[str] = None) -> bool:
    """Whether training or the quality signal reads the float model's outputs."""
    return (not data.labeled) or options.distill > 0 or bool(metric and QUALITY[metric][2])


def weight_optimizer(gm: nn.Module, options: TrainOptions) -> torch.optim.Optimizer:
    """The optimizer over every trainable parameter: weights at ``lr``, learned log-scales of
    the quantizers in their own group at ``scale_lr``."""
    named = [(n, p) for n, p in gm.named_parameters() if p.requires_grad]
    scales = [p for n, p in named if ".log_scales." in f".{n}"]
    weights = [p for n, p in named if ".log_scales." not in f".{n}"]
    groups = [{"params": weights}] + ([{"params": scales, "lr": options.scale_lr,
                                        "weight_decay": 0.0}] if scales else [])
    if options.optimizer == "adam":
        return torch.optim.Adam(groups, lr=options.lr, weight_decay=options.weight_decay)
    if options.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=options.lr, momentum=0.9, weight_decay=options.weight_decay)
    raise ValueError(f"unknown weight optimizer {options.optimizer!r}; use adam or sgd")


class WeightTrainer:
    """Trains ``gm``'s weights and scales under whichever configuration is applied to it.

    Requires: with labels, ``gm``'s first output is logits [N, classes]; ``teacher`` (the float
    model) when the data is unlabeled, ``distill`` > 0 or a teacher-based metric is used.
    The teacher loss is ``options.teacher_loss``, else that of ``metric`` (a ``QUALITY`` name;
    None: ``choose_metric`` on the teacher's outputs, once, when a teacher loss is first needed).
    Guarantees: batches depend only on the generator passed in; the optimizer holds every
    trainable parameter of ``gm`` at construction (per-format scales included).
    """

    def __init__(self, gm: nn.Module, data: Dataset, options: TrainOptions,
                 teacher: Optional[nn.Module] = None, metric: Optional[str] = None):
        self.gm, self.data, self.options, self.teacher = gm, data, options, teacher
        if options.distill > 0 and teacher is None:
            raise ValueError("TrainOptions.distill > 0 needs the float model as teacher")
        if metric is not None and metric not in QUALITY:
            raise ValueError(f"metric {metric!r}: use one of {', '.join(QUALITY)}")
        self.metric = metric
        # the device and data-parallel group of this process (``parallel.start``); one CPU
        # process unless the driver started more
        self.parallel = parallel.current()
        self.device = self.parallel.device
        parallel.check_split(options.batch_size, self.parallel.world)
        gm.to(self.device)
        data.use_device(self.device)  # a streamed image folder pins its batches for CUDA
        if teacher is not None:
            teacher.to(self.device)
        self.model = self.parallel.wrap(gm)  # what the training step calls (DDP across ranks)
        self.optimizer = weight_optimizer(gm, options)
        self._base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self._teacher_cache: dict = {}
        self._loss_metric: Optional[str] = None

    # -- teacher outputs (cached per split: the float model never changes) ---------------------
    def teacher_out(self, split: str, idx: Optional[torch.Tensor]):
        """The float model's outputs on ``split`` (rows ``idx``; None: all): a tensor for a
        one-output model, else a tuple of tensors (every floating output)."""
        if self.teacher is None:
            return None
        if split not in self._teacher_cache:
            x = getattr(self.data, f"x_{split}")
            b = self.options.eval_batch_size
            with torch.no_grad():
                chunks = [float_outputs(self.forward(self.teacher, x[i:i + b]))
                          for i in range(0, len(x), b)]
            self._teacher_cache[split] = [torch.cat(parts) for parts in zip(*chunks)]
        outs = self._teacher_cache[split]
        return pack_outputs(outs if idx is None else [t[idx] for t in outs])

    def loss_metric(self) -> str:
        """The metric the teacher loss pairs with: ``metric``, or (None, or a user metric with no
        teacher loss of its own) ``choose_metric`` on the teacher's outputs, chosen once."""
        if self._loss_metric is None:
            name = self.metric
            if name is None or QUALITY[name].teacher_loss is None:
                name = choose_metric(self.teacher, self.data)[0] if self.teacher is not None else "accuracy"
            self._loss_metric = name
        return self._loss_metric

    def loss(self, out, y, t):
        """Cross-entropy of the first output with labels, mixed with the teacher loss at weight
        ``distill``; without labels the teacher loss alone. ``out``: the model's output(s) (one
        tensor, e.g. ``first_output``, or all of them)."""
        if y is not None:
            ce = Fn.cross_entropy(float_outputs(out)[0], y)
            d = self.options.distill
            return ce if d <= 0 or t is None else (1 - d) * ce + d * self._kd(out, t)
        return self._kd(out, t)

    def _kd(self, out, t):
        """The metric's teacher loss, mean over the outputs (``QUALITY[m].outputs == "first"``:
        the first output only)."""
        m = QUALITY[self.loss_metric()]
        fn = TEACHER_LOSSES[self.options.teacher_loss or m.teacher_loss]
        T = self.options.kd_temperature
        outs, ts = paired_outputs(out, t)
        if m.outputs == "first":
            outs, ts = outs[:1], ts[:1]
        return sum(fn(o, r, T) for o, r in zip(outs, ts)) / len(outs)

    def forward(self, model: nn.Module, x):
        """``model``'s outputs on the batch ``x`` (on the trainer's device; across data-parallel
        ranks each runs its share and all get every output, in order)."""
        return self.parallel.forward(model, x.to(self.device, non_blocking=True))

    def draw(self, split: str, size: int, generator: torch.Generator) -> torch.Tensor:
        """The rows of a random batch of ``split`` (the global batch: the same rows on every
        rank): a pure function of the generator's state, so a resumed run draws on."""
        n = len(getattr(self.data, f"x_{split}"))
        return torch.randint(n, (min(size, n) if split != "train" else size,), generator=generator)

    def rows(self, split: str, idx: torch.Tensor):
        """(inputs, labels) of rows ``idx`` of ``split`` on the trainer's device (a streamed
        image folder decodes just these rows now)."""
        x, y = getattr(self.data, f"x_{split}"), getattr(self.data, f"y_{split}")
        dev = self.device
        return x[idx].to(dev, non_blocking=True), (None if y is None else y[idx].to(dev))

    def batch(self, split: str, size: int, generator: torch.Generator):
        """A random batch of ``split`` (``draw``), on the trainer's device: (x, y, rows)."""
        idx = self.draw(split, size, generator)
        return (*self.rows(split, idx), idx)

    def train_batch(self, generator: torch.Generator):
        """One optimizer step on a training batch (this rank's share of it under data
        parallelism: the global batch's rows are drawn, then only this rank's contiguous share
        is read). Returns (loss over the global batch, this rank's outputs, its labels and
        teacher outputs) — the search judges the step's own batch from them."""
        par = self.parallel
        idx = self.draw("train", self.options.batch_size, generator)
        x, y = self.rows("train", par.shard(idx))
        t = par.shard(self.teacher_out("train", idx))
        self.gm.train()
        with par.sharded():
            out = self.model(x)
        loss = self.loss(out, y, t)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(par.mean(loss.detach())), out, y, t

    def step(self, generator: torch.Generator) -> float:
        """One optimizer step on a training batch; returns the loss."""
        return self.train_batch(generator)[0]

    @torch.no_grad()
    def quality(self, metric: str, x, y, t) -> float:
        """``metric`` of ``gm`` (all its outputs) on the batch ``x``."""
        self.gm.eval()
        return QUALITY[metric][0](self.forward(self.gm, x), y, t)

    @torch.no_grad()
    def evaluate(self, metric: str, split: str = "test", model: Optional[nn.Module] = None) -> float:
        """``metric`` over a whole split (``val`` or ``test``) of ``model`` (default: ``gm`` under
        its applied configuration), every output concatenated over the evaluation chunks."""
        model = self.gm if model is None else model
        model.eval()
        x, y = getattr(self.data, f"x_{split}"), getattr(self.data, f"y_{split}")
        b = self.options.eval_batch_size
        chunks = [float_outputs(self.forward(model, x[i:i + b])) for i in range(0, len(x), b)]
        outs = pack_outputs([torch.cat(parts) for parts in zip(*chunks)])
        y = None if y is None else y.to(self.device)
        return QUALITY[metric][0](outs, y, self.teacher_out(split, None))

    def at_progress(self, step: int, steps: int) -> None:
        """Set the learning rates for step ``step`` of a ``steps``-step run (``lr_schedule``)."""
        factor = LR_SCHEDULES[self.options.lr_schedule](step / max(1, steps))
        for group, base in zip(self.optimizer.param_groups, self._base_lrs):
            group["lr"] = base * factor

    def train_fixed(self, apply, choice: Sequence[int], steps: int, generator: torch.Generator) -> None:
        """``steps`` optimizer steps with the configuration ``choice`` (QAT), on the schedule."""
        apply(self.gm, choice)
        for i in range(int(steps)):
            self.at_progress(i, int(steps))
            self.step(generator)
