"""Options shared by several commands, and small printing helpers."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from typing import Any, Callable, Iterator

import click

from dsdeploy.cli import flag_names
from dsdeploy.errors import InputShapeError

# dsdeploy.export.config.PRECISIONS, spelled out here: importing it would load torch for `--help`
PRECISIONS = ("fp32", "int8", "int8-dynamic")


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


def workers_option(func: Callable) -> Callable:
    """Add --workers N (-> the stage config's ``workers``): DataLoader worker processes."""
    return click.option("--workers", type=int, default=None, metavar="N",
                        help="Data loader worker processes decoding images (default: 0 on 1-2 CPUs, else "
                             "min(4, CPUs-1)); results do not depend on it.")(func)


def block_reconstruct_option(func: Callable) -> Callable:
    """Add --block-reconstruct DURATION (-> CalibrationParams.block_reconstruct)."""
    return click.option("--block-reconstruct", default=None, metavar="DURATION",
                        help="After calibrating, fit each converted block to the original's outputs (label-free, "
                             "Adam) for this long in all, e.g. 90s or 2m (default: off).")(func)


def device_option(func: Callable) -> Callable:
    """Add --device (-> the stage config's ``device``): auto | cpu | cuda | cuda:N | mps."""
    return click.option("--device", default="auto", show_default=True, metavar="DEVICE",
                        help="auto, cpu, cuda, cuda:N or mps: where the model runs on the data (auto: CUDA "
                             "when present, else the CPU).")(func)


def precision_option(func: Callable) -> Callable:
    """Add --precision (-> the stage config's ``precision``): fp32 | bf16 | fp16 autocast."""
    return click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32",
                        show_default=True, metavar="PRECISION",
                        help="fp32, bf16 or fp16: autocast of the forward passes (fp16 with a gradient "
                             "scaler); the weights and the artifact stay fp32.")(func)


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


def _floats(text: str | None, flag: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise click.BadParameter(f"must be comma-separated numbers, got {text!r}", param_hint=flag) from None


def _ints(text: str | None, flag: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(int(t) for t in text.replace("x", ",").split(",") if t.strip())
    except ValueError:
        raise click.BadParameter(f"must be integers like 224 or 224,224, got {text!r}", param_hint=flag) from None
    if not values or len(values) > 2 or min(values) <= 0:
        raise click.BadParameter(f"must be one or two positive integers (H,W), got {text!r}", param_hint=flag)
    return values


class _PrintOnce(logging.Handler):
    """Prints each distinct preprocessing line once on stderr (field names as the command's flags)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seen: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        line = flag_names(record.getMessage())
        if line not in self.seen:
            self.seen.add(line)
            click.echo(line, err=True)


@contextlib.contextmanager
def print_preprocessing() -> Iterator[None]:
    """While active, each distinct resolved-preprocessing line (logger ``dsdeploy.data.preprocessing``)
    is printed once on stderr."""
    logger = logging.getLogger("dsdeploy.data.preprocessing")
    handler = _PrintOnce()
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def preprocess_options(func: Callable) -> Callable:
    """Add --size, --resize, --mean, --std, --channels, --interpolation; the command gets ``preprocess`` (a dict of the
    keys given, for ``dsdeploy.data.preprocessing.resolve``) and the resolved preprocessing is printed once."""
    opts = [
        click.option("--size", default=None, metavar="H[,W]", help="Model input size (default: the model's own, "
                     "else its input shape)."),
        click.option("--resize", default=None, metavar="N|none",
                     help="Resize the shorter side to N then center-crop --size ('none': resize straight to size; "
                          "default derived from the size)."),
        click.option("--mean", default=None, metavar="M[,M,M]", help="Per-channel mean after scaling to [0,1]."),
        click.option("--std", default=None, metavar="S[,S,S]", help="Per-channel std after scaling to [0,1]."),
        click.option("--channels", type=click.Choice(["1", "3", "4"]), default=None,
                     help="Image channels: 1 gray, 3 RGB, 4 RGBA (default: the model's)."),
        click.option("--interpolation", type=click.Choice(["bilinear", "bicubic", "nearest"]), default=None,
                     help="Resampling of every resize (default: the model's, else bilinear)."),
    ]

    @functools.wraps(func)
    def wrapper(*args: Any, size=None, resize=None, mean=None, std=None, channels=None, interpolation=None,
                **kwargs: Any):
        pre: dict[str, Any] = {}
        if size is not None:
            pre["size"] = _ints(size, "--size")
        if resize is not None:
            pre["resize"] = 0 if resize.strip().lower() in ("none", "0") else _ints(resize, "--resize")[0]
        if mean is not None:
            pre["mean"] = _floats(mean, "--mean")
        if std is not None:
            pre["std"] = _floats(std, "--std")
        if channels is not None:
            pre["channels"] = int(channels)
        if interpolation is not None:
            pre["interpolation"] = interpolation
        with print_preprocessing():
            return func(*args, preprocess=pre or None, **kwargs)

    for opt in reversed(opts):
        wrapper = opt(wrapper)
    return wrapper
