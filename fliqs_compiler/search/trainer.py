"""Weight training and evaluation under a sampled format configuration (shared by the one-shot
search and the baselines).

``WeightTrainer`` owns the batches (drawn from one ``torch.Generator``, so a run is a pure
function of its seed), the weight optimizer (weights and per-format scales of the
``SearchableQuantizer``s), the loss (cross-entropy with labels; with no labels, knowledge
distillation from the float model) and the quality signals (``QUALITY``).
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as Fn
from torch import nn

from fliqs_compiler.data.sources import Dataset
from fliqs_compiler.numerics.quantizers import SearchableQuantizer

__all__ = ["TrainOptions", "WeightTrainer", "QUALITY", "float_copy", "bypass_quantizers",
           "first_output", "default_metric", "needs_teacher", "weight_optimizer"]


def first_output(out):
    """The model's first output tensor (fx graphs may return tuples/lists)."""
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out


def _quantizer_paths(gm: nn.Module) -> list:
    return [name for name, m in gm.named_modules() if isinstance(m, SearchableQuantizer)]


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


@contextlib.contextmanager
def bypass_quantizers(gm: nn.Module):
    """Run ``gm`` in float: every ``SearchableQuantizer`` is an identity inside the block."""
    saved = {p: gm.get_submodule(p) for p in _quantizer_paths(gm)}
    try:
        for p in saved:
            _set_submodule(gm, p, nn.Identity())
        yield gm
    finally:
        for p, m in saved.items():
            _set_submodule(gm, p, m)


def float_copy(gm: nn.Module) -> nn.Module:
    """A deep copy of ``gm`` with its quantizers replaced by identities (the float model)."""
    model = copy.deepcopy(gm)
    for p in _quantizer_paths(model):
        _set_submodule(model, p, nn.Identity())
    return model.eval()


# ---- quality signals: (student output, labels or None, teacher output or None) -> float ----
def _accuracy(out, y, t):
    return float((out.argmax(-1) == y).float().mean())


def _neg_loss(out, y, t):
    return -float(Fn.cross_entropy(out, y))


def _agreement(out, y, t):
    return float((out.argmax(-1) == t.argmax(-1)).float().mean())


def _neg_kl(out, y, t):
    return -float(Fn.kl_div(Fn.log_softmax(out, -1), Fn.log_softmax(t, -1), log_target=True,
                            reduction="batchmean"))


def _neg_mse(out, y, t):
    return -float(Fn.mse_loss(out, t))


QUALITY = {  # name -> (function, needs labels, needs teacher)
    "accuracy": (_accuracy, True, False),
    "neg_loss": (_neg_loss, True, False),
    "agreement": (_agreement, False, True),
    "neg_kl": (_neg_kl, False, True),
    "neg_mse": (_neg_mse, False, True),
}


def default_metric(data: Dataset, classification: bool = True) -> str:
    if data.labeled:
        return "accuracy"
    return "agreement" if classification else "neg_mse"


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

    def __post_init__(self):
        if not 0.0 <= float(self.distill) <= 1.0:
            raise ValueError(f"distill={self.distill}: use a weight in [0, 1]")


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

    Requires: ``gm`` returns logits [N, classes] (or any tensor when unlabeled: MSE distillation);
    ``teacher`` (the float model) when the data is unlabeled or a teacher-based metric is used.
    Guarantees: batches depend only on the generator passed in; the optimizer holds every
    trainable parameter of ``gm`` at construction (per-format scales included).
    """

    def __init__(self, gm: nn.Module, data: Dataset, options: TrainOptions,
                 teacher: Optional[nn.Module] = None):
        self.gm, self.data, self.options, self.teacher = gm, data, options, teacher
        if options.distill > 0 and teacher is None:
            raise ValueError("TrainOptions.distill > 0 needs the float model as teacher")
        self.optimizer = weight_optimizer(gm, options)
        self._teacher_cache: dict = {}

    # -- teacher outputs (cached per split: the float model never changes) ---------------------
    def teacher_out(self, split: str, idx: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if self.teacher is None:
            return None
        if split not in self._teacher_cache:
            x = getattr(self.data, f"x_{split}")
            with torch.no_grad():
                outs = [first_output(self.teacher(x[i:i + self.options.eval_batch_size]))
                        for i in range(0, len(x), self.options.eval_batch_size)]
            self._teacher_cache[split] = torch.cat(outs)
        t = self._teacher_cache[split]
        return t if idx is None else t[idx]

    def loss(self, out, y, t):
        """Cross-entropy with labels, mixed with KD at weight ``distill``; without labels KD
        (KL to the teacher at ``kd_temperature``) or MSE."""
        if y is not None:
            ce = Fn.cross_entropy(out, y)
            d = self.options.distill
            return ce if d <= 0 or t is None else (1 - d) * ce + d * self._kd(out, t)
        return self._kd(out, t)

    def _kd(self, out, t):
        if out.dim() == 2 and out.shape[1] > 1:
            T = self.options.kd_temperature
            return Fn.kl_div(Fn.log_softmax(out / T, -1), Fn.log_softmax(t / T, -1), log_target=True,
                             reduction="batchmean") * T * T
        return Fn.mse_loss(out, t)

    def batch(self, split: str, size: int, generator: torch.Generator):
        x = getattr(self.data, f"x_{split}")
        y = getattr(self.data, f"y_{split}")
        idx = torch.randint(len(x), (min(size, len(x)) if split != "train" else size,), generator=generator)
        return x[idx], (None if y is None else y[idx]), idx

    def step(self, generator: torch.Generator) -> float:
        """One optimizer step on a training batch; returns the loss."""
        x, y, idx = self.batch("train", self.options.batch_size, generator)
        t = self.teacher_out("train", idx)
        self.gm.train()
        loss = self.loss(first_output(self.gm(x)), y, t)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    @torch.no_grad()
    def quality(self, metric: str, x, y, t) -> float:
        self.gm.eval()
        return QUALITY[metric][0](first_output(self.gm(x)), y, t)

    @torch.no_grad()
    def evaluate(self, metric: str, split: str = "test", model: Optional[nn.Module] = None) -> float:
        """``metric`` over a whole split (``val`` or ``test``) of ``model`` (default: ``gm`` under
        its applied configuration)."""
        model = self.gm if model is None else model
        model.eval()
        x, y = getattr(self.data, f"x_{split}"), getattr(self.data, f"y_{split}")
        b = self.options.eval_batch_size
        outs = torch.cat([first_output(model(x[i:i + b])) for i in range(0, len(x), b)])
        return QUALITY[metric][0](outs, y, self.teacher_out(split, None))

    def train_fixed(self, apply, choice: Sequence[int], steps: int, generator: torch.Generator) -> None:
        """``steps`` optimizer steps with the configuration ``choice`` (QAT)."""
        apply(self.gm, choice)
        for _ in range(int(steps)):
            self.step(generator)
