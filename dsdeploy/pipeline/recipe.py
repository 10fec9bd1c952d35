"""Conversion recipes: one TOML file per model family or use case, loaded into dataclasses.

``load_recipe(path, overrides)`` reads the file with :mod:`tomllib`, applies
``--set section.key=value`` overrides (values parsed as TOML), checks every key and type
against the schema below and resolves relative paths against the recipe's folder
(override paths against the current folder). Unknown keys and wrong types raise
:class:`RecipeError` naming the key and the file. Nothing in a recipe is ever run by a
shell: specs name Python callables, paths name files.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

import tomllib

from dsdeploy.conversion.plan import Policy
from dsdeploy.errors import DsdeployError, RecipeError
from dsdeploy.export.config import DeployConfig, ExportConfig
from dsdeploy.pipeline.tomltypes import coerce, describe, parse_override, type_name
from dsdeploy.ranges import check_number, parse_duration
from dsdeploy.recover.config import (
    CALIB_BATCHES,
    CALIB_CACHE_MB,
    CALIB_EVAL_IMAGES,
    CALIB_ROUNDS,
    CalibrationParams,
    FinetuneConfig,
    check_device_name,
)
from dsdeploy.recover.evaluate import EvaluateConfig
from dsdeploy.runtime.bench import BenchConfig


@dataclass
class ModelSection:
    """[model]: what to convert (``torchvision:NAME``, ``sample:NAME``, ``pkg.module:factory``)."""

    spec: str = ""
    weights: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    input_shape: list[int] | None = None
    trust_pickle: bool = False
    pythonpath: list[str] = field(default_factory=list)  # folders added to sys.path for user code


@dataclass
class PreprocessSection:
    """[preprocess]: overrides of the model's preprocessing (dsdeploy.data.preprocessing.resolve); unset keys
    come from the model. ``size`` without ``resize`` derives resize from the size; ``resize = 0`` resizes
    straight to ``size``."""

    size: list[int] | None = None
    resize: int | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    channels: int | None = None
    interpolation: str | None = None  # bilinear | bicubic | nearest


# [convert] IS the library's rank policy (dsdeploy.conversion.plan.Policy): one definition, one validation.
ConvertSection = Policy


@dataclass
class CalibrateSection:
    """[calibrate]: least-squares pointwise weights + BatchNorm re-estimation (needs data)."""

    enabled: bool = True
    batches: int = CALIB_BATCHES  # a seeded subset of batches * batch_size training images
    batch_size: int = 64
    ridge: float = 1e-6
    rounds: int = CALIB_ROUNDS  # alternating depthwise/pointwise rounds per layer (0: pointwise only)
    cache_mb: float | str = CALIB_CACHE_MB  # MiB of cached stage inputs (0: none; "auto": half the free memory)
    eval_images: int = CALIB_EVAL_IMAGES  # validation images scored before/after (0: none)
    block_reconstruct: str | float | None = None  # e.g. "90s": label-free block reconstruction afterwards (kept in s)
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps (also where a mac_budget's sensitivity is measured)
    workers: int | None = None  # data loader worker processes (None: 0 on 1-2 CPUs, else min(4, CPUs-1))

    def __post_init__(self) -> None:
        check_device_name(self.device, "calibrate.device")


@dataclass
class FinetuneSection(FinetuneConfig):
    """[finetune]: the library's :class:`FinetuneConfig` itself, validated by it, plus the run's image cap.

    ``time_budget`` may be a duration (``"10m"``, ``"90s"``, ``"1h30m"``) and is kept in seconds;
    ``epochs`` unset means 10, or as many as ``time_budget`` allows.
    """

    epochs: int | None = None
    time_budget: str | float | None = None
    limit: int | None = None  # images per split for this stage (within data.limit)

    # FinetuneConfig fields a recipe does not set, and why (the run sets them)
    RECIPE_EXCLUDED: ClassVar[dict[str, str]] = {
        "seed": "the recipe's top-level seed is used",
        "progress": "the run's --quiet decides",
        "history_path": "the run writes it into its output folder",
        "checkpoint_path": "the run keeps it under OUT/resume to resume",
    }

    def __post_init__(self) -> None:
        if self.time_budget is not None:
            try:
                self.time_budget = parse_duration(self.time_budget, "time budget")
            except DsdeployError as exc:
                raise DsdeployError(f"finetune.time_budget: {exc}") from None
        if self.epochs is None and self.time_budget is None:
            self.epochs = 10
        super().__post_init__()

    def config(self, **run: Any) -> FinetuneConfig:
        """The :class:`FinetuneConfig` to train with: these options plus what the run sets (``run``)."""
        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(FinetuneConfig)}
        return FinetuneConfig(**{**own, **run})


def _with(cfg_cls: type, section: Any, run: dict[str, Any]) -> Any:
    """The library config ``cfg_cls`` from a recipe section (its own fields) plus what the run sets."""
    own = {f.name: getattr(section, f.name) for f in dataclasses.fields(cfg_cls)}
    return cfg_cls(**{**own, **run})


@dataclass
class EvaluateSection(EvaluateConfig):
    """[evaluate]: the library's :class:`EvaluateConfig` (accuracy of the original and of each recovery stage)."""

    enabled: bool = True

    RECIPE_EXCLUDED: ClassVar[dict[str, str]] = {"split": "a run scores the held-out part of its one split"}

    def config(self, **run: Any) -> EvaluateConfig:
        """The :class:`EvaluateConfig` to score with: these options plus what the run sets (``run``)."""
        return _with(EvaluateConfig, self, run)


@dataclass
class ExportSection(ExportConfig):
    """[export]: the library's :class:`ExportConfig` (ONNX export of the original and converted models, each
    gated by parity with torch)."""

    enabled: bool = True

    def config(self, **run: Any) -> ExportConfig:
        """The :class:`ExportConfig` to export with."""
        return _with(ExportConfig, self, run)


@dataclass
class DeploySection(DeployConfig):
    """[deploy]: the library's :class:`DeployConfig` (the bundle: quantization, ORT format, accuracy gate)."""

    enabled: bool = True
    latency_iters: int = 0  # the bundle's own batch-1 latency check (the bench stage measures latency)

    RECIPE_EXCLUDED: ClassVar[dict[str, str]] = {"threads": "the run uses bench.threads"}

    def config(self, **run: Any) -> DeployConfig:
        """The :class:`DeployConfig` to deploy with: these options plus what the run sets (``run``)."""
        return _with(DeployConfig, self, run)


@dataclass
class BenchSection(BenchConfig):
    """[bench]: the library's :class:`BenchConfig` (latency on these execution providers; missing ones are
    reported, not fatal). ``iters`` unset means 50 unless ``duration`` (seconds) is given."""

    enabled: bool = True
    providers: list[str] = field(default_factory=lambda: ["cpu", "openvino"])
    iters: int | None = None

    RECIPE_EXCLUDED: ClassVar[dict[str, str]] = {
        "data": "the run's data.spec is used",
        "seed": "the recipe's top-level seed is used",
        "skip_unavailable": "a run reports missing providers and goes on",
        "preprocess": "the [preprocess] section is used",
    }

    def __post_init__(self) -> None:
        if self.iters is None and self.duration is None:
            self.iters = 50

    def validate(self, name: Any = None) -> None:
        """:meth:`BenchConfig.validate` naming the recipe key (``bench.batches``)."""
        super().validate(name or (lambda f: f"bench.{f}"))

    def config(self, **run: Any) -> BenchConfig:
        """The :class:`BenchConfig` to measure with: these options plus what the run sets (``run``)."""
        return _with(BenchConfig, self, run)


@dataclass
class DataSection:
    """[data]: ``digits`` or a folder of images (None: give ``--data``; data stages are skipped without).

    ``val_split`` and ``limit`` (images per split) make the run's ONE split, used by calibration,
    fine-tuning and evaluation alike and recorded in the report."""

    spec: str | None = None
    val_split: float = 0.2
    limit: int | None = None


@dataclass
class Recipe:
    """A whole recipe. ``path`` is the file it came from (None when built in code)."""

    name: str = ""
    description: str = ""
    seed: int = 0
    model: ModelSection = field(default_factory=ModelSection)
    preprocess: PreprocessSection = field(default_factory=PreprocessSection)
    convert: ConvertSection = field(default_factory=ConvertSection)
    calibrate: CalibrateSection = field(default_factory=CalibrateSection)
    finetune: FinetuneSection = field(default_factory=FinetuneSection)
    evaluate: EvaluateSection = field(default_factory=EvaluateSection)
    export: ExportSection = field(default_factory=ExportSection)
    deploy: DeploySection = field(default_factory=DeploySection)
    bench: BenchSection = field(default_factory=BenchSection)
    data: DataSection = field(default_factory=DataSection)
    path: str | None = None

    def section(self, name: str) -> dict[str, Any]:
        """One section (or a top-level value) as plain data, for hashing and records."""
        value = getattr(self, name)
        if not dataclasses.is_dataclass(value):
            return value
        excluded = getattr(value, "RECIPE_EXCLUDED", {})
        return {k: v for k, v in asdict(value).items() if k not in excluded}

    def to_dict(self) -> dict[str, Any]:
        """The recipe as TOML-able data (what a recipe file may hold)."""
        return {f.name: self.section(f.name) for f in dataclasses.fields(self) if f.name != "path"}


SECTIONS = {f.name: f.type for f in dataclasses.fields(Recipe) if f.name not in ("path",)}
# Keys holding file paths (resolved against the recipe's folder); data/model specs only when they look like paths.
PATH_KEYS = {("model", "weights"), ("model", "pythonpath"), ("model", "spec"), ("data", "spec")}


def _unknown(key: str, known: list[str], where: str, src: str) -> RecipeError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(known)}"
    return RecipeError(f"{src}: unknown key {where}{key!r}{hint}")


def _build(cls: type, table: dict[str, Any], section: str, src: str) -> Any:
    hints = typing.get_type_hints(cls)
    excluded = getattr(cls, "RECIPE_EXCLUDED", {})
    known = [f.name for f in dataclasses.fields(cls) if f.name not in excluded]
    args = {}
    for key, value in table.items():
        if key in excluded:
            raise RecipeError(f"{src}: {section}.{key} cannot be set in a recipe: {excluded[key]}")
        if key not in known:
            raise _unknown(key, known, f"in [{section}] ", src)
        ok, v = coerce(value, hints[key])
        if not ok:
            raise RecipeError(f"{src}: {section}.{key} must be {type_name(hints[key])}, got {describe(value)}")
        args[key] = v
    try:  # the library's config validates itself (messages name section.field)
        obj = cls(**args)
        if hasattr(obj, "validate"):
            dataclasses.replace(obj).validate()  # on a copy: Policy.validate fills in the default rank
    except DsdeployError as exc:
        raise RecipeError(f"{src}: {exc}") from None
    return obj


def recipe_from_dict(data: dict[str, Any], src: str = "<recipe>") -> Recipe:
    """Build and validate a Recipe from parsed TOML (no path resolution)."""
    if not isinstance(data, dict):
        raise RecipeError(f"{src}: a recipe is a TOML table")
    hints = typing.get_type_hints(Recipe)
    args: dict[str, Any] = {}
    for key, value in data.items():
        if key not in SECTIONS:
            raise _unknown(key, list(SECTIONS), "", src)
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise RecipeError(f"{src}: [{key}] must be a table, got {describe(value)}")
            args[key] = _build(tp, value, key, src)
        else:
            ok, v = coerce(value, tp)
            if not ok:
                raise RecipeError(f"{src}: {key} must be {type_name(tp)}, got {describe(value)}")
            args[key] = v
    recipe = Recipe(**args)
    validate(recipe, src)
    return recipe


def validate(r: Recipe, src: str) -> None:
    """Check values (ranges, choices, exclusive options) beyond their types."""
    if not r.model.spec:
        raise RecipeError(f"{src}: model.spec is required (torchvision:NAME, timm:NAME, sample:NAME or pkg.module:factory)")
    if r.model.input_shape is not None and (len(r.model.input_shape) < 3 or min(r.model.input_shape) < 1):
        raise RecipeError(f"{src}: model.input_shape must be positive integers like [1, 3, 224, 224]")
    p = r.preprocess
    if p.size is not None and len(p.size) not in (1, 2):
        raise RecipeError(f"{src}: preprocess.size must be [H, W], got {p.size}")
    if p.channels is not None and p.channels not in (1, 3, 4):
        raise RecipeError(f"{src}: preprocess.channels must be 1, 3 or 4, got {p.channels}")
    if p.interpolation is not None and p.interpolation not in ("bilinear", "bicubic", "nearest"):
        raise RecipeError(f"{src}: preprocess.interpolation must be bilinear, bicubic or nearest, got {p.interpolation!r}")
    if p.resize is not None and p.resize < 0:
        raise RecipeError(f"{src}: preprocess.resize must be >= 0 (0: resize straight to size), got {p.resize}")
    if r.data.limit is not None and r.data.limit < 1:
        raise RecipeError(f"{src}: data.limit must be >= 1, got {r.data.limit}")
    if not 0 <= r.data.val_split < 1:
        raise RecipeError(f"{src}: data.val_split must be in [0, 1), got {r.data.val_split}")
    if r.calibrate.batch_size < 1:
        raise RecipeError(f"{src}: calibrate.batch_size must be >= 1, got {r.calibrate.batch_size}")
    _check_numbers(r, src)


def _check_numbers(r: Recipe, src: str) -> None:
    """The calibrate numbers, checked by the library's own config dataclass, and the seed ([evaluate], [export],
    [deploy], [bench] ARE the library's configs: they validated themselves when built)."""
    c = r.calibrate
    try:
        c.block_reconstruct = CalibrationParams(ridge=c.ridge, max_batches=c.batches, batch_size=c.batch_size,
                                                rounds=c.rounds, cache_mb=c.cache_mb, eval_images=c.eval_images,
                                                block_reconstruct=c.block_reconstruct).block_reconstruct
    except DsdeployError as exc:
        raise RecipeError(f"{src}: {str(exc).replace('calibrate max_batches', 'calibrate.batches')}") from None
    try:
        check_number(r.seed, "seed", low=0, integer=True)
    except DsdeployError as exc:
        raise RecipeError(f"{src}: {exc}") from None


# ----------------------------------------------------------------------------------------------
# loading, overrides, paths
def _resolve(section: str, key: str, value: Any, base: Path) -> Any:
    """``value`` with relative paths made absolute against ``base`` (specs only when they name files)."""
    if (section, key) not in PATH_KEYS or value is None or (section, value) == ("data", "digits") or (
            (section, key) == ("model", "spec") and not str(value).endswith(".dsd")):
        return value
    absolute = lambda v: str((base / Path(v).expanduser()).resolve()) if isinstance(v, str) else v  # noqa: E731
    return [absolute(v) for v in value] if isinstance(value, list) else absolute(value)


def load_recipe(path: str | Path, overrides: Sequence[str | tuple[str, str, Any]] = (), *,
                cwd: str | Path | None = None) -> Recipe:
    """Read, override, validate and resolve a recipe file.

    Args:
        path: the TOML file.
        overrides: ``section.key=value`` strings; values are TOML (``2``, ``"x"``, ``[1, 2]``,
            ``true``), or a bare string when not valid TOML; or ``(section, key, value)`` tuples
            (``--data``/``--weights``). Paths in overrides resolve against ``cwd``.
        cwd: folder for override paths (default: the current folder).

    Raises:
        RecipeError: missing/unreadable file, TOML syntax, unknown keys, wrong types or bad values.
    """
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"recipe not found: {p}")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{p}: not valid TOML ({exc})") from None
    for section, table in data.items():
        if isinstance(table, dict):
            table.update({k: _resolve(section, k, v, p.resolve().parent) for k, v in table.items()})
    base = Path(cwd) if cwd is not None else Path.cwd()
    for item in overrides:
        parts, value = parse_override(item) if isinstance(item, str) else (list(item[:-1]), item[-1])
        text = item if isinstance(item, str) else ".".join(parts)
        if len(parts) == 1:
            data[parts[0]] = value
            continue
        section, key = parts
        table = data.setdefault(section, {})
        if not isinstance(table, dict):
            raise RecipeError(f"--set {text!r}: {section} is not a section")
        table[key] = _resolve(section, key, value, base.resolve())
    recipe = recipe_from_dict(data, str(p))
    recipe.path = str(p.resolve())
    return recipe
