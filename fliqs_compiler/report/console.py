"""The summary table a run prints on stderr when it ends (rich)."""
from __future__ import annotations

from pathlib import Path

from fliqs_compiler.report.text import MISSING, quality

__all__ = ["print_summary"]


def _errors_text(n: dict) -> str:
    """``"ORT / TVM"`` max |err| (``—`` when not checked), plus the ORT error in output LSBs."""
    errs = " / ".join(MISSING if v is None else f"{v:.3g}"
                      for v in (n["onnxruntime_max_abs_err"], n["tvm_max_abs_err"]))
    lsb = n.get("onnxruntime_default_lsb")
    return errs + ("" if lsb is None else f" (ORT {lsb:.2f} output LSB)")


def summary_rows(report: dict, out: Path) -> list:
    """(label, value) rows: budget asked vs achieved, quality, BOPs, size, latency, numerics,
    where the artifacts are."""
    from fliqs_compiler.cost.budget import format_cost
    r, totals = report, report["totals"]
    kind = r["budget"]["kind"]
    achieved = {"bops": totals["bops"], "size": totals["size_bytes"],
                "latency": totals.get("searched_latency_ms")}.get(kind)
    metric = r["quality"]["metric"]
    lat = totals["latency_ms"]
    rows = [
        ("budget asked", f"{r['budget']['text']} = {format_cost(kind, r['budget']['value'])}"),
        ("budget achieved" + (" (latency table)" if kind == "latency" else ""),
         MISSING if achieved is None else format_cost(kind, achieved)),
        (f"quality ({metric})", f"float {quality(r['quality']['float'], metric)} → final "
                                f"{quality(r['quality']['final'], metric)}"),
        ("BOPs (searched / float layers)",
         f"{format_cost('bops', totals['bops'])} / {format_cost('bops', totals['float_bops'])}"),
        ("weight size (searched layers)", format_cost("size", totals["size_bytes"])),
        ("measured latency",
         MISSING if lat is None else f"{lat:.4g} ms ({r['environment']['threads']} threads)"),
        ("max |err| ORT (default session) / TVM", _errors_text(r["numerics"])),
    ]
    if r.get("sweep"):
        rows.append(("sweep", ", ".join(f"{p['budget']}: {quality(p['quality'], metric)}"
                                        for p in r["sweep"])))
    return rows + [("artifacts", str(out)), ("report", str(out / "report.md"))]


def print_summary(report: dict, out: Path, command: str = "compile") -> None:
    """The final summary table on stderr (``summary_rows``)."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"fliqs {command}: {report['model']} → {report['target']}", show_header=False)
    t.add_column(style="bold")
    t.add_column()
    for label, value in summary_rows(report, out):
        t.add_row(label, value)
    Console(stderr=True).print(t)
