"""The recovery stages' numeric options and their one set of defaults (light: no torch import).

Recipes, the CLI and the library read the defaults from here, so each is defined once.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from dsdeploy.errors import DsdeployError
from dsdeploy.ranges import check_number, parse_duration
from dsdeploy.recover.schedule import Schedule

WARMUP_EPOCHS = 0.2  # default LR warmup: a fifth of an epoch, at most a tenth of the run (0: none)
CALIB_BATCHES = 50  # calibration batches by default: [calibrate] batches, convert/calibrate CLI, library
CALIB_ROUNDS = 3  # alternating (depthwise + pointwise) rounds per layer after the pointwise solve
CALIB_CACHE_MB = "auto"  # cached stage inputs during calibration: "auto" (a share of free memory) or MiB
CALIB_EVAL_IMAGES = 2000  # validation images scored before and after calibration (0: no scoring)
DEVICE_NAME = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
PRECISION_NAMES = ("fp32", "bf16", "fp16")


def check_device_name(value: Any, field: str) -> None:
    """Refuse, in one line naming ``field``, a device name that is not auto, cpu, cuda, cuda:N or mps.

    Only the spelling is checked here (no torch import); whether this machine has the device is
    decided when a stage runs (:func:`dsdeploy.recover.device.resolve_device`).
    """
    if not isinstance(value, str) or not DEVICE_NAME.match(value.strip().lower()):
        raise DsdeployError(f"{field} must be one of auto, cpu, cuda, cuda:N, mps, got {value!r}")


def check_precision_name(value: Any, field: str) -> None:
    """Refuse, in one line naming ``field``, a precision other than fp32, bf16, fp16."""
    if value not in PRECISION_NAMES:
        raise DsdeployError(f"{field} must be one of {', '.join(PRECISION_NAMES)}, got {value!r}")


@dataclass
class CalibrationParams:
    """The numeric options of calibration, validated on construction (one line naming the field).

    Attributes:
        ridge: relative ridge of the least squares, ``>= 0`` and finite.
        max_batches: use at most this many batches (None: all), ``>= 1``.
        batch_size: images per calibration batch, ``>= 1``.
        rounds: alternating least-squares rounds per layer (a depthwise solve, then a pointwise
            solve) after the first pointwise solve, ``>= 0`` (0: pointwise weights only).
        cache_mb: MiB of stage inputs cached to avoid rerunning the network prefix per layer,
            ``>= 0`` (0: no cache; same result, slower on deep models), or ``"auto"`` (the default):
            half the memory available when calibration starts (``MemAvailable``, within a cgroup's
            limit; 1024 MiB where neither can be read; :func:`dsdeploy.recover.stagecache.cache_budget_mb`).
        block_reconstruct: seconds for label-free block reconstruction after the least squares
            and BatchNorm re-estimation (:mod:`dsdeploy.recover.blockrec`); a duration such as
            ``"90s"`` or ``"2m"`` is converted to seconds; None, 0, ``"0"`` or ``"off"``: off (the
            default: it costs the time it is given, which only the user can weigh).
        eval_images: score top-1 before and after calibration on at most this many validation
            images (the first of the split), ``>= 0`` (0: no scoring).
        device: where the networks run: auto (CUDA when present, else CPU), cpu, cuda, cuda:N, mps.
            The least-squares sums are float64 wherever the device has float64 (MPS has not).
        workers: DataLoader worker processes reading the images (None: ``dsdeploy.data.loader.default_workers``).
    """

    ridge: float = 1e-6
    max_batches: int | None = CALIB_BATCHES
    batch_size: int = 64
    rounds: int = CALIB_ROUNDS
    cache_mb: float | str = CALIB_CACHE_MB
    block_reconstruct: float | str | None = None
    eval_images: int = CALIB_EVAL_IMAGES
    device: str = "auto"
    workers: int | None = None

    def __post_init__(self) -> None:
        self.block_reconstruct = block_budget(self.block_reconstruct)
        check_device_name(self.device, "calibrate.device")
        check_number(self.ridge, "calibrate ridge", low=0)
        check_number(self.max_batches, "calibrate max_batches", low=1, integer=True, optional=True)
        check_number(self.batch_size, "calibrate batch_size", low=1, integer=True)
        check_number(self.rounds, "calibrate.rounds", low=0, integer=True)
        self.cache_mb = cache_size(self.cache_mb)
        check_number(self.eval_images, "calibrate.eval_images", low=0, integer=True)
        check_number(self.workers, "calibrate.workers", low=0, integer=True, optional=True)

    def fit(self) -> dict[str, Any]:
        """The least-squares fit's options as keyword arguments of :func:`dsdeploy.recover.reconstruct.calibrate`."""
        return {"rounds": self.rounds, "cache_mb": self.cache_mb, "eval_images": self.eval_images,
                "device": self.device}


def cache_size(value: float | str, field: str = "calibrate.cache_mb") -> float | str:
    """A stage-cache size: ``"auto"``, or MiB ``>= 0`` (a number or a numeric string); else a one-line error."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return "auto"
        try:
            value = float(text)
        except ValueError:
            raise DsdeployError(f"{field} must be 'auto' or a number of MiB >= 0, got {value!r}") from None
    check_number(value, field, low=0)
    return value


def block_budget(value: float | str | None, field: str = "calibrate.block_reconstruct") -> float | None:
    """A block-reconstruction time budget in seconds: None when off (None, 0, "0", "off", "none", "")."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "0", "off", "none")):
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0:
        return None
    return parse_duration(value, field)


MODES = ("none", "partial", "full")
# options that may change between a run and its resume (the stored schedule fixes the step count)
# (a resume may move to another device: the run continues, bit-exact only on the same one;
# nproc: the processes a run has are compared on resume as the checkpoint's world size instead)
NOT_TRAJECTORY = ("progress", "history_path", "checkpoint_path", "time_budget", "device", "nproc", "workers")


@dataclass
class FinetuneConfig:
    """Every fine-tuning option (defaults suit a calibrated student and its original as teacher)."""

    mode: str = "full"  # none | partial (DS blocks + their norms) | full
    epochs: int | None = 10
    time_budget: float | None = None  # seconds; sizes the schedule instead of `epochs`
    batch_size: int = 64
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # step | cosine | cosine-restarts | constant
    warmup_epochs: float = WARMUP_EPOCHS  # linear from lr/10; capped at a tenth of the run's steps; 0: none
    kd_weight: float = 1.0
    feature_weight: float = 0.0
    ce_weight: float = 0.5
    temperature: float = 4.0
    clip_grad: float | None = 5.0
    init: str = "he"  # xavier | he | none: for parameters not initialised from the original
    reinit: str | None = None  # regex of module names to treat as not from the original
    patience: int | None = None  # epochs without val improvement before stopping
    augment: bool = False
    workers: int | None = None  # DataLoader worker processes (None: 0 on 1-2 CPUs, else min(4, cpus-1))
    channels_last: bool = True  # NHWC while training: ~2x faster convs on CPU; the model is given back NCHW
    device: str = "auto"  # auto (CUDA when present, else CPU) | cpu | cuda | cuda:N | mps
    precision: str = "fp32"  # fp32 | bf16 | fp16: autocast of the forward pass (fp16 with a gradient scaler)
    seed: int = 0
    progress: bool = True
    history_path: str | None = None
    checkpoint_path: str | None = None
    nproc: int = 1  # > 1: start this many data-parallel worker processes on this machine (batch_size is split)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise a DsdeployError naming the first option out of range (NaN/inf always are)."""
        if self.mode not in MODES:
            raise DsdeployError(f"finetune.mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.optimizer not in ("sgd", "adamw"):
            raise DsdeployError(f"finetune.optimizer must be one of sgd, adamw, got {self.optimizer!r}")
        if self.init not in ("xavier", "he", "none"):
            raise DsdeployError(f"finetune.init must be one of xavier, he, none, got {self.init!r}")
        if self.reinit is not None:
            try:
                re.compile(self.reinit)
            except re.error as exc:
                raise DsdeployError(f"finetune.reinit is not a valid regular expression: {exc}") from None
        check_number(self.epochs, "finetune.epochs", low=0, integer=True, optional=True)
        check_number(self.time_budget, "finetune.time_budget (seconds)", low=0, low_open=True, optional=True)
        if self.mode != "none" and not self.epochs and not self.time_budget:
            raise DsdeployError(f"finetune.epochs must be >= 1 unless finetune.time_budget is set, got {self.epochs}")
        check_number(self.batch_size, "finetune.batch_size", low=1, integer=True)
        check_number(self.lr, "finetune.lr", low=0, low_open=True)
        check_number(self.momentum, "finetune.momentum", low=0, high=1, high_open=True)
        check_number(self.weight_decay, "finetune.weight_decay", low=0)
        check_number(self.warmup_epochs, "finetune.warmup_epochs", low=0)
        for name in ("kd_weight", "feature_weight", "ce_weight"):
            check_number(getattr(self, name), f"finetune.{name}", low=0)
        if self.kd_weight + self.feature_weight + self.ce_weight <= 0:
            raise DsdeployError("finetune kd_weight, feature_weight and ce_weight are all 0: nothing to train for")
        check_number(self.temperature, "finetune.temperature", low=0, low_open=True)
        check_number(self.clip_grad, "finetune.clip_grad (0 or None disables it)", low=0, optional=True)
        check_number(self.patience, "finetune.patience", low=0, integer=True, optional=True)
        check_number(self.seed, "finetune.seed", low=0, integer=True)
        check_device_name(self.device, "finetune.device")
        check_precision_name(self.precision, "finetune.precision")
        check_number(self.nproc, "finetune.nproc", low=1, integer=True)
        check_number(self.workers, "finetune.workers", low=0, integer=True, optional=True)
        Schedule(self.schedule, self.lr)

    def trajectory(self) -> dict[str, Any]:
        """The options that determine the weights (compared on resume)."""
        return {k: v for k, v in asdict(self).items() if k not in NOT_TRAJECTORY}


@dataclass
class FinetuneResult:
    """Outcome: what the model scored before and after, why it stopped, where the time went.

    The returned model is the best of the input (epoch 0) and every trained epoch, by the
    measure named in ``checked_on`` (:mod:`dsdeploy.recover.check`); ties keep the input.

    Attributes:
        best_accuracy: top-1 of the returned model on the checked images (None: not an accuracy measure).
        best_epoch: the epoch returned (0: the input, unchanged).
        stopped: completed | early-stop | budget | none.
        accuracy_before / teacher_accuracy: top-1 of the input / the teacher on the same images.
        seconds: wall time from the clock's start (the command's, for ``dsdeploy finetune``) to the end.
        decode_seconds / train_seconds / eval_seconds: data preparation, training steps, evaluations.
        kept_input: no trained epoch beat the input: the model returned is the input, unchanged.
        worse_than_input: the last trained epoch scored below the input (the input or a better epoch is returned).
        warning: one line for the user when ``kept_input`` or ``worse_than_input`` (else None).
        checked_on: the measure that picked the model, in words.
        score_before / best_score: that measure for the input and the returned model (higher is better).
        time_budget: the budget in seconds (None: sized by epochs).
        processes: how many data-parallel processes trained the model (1: this one alone).
    """

    best_accuracy: float | None
    best_epoch: int
    epochs: int
    steps: int
    stopped: str  # completed | early-stop | budget | none
    accuracy_before: float | None
    teacher_accuracy: float | None
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: str | None = None
    history_file: str | None = None
    resumed_from: int | None = None
    split: dict[str, Any] | None = None  # the data split used (dsdeploy.data.labels.split_record)
    decode_seconds: float = 0.0
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    kept_input: bool = False
    worse_than_input: bool = False
    warning: str | None = None
    checked_on: str | None = None
    score_before: float | None = None
    best_score: float | None = None
    time_budget: float | None = None
    processes: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def history_entry(self, config: FinetuneConfig, **extra: Any) -> dict[str, Any]:
        """The artifact history record ``{"stage": "finetune", ...}``."""
        d = {k: v for k, v in self.to_dict().items() if k not in ("history", "checkpoint", "history_file")}
        return {"stage": "finetune", **d, "config": config.trajectory(), **extra}
