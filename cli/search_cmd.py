"""``fliqs search``: the FLIQS search on its own (import, passes, search) → config.json."""
from __future__ import annotations

import click

from fliqs_compiler.driver.options import check_data_arg

from fliqs_compiler.cli.common import (OneLineCommand, debug_option, space_options,
                                       finetune_options, prior_option,
                                       handle_errors, input_shape_option, metric_option,
                                       metric_options, parse_input_shapes, parse_int)
from fliqs_compiler.cli.ranks import check_nproc, device_option, launch, nproc_option


@click.command("search", cls=OneLineCommand)
@click.argument("model", type=click.Path(path_type=str))
@click.option("--data", metavar="DATA", help="digits, fashion-mnist, .npz, or an image folder.")
@click.option("--formats", metavar="LIST", help="Candidate formats (default int4,int8,fp8_e4m3).")
@click.option("--budget", metavar="KIND=VALUE", help="bops=0.25x | bops=12.5G | size=2MB | latency=3ms.")
@click.option("--target", metavar="TARGET", help="Needed for latency budgets (the latency table's target).")
@click.option("--steps", metavar="N", default="300", show_default=True, help="Search steps.")
@click.option("--out", metavar="DIR", help="Output folder (default ./fliqs-out/<model-stem>/).")
@click.option("--seed", metavar="N", default="0", show_default=True, help="Random seed.")
@click.option("--resume", is_flag=True, help="Continue from DIR/checkpoint/.")
@input_shape_option
@click.option("--finetune", metavar="N", default="0", show_default=True,
              help="Fine-tune N steps under the found configuration (comparison only).")
@prior_option
@metric_option
@device_option
@nproc_option
@click.option("--quiet", is_flag=True, help="No progress display.")
@debug_option
@handle_errors
@space_options  # innermost: its option errors pass through handle_errors
def search(model, data, formats, budget, target, steps, out, seed, resume, input_shapes, finetune,
           prior, prepare_options, metric, device, nproc, quiet):
    """Run the FLIQS one-shot search on MODEL and write DIR/config.json (and search.jsonl)."""
    from fliqs_compiler.driver import api
    check_data_arg(data)  # before the model is imported (cheap options first)
    search_options = dict(finetune_options(finetune), prior=prior, **metric_options(metric))
    nproc = check_nproc(nproc, search_options)
    kwargs = dict(data=data, formats=formats, budget=budget, target=target,
                  steps=api.check_steps(steps), out=out, seed=parse_int("--seed", seed),
                  resume=resume, input_shapes=parse_input_shapes(input_shapes) or None,
                  progress=not quiet, search_options=search_options,
                  prepare_options=prepare_options,
                  device=device)
    if nproc > 1:
        api.search_request(model, **kwargs)  # every option checked before the ranks start
        launch(nproc, out or "the output folder")
        return
    res = api.search_only(model, **kwargs)
    if res is not None:  # None: a data-parallel rank other than 0
        click.echo(f"wrote {res['config']}")
