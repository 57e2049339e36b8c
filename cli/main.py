"""The ``fliqs`` command. Subcommands live in their own modules and are imported lazily so that
``fliqs --help`` stays fast and a broken optional stack cannot break unrelated commands."""
from __future__ import annotations

import importlib

import click

from fliqs_compiler import __version__

# name -> (module, attribute, one-line help)
COMMANDS = {
    "inspect": ("fliqs_compiler.cli.inspect_cmd", "inspect", "Table of quantizable nodes."),
    "compile": ("fliqs_compiler.cli.compile_cmd", "compile_", "Import, search, lower, measure."),
    "search": ("fliqs_compiler.cli.search_cmd", "search", "Run the FLIQS search only."),
    "lower": ("fliqs_compiler.cli.lower_cmd", "lower", "Lower a given format config."),
    "profile": ("fliqs_compiler.cli.profile_cmd", "profile", "Build the per-layer latency table."),
    "report": ("fliqs_compiler.cli.report_cmd", "report", "Render report.md / plots of a run."),
    "demo": ("fliqs_compiler.cli.demo_cmd", "demo", "The embedded default, end to end."),
    "formats": ("fliqs_compiler.cli.formats_cmd", "formats", "The format registry as a table."),
    "devices": ("fliqs_compiler.cli.devices_cmd", "devices", "Devices of a TVM RPC tracker."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attr, short = COMMANDS[name]
        try:
            return getattr(importlib.import_module(module), attr)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise

            @click.command(name=name, help=f"{short} (not available in this build)")
            def missing():
                raise click.ClickException(f"'fliqs {name}' is not available yet")

            return missing

    def format_commands(self, ctx, formatter):
        rows = [(name, short) for name, (_, _, short) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fliqs")
def cli():
    """fliqs: mixed-precision (integer + floating-point) quantization search and lowering."""


def main():
    cli(prog_name="fliqs")


if __name__ == "__main__":
    main()
