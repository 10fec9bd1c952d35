"""Activation-aware factorization: alternate least-squares fits of a DS block's pointwise and depthwise factors.

Shapes inside (per conv group ``g``): depthwise ``d (g, K, Cin_g, T)`` with ``T = prod(k)``,
pointwise ``P (g, K, Cout_g, Cin_g)``, bias ``b (g, Cout_g)``, dense kernel
``W (g, Cin_g*T + 1, Cout_g)`` (the last row is the bias). All float64.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from dsdeploy.conversion.block import DSConv
from dsdeploy.recover.lsq import (
    DEPTHWISE_UNKNOWNS,
    FLOAT32_FEATURES,
    PATCH_ROWS_MIN,
    PATCH_ROWS_PER_FEATURE,
    TOLERANCE,
    Sums,
    _accumulate,
    _quadratic_error,
    _ridge_solve,
    _targets,
    patch_rows,
    patches,
    positions,
)

F64 = torch.float64


class PatchEquations(Sums):
    """Per-group ``X^T X``, ``X^T B``, ``||B||^2`` of one block's input patches ``X`` (with a ones column)
    against the original conv's output ``B``, in float64: the exact output error of any factors
    (on the rows kept).

    ``batches``: how many batches will be added (a hint). Only ``max(PATCH_ROWS_PER_FEATURE * D,
    PATCH_ROWS_MIN)`` rows in all are kept (``D = Cin_g * prod(k) + 1``): from each batch a seeded
    random subset of ``ceil(that / batches)`` output positions (all when fewer). ``subsample=False``
    keeps every row. Products of chunks are float32 when ``D > FLOAT32_FEATURES`` (sums float64).
    ``weight (Cout,)``: weight each output channel's error by ``weight^2`` (e.g. its gain through the
    BatchNorm after it); the equations, factors and errors are then those of the weighted outputs
    (:meth:`load` writes the unweighted factors).
    """

    _SUMS = ("xtx", "xtb", "btb")

    def __init__(self, block: DSConv, conv: nn.Module, batches: int = 1, subsample: bool = True,
                 seed: int = 0, weight: torch.Tensor | None = None) -> None:
        self.block, self.conv = block, conv
        g = block.groups
        self.g, self.cg, self.og = g, block.in_channels // g, block.out_channels // g
        self.k, self.t = block.rank, int(torch.tensor(block.kernel_size).prod())
        self.bias = conv.bias is not None
        d = self.cg * self.t + 1
        self.xtx = torch.zeros(g, d, d, dtype=F64)
        self.xtb = torch.zeros(g, d, self.og, dtype=F64)
        self.btb = torch.zeros(g, dtype=F64)
        self.rows = 0
        cap = max(PATCH_ROWS_PER_FEATURE * d, PATCH_ROWS_MIN)
        self.per_batch = -(-cap // max(1, batches)) if subsample else None
        self.generator = torch.Generator().manual_seed(seed)
        self.dtype = torch.float32 if d > FLOAT32_FEATURES else F64
        self.weight = None if weight is None else weight.detach().cpu().to(F64).reshape(g, self.og)

    @property
    def depthwise_solvable(self) -> bool:
        """Whether the depthwise step's system (``K * Cin_g * T`` unknowns per group) is small enough."""
        return self.k * self.cg * self.t <= DEPTHWISE_UNKNOWNS

    def add(self, x: torch.Tensor) -> None:
        """Accumulate one batch of block inputs ``x``."""
        dtype = self.place(x.device, self.dtype)
        n, length = x.shape[0], positions(self.block, x)
        conv = self.conv
        if self.per_batch is not None and n * length > self.per_batch and type(conv) in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
            # only the kept rows: gathered from the input, targets as patches @ the conv's kernel
            keep = torch.randperm(n * length, generator=self.generator)[:self.per_batch]
            a = patch_rows(self.block, x, keep).reshape(-1, self.g, self.cg * self.t)  # (m, g, Cin_g*T)
            w = conv.weight.detach().reshape(self.g, self.og, self.cg * self.t).to(a.dtype)
            b = torch.einsum("mgf,gof->mgo", a, w)
            if conv.bias is not None:
                b = b + conv.bias.detach().reshape(self.g, self.og).to(b.dtype)
        else:
            p = patches(self.block, x)  # (N, Cin, T, L)
            a = p.reshape(n, self.g, self.cg * self.t, length).permute(0, 3, 1, 2).reshape(-1, self.g, self.cg * self.t)
            b = _targets(conv, x, self.g)
        if self.weight is not None:
            b = b * self.weight.to(b.device, b.dtype)
        _accumulate(self.xtx, self.xtb, self.btb, a, b, True, dtype)
        self.rows += a.shape[0]

    # -- factors <-> the block -----------------------------------------------------------------
    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The block's present ``(d, P, b)`` (``b`` zeros when the conv has no bias)."""
        g, k = self.g, self.k
        self.host()
        d = self.block.get_depthwise().detach().cpu().to(F64).reshape(k, g, self.cg, self.t).transpose(0, 1)
        pw, bias = self.block.get_pointwise()
        p = pw.detach().cpu().to(F64).reshape(k, g, self.og, self.cg).transpose(0, 1)
        b = bias.detach().cpu().to(F64).reshape(g, self.og) if bias is not None else torch.zeros(g, self.og, dtype=F64)
        if self.weight is not None:
            p, b = p * self.weight[:, None, :, None], b * self.weight
        return d.contiguous(), p.contiguous(), b

    def load(self, d: torch.Tensor, p: torch.Tensor, b: torch.Tensor) -> None:
        """Write ``(d, P, b)`` into the block (in its dtype)."""
        if self.weight is not None:
            p, b = p / self.weight[:, None, :, None], b / self.weight
        blk = self.block
        dtype = blk.get_pointwise()[0].dtype
        blk.set_depthwise(d.transpose(0, 1).reshape(self.k, blk.in_channels, *blk.kernel_size).to(dtype))
        blk.set_pointwise(p.transpose(0, 1).reshape(self.k, blk.out_channels, self.cg).to(dtype),
                          b.reshape(-1).to(dtype) if self.bias else None)

    def dense(self, d: torch.Tensor, p: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The dense kernel (with bias row) of ``(d, P, b)``."""
        w = torch.einsum("gkoc,gkct->gcto", p, d).reshape(self.g, self.cg * self.t, self.og)
        return torch.cat([w, b[:, None, :]], dim=1)

    def error(self, w: torch.Tensor) -> float:
        """Relative squared output error ``||X W - B||^2 / ||B||^2`` of a dense kernel ``W``, over groups."""
        self.host()
        return _quadratic_error(self.xtx, self.xtb, self.btb, w)

    # -- the two half-problems -------------------------------------------------------------------
    def fit_pointwise(self, d: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Least-squares ``(P, b)`` for fixed depthwise filters ``d`` (the bias only when the conv has one)."""
        g, k, cg, t = self.g, self.k, self.cg, self.t
        expand = torch.zeros(g, cg, t, k, cg, dtype=F64)  # features (k, c) as combinations of patches (c, t)
        idx = torch.arange(cg)
        expand[:, idx, :, :, idx] = d.permute(2, 0, 3, 1)
        expand = expand.reshape(g, cg * t, k * cg)
        if self.bias:
            expand = torch.cat([torch.cat([expand, expand.new_zeros(g, cg * t, 1)], 2),
                                torch.cat([expand.new_zeros(g, 1, k * cg), expand.new_ones(g, 1, 1)], 2)], 1)
            xtx, xtb = self.xtx, self.xtb
        else:
            xtx, xtb = self.xtx[:, :-1, :-1], self.xtb[:, :-1]
        ata = expand.transpose(1, 2) @ xtx @ expand
        sol = _ridge_solve(ata, expand.transpose(1, 2) @ xtb, ridge)  # (g, K*cg [+1], og)
        p = sol[:, :k * cg].reshape(g, k, cg, self.og).transpose(2, 3).contiguous()
        b = sol[:, -1] if self.bias else torch.zeros(g, self.og, dtype=F64)
        return p, b

    def fit_depthwise(self, p: torch.Tensor, b: torch.Tensor, ridge: float) -> torch.Tensor:
        """Least-squares depthwise filters ``d`` for fixed pointwise weights and bias."""
        g, k, cg, t = self.g, self.k, self.cg, self.t
        gram = torch.einsum("gkoc,gjod->gkcjd", p, p)
        xtx = self.xtx[:, :-1, :-1].reshape(g, cg, t, cg, t)
        ata = torch.einsum("gkcjd,gctdu->gkctjdu", gram, xtx).reshape(g, k * cg * t, k * cg * t)
        target = (self.xtb[:, :-1] - self.xtx[:, :-1, -1:] * b[:, None, :]).reshape(g, cg, t, self.og)
        atb = torch.einsum("gkoc,gcto->gkct", p, target).reshape(g, k * cg * t, 1)
        return _ridge_solve(ata, atb, ridge).reshape(g, k, cg, t)


def _balance(d: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale each (k, c) term so its depthwise and pointwise norms match (same function, better conditioned)."""
    nd, np_ = d.norm(dim=3), p.norm(dim=2)
    s = torch.where((nd > 0) & (np_ > 0), (np_ / nd.clamp_min(1e-300)).sqrt(), torch.ones_like(nd))
    return d * s[..., None], p / s[:, :, None, :]


@dataclass
class FitResult:
    """Relative output errors of one layer's fit: after SVD, after the pointwise solve, after each round."""

    error_svd: float
    error_pointwise: float
    error_rounds: list[float] = field(default_factory=list)

    @property
    def error(self) -> float:
        return self.error_rounds[-1] if self.error_rounds else self.error_pointwise


def alternate(eq: PatchEquations, rounds: int, ridge: float, tol: float = TOLERANCE) -> FitResult:
    """Fit the block behind ``eq``: a pointwise solve, then up to ``rounds`` (depthwise + pointwise) rounds.

    Stops when a round lowers the relative output error by less than ``tol`` (a fraction of
    it); a step that would not lower the error is not taken (so the result is never worse
    than the SVD start). Loads the best factors into the block.
    """
    d, p, b = eq.factors()
    e_svd = e = eq.error(eq.dense(d, p, b))
    changed = False
    p1, b1 = eq.fit_pointwise(d, ridge)
    e1 = eq.error(eq.dense(d, p1, b1))
    if e1 < e:
        p, b, e, changed = p1, b1, e1, True
    result = FitResult(e_svd, e)
    for _ in range(rounds if eq.depthwise_solvable else 0):
        try:
            d2 = eq.fit_depthwise(p, b, ridge)
        except torch.linalg.LinAlgError:  # singular even with the ridge (e.g. ridge = 0, dead inputs): stop here
            break
        e2 = eq.error(eq.dense(d2, p, b))
        if not e2 < e:
            break
        p2, b2 = eq.fit_pointwise(d2, ridge)
        e3 = eq.error(eq.dense(d2, p2, b2))
        if not e3 < e2:  # keep the depthwise step alone
            p2, b2, e3 = p, b, e2
        gain = (e - e3) / max(e, 1e-300)
        (d, p), b, e, changed = _balance(d2, p2), b2, e3, True
        result.error_rounds.append(e)
        if gain < tol:
            break
    if changed:
        eq.load(d, p, b)
    return result
