"""The ``dsdeploy`` command line: a thin layer over the library.

Each command parses its options, calls one library function and prints. Errors a user
can cause (``DsdeployError``) become one line on stderr and a non-zero exit status; a
traceback is shown only with ``--debug``.
"""

from __future__ import annotations

import importlib
import re

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


# Library messages name a field as ``section.field``, ``snake_case_argument`` or ``argument=True``;
# on the command line the same value is a flag. One rule maps them: a name that is a parameter of
# the command being run becomes its flag (``convert.mac_budget`` -> ``--mac-budget``); the
# config fields whose parameter is named otherwise are listed here.
PARAM_OF = {"bench.batches": "batch", "finetune.history_path": "history", "calibrate.max_batches": "calib_batches",
            "calibrate.cache_mb": "calib_cache_mb"}
SECTIONS = ("convert", "calibrate", "finetune", "evaluate", "export", "deploy", "bench", "preprocess")
_FIELD = re.compile(r"(?<![\w./-])(?:(?P<section>" + "|".join(SECTIONS) +
                    r")\.)?(?P<name>[a-z][a-z0-9]*(?:_[a-z0-9]+)*)(?P<value>=(?:True|False))?(?![\w/-])")


def flag_names(text: str, command: click.Command | None = None) -> str:
    """``text`` with the library's field/argument names replaced by ``command``'s flags (default: the
    command being run); names the command has no flag for are kept."""
    if command is None:
        ctx = click.get_current_context(silent=True)
        command = ctx.command if ctx is not None else None
    if command is None:
        return text
    options = {p.name: p for p in command.params if isinstance(p, click.Option)}

    def flag(m: re.Match) -> str:
        name, section = m["name"], m["section"]
        if not (section or "_" in name or m["value"]):
            return m[0]
        opt = options.get(name) or options.get(PARAM_OF.get(f"{section}.{name}", ""))
        longs = [o for o in opt.opts if o.startswith("--")] if opt is not None else []
        if not longs:
            return m[0]
        if m["value"] == "=False" and opt.secondary_opts:
            return opt.secondary_opts[0]
        return longs[0]

    return _FIELD.sub(flag, text)


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
            sub = self.commands.get(ctx.invoked_subcommand or "")
            click.echo(f"error: {flag_names(str(exc), sub) if sub is not None else exc}", err=True)
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

    MODEL arguments accept: torchvision:NAME, timm:NAME, sample:NAME, pkg.module:factory, or a
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
