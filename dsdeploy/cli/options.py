"""Options shared by several commands, and small printing helpers."""

from __future__ import annotations

import json
from typing import Any, Callable

import click

from dsdeploy.errors import InputShapeError


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    """``"1,3,224,224"`` -> ``(1, 3, 224, 224)``; raises InputShapeError on bad text."""
    if text is None or text == "":
        return None
    try:
        dims = tuple(int(t) for t in text.replace("x", ",").split(",") if t.strip())
    except ValueError:
        raise InputShapeError(f"--input-shape must be comma-separated integers like 1,3,224,224, got {text!r}") from None
    if not dims or any(d <= 0 for d in dims):
        raise InputShapeError(f"--input-shape must hold positive integers, got {text!r}")
    return dims


def parse_kwargs(text: str | None) -> dict[str, Any]:
    """Parse ``--model-kwargs`` JSON into a dict (empty when not given)."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON ({exc.msg})", param_hint="--model-kwargs") from None
    if not isinstance(value, dict):
        raise click.BadParameter("must be a JSON object", param_hint="--model-kwargs")
    return value


def trust_code_option(func: Callable) -> Callable:
    """Add --trust-code (-> the library's ``trust_code``): import the factory a .dsd records."""
    return click.option("--trust-code", is_flag=True,
                        help="Import and call the pkg.module:factory a .dsd artifact records (runs code named "
                             "in the file!). Not needed for torchvision:/sample: sources.")(func)


def model_options(func: Callable) -> Callable:
    """Add --weights, --model-kwargs, --trust-pickle, --trust-code and --input-shape."""
    opts = [
        click.option("--weights", type=click.Path(dir_okay=False), default=None,
                     help="Checkpoint file (state_dict, possibly nested under state_dict/model/net)."),
        click.option("--model-kwargs", default=None, metavar="JSON",
                     help='Keyword arguments for the model builder, e.g. \'{"num_classes": 10}\'.'),
        click.option("--trust-pickle", is_flag=True,
                     help="Allow --weights to be a whole pickled model (runs code from the file!)."),
        click.option("--input-shape", default=None, metavar="N,C,H,W",
                     help="Input shape for profiling/export; defaults to the model's own or 1,3,224,224."),
        trust_code_option,
    ]
    for opt in reversed(opts):
        func = opt(func)
    return func


def echo_json(obj: Any) -> None:
    """Print ``obj`` as JSON on stdout."""
    click.echo(json.dumps(obj, indent=2, default=str))
