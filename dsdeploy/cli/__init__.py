"""The ``dsdeploy`` command line: a thin layer over the library.

Each command parses its options, calls one library function and prints. Errors a user
can cause (``DsdeployError``) become one line on stderr and a non-zero exit status; a
traceback is shown only with ``--debug``.
"""

from __future__ import annotations

import importlib

import click

from dsdeploy.errors import DsdeployError
from dsdeploy.version import __version__

# Modules that register commands on ``cli``; imported lazily by ``main`` so that
# importing this package stays cheap. Each holds only argument parsing and printing.
COMMAND_MODULES = (
    "dsdeploy.cli.model_cmds",
    "dsdeploy.cli.recover_cmds",
    "dsdeploy.cli.export_cmds",
    "dsdeploy.cli.bench_cmds",
    "dsdeploy.cli.latency_cmds",
    "dsdeploy.cli.run_cmds",
)


class DsdeployGroup(click.Group):
    """A click group that turns errors into one line on stderr and an exit status."""

    def invoke(self, ctx: click.Context):
        debug = bool(ctx.params.get("debug"))
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            ctx.exit(130)
        except DsdeployError as exc:
            if debug:
                raise
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except Exception as exc:  # a bug, not a user error: still one line unless --debug
            if debug:
                raise
            lines = str(exc).strip().splitlines()
            click.echo(f"internal error: {type(exc).__name__}: {lines[0] if lines else ''} "
                       f"(rerun with --debug for the traceback)", err=True)
            ctx.exit(70)


@click.group(cls=DsdeployGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.version_option(__version__, prog_name="dsdeploy")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """dsdeploy: rewrite a pretrained CNN's convolutions into depthwise-separable
    blocks, recover its accuracy, export it to ONNX and benchmark it on ONNX Runtime
    execution providers side by side with the original.

    MODEL arguments accept: torchvision:NAME, sample:NAME, pkg.module:factory, or a
    .dsd artifact written by `dsdeploy convert`.
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def load_commands() -> click.Group:
    """Import every command module (registering its commands) and return the group."""
    for name in COMMAND_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
    return cli


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    load_commands()
    cli.main(args=argv, prog_name="dsdeploy")
