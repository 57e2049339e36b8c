"""Human-readable numbers and labels shared by report.md and the plots (``—`` for a missing
value), so that both show a quantity the same way."""
from __future__ import annotations

from typing import Optional

MISSING = "—"
PERCENT_METRICS = ("accuracy", "agreement")  # fractions shown as percentages
METRIC_UNITS = {"sqnr": " dB"}  # shown after the value


def si(x: Optional[float], unit: str = "") -> str:
    """``294912`` → ``"295 k"`` (3 significant digits, SI prefix)."""
    if x is None:
        return MISSING
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g} {suffix}{unit}"
    return f"{x:.3g} {unit}".strip()


def size_bytes(x: Optional[float]) -> str:
    """A byte count in B, KiB or MiB."""
    if x is None:
        return MISSING
    for div, suffix in ((2 ** 20, "MiB"), (2 ** 10, "KiB")):
        if x >= div:
            return f"{x / div:.3g} {suffix}"
    return f"{int(x)} B"


def ms(x: Optional[float]) -> str:
    return MISSING if x is None else f"{x:.4g} ms"


def quality(x: Optional[float], metric: str) -> str:
    """A quality value: a percentage for accuracy-like metrics, else 4 significant digits."""
    if x is None:
        return MISSING
    return f"{x * 100:.2f} %" if metric in PERCENT_METRICS else f"{x:.4g}{METRIC_UNITS.get(metric, '')}"


def budget_text(budget: dict) -> str:
    """The budget as the user asked for it (``bops=0.5x``), or rebuilt from kind and value."""
    return budget.get("text") or f"{budget['kind']}={budget['value']}"


# how an achieved total reads, per budget kind
_COST_TEXT = {"bops": lambda v: si(v, "BOPs"), "size": size_bytes, "latency": ms}


def budget_achieved(report: dict) -> tuple:
    """(asked value, achieved value, formatter) in the budget's kind."""
    kind = report["budget"]["kind"]
    totals = report["totals"]
    achieved = {"bops": totals["bops"], "size": totals["size_bytes"],
                "latency": totals.get("searched_latency_ms", totals["latency_ms"])}.get(kind)
    return report["budget"]["value"], achieved, _COST_TEXT.get(kind, str)


def executed(layer: dict) -> str:
    """The dtype a layer ran in, with its kernel when the dtype does not already name it."""
    dtype = layer.get("executed_dtype")
    if not dtype:
        return MISSING
    kernel = layer.get("kernel")
    return f"{dtype} ({kernel})" if kernel and kernel not in dtype else dtype
