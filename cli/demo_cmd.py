"""``fliqs demo``: the embedded default, end to end — the bundled digits CNN
(``fliqs_compiler/assets/demo.onnx``) compiled for ``llvm`` on sklearn digits."""
from __future__ import annotations

import click

from .common import debug_option, handle_errors
from .compile_cmd import OneLineCommand

DEMO_STEPS = 200


@click.command("demo", cls=OneLineCommand)
@click.option("--out", metavar="DIR", default="fliqs-out/demo", show_default=True, help="Output folder.")
@click.option("--quiet", is_flag=True, help="No progress display.")
@debug_option
@handle_errors
def demo(out, quiet):
    """Compile the bundled digits CNN for the host CPU (llvm) on sklearn digits, end to end."""
    from fliqs_compiler import api
    result = api.compile(api.DEMO_MODEL, target="llvm", data="digits", steps=DEMO_STEPS, out=out,
                         progress=not quiet)
    q = result.report["quality"]
    click.echo(f"demo: {q['metric']} float {100 * q['float']:.2f} % → {100 * q['final']:.2f} % at "
               f"{result.bops / 1e6:.3g} MBOPs; report: {result.out_dir / 'report.md'}")
