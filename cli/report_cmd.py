"""``fliqs report DIR``: re-render report.md, formats.png (and pareto.png) from DIR/report.json;
``fliqs report DIR1 DIR2 … --out MERGED``: one sweep of separately run points (e.g. one budget
per cluster job) merged into one report and Pareto plot."""
from __future__ import annotations

import click

from fliqs_compiler.cli.common import OneLineCommand, debug_option, handle_errors


@click.command("report", cls=OneLineCommand)
@click.argument("out_dirs", metavar="DIR...", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--out", metavar="MERGED",
              help="With several DIRs: the folder for the merged sweep (report.json with the "
                   "sweep table, report.md, formats.png, pareto.png).")
@click.option("--print", "show", is_flag=True, help="Also print report.md.")
@debug_option
@handle_errors
def report(out_dirs, out, show):
    """Render the report of a finished run in DIR (report.md and plots from report.json), or
    merge the runs in DIR... (one budget each) into one sweep in MERGED."""
    from pathlib import Path

    from fliqs_compiler.base.errors import FliqsError
    from fliqs_compiler.report import render, write_report
    from fliqs_compiler.report.files import read_report
    from fliqs_compiler.report.sweep import add_sweep
    if len(out_dirs) == 1 and out is None:
        paths = render(out_dirs[0])
        target = Path(out_dirs[0])
    else:
        if out is None:
            raise FliqsError(f"{len(out_dirs)} run folders: give --out MERGED for the merged sweep "
                             "report (the runs' own folders are left as they are)")
        reports = [(Path(d).resolve(), read_report(d)) for d in out_dirs]  # each checked, named if bad
        models = {rep["model"] for _, rep in reports}
        if len(models) > 1:
            raise FliqsError(f"the runs are of different models ({', '.join(sorted(models))}); "
                             "merge runs of one model")
        target = Path(out)
        target.mkdir(parents=True, exist_ok=True)
        main = add_sweep(dict(reports[0][1]), reports, target.resolve())
        paths = write_report(target, main)
    if show:
        click.echo((target / "report.md").read_text())
    click.echo("wrote " + ", ".join(str(p) for p in paths.values()))
