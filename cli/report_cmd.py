"""``fliqs report DIR``: re-render report.md, formats.png (and pareto.png) from DIR/report.json."""
from __future__ import annotations

import click

from fliqs_compiler.cli.common import OneLineCommand, debug_option, handle_errors


@click.command("report", cls=OneLineCommand)
@click.argument("out_dir", metavar="DIR", type=click.Path(path_type=str))
@click.option("--print", "show", is_flag=True, help="Also print report.md.")
@debug_option
@handle_errors
def report(out_dir, show):
    """Render the report of a finished run in DIR (report.md and plots from report.json)."""
    from fliqs_compiler.report import render
    paths = render(out_dir)
    if show:
        click.echo(paths["report.md"].read_text())
    click.echo("wrote " + ", ".join(str(p) for p in paths.values()))
