"""How a fine-tune scores a model against its input: the one measure that picks the weights returned.

Higher is better. Labelled validation images: top-1 accuracy. Unlabelled validation
images: minus the KL divergence from the teacher's predictions (the distillation loss at
temperature 1). No validation split: the same measures on a fixed subset of the training
images without augmentation, which catches a run that diverged but cannot see
over-fitting; :attr:`ModelCheck.basis` says which one was used. Under a time budget the
check may use only the first batches of those images (:meth:`ModelCheck.fit_to`), the same
ones for the input and every epoch.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Subset

from dsdeploy.data.datasets import make_loader
from dsdeploy.recover.metrics import evaluate, scored_batches

TRAIN_SUBSET = 1024  # training images scored when there is no validation split


@dataclass
class ModelCheck:
    """Scores models on fixed images (see the module notes); build it with :func:`model_check`.

    Attributes:
        basis: what the score is, in words (shown in results and warnings).
        accuracy: whether the score is a top-1 accuracy (else minus a KL divergence).
        held_out: whether the images are a validation split (not trained on).
        max_batches: score on at most this many batches (None: all).
        precision: autocast of the scoring forward passes (fp32 | bf16 | fp16), as the training's.
    """

    basis: str
    accuracy: bool
    held_out: bool
    loader: Any = field(repr=False)
    teacher: nn.Module | None = field(default=None, repr=False)
    _targets: list[torch.Tensor] | None = field(default=None, repr=False)
    max_batches: int | None = None
    precision: str = "fp32"

    def score(self, model: nn.Module, channels_last: bool = False) -> float | None:
        """The score of ``model`` (higher is better; None when nothing could be scored)."""
        if self.accuracy:
            return evaluate(model, self.loader, self.max_batches, channels_last=channels_last,
                            precision=self.precision)
        if self._targets is None:
            self._targets = [F.softmax(out, 1) for out in _outputs(self.teacher, self.loader, channels_last,
                                                                    self.max_batches, self.precision)]
        kl = n = 0.0
        for p_t, out in zip(self._targets, _outputs(model, self.loader, channels_last, self.max_batches,
                                                    self.precision)):
            kl += float(F.kl_div(F.log_softmax(out, 1), p_t, reduction="sum"))
            n += out.shape[0]
        return -kl / n if n else None

    def fit_to(self, model: nn.Module, seconds: float, channels_last: bool = False) -> None:
        """Use only as many batches as score ``model`` in about ``seconds`` (at least one; says so in ``basis``)."""
        batches = len(self.loader)
        t = time.perf_counter()
        evaluate(model, self.loader, 1, channels_last=channels_last, precision=self.precision)
        fit = max(1, int(seconds / max(time.perf_counter() - t, 1e-6)))
        if fit < batches:
            images = min(fit * (self.loader.batch_size or 1), len(self.loader.dataset))
            self.max_batches = fit
            self.basis += f" (on the first {images} of {len(self.loader.dataset)} images, to fit the time budget)"

    def describe(self, score: float | None) -> str:
        """``score`` in words: ``81.20%`` or ``KL 0.0312``."""
        if score is None:
            return "-"
        return f"{100 * score:.2f}%" if self.accuracy else f"KL {-score:.4f}"


def _outputs(model: nn.Module, loader: Any, channels_last: bool, max_batches: int | None,
             precision: str = "fp32") -> list[torch.Tensor]:
    """The model's scores per batch, by the one evaluation loop (:func:`dsdeploy.recover.metrics.scored_batches`)."""
    return [out for _y, out in scored_batches(model, loader, max_batches=max_batches, channels_last=channels_last,
                                              precision=precision)]


def _plain(dataset: Any) -> Any:
    """``dataset`` without its training augmentation (a shallow copy sharing the decoded images)."""
    if getattr(dataset, "augment", False):
        dataset = copy.copy(dataset)
        dataset.augment = False
    return dataset


def model_check(data: Any, teacher: nn.Module | None, labelled: bool, batch_size: int = 256) -> ModelCheck:
    """The measure for ``data`` (a DataSplits): see the module notes for the choice.

    ``teacher`` may be None only with ``labelled`` data.
    """
    if data.val is not None and len(data.val):
        images, held_out, where = data.val, True, "validation"
    else:
        n = min(len(data.train), TRAIN_SUBSET)
        images, held_out = Subset(_plain(data.train), range(n)), False
        where = f"{n} training images (no validation split: a check for divergence, not over-fitting)"
    loader = make_loader(images, batch_size, shuffle=False)
    if labelled:
        return ModelCheck(f"{where} accuracy" if held_out else f"accuracy on {where}", True, held_out, loader)
    return ModelCheck(f"{where} distillation loss (KL to the teacher; no labels)" if held_out
                      else f"distillation loss (KL to the teacher) on {where}", False, held_out, loader, teacher)
