"""The depthwise-separable block that replaces one standard convolution.

``DSConv`` computes ``sum_k pointwise_k(depthwise_k(x)) + bias`` and exposes the
attributes of the conv it replaced (``in_channels``, ``out_channels``, ``kernel_size``,
``stride``, ``padding``, ``dilation``, ``groups``, ``padding_mode``) so code that
inspects convs keeps working. Three graph layouts compute the same function:

- ``branches`` (default): K pairs of (multiplier-1 depthwise conv -> pointwise conv),
  summed. Stays on ONNX Runtime's fast depthwise path (see DESIGN.md).
- ``concat``: K multiplier-1 depthwise convs, interleaved, one pointwise conv.
- ``multiplier``: one depthwise conv with channel multiplier K, one pointwise conv.
"""

from __future__ import annotations

import torch
from torch import nn

from dsdeploy.conversion.decompose import factorize, reconstruct

LAYOUTS = ("branches", "concat", "multiplier")
CONV_TYPES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class DSConv(nn.Module):
    """A rank-K depthwise-separable replacement for a ``Conv{1,2,3}d``.

    Stride, padding, dilation and padding_mode belong to the depthwise convs; the bias
    to the pointwise part; a grouped conv gets a grouped pointwise conv.
    """

    def __init__(self, conv: nn.Module, rank: int, layout: str = "branches") -> None:
        """Build the structure of a block replacing ``conv`` (weights uninitialised).

        Use :meth:`from_conv` to initialise it from the conv's kernel.
        """
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
        dim = len(conv.kernel_size)
        conv_cls = CONV_TYPES[dim]
        self.in_channels = conv.in_channels
        self.out_channels = conv.out_channels
        self.kernel_size = tuple(conv.kernel_size)
        self.stride = tuple(conv.stride)
        self.padding = conv.padding
        self.dilation = tuple(conv.dilation)
        self.groups = conv.groups
        self.padding_mode = conv.padding_mode
        self.rank = int(rank)
        self.layout = layout
        cin, cout, g = conv.in_channels, conv.out_channels, conv.groups
        kw = {"device": conv.weight.device, "dtype": conv.weight.dtype}
        has_bias = conv.bias is not None

        def dw(mult: int) -> nn.Module:
            return conv_cls(cin, cin * mult, self.kernel_size, stride=self.stride, padding=self.padding,
                            dilation=self.dilation, groups=cin, bias=False, padding_mode=self.padding_mode, **kw)

        if layout == "branches":
            self.depthwise = nn.ModuleList(dw(1) for _ in range(rank))
            self.pointwise = nn.ModuleList(
                conv_cls(cin, cout, 1, groups=g, bias=has_bias and i == 0, **kw) for i in range(rank))
        else:
            self.depthwise = nn.ModuleList([dw(rank)]) if layout == "multiplier" else nn.ModuleList(
                dw(1) for _ in range(rank))
            self.pointwise = nn.ModuleList([conv_cls(cin * rank, cout, 1, groups=g, bias=has_bias, **kw)])

    @classmethod
    def from_conv(cls, conv: nn.Module, rank: int, layout: str = "branches", svd=None) -> "DSConv":
        """A block initialised from ``conv``'s kernel by per-channel SVD (exact at full rank).

        ``svd`` may pass a precomputed :func:`dsdeploy.conversion.decompose.channel_svd` of the kernel.
        """
        block = cls(conv, rank, layout)
        f = factorize(conv.weight.detach(), rank, conv.groups, svd=svd)
        with torch.no_grad():
            block.set_depthwise(f.depthwise)
            block.set_pointwise(f.pointwise, None if conv.bias is None else conv.bias.detach())
        return block

    # -- factors ---------------------------------------------------------------------
    def get_depthwise(self) -> torch.Tensor:
        """Depthwise filters ``(K, Cin, *k)``."""
        if self.layout == "multiplier":
            w = self.depthwise[0].weight  # (Cin*K, 1, *k), channel c*K + k
            return w.reshape(self.in_channels, self.rank, *self.kernel_size).transpose(0, 1)
        return torch.stack([m.weight[:, 0] for m in self.depthwise])

    def set_depthwise(self, depthwise: torch.Tensor) -> None:
        """Load depthwise filters ``(K, Cin, *k)``."""
        with torch.no_grad():
            if self.layout == "multiplier":
                w = depthwise.transpose(0, 1).reshape(self.in_channels * self.rank, 1, *self.kernel_size)
                self.depthwise[0].weight.copy_(w)
            else:
                for k, m in enumerate(self.depthwise):
                    m.weight.copy_(depthwise[k].unsqueeze(1))

    def get_pointwise(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Pointwise weights ``(K, Cout, Cin/groups)`` and the bias (or None)."""
        cin_g = self.in_channels // self.groups
        if self.layout == "branches":
            pw = torch.stack([m.weight.reshape(self.out_channels, cin_g) for m in self.pointwise])
            return pw, self.pointwise[0].bias
        w = self.pointwise[0].weight.reshape(self.out_channels, cin_g, self.rank)  # [o, c_local*K + k]
        return w.permute(2, 0, 1), self.pointwise[0].bias

    def set_pointwise(self, pointwise: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Load pointwise weights ``(K, Cout, Cin/groups)`` and the bias."""
        ones = (1,) * len(self.kernel_size)
        with torch.no_grad():
            if self.layout == "branches":
                for k, m in enumerate(self.pointwise):
                    m.weight.copy_(pointwise[k].reshape(m.weight.shape[0], -1, *ones))
            else:
                w = pointwise.permute(1, 2, 0).reshape(self.out_channels, -1, *ones)
                self.pointwise[0].weight.copy_(w)
            b = self.pointwise[0].bias
            if b is not None:
                b.copy_(bias if bias is not None else torch.zeros_like(b))

    def dense_weight(self) -> torch.Tensor:
        """The dense conv kernel ``(Cout, Cin/groups, *k)`` this block computes."""
        pw, _ = self.get_pointwise()
        return reconstruct(self.get_depthwise(), pw, self.groups)

    # -- compute ---------------------------------------------------------------------
    def depthwise_features(self, x: torch.Tensor) -> torch.Tensor:
        """Outputs of the K depthwise filters, ``(N, K, Cin, *spatial_out)``."""
        if self.layout == "multiplier":
            y = self.depthwise[0](x)
            return y.reshape(y.shape[0], self.in_channels, self.rank, *y.shape[2:]).transpose(1, 2)
        return torch.stack([m(x) for m in self.depthwise], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "branches":
            out = self.pointwise[0](self.depthwise[0](x))
            for dw, pw in zip(self.depthwise[1:], self.pointwise[1:]):
                out = out + pw(dw(x))
            return out
        if self.layout == "multiplier":
            return self.pointwise[0](self.depthwise[0](x))
        feats = torch.stack([m(x) for m in self.depthwise], dim=2)  # (N, Cin, K, *sp)
        return self.pointwise[0](feats.flatten(1, 2))

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, rank={self.rank}, "
                f"layout={self.layout}, stride={self.stride}, groups={self.groups}")


def ds_blocks(model: nn.Module) -> dict[str, DSConv]:
    """Every DSConv in ``model``, by module name, in network order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, DSConv)}
