"""Shared CLI plumbing: error handling (one line, exit code), one-line usage errors
(``OneLineCommand``), common options and parsing helpers used by every ``fliqs`` command."""
from __future__ import annotations

import functools
import os
import sys

import click

from fliqs_compiler.base.errors import FliqsError

DEBUG_ENV = "FLIQS_DEBUG"


class UsageLine(click.ClickException):
    """A click usage error shown as one line (exit 2)."""

    exit_code = 2

    def show(self, file=None):
        click.echo(f"fliqs: error: {self.format_message()}", err=True)


class OneLineCommand(click.Command):
    """A click command whose usage errors (missing argument, bad option type) print one
    ``fliqs: error: ...`` line on stderr (no usage block) and exit 2, like every other bad input."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as e:
            raise UsageLine(f"{e.format_message()} (see 'fliqs {info_name} --help')") from None


def debug_option(f):
    """``--debug``: show tracebacks instead of one-line errors."""

    def _set(ctx, param, value):
        if value:
            os.environ[DEBUG_ENV] = "1"
        return value

    return click.option("--debug", is_flag=True, expose_value=False, is_eager=True,
                        callback=_set, help="Show a traceback on errors.")(f)


def parse_input_shapes(values) -> dict:
    """``("x=1x3x224x224", ...)`` → ``{"x": (1, 3, 224, 224)}``; a bad value is a FliqsError."""
    shapes = {}
    for item in values or ():
        name, sep, dims = item.partition("=")
        try:
            if not sep or not name:
                raise ValueError
            shapes[name] = tuple(int(d) for d in dims.lower().split("x"))
            if any(d <= 0 for d in shapes[name]):
                raise ValueError
        except ValueError:
            raise FliqsError(f"--input-shape {item!r}: expected NAME=D1xD2x... with positive "
                             "integers, e.g. input=1x3x224x224") from None
    return shapes


def parse_int(option: str, value) -> int:
    """An integer option value, or a one-line FliqsError naming the option."""
    try:
        return int(value)
    except (TypeError, ValueError):
        raise FliqsError(f"{option} {value!r}: give an integer") from None


def finetune_options(value) -> dict:
    """``--finetune N`` → search options (a negative N is a one-line error)."""
    steps = parse_int("--finetune", value)
    if steps < 0:
        raise FliqsError(f"--finetune {value}: give a number of steps ≥ 0")
    return {"finetune": steps} if steps else {}


prior_option = click.option(
    "--prior", type=click.Choice(["sensitivity", "none"]), default="sensitivity", show_default=True,
    help="Start the search's policy from the sensitivity + ILP choice (its forward passes are "
         "charged as search steps) or from uniform probabilities.")


attention_option = click.option(
    "--attention-matmuls", "attention", type=click.Choice(["searched", "float"]),
    default="searched", show_default=True,
    help="Activation × activation MatMuls (attention Q·Kᵀ and A·V): searched like every layer "
         "(a softmax output only in formats of ≥ 8 bits), or kept in float.")


quantize_inputs_option = click.option(
    "--quantize-inputs", "quantize_inputs", metavar="OPS", default="none", show_default=True,
    help="Also search the input activation of these ops, comma-separated: layernorm, softmax, "
         "gelu (the op itself stays float on the dequantized input; softmax inputs only in "
         "formats of ≥ 8 bits, LayerNorm/GELU inputs ≥ 4; they cost nothing in the budget).")


group_option = click.option(
    "--group", "groups", metavar="REGEX", multiple=True,
    help="Layers whose name matches REGEX share one format (repeatable; one decision per "
         "REGEX), e.g. --group 'attn/(q|k|v)_proj' for separate Q, K, V Linears.")
keep_float_option = click.option(
    "--keep-float", "keep_float", metavar="REGEX", multiple=True,
    help="Layers whose name matches REGEX stay float, outside search and budget (repeatable).")


weight_activation_option = click.option(
    "--weight-activation", "weight_activation", type=click.Choice(["tied", "separate"]),
    default="tied", show_default=True,
    help="One format per layer for its weight and input activation, or a separate decision for "
         "each (W2A4 and the like; twice the decisions, costs stay exact: BOPs = MACs x bits_w x "
         "bits_a).")


def prepare_options(attention: str, groups=(), keep_float=(), quantize_inputs="none",
                    weight_activation: str = "tied") -> dict:
    """``--attention-matmuls``, ``--group``, ``--keep-float``, ``--quantize-inputs``,
    ``--weight-activation`` → ``passes.PrepareOptions`` fields; a bad regular expression or op
    name is a one-line error before the model is read."""
    import re
    from fliqs_compiler.passes import parse_quantize_inputs
    for option, patterns in (("--group", groups), ("--keep-float", keep_float)):
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as e:
                raise FliqsError(f"{option} {pattern!r}: not a valid regular expression ({e})") from None
    options = {} if attention == "searched" else {"quantize_act_matmul": False}
    if groups:
        options["group_patterns"] = tuple(groups)
    if keep_float:
        options["keep_float_patterns"] = tuple(keep_float)
    inputs = parse_quantize_inputs(quantize_inputs, "--quantize-inputs")
    if inputs:
        options["quantize_inputs"] = inputs
    if weight_activation == "separate":
        options["tie_weight_activation"] = False
    return options


def space_options(command):
    """The search-space options (``--attention-matmuls``, ``--quantize-inputs``, ``--group``,
    ``--keep-float``, ``--weight-activation``) given to ``command`` as one argument,
    ``prepare_options``: the ``passes.PrepareOptions`` fields they ask for, checked first."""
    import functools

    @functools.wraps(command)
    def with_space(*args, attention, quantize_inputs, groups, keep_float, weight_activation, **kwargs):
        return command(*args, prepare_options=prepare_options(attention, groups, keep_float, quantize_inputs,
                                                              weight_activation), **kwargs)
    for option in (weight_activation_option, keep_float_option, group_option, quantize_inputs_option,
                   attention_option):
        with_space = option(with_space)
    return with_space


metric_option = click.option(
    "--metric", metavar="NAME", default=None,
    help="Quality signal of the search and the report: accuracy, agreement, cosine, sqnr, "
         "neg_rel_mse, neg_kl, neg_mse, neg_loss (default: chosen from the model's outputs; "
         "the report says which and why).")


def metric_options(value) -> dict:
    """``--metric NAME`` → search options (checked up front: an unknown name is a one-line
    FliqsError listing the valid ones)."""
    from fliqs_compiler.driver.options import check_metric
    name = check_metric(value)
    return {"metric": name} if name else {}


input_shape_option = click.option(
    "--input-shape", "input_shapes", multiple=True, metavar="NAME=1x3x224x224",
    help="Pin an input's shape (repeatable); needed for dynamic dimensions.")


def _quiet_fx_call_errors() -> None:
    """torch.fx's GraphModule prints the failing line of its generated code to stderr before
    re-raising (``torch.fx.graph_module._WrappedCall``), which breaks the one-line-error rule;
    without --debug, that module's ``print`` is silenced (the error itself still propagates)."""
    import torch.fx.graph_module as fx_graph_module
    fx_graph_module.print = lambda *args, **kwargs: None


def handle_errors(fn):
    """Run a command body: FliqsError → one line on stderr and its exit code; anything else →
    one line and exit 1 (a traceback with --debug or FLIQS_DEBUG=1). A data-parallel rank whose
    error line another process prints (``ranks.silenced``) exits with the code alone; every rank
    of a torchrun job ends without the interpreter's teardown (``ranks.exit_now``)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not os.environ.get(DEBUG_ENV):
            _quiet_fx_call_errors()
        try:
            result = fn(*args, **kwargs)
        except (FliqsError, click.exceptions.Exit, click.ClickException, KeyboardInterrupt) as e:
            if isinstance(e, FliqsError):
                if os.environ.get(DEBUG_ENV):
                    raise
                _leave_silently(e, e.exit_code)
                click.echo(f"fliqs: error: {e}", err=True)
                _end_rank(e.exit_code)
                sys.exit(e.exit_code)
            if isinstance(e, KeyboardInterrupt):
                click.echo("fliqs: interrupted (a checkpoint, if any, is kept; rerun with --resume)",
                           err=True)
                _end_rank(130)
                sys.exit(130)
            raise
        except Exception as e:  # noqa: BLE001 — the CLI's last line of defence
            if os.environ.get(DEBUG_ENV):
                raise
            _leave_silently(e, 1)
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            click.echo(f"fliqs: internal error: {type(e).__name__}: {msg} "
                       "(rerun with --debug for a traceback)", err=True)
            _end_rank(1)
            sys.exit(1)
        _end_rank(0)
        return result

    return wrapper


def _leave_silently(error: BaseException, code: int) -> None:
    from fliqs_compiler.cli.ranks import leave_silently
    leave_silently(error, code)


def _end_rank(code: int) -> None:
    """A rank of a torchrun job ends here, without the interpreter's teardown (``ranks.exit_now``)."""
    from fliqs_compiler.cli.ranks import exit_now
    exit_now(code)
