"""``fliqs lower``: materialize a given format assignment (config.json), export QDQ ONNX, lower and
compile for the target, check numerics, measure latency, write the report (no search)."""
from __future__ import annotations

import click

from fliqs_compiler.driver.options import check_data_arg

from fliqs_compiler.cli.common import (OneLineCommand, debug_option, handle_errors,
                                       input_shape_option, parse_input_shapes)


@click.command("lower", cls=OneLineCommand)
@click.argument("model", type=click.Path(path_type=str))
@click.option("--config", "config", metavar="CONFIG.json", help="Format per node (config.json).")
@click.option("--target", metavar="TARGET", help="llvm, a JSON target dict, or ort.")
@click.option("--out", metavar="DIR", help="Output folder (default ./fliqs-out/<model-stem>/).")
@click.option("--data", metavar="DATA", help="Calibration/quality data (default: random inputs).")
@input_shape_option
@click.option("--quiet", is_flag=True, help="No progress display.")
@debug_option
@handle_errors
def lower(model, config, target, out, data, input_shapes, quiet):
    """Lower MODEL with the formats of CONFIG.json for TARGET: tvm/model.so, model.qdq.onnx, report."""
    from fliqs_compiler.driver import api
    from fliqs_compiler.base.errors import FliqsError
    if not config:
        raise FliqsError("--config is required: give a config.json written by 'fliqs compile' or 'fliqs search'")
    if not target:
        raise FliqsError("--target is required: use llvm (host CPU via TVM), ort, or a JSON target dict")
    check_data_arg(data)  # before the model is imported (cheap options first)
    result = api.lower_config(model, config, target=target, out=out, data=data,
                              input_shapes=parse_input_shapes(input_shapes) or None, progress=not quiet)
    click.echo(f"wrote {result.out_dir} (report: {result.out_dir / 'report.md'})")
