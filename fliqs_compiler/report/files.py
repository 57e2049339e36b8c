"""The report files of a run folder: ``write_report`` (validate, then report.json, report.md and
the plots) and ``render`` (re-render report.md and the plots from an existing report.json, for
``fliqs report DIR``). Every file is written atomically (tmp + ``os.replace``): a reader never
sees a half-written file."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from fliqs_compiler.base import atomic
from fliqs_compiler.base.errors import FliqsError
from fliqs_compiler.report.contract import validate_report
from fliqs_compiler.report.markdown import render_markdown
from fliqs_compiler.report.plots import plot_formats, plot_pareto

__all__ = ["write_report", "render", "read_report"]


def write_report(out_dir, report: dict) -> dict:
    """Validate ``report`` and write report.json, report.md, formats.png (and pareto.png when
    ``report["sweep"]`` has points) into ``out_dir``. Returns ``{file name: Path}``.

    Raises ValueError (a programming error, not user input) when a contract field is missing."""
    problems = validate_report(report)
    if problems:
        raise ValueError("report does not meet the report.json contract: " + "; ".join(problems[:5]))
    out = Path(out_dir)
    paths = {"report.json": atomic.write_text(out / "report.json",
                                              json.dumps(report, indent=2, default=str) + "\n")}
    paths.update(render(out, report))
    return paths


def read_report(out_dir) -> dict:
    """``out_dir/report.json`` as a dict; missing, unreadable or off-contract is a FliqsError."""
    src = Path(out_dir) / "report.json"
    if not src.is_file():
        raise FliqsError(f"{src}: no report.json here; pass the --out folder of a finished "
                         "'fliqs compile' or 'fliqs lower' run")
    try:
        report = json.loads(src.read_text())
    except (OSError, ValueError) as e:
        raise FliqsError(f"{src}: not readable JSON ({e}); rerun 'fliqs compile' to "
                         "regenerate it") from None
    problems = validate_report(report)
    if problems:
        raise FliqsError(f"{src}: not a fliqs report ({problems[0]}); rerun 'fliqs compile' "
                         "to regenerate it")
    return report


def render(out_dir, report: Optional[dict] = None) -> dict:
    """(Re-)render report.md, formats.png and pareto.png from ``report`` or ``out_dir/report.json``
    (``read_report``: a missing, unreadable or off-contract file is a FliqsError)."""
    out = Path(out_dir)
    if report is None:
        report = read_report(out)
    paths = {"report.md": atomic.write_text(out / "report.md", render_markdown(report)),
             "formats.png": plot_formats(report, out / "formats.png")}
    if report.get("sweep"):
        paths["pareto.png"] = plot_pareto(report, out / "pareto.png")
    return paths
