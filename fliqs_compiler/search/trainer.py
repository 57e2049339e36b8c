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

from ..data import Dataset
from ..quantizers import SearchableQuantizer

__all__ = ["TrainOptions", "WeightTrainer", "QUALITY", "float_copy", "bypass_quantizers",
           "first_output", "default_metric"]


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
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adam"  # adam | sgd (momentum 0.9)
    weight_decay: float = 0.0
    kd_temperature: float = 1.0
    eval_batch_size: int = 1024


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
        params = [p for p in gm.parameters() if p.requires_grad]
        if options.optimizer == "adam":
            self.optimizer = torch.optim.Adam(params, lr=options.lr, weight_decay=options.weight_decay)
        elif options.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=options.lr, momentum=0.9,
                                             weight_decay=options.weight_decay)
        else:
            raise ValueError(f"unknown weight optimizer {options.optimizer!r}; use adam or sgd")
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
        """Cross-entropy with labels; else KD (KL to the teacher at ``kd_temperature``) or MSE."""
        if y is not None:
            return Fn.cross_entropy(out, y)
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
        t = self.teacher_out("train", idx) if y is None else None
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
