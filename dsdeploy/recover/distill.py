"""Distillation from the original model: losses and the teacher/student wiring.

The loss is ``kd * T^2 * KL(softmax(t/T) || softmax(s/T)) + feature * mean relative MSE
(block outputs) + ce * CE(s, y)``; the cross-entropy only counts labelled items (label >= 0),
and the feature term compares each replaced block's output in the student with the
output of the original conv it replaced, in the teacher (captured by forward hooks).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from dsdeploy.conversion.artifact import load_source_model
from dsdeploy.conversion.block import DSConv, ds_blocks
from dsdeploy.conversion.loading import load_model
from dsdeploy.errors import ArtifactError
from dsdeploy.recover.metrics import evaluate  # noqa: F401  (re-exported: reconstruct.py, finetune.py import it from here)


@dataclass
class LossWeights:
    """Weights of the three loss terms and the distillation temperature."""

    kd: float = 1.0
    feature: float = 0.0
    ce: float = 0.5
    temperature: float = 4.0


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Temperature-scaled KL divergence, multiplied by T^2 (Hinton et al.), batch mean."""
    t = temperature
    log_p = F.log_softmax(student_logits / t, dim=1)
    log_q = F.log_softmax(teacher_logits / t, dim=1)
    return F.kl_div(log_p, log_q, reduction="batchmean", log_target=True) * (t * t)


def feature_loss(student_out: torch.Tensor, teacher_out: torch.Tensor) -> torch.Tensor:
    """MSE between a replaced block's output and the original conv's, relative to the latter's mean square.

    Normalising makes layers of any scale count alike (the quantity calibration minimises).
    """
    return F.mse_loss(student_out, teacher_out) / teacher_out.detach().square().mean().clamp_min(1e-12)


class FeatureTaps:
    """Forward hooks capturing the outputs of named modules (kept while the taps are active)."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name: str):
        def hook(_mod, _args, out):
            self.outputs[name] = out
        return hook

    def clear(self) -> None:
        self.outputs.clear()

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.outputs.clear()


class Distiller(nn.Module):
    """Student + frozen teacher -> (loss, student logits, loss parts) for one batch.

    The teacher runs in eval mode without gradients. Feature taps are installed only
    when ``weights.feature > 0``, on the student's DS blocks (or ``layers``) and the
    teacher's modules of the same names (the original convs they replaced). ``runner``: what
    the student's forward pass goes through (its DistributedDataParallel wrapper; default the student).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None, weights: LossWeights,
                 layers: list[str] | None = None, runner: nn.Module | None = None) -> None:
        super().__init__()
        self.student, self.weights = student, weights
        self.runner = [runner if runner is not None else student]  # a list: not a submodule
        self.teacher = [teacher]  # a list: keeps the teacher out of this module's parameters/state_dict
        if teacher is not None:
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
        self.s_taps = self.t_taps = None
        if weights.feature > 0 and teacher is not None:
            t_names = dict(teacher.named_modules())
            names = [n for n in (layers if layers is not None else list(ds_blocks(student))) if n in t_names]
            self.s_taps = FeatureTaps({n: student.get_submodule(n) for n in names})
            self.t_taps = FeatureTaps({n: teacher.get_submodule(n) for n in names})

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor,
                                                                               dict[str, float]]:
        w = self.weights
        teacher = self.teacher[0]
        need_teacher = teacher is not None and (w.kd > 0 or self.s_taps is not None)
        if need_teacher:
            with torch.no_grad():
                t_logits = teacher(x)
        logits = self.runner[0](x)
        total = logits.new_zeros(())
        parts: dict[str, float] = {}
        if need_teacher and w.kd > 0 and t_logits.shape == logits.shape:
            kd = kd_loss(logits, t_logits, w.temperature)
            total = total + w.kd * kd
            parts["kd"] = float(kd.detach())
        if self.s_taps is not None:
            feats = [feature_loss(self.s_taps.outputs[n], self.t_taps.outputs[n]) for n in self.s_taps.outputs]
            if feats:
                fl = torch.stack(feats).mean()
                total = total + w.feature * fl
                parts["feature"] = float(fl.detach())
            self.s_taps.clear()
            self.t_taps.clear()
        if y is not None and w.ce > 0:
            mask = y >= 0
            if bool(mask.any()):
                ce = F.cross_entropy(logits[mask], y[mask])
                total = total + w.ce * ce
                parts["ce"] = float(ce.detach())
        return total, logits, parts

    def close(self) -> None:
        for taps in (self.s_taps, self.t_taps):
            if taps is not None:
                taps.close()


def call_order(model: nn.Module, x: torch.Tensor) -> list[str]:
    """Names of leaf modules (DSConv counted as a leaf) in the order one forward pass calls them."""
    order: list[str] = []
    handles = []
    ds = list(ds_blocks(model))
    for name, mod in model.named_modules():
        inside_ds = any(name.startswith(n + ".") for n in ds)
        if name and not inside_ds and (isinstance(mod, DSConv) or not list(mod.children())):
            handles.append(mod.register_forward_pre_hook(lambda _m, _a, n=name: order.append(n)))
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return order


def following_norms(model: nn.Module, x: torch.Tensor) -> dict[str, str]:
    """For each DSConv, the normalisation layer called right after it (when it has matching width)."""
    order = call_order(model, x)
    out: dict[str, str] = {}
    for i, name in enumerate(order[:-1]):
        block = model.get_submodule(name)
        if isinstance(block, DSConv):
            nxt = model.get_submodule(order[i + 1])
            if isinstance(nxt, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)) and \
                    getattr(nxt, "num_features", getattr(nxt, "num_channels", None)) == block.out_channels:
                out[name] = order[i + 1]
    return out


def fresh_parameters(student: nn.Module, teacher: nn.Module | None, reinit: str | None = None) -> list[str]:
    """Names of student parameters NOT initialised from the original model.

    A parameter is fresh when the teacher has no parameter of that name and shape
    (DSConv factors count as from the original: they come from its kernels), or when
    its module name matches the ``reinit`` regex.
    """
    t_params = {n: p.shape for n, p in teacher.named_parameters()} if teacher is not None else None
    ds = list(ds_blocks(student))
    pattern = re.compile(reinit) if reinit else None
    fresh = []
    for name, p in student.named_parameters():
        module = name.rpartition(".")[0]
        if pattern is not None and pattern.search(module):
            fresh.append(name)
        elif t_params is not None and not any(name.startswith(d + ".") for d in ds) and t_params.get(name) != p.shape:
            fresh.append(name)
    return fresh


def init_parameters(model: nn.Module, names: Iterable[str], scheme: str) -> None:
    """Initialise parameters ``names``: weights (dim >= 2) by ``xavier`` or ``he``; the rest to 0 (bias) or 1."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n in names:
            p = params[n]
            if p.dim() >= 2:
                if scheme == "xavier":
                    nn.init.xavier_uniform_(p)
                elif scheme == "he":
                    nn.init.kaiming_normal_(p, mode="fan_out", nonlinearity="relu")
                else:
                    raise ValueError(f"unknown init scheme {scheme!r}; choose xavier or he")
            elif n.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)


def load_teacher(artifact, spec: str | None = None, weights: str | None = None, *,
                 trust_code: bool = False) -> nn.Module:
    """The distillation teacher: ``spec`` (+ ``weights``) when given, else the artifact's source model.

    ``trust_code`` as in :func:`dsdeploy.conversion.loading.load_model` (a ``.dsd`` teacher's or the
    artifact's recorded factory); a source whose weights are gone names the ``teacher`` argument.
    """
    if spec:
        return load_model(spec, weights, trust_code=trust_code).model.eval()

    try:
        return load_source_model(artifact, trust_code=trust_code)
    except ArtifactError as exc:
        if "source weights" not in str(exc):
            raise
        raise ArtifactError(f"{exc}, or give the original model as the teacher") from None
