"""``fliqs compile``: the main job (import, passes, search, materialize, export, lower, measure,
report) as a thin layer over ``fliqs_compiler.driver.api.compile``."""
from __future__ import annotations

import click

from fliqs_compiler.cli.common import (OneLineCommand, debug_option, space_options,
                                       finetune_options, prior_option,
                                       handle_errors, input_shape_option, metric_option,
                                       metric_options, parse_input_shapes, parse_int)
from fliqs_compiler.cli.ranks import check_nproc, device_option, launch, nproc_option
from fliqs_compiler.driver.options import check_data_arg


@click.command("compile", cls=OneLineCommand)
@click.argument("model", type=click.Path(dir_okay=True, path_type=str))
@click.option("--target", "target", metavar="TARGET",
              help="Required: llvm (host CPU via TVM), a JSON target dict, ort, or rpc://HOST:PORT/KEY.")
@click.option("--data", metavar="DATA",
              help="digits, fashion-mnist, a .npz with x (and y), or an image folder. "
                   "Without labels (or without --data) the float model is the teacher.")
@click.option("--formats", metavar="LIST", help="Candidate formats, comma-separated "
              "(default int4,int8,fp8_e4m3; see 'fliqs formats').")
@click.option("--budget", metavar="KIND=VALUE",
              help="bops=0.25x | bops=12.5G | size=2MB | latency=3ms (default bops=0.5x).")
@click.option("--sweep", metavar="KIND=V1,V2,...",
              help="One search per budget, e.g. bops=0.2x,0.3x,0.5x; draws pareto.png.")
@click.option("--jobs", metavar="K", default="1", show_default=True,
              help="Sweep points run at once, each in its own process (same results as one by "
                   "one; K × threads should fit the cores).")
@click.option("--steps", metavar="N", default="300", show_default=True, help="Search steps.")
@click.option("--out", metavar="DIR", help="Output folder (default ./fliqs-out/<model-stem>/).")
@click.option("--seed", metavar="N", default="0", show_default=True, help="Random seed.")
@click.option("--resume", is_flag=True, help="Continue from DIR/checkpoint/ of an interrupted run.")
@input_shape_option
@click.option("--baselines", metavar="LIST",
              help="Also run baselines on the same graph/data/steps/budget: uniform,random,ilp,dnas.")
@click.option("--tune-trials", metavar="N", default="0", show_default=True,
              help="TVM targets: MetaSchedule trials per layer for the latency tables "
                   "(0: default schedules, fast but not representative).")
@click.option("--finetune", metavar="N", default="0", show_default=True,
              help="Fine-tune N steps under the found configuration (for comparison: FLIQS "
                   "needs no retraining; the report keeps both qualities).")
@prior_option
@metric_option
@device_option
@nproc_option
@click.option("--quiet", is_flag=True, help="No progress display.")
@click.option("--dry-run", is_flag=True,
              help="Check the options, list the stages this run would execute, and stop.")
@click.option("--checkpoint-every", metavar="N", default=None, hidden=True,
              help="Search checkpoint interval in steps (tests).")
@debug_option
@handle_errors
@space_options  # innermost: its option errors pass through handle_errors
def compile_(model, target, data, formats, budget, sweep, jobs, steps, out, seed, resume, input_shapes,
             baselines, tune_trials, finetune, prior, prepare_options, metric, device, nproc, quiet, dry_run, checkpoint_every):
    """Search a mixed-precision format per layer of MODEL under a budget, then export, lower,
    compile and measure it for TARGET."""
    from fliqs_compiler.driver import api
    from fliqs_compiler.base.errors import FliqsError
    if not target:
        raise FliqsError("--target is required: use llvm (host CPU via TVM), ort, or a JSON target dict")
    check_data_arg(data)  # before the model is imported (cheap options first)
    shapes = parse_input_shapes(input_shapes)
    search_options = dict(finetune_options(finetune), prior=prior, **metric_options(metric))
    nproc = check_nproc(nproc, search_options)
    if nproc > 1 and api.check_jobs(jobs) > 1:
        raise FliqsError(f"--nproc {nproc} and --jobs {jobs} together: run a sweep's points either "
                         "at once (--jobs) or each over several processes (--nproc), not both")
    if checkpoint_every is not None:
        search_options["checkpoint_every"] = api.check_steps(checkpoint_every)
    kwargs = dict(target=target, data=data, formats=formats, budget=budget,
                  steps=api.check_steps(steps), out=out, seed=parse_int("--seed", seed),
                  resume=resume, sweep=sweep, baselines=baselines, input_shapes=shapes or None,
                  progress=not quiet, search_options=search_options,
                  prepare_options=prepare_options,
                  tune_trials=parse_int("--tune-trials", tune_trials), device=device,
                  jobs=jobs)
    if dry_run:
        click.echo(api.describe("compile", model=model, **kwargs))
        return
    if nproc > 1:
        api.compile_request(model, **kwargs)  # every option checked before the ranks start
        launch(nproc, out or "the output folder")
        return
    result = api.compile(model, **kwargs)
    if result is not None:  # None: a data-parallel rank other than 0 (it writes nothing)
        click.echo(f"wrote {result.out_dir} (report: {result.out_dir / 'report.md'})")
