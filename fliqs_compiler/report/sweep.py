"""A sweep's summary in the main point's report: the table of points (budget, cost, quality,
folder) and the baselines of every point merged. One place for it: the ``sweep summary`` stage of
``fliqs compile --sweep`` and ``fliqs report --merge`` (points run as separate jobs, e.g. one
budget per cluster job) both call ``add_sweep``."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

__all__ = ["add_sweep"]


def add_sweep(main: dict, points: Sequence, base: Path) -> dict:
    """``main`` (the first point's report) with ``sweep`` — one row per ``(folder, report)`` of
    ``points``, ``dir`` relative to ``base`` — and ``sweep_baselines`` (each distinct baseline
    once). Returns ``main``, changed in place."""
    main["sweep"] = [
        {"budget": rep["budget"]["text"], "budget_value": rep["budget"]["value"],
         "bops": rep["totals"]["bops"], "size_bytes": rep["totals"]["size_bytes"],
         "quality": rep["quality"]["final"], "latency_ms": rep["totals"]["latency_ms"],
         "dir": os.path.relpath(Path(folder), base) if Path(folder) != Path(base) else "."}
        for folder, rep in points]
    seen, merged = set(), []
    for _, rep in points:
        for b in rep["baselines"]:
            key = (b["name"], b["bops"], b["quality"])
            if key not in seen:
                seen.add(key)
                merged.append(b)
    main["sweep_baselines"] = merged
    return main
