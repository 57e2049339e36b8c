"""The data a command runs on and how its quality is measured: the search data (``load_dataset``),
the float teacher and its quality (``data_and_teacher``), and ``evaluate`` on the held-out split."""
from __future__ import annotations

from typing import Optional

from fliqs_compiler.base.errors import FliqsError

__all__ = ["load_dataset", "data_and_teacher", "evaluate", "num_classes"]


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


def data_and_teacher(data, graph, seed: int, holdout: float) -> tuple:
    """(dataset, float teacher, metric, float quality): the data stage of compile and lower."""
    import copy
    dataset = load_dataset(data, graph, seed, holdout)
    teacher = copy.deepcopy(graph.gm).eval()
    metric, q_float = evaluate(teacher, dataset, teacher)
    return dataset, teacher, metric, q_float


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


def evaluate(gm, dataset, teacher=None, batch: int = 256) -> tuple:
    """(metric, value) of ``gm`` on the held-out split (``x_test``: the official test split where
    the data has one, else the validation split): accuracy with labels, else top-1 agreement with
    ``teacher`` (a float GraphModule; None → the model agrees with itself: 1.0)."""
    import torch
    x, y = dataset.x_test, dataset.y_test
    hits = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out = gm(x[i:i + batch])
            out = out[0] if isinstance(out, (tuple, list)) else out
            pred = out.reshape(out.shape[0], -1).argmax(1)
            if y is not None:
                ref = y[i:i + batch]
            elif teacher is not None:
                t = teacher(x[i:i + batch])
                t = t[0] if isinstance(t, (tuple, list)) else t
                ref = t.reshape(t.shape[0], -1).argmax(1)
            else:
                ref = pred
            hits += int((pred == ref).sum())
    return ("accuracy" if y is not None else "agreement"), hits / max(1, len(x))
