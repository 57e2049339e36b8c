"""Quality signals of the search and the baselines, as data, and the automatic choice of one.

``QUALITY`` maps a name to a ``Metric`` (its function, whether it needs labels / the float
model, the teacher loss it pairs with, which outputs it measures). Every metric is
higher-is-better. ``auto_metric`` / ``choose_metric`` pick one from the float model's outputs
(the rule is in ``auto_metric``'s docstring); ``register_metric`` adds a user's. Multi-output
models: label metrics read the first output (the labels index its classes); teacher metrics and
the label-free loss cover every floating output (mean over outputs).
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as Fn
from torch import fx, nn

from fliqs_compiler.data.sources import Dataset
from fliqs_compiler.ir.ops import kind_of
from fliqs_compiler.search.float_view import bypass_quantizers

__all__ = ["QUALITY", "Metric", "TEACHER_LOSSES", "first_output", "outputs_of", "default_metric",
           "auto_metric", "choose_metric", "describe_outputs", "OutputInfo", "output_kind",
           "register_metric", "custom_metric", "SQNR_CAP_DB", "float_outputs", "pack_outputs", "paired_outputs",
           "resolve_metric"]


def first_output(out):
    """The model's first output tensor (fx graphs may return tuples/lists)."""
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out


# ---- model outputs ---------------------------------------------------------------------------
def outputs_of(out) -> list:
    """Every tensor a model returned, in order (nested tuples / lists / dict values flattened)."""
    if torch.is_tensor(out):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in outputs_of(o)]
    return []


def float_outputs(out) -> list:
    """The floating-point outputs (integer outputs, e.g. indices, have no quality or gradient)."""
    outs = [o for o in outputs_of(out) if o.is_floating_point()]
    if not outs:
        raise ValueError("the model returns no floating-point output to measure")
    return outs


def pack_outputs(outs: list):
    """One tensor for a one-output model, else a tuple (how teacher outputs are handed around)."""
    return outs[0] if len(outs) == 1 else tuple(outs)


def paired_outputs(out, t) -> tuple:
    """(student outputs, teacher outputs) as equal-length lists. A caller that passes only the
    first student output (``first_output``) is paired with the first teacher output."""
    outs = float_outputs(out)
    ts = float_outputs(t)
    if len(ts) < len(outs):
        raise ValueError(f"{len(outs)} model outputs but {len(ts)} float-model outputs")
    return outs, ts[:len(outs)]


def _flat(x: torch.Tensor) -> torch.Tensor:
    """[N, ...] → [N, features] (a 0-/1-D output counts one feature per sample)."""
    return x.reshape(x.shape[0], -1) if x.dim() > 1 else x.reshape(-1, 1)


# ---- per-output quality signals: (student output, labels or None, teacher output) -> float ---
SQNR_CAP_DB = 120.0  # SQNR of a noise-free output: the noise floor is 1e-12 of the signal power


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


def _cosine(out, y, t):
    """Mean over samples of the cosine similarity of each sample's (flattened) output to the float
    model's (1 when identical; two all-zero vectors count as identical)."""
    o, r = _flat(out).double(), _flat(t).double()
    cos = Fn.cosine_similarity(o, r, dim=1, eps=1e-12)
    same = (o == r).all(1)
    return float(torch.where(same, torch.ones_like(cos), cos).mean())


def _sqnr(out, y, t):
    """10·log10(Σ t² / Σ (out − t)²) over the whole batch, in dB, capped at ``SQNR_CAP_DB``."""
    t64 = t.double()
    signal = float((t64 ** 2).sum())
    noise = float(((out.double() - t64) ** 2).sum())
    floor = max(signal, 1e-30) * 10 ** (-SQNR_CAP_DB / 10)
    return 10.0 * math.log10(max(signal, 1e-30) / max(noise, floor))


def _neg_rel_mse(out, y, t):
    """−Σ (out − t)² / Σ t² (0 when identical; −1 for an all-zero output)."""
    t64 = t.double()
    return -float(((out.double() - t64) ** 2).sum() / (t64 ** 2).sum().clamp_min(1e-30))


# ---- teacher (label-free) losses: (student output, teacher output, temperature) -> tensor -------
def _kl_loss(out, t, T):
    return Fn.kl_div(Fn.log_softmax(out / T, -1), Fn.log_softmax(t / T, -1), log_target=True,
                     reduction="batchmean") * T * T


def _mse_loss(out, t, T):
    return Fn.mse_loss(out, t)


def _rel_mse_loss(out, t, T):
    return Fn.mse_loss(out, t) / t.detach().pow(2).mean().clamp_min(1e-12)


def _cosine_loss(out, t, T):
    return 1.0 - Fn.cosine_similarity(_flat(out), _flat(t), dim=1, eps=1e-8).mean()


TEACHER_LOSSES = {  # name -> loss of one output against the float model's
    "kl": _kl_loss,          # KL(softmax(t/T) ‖ softmax(out/T))·T², batch mean
    "mse": _mse_loss,        # mean squared error
    "rel_mse": _rel_mse_loss,  # MSE / mean(t²): every output weighs alike whatever its scale
    "cosine": _cosine_loss,  # 1 − mean per-sample cosine similarity
}


class Metric(NamedTuple):
    """One quality signal (higher is better). ``fn(out, y, t) -> float`` takes the model's
    outputs as returned (a tensor, or a tuple for several), the labels (or None) and the float
    model's outputs (or None); ``outputs`` says which it measures: ``"first"`` (label metrics: the
    labels index the first output's classes) or ``"all"`` (the mean of ``per_output`` over every
    floating output). ``teacher_loss``: the ``TEACHER_LOSSES`` entry the label-free loss (and the
    distillation term) uses with this metric; None: that of the automatic choice."""
    fn: Callable
    needs_labels: bool
    needs_teacher: bool
    teacher_loss: Optional[str]
    outputs: str
    per_output: Optional[Callable]
    when: str  # when ``auto_metric`` chooses it (docs/method.md's table)


def _over_outputs(per: Callable, which: str) -> Callable:
    def fn(out, y, t):
        if which == "first":
            return per(float_outputs(out)[0], y, None if t is None else float_outputs(t)[0])
        outs, ts = paired_outputs(out, t)
        return sum(per(o, y, r) for o, r in zip(outs, ts)) / len(outs)
    fn.__name__ = per.__name__.lstrip("_")
    return fn


def _entry(per, needs_labels, needs_teacher, teacher_loss, outputs, when) -> Metric:
    return Metric(_over_outputs(per, outputs), needs_labels, needs_teacher, teacher_loss, outputs,
                  per, when)


QUALITY = {  # name -> Metric (indexable: [0] function, [1] needs labels, [2] needs teacher)
    "accuracy": _entry(_accuracy, True, False, "kl", "first",
                       "labels, and the first output is [N, C] logits (C > 1)"),
    "neg_loss": _entry(_neg_loss, True, False, "kl", "first", "never (override only)"),
    "agreement": _entry(_agreement, False, True, "kl", "all",
                        "no labels, every output [N, C] logits (C > 1)"),
    "neg_kl": _entry(_neg_kl, False, True, "kl", "all", "never (override only)"),
    "cosine": _entry(_cosine, False, True, "cosine", "all",
                     "every output an [N, D] embedding (name contains 'emb', or "
                     "pooled over a sequence: a mean/sum/max of an [N, L, D] tensor)"),
    "sqnr": _entry(_sqnr, False, True, "rel_mse", "all",
                   "anything else: ≥3-D maps, 1-D regression, mixed multi-output models"),
    "neg_rel_mse": _entry(_neg_rel_mse, False, True, "rel_mse", "all", "never (override only)"),
    "neg_mse": _entry(_neg_mse, False, True, "mse", "all", "never (override only)"),
}


def register_metric(name: str, fn: Callable, *, needs_labels: bool = False,
                    teacher_loss: Optional[str] = None) -> str:
    """Register a user metric ``fn(outputs, float_outputs, labels) -> float``, **higher is
    better** (to use a loss, return its negative). ``outputs`` / ``float_outputs`` are the
    model's and the float model's floating-point outputs on the same batch (one tensor, or a
    tuple for several outputs); ``labels`` is None without labels. The label-free
    loss is ``teacher_loss`` (a ``TEACHER_LOSSES`` name) or, by default, that of the automatic
    choice. Registering a name again replaces it. Returns ``name``."""
    if teacher_loss is not None and teacher_loss not in TEACHER_LOSSES:
        raise ValueError(f"teacher_loss={teacher_loss!r}: use one of {', '.join(TEACHER_LOSSES)}")

    def wrapped(out, y, t):
        return float(fn(pack_outputs(float_outputs(out)),
                        None if t is None else pack_outputs(float_outputs(t)), y))
    wrapped.__name__ = getattr(fn, "__name__", "metric")
    QUALITY[name] = Metric(wrapped, bool(needs_labels), True, teacher_loss, "all", None,
                           "never (given through the Python API)")
    return name


def custom_metric(fn: Callable) -> str:
    """``register_metric`` under the name ``custom:<function name>``; returns that name."""
    return register_metric(f"custom:{getattr(fn, '__name__', 'metric')}", fn)


# ---- the automatic choice -------------------------------------------------------------------
class OutputInfo(NamedTuple):
    shape: tuple
    name: str = ""
    pooled_sequence: bool = False  # a mean/sum/max over a dim of an [N, L, D] tensor


def output_kind(o: OutputInfo) -> str:
    """``logits`` ([N, C], C > 1), ``embedding`` (an [N, D] output named ``*emb*`` or pooled over a
    sequence) or ``tensor`` (anything else)."""
    if len(o.shape) != 2 or o.shape[1] <= 1:
        return "tensor"
    return "embedding" if ("emb" in o.name.lower() or o.pooled_sequence) else "logits"


def auto_metric(outputs: Sequence[OutputInfo], labeled: bool) -> tuple:
    """(metric name, reason): the quality signal chosen from the float model's outputs.

    Rule, on the floating-point outputs (each is ``logits``, ``embedding`` or ``tensor``, see
    ``output_kind``):
    1. labels and the first output is logits → ``accuracy`` (of the first output);
    2. without labels, every output logits → ``agreement`` (mean over outputs);
    3. every output an embedding → ``cosine`` (mean over outputs; labels, if any, unused);
    4. anything else (≥3-D maps, 1-D / [N, 1] regression, outputs of mixed kinds, labels with a
       first output that is not logits) → ``sqnr`` (mean of the per-output dB).
    An [N, C] output counts as an embedding, not logits, when its name contains "emb" or it is
    a mean/sum/max over a dim of an [N, L, D] tensor (a pooled sequence); a CNN's global average
    pool ([N, C, H, W] → [N, C]) or a linear head gives logits. ``--metric`` overrides.
    """
    if not outputs:
        raise ValueError("the model returns no floating-point output to measure")
    kinds = [output_kind(o) for o in outputs]
    desc = ", ".join(f"{k} [{', '.join(['N', *map(str, o.shape[1:])])}]" + (f" '{o.name}'" if o.name else "")
                     for k, o in zip(kinds, outputs))
    one = len(kinds) == 1
    if labeled and kinds and kinds[0] == "logits":
        return "accuracy", f"labels, and the first output is [N, C] logits ({desc})"
    if not labeled and kinds and all(k == "logits" for k in kinds):
        return "agreement", (f"no labels, {'the output is' if one else f'all {len(kinds)} outputs are'} "
                             f"[N, C] logits: top-1 agreement with the float model ({desc})")
    if kinds and all(k == "embedding" for k in kinds):
        return "cosine", (f"{'the output is an' if one else f'all {len(kinds)} outputs are'} "
                          f"[N, D] embedding{'' if one else 's'}: cosine similarity to the float "
                          f"model ({desc})")
    why = ("outputs of mixed kinds" if len(set(kinds)) > 1 else
           "labels, but the first output is not [N, C] logits" if labeled and kinds[0] != "logits" else
           f"{'the output is' if one else f'all {len(kinds)} outputs are'} neither logits nor embeddings")
    return "sqnr", f"{why}: SQNR (dB) to the float model, mean over outputs ({desc})"


_REDUCTIONS = {"mean", "sum", "amax", "max", "nansum", "logsumexp"}


def _reduction_name(node) -> Optional[str]:
    if node.op == "call_method":
        return node.target if node.target in _REDUCTIONS else None
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target)).split(".")[0]
        return name if name in _REDUCTIONS else None
    return None


def describe_outputs(model: nn.Module, x: torch.Tensor, names: Sequence[str] = ()) -> list:
    """``OutputInfo`` of each floating output of ``model`` on the batch ``x`` (its name from
    ``names``, else the fx node's; ``pooled_sequence`` read from the fx graph when ``model`` is a
    ``GraphModule``: the node making the output, through shape ops, reduces an [N, L, D] tensor
    over L)."""
    shapes: dict = {}
    out_nodes: list = []
    if isinstance(model, fx.GraphModule):
        class _Shapes(fx.Interpreter):
            def run_node(self, n):
                r = super().run_node(n)
                if torch.is_tensor(r):
                    shapes[n] = tuple(r.shape)
                return r
        try:
            with torch.no_grad():
                result = _Shapes(model).run(x)
        except Exception:  # noqa: BLE001 — not interpretable node by node: shapes only
            return describe_outputs(nn.Sequential(model), x, names)
        out_node = next(n for n in model.graph.nodes if n.op == "output")
        fx.node.map_arg(out_node.args[0], out_nodes.append)
    else:
        with torch.no_grad():
            result = model(x)
    infos, outs = [], outputs_of(result)
    for i, o in enumerate(outs):
        if not o.is_floating_point():
            continue
        node = out_nodes[i] if len(out_nodes) == len(outs) else None
        name = names[i] if i < len(names) else (node.name if node is not None else "")
        pooled = False
        while node is not None:
            if _reduction_name(node) and node.args and isinstance(node.args[0], fx.Node):
                shape_in = shapes.get(node.args[0], ())  # [N, L, D] → [N, D]: over the sequence
                pooled = len(shape_in) == 3 and shape_in[-1] == o.shape[-1]
                break
            if (kind_of(node) == "shape_op" or (node.op == "call_method" and node.target in
                                                ("view", "reshape", "flatten", "squeeze", "contiguous"))) \
                    and node.args and isinstance(node.args[0], fx.Node):
                node = node.args[0]
                continue
            break
        infos.append(OutputInfo(tuple(o.shape), str(name), pooled))
    return infos


def choose_metric(model: nn.Module, data: Dataset, names: Sequence[str] = ()) -> tuple:
    """(metric, reason) for the float ``model`` on ``data``: ``auto_metric`` on its outputs for
    two validation samples."""
    x = data.x_val[:2] if len(data.x_val) else data.x_train[:2]
    was = model.training
    model.eval()
    try:  # in float: a forward through the quantizers would initialize scales from x
        with bypass_quantizers(model):
            return auto_metric(describe_outputs(model, x, names), data.labeled)
    finally:
        model.train(was)


def default_metric(data: Dataset, classification: bool = True) -> str:
    """The metric from the labels alone (callers that cannot see the model): accuracy with labels,
    else agreement for a classifier and sqnr otherwise. ``choose_metric`` is the full rule."""
    if data.labeled:
        return "accuracy"
    return "agreement" if classification else "sqnr"


def resolve_metric(graph, data: Dataset, name: Optional[str] = None) -> tuple:
    """(metric, reason) of a search or baseline on ``graph``: ``name`` when given, else
    ``choose_metric`` on the graph's outputs."""
    if name:
        return name, "asked for"
    return choose_metric(graph.gm, data, getattr(graph, "output_names", ()) or ())
