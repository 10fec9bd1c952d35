"""The ``dsdeploy`` command line: a thin layer over the library.

Each command parses its options, calls one library function and prints. Errors a user
can cause (``DsdeployError``) become one line on stderr and a non-zero exit status; a
traceback is shown only with ``--debug``.
"""

from __future__ import annotations

import importlib
import sys

import click

from dsdeploy import __version__
from dsdeploy.errors import DsdeployError

# Modules that register commands on ``cli``; imported lazily by ``main`` so that
# importing this package stays cheap. Each holds only argument parsing and printing.
COMMAND_MODULES = (
    "dsdeploy.cli.model_cmds",
    "dsdeploy.cli.recover_cmds",
    "dsdeploy.cli.export_cmds",
    "dsdeploy.cli.bench_cmds",
    "dsdeploy.cli.run_cmds",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
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
    """Console-script entry point: run the CLI, turning user errors into one line."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    load_commands()
    try:
        rv = cli.main(args=args, prog_name="dsdeploy", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("error: interrupted", err=True)
        sys.exit(130)
    except DsdeployError as exc:
        if debug:
            raise
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except Exception as exc:  # a bug, not a user error: still one line unless --debug
        if debug:
            raise
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        click.echo(f"internal error: {type(exc).__name__}: {msg} (rerun with --debug for the traceback)", err=True)
        sys.exit(70)
    sys.exit(rv if isinstance(rv, int) else 0)
