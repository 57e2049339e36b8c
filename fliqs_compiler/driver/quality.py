"""The data a command runs on and how its quality is measured: the search data (``load_dataset``),
the quality metric (``choose``: given, or chosen from the float model's outputs), the float
teacher and its quality (``data_and_teacher``), and ``evaluate`` on the held-out split (the
metrics of ``search.trainer.QUALITY``, the same functions the search uses)."""
from __future__ import annotations

from typing import Optional

from fliqs_compiler.base.errors import FliqsError

__all__ = ["load_dataset", "choose", "data_and_teacher", "evaluate", "num_classes"]


def load_dataset(data, graph, seed: int, holdout: float):
    """The search data: ``data`` spec (digits, fashion-mnist, .npz, image folder) or, with no data,
    seeded random inputs (no labels: the float model is the teacher)."""
    import torch
    from fliqs_compiler.data.sources import Dataset, load_data
    if len(graph.inputs) != 1:
        raise FliqsError(f"model {graph.name} has {len(graph.inputs)} inputs; the search data feeds "
                         "single-input models only")
    spec = graph.inputs[0]
    check_runs_on_batches(graph)
    if data is not None:
        return load_data(str(data), spec, holdout=holdout, seed=seed, num_classes=num_classes(graph))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((512, *spec.shape[1:]), generator=g)
    n_val = int(round(holdout * len(x)))
    return Dataset(x_train=x[n_val:], y_train=None, x_val=x[:n_val], y_val=None, num_classes=None,
                   description="no --data: 512 seeded Gaussian random inputs (the float model is "
                               "the teacher; quality = agreement with it)")


def choose(graph, dataset, metric: Optional[str] = None) -> tuple:
    """(metric, reason): ``metric`` as given (a checked ``QUALITY`` name), else the automatic
    choice from the float graph's outputs (``search.trainer.choose_metric``). A metric that
    needs labels on unlabeled data is a FliqsError here, before any training."""
    from fliqs_compiler.search.trainer import QUALITY, choose_metric
    if metric is None:
        return choose_metric(graph.gm, dataset, graph.output_names)
    if QUALITY[metric].needs_labels and not dataset.labeled:
        raise FliqsError(f"--metric {metric}: the data has no labels; use a label-free metric "
                         "(agreement, cosine, sqnr, neg_rel_mse, neg_kl) or give labelled --data")
    return metric, f"given (--metric {metric})"


def data_and_teacher(data, graph, seed: int, holdout: float, metric: Optional[str] = None) -> tuple:
    """(dataset, float teacher, metric, reason, float quality): the data stage of compile and
    lower (``metric``: as given, None → chosen from the model's outputs)."""
    import copy
    dataset = load_dataset(data, graph, seed, holdout)
    metric, reason = choose(graph, dataset, metric)
    teacher = copy.deepcopy(graph.gm).eval()
    _, q_float = evaluate(teacher, dataset, teacher, metric=metric)
    return dataset, teacher, metric, reason, q_float


def check_runs_on_batches(graph) -> None:
    """Search and evaluation feed batches of data: a graph whose folded shapes keep the pinned
    batch size cannot take them. Found here with a one-line error instead of deep in a stage."""
    import torch
    spec = graph.inputs[0]
    x = torch.zeros((3, *spec.shape[1:]), dtype=getattr(torch, spec.dtype, torch.float32))
    try:
        with torch.no_grad():
            graph.gm(x)
    except Exception as e:  # noqa: BLE001 — any failure here is this one problem
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise FliqsError(f"model {graph.name}: does not run on a batch of 3 inputs shaped "
                         f"{tuple(spec.shape[1:])} ({first}); a shape in the model fixes the batch "
                         f"size at {spec.shape[0]}: export it with a dynamic batch dimension") from None


def num_classes(graph) -> Optional[int]:
    """The class count of a classifier (first output shaped [batch, C]), else None: labels must
    lie in [0, C)."""
    import torch
    try:
        with torch.no_grad():
            out = graph.gm(*graph.example_inputs())
    except Exception:  # noqa: BLE001 — not runnable here: let the search report it
        return None
    out = out[0] if isinstance(out, (tuple, list)) else out
    return int(out.shape[1]) if torch.is_tensor(out) and out.dim() == 2 and out.shape[1] > 1 else None


def evaluate(gm, dataset, teacher=None, batch: int = 256, metric: Optional[str] = None) -> tuple:
    """(metric, value) of ``gm`` on the held-out split (``x_test``: the official test split where
    the data has one, else the validation split), every output concatenated over the batches.
    ``metric``: a ``QUALITY`` name; None → ``choose_metric`` on ``teacher`` (or ``gm``). Teacher
    metrics compare with ``teacher`` (a float GraphModule; None → ``gm`` itself: the float value)."""
    import torch
    from fliqs_compiler.search.trainer import QUALITY, float_outputs, pack_outputs, choose_metric
    if metric is None:
        metric = choose_metric(teacher if teacher is not None else gm, dataset)[0]
    x, y = dataset.x_test, dataset.y_test
    m = QUALITY[metric]

    def outputs(model):
        with torch.no_grad():
            chunks = [float_outputs(model(x[i:i + batch])) for i in range(0, len(x), batch)]
        return pack_outputs([torch.cat(parts) for parts in zip(*chunks)])
    outs = outputs(gm)
    ref = (outputs(teacher) if teacher is not None else outs) if m.needs_teacher else None
    return metric, float(m.fn(outs, y, ref))
