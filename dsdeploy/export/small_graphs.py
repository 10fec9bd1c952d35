"""Single-layer ONNX graphs for latency tables: one dense conv, or the DS block that would replace it.

A layer is described by :class:`ConvSpec` (shapes and conv attributes, no weights); the
graphs carry random weights as initializers (constant weights, as in an exported model),
the conv's bias standing for the BatchNorm the exported graph folds into it (the dense
conv's bias; the DS block's pointwise bias). Export uses the TorchScript exporter with
constant folding, as :func:`dsdeploy.export.onnx_export.export_onnx` does by default.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from dsdeploy.conversion.block import CONV_TYPES, DSConv
from dsdeploy.errors import ExportError

OPSET = 17


@dataclass(frozen=True)
class ConvSpec:
    """One conv call: input shape ``(N, C, *spatial)`` and the conv's attributes (JSON-able)."""

    input_shape: tuple[int, ...]
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: Any  # tuple of ints, or "same"/"valid"
    dilation: tuple[int, ...]
    groups: int
    padding_mode: str = "zeros"

    @classmethod
    def of(cls, conv: nn.Module, input_shape: list[int] | tuple[int, ...], batch: int | None = None) -> ConvSpec:
        """The spec of ``conv`` called on ``input_shape`` (its batch replaced by ``batch`` when given)."""
        shape = tuple(int(d) for d in input_shape)
        if batch is not None:
            shape = (int(batch), *shape[1:])
        pad = conv.padding if isinstance(conv.padding, str) else tuple(int(p) for p in conv.padding)
        return cls(shape, int(conv.out_channels), tuple(conv.kernel_size), tuple(conv.stride), pad,
                   tuple(conv.dilation), int(conv.groups), str(conv.padding_mode))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    def key(self) -> str:
        """A short stable digest of the spec (identical layers share it)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def conv(self, seed: int = 0) -> nn.Module:
        """A conv with bias of this spec, weights drawn from ``seed`` (Kaiming-uniform, torch's default)."""
        torch.manual_seed(seed)
        cls = CONV_TYPES[len(self.kernel_size)]
        return cls(self.input_shape[1], self.out_channels, self.kernel_size, stride=self.stride,
                   padding=self.padding, dilation=self.dilation, groups=self.groups, bias=True,
                   padding_mode=self.padding_mode).eval()


def layer_module(spec: ConvSpec, rank: int | None = None, layout: str = "branches", seed: int = 0) -> nn.Module:
    """The dense conv (``rank=None``) or its rank-``rank`` DS block in ``layout``, in eval mode."""
    conv = spec.conv(seed)
    return conv if rank is None else DSConv.from_conv(conv, rank, layout).eval()


def to_onnx(module: nn.Module, input_shape: tuple[int, ...]) -> bytes:
    """``module`` exported in eval mode at the fixed ``input_shape`` (input ``input``, output ``output``),
    serialized; the module's train/eval mode is left as it was.

    Raises ExportError (one line) when the exporter fails.
    """
    buf = io.BytesIO()
    x = torch.zeros(*input_shape)
    was_training = module.training
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(module.eval(), (x,), buf, dynamo=False, opset_version=OPSET, input_names=["input"],
                              output_names=["output"], do_constant_folding=True)
    except (RuntimeError, ValueError, TypeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExportError(f"exporting a {type(module).__name__} at {list(input_shape)} failed: {first}") from None
    finally:
        module.train(was_training)
    return buf.getvalue()


def layer_graph(spec: ConvSpec, rank: int | None = None, layout: str = "branches", seed: int = 0) -> bytes:
    """The serialized ONNX graph of :func:`layer_module` at the spec's input shape."""
    return to_onnx(layer_module(spec, rank, layout, seed), spec.input_shape)
