"""Option parsing and defaults shared by the API (``api``) and the CLI: each turns a user's value
into a checked one or raises a one-line ``FliqsError`` naming the option and what to do."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

from fliqs_compiler.numerics import formats as F
from fliqs_compiler.base.errors import FliqsError

DEFAULT_FORMATS = ("int4", "int8", "fp8_e4m3")
DEFAULT_BUDGET = "bops=0.5x"
DEFAULT_STEPS = 300
DEFAULT_HOLDOUT = 0.2


def parse_formats(value: Union[str, Sequence[str], None]) -> list:
    """``"int4,int8"`` or ``["int4", "int8"]`` → canonical registry names, order kept, no repeats.
    Unknown names / an empty list → FliqsError listing the registry."""
    if value is None:
        return list(DEFAULT_FORMATS)
    items = value.split(",") if isinstance(value, str) else list(value)
    return list(F.check_searchable([str(i).strip() for i in items if str(i).strip()]))


def parse_sweep(value: Optional[str]) -> Optional[list]:
    """``"bops=0.2x,0.3x,0.5x"`` → ``["bops=0.2x", "bops=0.3x", "bops=0.5x"]`` (each checked with
    ``budget.parse_budget``); None → None. Malformed → FliqsError with an example."""
    if value is None:
        return None
    from fliqs_compiler.cost.budget import parse_budget
    kind, sep, values = str(value).partition("=")
    vals = [v.strip() for v in values.split(",") if v.strip()]
    if not sep or not kind.strip() or not vals:
        raise FliqsError(f"--sweep {value!r}: expected KIND=V1,V2,... e.g. --sweep bops=0.2x,0.3x,0.5x")
    budgets = [f"{kind.strip()}={v}" for v in vals]
    for b in budgets:
        try:
            parse_budget(b)
        except FliqsError as e:
            raise FliqsError(f"--sweep {value!r}: {str(e).replace('--budget ', '', 1)}") from None
    if len(set(budgets)) != len(budgets):
        raise FliqsError(f"--sweep {value!r}: a value is repeated; list each budget once")
    return budgets


def check_jobs(jobs) -> int:
    """``--jobs``: sweep points at once, a positive integer."""
    try:
        n = int(jobs)
        if n != float(jobs) or n < 1:
            raise ValueError
    except (TypeError, ValueError):
        raise FliqsError(f"--jobs {jobs!r}: give the number of sweep points to run at once "
                         "(1 or more)") from None
    return n


def check_steps(steps) -> int:
    """A positive step count, or FliqsError."""
    try:
        n = int(steps)
        if n != float(steps) or n <= 0:
            raise ValueError
    except (TypeError, ValueError):
        raise FliqsError(f"--steps {steps!r}: give a positive integer number of search steps, "
                         f"e.g. --steps {DEFAULT_STEPS}") from None
    return n


def parse_baselines(value) -> list:
    """``"uniform,random"`` (or a list) → baseline names from ``search.baselines.BASELINES``;
    unknown names → FliqsError listing them. None/empty → []."""
    if not value:
        return []
    from fliqs_compiler.search.baselines import BASELINES
    items = [v.strip().lower() for v in (value.split(",") if isinstance(value, str) else value)]
    items = [v for v in items if v]
    unknown = [v for v in items if v not in BASELINES]
    if unknown:
        raise FliqsError(f"--baselines: unknown baseline {unknown[0]!r}; use any of {', '.join(BASELINES)}")
    return list(dict.fromkeys(items))


def check_model_arg(model) -> None:
    """A model path must name an existing file; FliqsError otherwise (objects pass)."""
    if isinstance(model, (str, Path)):
        p = Path(model)
        if not p.exists():
            raise FliqsError(f"{p}: model file not found; give the path of an .onnx file")
        if p.is_dir():
            raise FliqsError(f"{p}: is a folder; give the path of an .onnx file")


def check_data_arg(data) -> None:
    """``--data`` checked without reading it (before any model work): a known source name, an
    existing ``.npz`` file or a folder; anything else is the data loader's one-line FliqsError.
    None (seeded random inputs) passes."""
    if data is None:
        return
    from fliqs_compiler.data.sources import _source_of  # picks the loader; reads nothing
    _source_of(str(data))


def check_holdout(holdout) -> float:
    """The held-out fraction, strictly between 0 and 1, or FliqsError."""
    try:
        value = float(holdout)
    except (TypeError, ValueError):
        value = -1.0
    if not 0.0 < value < 1.0:
        raise FliqsError(f"holdout={holdout}: use a fraction between 0 and 1, e.g. 0.2")
    return value


def check_tuning(target, trials):
    """``--tune-trials`` → ``TuningOptions`` for ``target``'s backend: ≥ 0, and > 0 only where the
    backend tunes kernels for that target (``registry.tuning_refusal``: the backend's one-line
    reason, a FliqsError, otherwise)."""
    from fliqs_compiler.backends.registry import TuningOptions, backend_for, tuning_refusal
    try:
        n = int(trials or 0)
    except (TypeError, ValueError):
        n = -1
    if n < 0:
        raise FliqsError(f"--tune-trials {trials}: give a number of trials ≥ 0")
    if n:  # the backend decides (its tunes(target) and tuning_refusal)
        why = tuning_refusal(backend_for(target), target)
        if why:
            raise FliqsError(why)
    return TuningOptions(trials=n)


def check_metric(value, option: str = "--metric") -> Optional[str]:
    """The search's quality metric: None (chosen from the model's outputs), a ``QUALITY`` name, or
    a callable ``fn(outputs, float_outputs, labels) -> float`` (higher is better; registered as
    ``custom:<name>``, whose name is returned). Anything else → FliqsError naming ``option`` and
    the valid names (checked before any model work)."""
    if value is None:
        return None
    from fliqs_compiler.search.trainer import QUALITY, custom_metric
    if callable(value) and not isinstance(value, str):
        return custom_metric(value)
    name = str(value).strip().lower()
    if name not in QUALITY:
        valid = ", ".join(n for n in QUALITY if not n.startswith("custom:"))
        raise FliqsError(f"{option} {value!r}: unknown metric; use one of {valid} "
                         "(or a callable through the Python API)")
    return name
