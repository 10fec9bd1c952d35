"""Normal-equation math of calibration: the pointwise-only fit and the alternating (depthwise + pointwise) fit.

Both accumulate, over calibration batches, the statistics of one least-squares problem in
float64, chunked (no activations are stored), per conv group:

- :class:`NormalEquations`: the block's depthwise features ``A`` against the original conv's
  output ``B`` (``A^T A``, ``A^T B``, ``||B||^2``); with the depthwise filters fixed the
  block output is linear in the pointwise weights and bias.
- :class:`PatchEquations`: the unfolded input patches ``X`` against ``B`` (``X^T X``,
  ``X^T B``, ``||B||^2``). The block output is ``X`` times its dense kernel
  ``W = sum_k P_k d_k``, so this one pass gives the exact output error of ANY factors, and
  both half-problems of the alternation: with ``d`` fixed the pointwise normal equations
  are ``D^T (X^T X) D``; with ``P`` fixed the depthwise ones are ``(P^T P) ⊙ (X^T X)``
  (Hadamard over channel pairs). The rounds need no further data pass.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dsdeploy.conversion.block import DSConv
from dsdeploy.recover.device import lsq_placement, supports_float64

CHUNK_ELEMENTS = 1 << 22  # rows x features per float64 product chunk (32 MiB)
PATCH_MB = 512  # X^T X above this (float64, all groups) -> pointwise-only fit for the layer
DEPTHWISE_UNKNOWNS = 6144  # K * Cin_g * prod(k) above this per group -> no depthwise step (solve cost ~D^3)
TOLERANCE = 1e-3  # stop alternating when a round lowers the relative error by less than this fraction
PATCH_ROWS_PER_FEATURE = 64  # patch statistics: keep at most max(this * features, PATCH_ROWS_MIN) rows per layer
PATCH_ROWS_MIN = 65536
FLOAT32_FEATURES = 512  # patch statistics with more features per group: float32 chunk products, float64 sums
FLOAT32_CHUNK = 4  # float32 chunk products take this many times CHUNK_ELEMENTS (fewer float64 additions)
SYMMETRIC_FEATURES = 1024  # A^T A with at least this many features: upper row bands only, mirrored
BANDS = 8  # ... in this many bands (about (BANDS + 1) / (2 * BANDS) of the full product's multiply-adds)


def _ridge_solve(ata: torch.Tensor, atb: torch.Tensor, ridge: float) -> torch.Tensor:
    """``(A^T A + lam I) W = A^T B`` per group, lam = ridge * trace / D (at least 1e-12)."""
    d = ata.shape[-1]
    lam = ridge * ata.diagonal(dim1=1, dim2=2).sum(-1) / d
    reg = ata + lam.clamp_min(1e-12)[:, None, None] * torch.eye(d, dtype=ata.dtype)
    chol, info = torch.linalg.cholesky_ex(reg)  # symmetric positive definite: half the cost of LU
    if bool((info == 0).all()):
        return torch.cholesky_solve(atb, chol)
    return torch.linalg.solve(reg, atb)


def _quadratic_error(ata: torch.Tensor, atb: torch.Tensor, btb: torch.Tensor, w: torch.Tensor) -> float:
    """``||A W - B||^2 / ||B||^2`` from the normal equations, summed over groups."""
    sq = (w.transpose(1, 2) @ ata @ w).diagonal(dim1=1, dim2=2).sum() - 2 * (w * atb).sum() + btb.sum()
    return float(sq.clamp_min(0) / btb.sum().clamp_min(1e-30))


def _gram(ac: torch.Tensor) -> torch.Tensor:
    """``ac^T ac`` per group for ``ac (g, m, D)``: from its upper row bands when ``D >= SYMMETRIC_FEATURES``
    (the lower part mirrored; equal to the full product up to float rounding, about 0.56x the work)."""
    d = ac.shape[-1]
    act = ac.transpose(1, 2)
    if d < SYMMETRIC_FEATURES:
        return act @ ac
    out = ac.new_empty(ac.shape[0], d, d)
    size = -(-d // BANDS)
    for lo in range(0, d, size):
        hi = min(d, lo + size)
        band = act[:, lo:hi] @ ac[:, :, lo:]  # rows lo:hi, columns lo: (the diagonal block and right of it)
        out[:, lo:hi, lo:] = band
        out[:, hi:, lo:hi] = band[:, :, hi - lo:].transpose(1, 2)
    return out


def _accumulate(ata: torch.Tensor, atb: torch.Tensor, btb: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                ones: bool, dtype: torch.dtype = torch.float64) -> None:
    """Add ``a (m, g, D)`` and ``b (m, g, Cout_g)`` rows to the float64 sums, in chunks (``ones``: a bias column).

    ``dtype``: of each chunk's products, computed on the rows' device (float32: about twice as
    fast; the sums stay float64, on their own device: :func:`dsdeploy.recover.device.lsq_placement`).
    """
    g = a.shape[1]
    elements = CHUNK_ELEMENTS * (FLOAT32_CHUNK if dtype == torch.float32 else 1)
    step = max(1, elements // (g * (a.shape[-1] + 1)))
    for i in range(0, a.shape[0], step):
        ac = a[i:i + step].to(dtype).transpose(0, 1)  # (g, m, D)
        if ones:
            ac = torch.cat([ac, ac.new_ones(ac.shape[0], ac.shape[1], 1)], dim=2)
        bc = b[i:i + step].to(dtype).transpose(0, 1)  # (g, m, Cout_g)
        act = ac.transpose(1, 2)
        ata += _gram(ac).to(ata.device, torch.float64)
        atb += (act @ bc).to(atb.device, torch.float64)
        bsq = bc.to(torch.float64) if supports_float64(bc.device) else bc.cpu().to(torch.float64)
        btb += bsq.square().sum(dim=(1, 2)).to(btb.device)


class Sums:
    """Where a system's float64 sums live: on the rows' device while accumulating (the CPU when that
    device has no float64), on the CPU for the solves (:meth:`host`)."""

    _SUMS: tuple[str, ...] = ()

    def place(self, device: torch.device, dtype: torch.dtype) -> torch.dtype:
        """Move the sums to where rows from ``device`` accumulate; the chunk-product dtype to use there
        (``dtype``, or float32 on a device without float64)."""
        where, product = lsq_placement(device)
        for name in self._SUMS:
            t = getattr(self, name)
            if t.device != where:
                setattr(self, name, t.to(where))
        return dtype if product == torch.float64 else torch.float32

    def host(self) -> None:
        """Move the sums to the CPU (the solves and error formulas run there, in float64)."""
        for name in self._SUMS:
            setattr(self, name, getattr(self, name).cpu())


def _targets(conv: nn.Module, x: torch.Tensor, g: int) -> torch.Tensor:
    """The original conv's output as rows ``(N * positions, g, Cout_g)``."""
    y = conv(x)
    return y.reshape(y.shape[0], g, y.shape[1] // g, -1).permute(0, 3, 1, 2).reshape(-1, g, y.shape[1] // g)


class NormalEquations(Sums):
    """Per-group ``A^T A``, ``A^T B`` and ``||B||^2`` of the pointwise fit for one block, in float64."""

    _SUMS = ("ata", "atb", "btb")

    def __init__(self, block: DSConv, conv: nn.Module) -> None:
        self.block, self.conv = block, conv
        g, k = block.groups, block.rank
        self.g, self.cin_g, self.cout_g = g, block.in_channels // g, block.out_channels // g
        self.bias = conv.bias is not None
        d = k * self.cin_g + int(self.bias)
        self.ata = torch.zeros(g, d, d, dtype=torch.float64)
        self.atb = torch.zeros(g, d, self.cout_g, dtype=torch.float64)
        self.btb = torch.zeros(g, dtype=torch.float64)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        """Accumulate one batch of block inputs ``x``."""
        dtype = self.place(x.device, torch.float64)
        feats = self.block.depthwise_features(x)  # (N, K, Cin, *sp)
        n, k = feats.shape[:2]
        a = feats.reshape(n, k, self.g, self.cin_g, -1).permute(0, 4, 2, 1, 3).reshape(-1, self.g, k * self.cin_g)
        _accumulate(self.ata, self.atb, self.btb, a, _targets(self.conv, x, self.g), self.bias, dtype)
        self.rows += a.shape[0]

    def current(self) -> torch.Tensor:
        """The block's present pointwise weights as ``W (g, D, Cout_g)``."""
        pw, bias = self.block.get_pointwise()  # (K, Cout, Cin_g)
        k = pw.shape[0]
        pw, bias = pw.detach().cpu(), bias.detach().cpu() if bias is not None else None
        w = pw.reshape(k, self.g, self.cout_g, self.cin_g).permute(1, 0, 3, 2)
        w = w.reshape(self.g, k * self.cin_g, self.cout_g).to(torch.float64)
        if self.bias:
            bias = bias.detach() if bias is not None else torch.zeros(self.block.out_channels)
            w = torch.cat([w, bias.reshape(self.g, 1, self.cout_g).to(torch.float64)], dim=1)
        return w

    def error(self, w: torch.Tensor) -> float:
        """Relative squared error ``||A W - B||^2 / ||B||^2`` summed over groups."""
        self.host()
        return _quadratic_error(self.ata, self.atb, self.btb, w)

    def solve(self, ridge: float) -> torch.Tensor:
        """Ridge-regularised least squares: ``(A^T A + lam I) W = A^T B``, lam = ridge * trace / D."""
        self.host()
        return _ridge_solve(self.ata, self.atb, ridge)

    def load(self, w: torch.Tensor) -> None:
        """Write ``W`` back into the block's pointwise weights and bias."""
        k = self.block.rank
        dtype = self.block.get_pointwise()[0].dtype
        bias = w[:, -1, :].reshape(-1).to(dtype) if self.bias else None
        wk = w[:, :k * self.cin_g, :].reshape(self.g, k, self.cin_g, self.cout_g).permute(1, 0, 3, 2)
        self.block.set_pointwise(wk.reshape(k, self.block.out_channels, self.cin_g).to(dtype), bias)


def _padding(block: DSConv) -> list[tuple[int, int]]:
    """(before, after) padding per spatial dim of ``block`` (ints or ``"same"``/``"valid"``)."""
    dims, k, dil = len(block.kernel_size), block.kernel_size, block.dilation
    if isinstance(block.padding, str):
        total = [0] * dims if block.padding == "valid" else [dl * (kk - 1) for dl, kk in zip(dil, k)]
        return [(t // 2, t - t // 2) for t in total]
    pad = block.padding if isinstance(block.padding, (tuple, list)) else (block.padding,) * dims
    return [(p, p) for p in pad]


def _padded(block: DSConv, x: torch.Tensor) -> torch.Tensor:
    """``x`` padded as ``block``'s depthwise conv pads it (its padding_mode)."""
    flat = [v for pr in reversed(_padding(block)) for v in pr]  # F.pad wants the last dim first
    if any(flat):
        mode = "constant" if block.padding_mode == "zeros" else block.padding_mode
        x = F.pad(x, flat, mode=mode)
    return x


def positions(block: DSConv, x: torch.Tensor) -> int:
    """How many output positions ``block`` has per image of ``x``."""
    k, dil, st = block.kernel_size, block.dilation, block.stride
    count = 1
    for i, (lo, hi) in enumerate(_padding(block)):
        count *= (x.shape[2 + i] + lo + hi - dil[i] * (k[i] - 1) - 1) // st[i] + 1
    return count


def patches(block: DSConv, x: torch.Tensor) -> torch.Tensor:
    """The input patches each output position of ``block`` sees: ``(N, Cin, prod(k), positions)``.

    Honours the block's padding (ints or ``"same"``/``"valid"``), padding_mode, stride and
    dilation for 1D, 2D and 3D convs: ``conv(x)[n, o, p] = sum_{c,t} W[o, c, t] * X[n, c, t, p]``.
    """
    dims, k, dil, st = len(block.kernel_size), block.kernel_size, block.dilation, block.stride
    x = _padded(block, x)
    for i in range(dims):  # windows of the dilated extent, then every dil-th element
        x = x.unfold(2 + i, dil[i] * (k[i] - 1) + 1, st[i])
    n, c = x.shape[:2]
    out = x.shape[2:2 + dims]
    win = tuple(slice(None, None, d) for d in dil)
    x = x[(Ellipsis, *win)]  # (N, C, *out, *k)
    perm = [0, 1, *range(2 + dims, 2 + 2 * dims), *range(2, 2 + dims)]
    return x.permute(perm).reshape(n, c, -1, int(torch.tensor(out).prod()) if out else 1)


def patch_rows(block: DSConv, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``patches(block, x)`` at flat rows ``rows`` of ``(N * positions)``, as ``(m, Cin, prod(k))``:
    ``patches(block, x)[rows // L, :, :, rows % L]`` (the same values) without forming every patch."""
    dims, k, dil, st = len(block.kernel_size), block.kernel_size, block.dilation, block.stride
    xp = _padded(block, x)
    out = [(xp.shape[2 + i] - dil[i] * (k[i] - 1) - 1) // st[i] + 1 for i in range(dims)]
    rows = rows.to(x.device)
    length = math.prod(out)
    n, rest = rows // length, rows % length
    coords = []
    for size in reversed(out):  # positions are row-major over the output dims
        coords.append(rest % size)
        rest = rest // size
    coords.reverse()
    offsets = torch.meshgrid(*[torch.arange(kk, device=x.device) for kk in k], indexing="ij")  # row-major over k
    index = [coords[i][:, None] * st[i] + offsets[i].reshape(1, -1) * dil[i] for i in range(dims)]  # (m, T) each
    return xp[(n[:, None], slice(None), *index)].transpose(1, 2)  # (m, T, C) -> (m, C, T)


def patch_bytes(block: DSConv) -> int:
    """Bytes of :class:`PatchEquations`' ``X^T X`` for ``block`` (float64, every group)."""
    d = block.in_channels // block.groups * int(torch.tensor(block.kernel_size).prod()) + 1
    return block.groups * d * d * 8
