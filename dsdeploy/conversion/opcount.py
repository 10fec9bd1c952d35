"""Parameters and multiply-accumulates (MACs) per layer, for a given input shape.

MACs are counted for convolution (incl. transposed) and linear layers, the layers that
dominate a CNN's cost; ``conv_macs`` is the part the rewriter acts on.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from dsdeploy.errors import InputShapeError

CONV_LIKE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass
class LayerProfile:
    """One conv or linear layer: where it sits, its parameters and MACs per forward."""

    name: str
    type: str
    params: int
    macs: int
    in_shape: list[int]
    out_shape: list[int]


@dataclass
class Profile:
    """A whole model at one input shape."""

    input_shape: list[int]
    layers: list[LayerProfile] = field(default_factory=list)
    total_params: int = 0
    total_macs: int = 0
    conv_macs: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    def macs_under(self, prefix: str) -> int:
        """MACs of the layers named ``prefix`` or inside the module ``prefix``."""
        return sum(l.macs for l in self.layers if l.name == prefix or l.name.startswith(prefix + "."))


def _wants_image_list(model: nn.Module) -> bool:
    """torchvision detection models take ``list[Tensor]`` (first forward arg ``images``)."""
    try:
        params = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return False
    return bool(params) and params[0] == "images"


def run_model(model: nn.Module, x: torch.Tensor):
    """Call ``model`` on the batch ``x`` (as a list of images for detection models)."""
    return model(list(x)) if _wants_image_list(model) else model(x)


def layer_macs(module: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int:
    """MACs of one conv/linear call for one sample of the batch."""
    batch = out.shape[0] if out.dim() > 1 else 1
    if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        window = math.prod(module.kernel_size)
        return inp[0].numel() * (module.out_channels // module.groups) * window
    if isinstance(module, CONV_LIKE):
        window = math.prod(module.kernel_size)
        return out.numel() // batch * (module.in_channels // module.groups) * window
    if isinstance(module, nn.Linear):
        return out.numel() // batch * module.in_features
    return 0


def trace_calls(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, tuple[list[int], list[int], int]]:
    """Run one forward pass; for every conv/linear that ran: (in shape, out shape, MACs).

    Shapes are those of the first call; MACs sum over every call of the module in the
    pass (a conv applied twice costs twice), as the exported graph does.

    Raises InputShapeError when the model cannot run on that shape.
    """
    seen: dict[str, tuple[list[int], list[int], int]] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, CONV_LIKE + (nn.Linear,)):
            def hook(m, args, out, name=name):
                if args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
                    macs = layer_macs(m, args[0], out)
                    if name in seen:  # called again in the same forward (weight sharing): every call costs
                        ishape, oshape, before = seen[name]
                        seen[name] = (ishape, oshape, before + macs)
                    else:
                        seen[name] = (list(args[0].shape), list(out.shape), macs)
            hooks.append(mod.register_forward_hook(hook))
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            run_model(model, torch.randn(*input_shape, dtype=dtype, generator=torch.Generator().manual_seed(0)))
    except (RuntimeError, ValueError, IndexError, AssertionError, TypeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputShapeError(f"the model cannot run on input shape {','.join(map(str, input_shape))}: {first}") from exc
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return seen


def profile_model(model: nn.Module, input_shape: tuple[int, ...],
                  calls: dict[str, tuple[list[int], list[int], int]] | None = None) -> Profile:
    """Params and MACs per conv/linear layer and in total, at ``input_shape`` (batch included).

    ``calls`` reuses a :func:`trace_calls` result for the same model and shape.
    """
    calls = trace_calls(model, input_shape) if calls is None else calls
    modules = dict(model.named_modules())
    prof = Profile(input_shape=list(input_shape))
    for name, (ishape, oshape, macs) in calls.items():
        mod = modules[name]
        prof.layers.append(LayerProfile(name=name, type=type(mod).__name__,
                                        params=sum(p.numel() for p in mod.parameters(recurse=False)),
                                        macs=macs, in_shape=ishape, out_shape=oshape))
        if isinstance(mod, CONV_LIKE):
            prof.conv_macs += macs
        prof.total_macs += macs
    prof.total_params = sum(p.numel() for p in model.parameters())
    return prof
