"""Errors a user can cause. Each carries one actionable line and an exit status.

The CLI prints ``str(err)`` on stderr and exits with ``err.exit_code``; it never shows
a traceback for these (unless ``--debug``).
"""

from __future__ import annotations


class DsdeployError(Exception):
    """Base class: a problem with the user's input or environment, not a bug."""

    exit_code = 2


class SourceError(DsdeployError):
    """A model spec that cannot be resolved or built."""


class WeightsError(DsdeployError):
    """A checkpoint that cannot be read or does not fit the model."""


class ArtifactError(DsdeployError):
    """A ``.dsd`` artifact that is corrupt or of an incompatible format."""


class InputShapeError(DsdeployError):
    """An ``--input-shape`` the model cannot take."""


class PlanError(DsdeployError):
    """Conversion options that cannot be satisfied (bad regex, infeasible budget)."""


class NothingToConvertError(DsdeployError):
    """The plan converts no layer; the message lists each conv's reason."""

    exit_code = 3


class DataError(DsdeployError):
    """A dataset that is missing, empty, or unusable for the requested run."""


class RecipeError(DsdeployError):
    """A recipe file with unknown keys, wrong types or bad values."""


class ExportError(DsdeployError):
    """An ONNX export that failed or a corrupt ONNX file."""


class ParityError(ExportError):
    """Outputs of two runtimes disagree beyond tolerance; lists every failing output."""

    exit_code = 4


class ProviderError(DsdeployError):
    """An execution provider that is unavailable or cannot run the model."""


class DeployError(DsdeployError):
    """A deployment step that failed (quantization, accuracy gate)."""

    exit_code = 5


class OutputError(DsdeployError):
    """An output path the command may not write (an input, the wrong suffix, someone else's file or folder)."""


class ConfigError(DsdeployError):
    """An option value outside its valid range (names the field)."""


class ModelError(DsdeployError):
    """A model whose numbers or structure make it unusable for conversion (names the layer)."""


class CheckpointError(DsdeployError):
    """A training checkpoint that is missing, corrupt, or from a different run."""


class TrainingInterrupted(DsdeployError):
    """SIGINT/SIGTERM during training: nothing partial was saved."""

    exit_code = 130


class StageError(DsdeployError):
    """A pipeline stage failed; the message names the stage, the exit status is the cause's."""

    def __init__(self, stage: str, message: str, exit_code: int = 2) -> None:
        super().__init__(f"stage {stage} failed: {message}")
        self.stage = stage
        self.exit_code = exit_code


class LatencyCacheError(DsdeployError):
    """A latency-table cache file that cannot be read or written."""


class DeviceError(DsdeployError):
    """A device or precision this machine (or this torch build) cannot run (names the field)."""
