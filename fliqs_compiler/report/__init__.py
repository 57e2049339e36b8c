"""Run reports: ``report.json`` (the public contract, ``contract.CONTRACT``), ``report.md`` (for
people), ``formats.png`` (per-layer format chart with MACs) and ``pareto.png`` (when a sweep ran).

``write_report(out_dir, report)`` requires a report dict holding every contract field with the
contract's types (``validate_report`` checks it and names what is missing) and guarantees that each
file is written atomically (tmp + ``os.replace``): a reader never sees a half-written file.
``render(out_dir)`` re-renders report.md and the plots from an existing report.json
(``fliqs report DIR``).

One module per job: ``contract`` (the check), ``build`` (the report.json dict from a run's facts),
``markdown``, ``plots``, ``environment`` (versions, CPU), ``console`` (the end-of-run summary),
``files`` (writing and re-rendering a run folder), ``text`` (number formatting they share). The
report layer imports only base, numerics, ir and cost: the driver hands it everything else.
"""
from __future__ import annotations

from fliqs_compiler.report.build import build_report
from fliqs_compiler.report.console import print_summary
from fliqs_compiler.report.contract import CONTRACT, validate_report
from fliqs_compiler.report.files import render, write_report
from fliqs_compiler.report.plots import plot_formats

__all__ = ["CONTRACT", "validate_report", "write_report", "render", "build_report",
           "print_summary", "plot_formats"]
