"""Pure math: a conv kernel -> depthwise-separable factors, ranks by energy, errors.

For input channel ``c`` the kernel slice ``W[:, c]`` (the outputs of ``c``'s group,
flattened over the kernel window) has an SVD ``U S Vᵀ``. The top ``K`` terms give ``K``
depthwise filters (rows of ``Vᵀ`` scaled by ``sqrt(S)``) and pointwise columns
(columns of ``U`` scaled by ``sqrt(S)``). At ``K = min(Cout/groups, prod(k))`` the
factors reproduce the kernel exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Factors:
    """DS factors of one conv kernel.

    Attributes:
        depthwise: ``(K, Cin, *k)`` — filter ``k`` of input channel ``c``.
        pointwise: ``(K, Cout, Cin // groups)`` — pointwise weights of branch ``k``
            (a grouped 1x1 conv with ``groups`` groups).
        singular_values: ``(Cin, R)`` all singular values per input channel (R = full rank).
    """

    depthwise: torch.Tensor
    pointwise: torch.Tensor
    singular_values: torch.Tensor


def full_rank(weight_shape: tuple[int, ...], groups: int) -> int:
    """The rank at which the DS block reproduces a conv with this kernel exactly."""
    cout = weight_shape[0]
    window = 1
    for k in weight_shape[2:]:
        window *= int(k)
    return min(cout // groups, window)


def _channel_slices(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """``(Cout, Cin/g, *k)`` -> ``(Cin, Cout/g, prod(k))``: one matrix per input channel."""
    cout, cin_g = weight.shape[:2]
    window = weight[0, 0].numel()
    w = weight.reshape(groups, cout // groups, cin_g, window)  # (g, Cout_g, Cin_g, P)
    return w.permute(0, 2, 1, 3).reshape(groups * cin_g, cout // groups, window)


def thin_svd(mats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched thin SVD through a QR of the long side first.

    The slices are very tall or wide (e.g. 768x4); LAPACK's batched SVD on such shapes
    was measured here at 0.1-27 s for the same input, QR + a small SVD at ~0.03 s.
    """
    m, n = mats.shape[-2:]
    if m >= n:
        q, r = torch.linalg.qr(mats)  # (.., m, n), (.., n, n)
        u, s, vh = torch.linalg.svd(r)
        return q @ u, s, vh
    q, r = torch.linalg.qr(mats.mT)  # A = Rᵀ Qᵀ
    u, s, vh = torch.linalg.svd(r.mT)
    return u, s, vh @ q.mT


def channel_svd(weight: torch.Tensor, groups: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched SVD of every input channel's slice, in float64: ``U, S, Vh``."""
    return thin_svd(_channel_slices(weight.detach().to(torch.float64), groups))


def factorize(weight: torch.Tensor, rank: int, groups: int = 1,
              svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> Factors:
    """Split a conv kernel into ``rank`` depthwise filters per channel + pointwise weights.

    Args:
        weight: conv kernel ``(Cout, Cin/groups, *k)``.
        rank: number of terms kept, ``1 <= rank <= full_rank``.
        groups: the conv's groups.
        svd: a :func:`channel_svd` result for this kernel, to avoid recomputing it.

    Returns:
        Factors in the kernel's dtype.
    """
    r_full = full_rank(tuple(weight.shape), groups)
    if not 1 <= rank <= r_full:
        raise ValueError(f"rank {rank} outside 1..{r_full}")
    cout, cin_g = weight.shape[:2]
    kshape = tuple(weight.shape[2:])
    u, s, vh = svd if svd is not None else channel_svd(weight, groups)  # (Cin,Cout_g,R), (Cin,R), (Cin,R,P)
    root = s[:, :rank].sqrt()
    dw = vh[:, :rank, :] * root[:, :, None]  # (Cin, K, P)
    pw = u[:, :, :rank] * root[:, None, :]  # (Cin, Cout_g, K)
    cin = dw.shape[0]
    depthwise = dw.permute(1, 0, 2).reshape(rank, cin, *kshape)
    # pointwise[k, o, c_local] for output o in group j and input channel c = j*Cin_g + c_local
    pw = pw.reshape(groups, cin_g, cout // groups, rank).permute(3, 0, 2, 1)  # (K, g, Cout_g, Cin_g)
    pointwise = pw.reshape(rank, cout, cin_g)
    return Factors(depthwise.to(weight.dtype), pointwise.to(weight.dtype), s.to(weight.dtype))


def reconstruct(depthwise: torch.Tensor, pointwise: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """The dense kernel ``(Cout, Cin/g, *k)`` that DS factors are equivalent to."""
    rank, cin = depthwise.shape[:2]
    kshape = tuple(depthwise.shape[2:])
    _, cout, cin_g = pointwise.shape
    dw = depthwise.reshape(rank, groups, cin_g, -1)  # (K, g, Cin_g, P)
    pw = pointwise.reshape(rank, groups, cout // groups, cin_g)  # (K, g, Cout_g, Cin_g)
    w = torch.einsum("kgoc,kgcp->gocp", pw, dw)  # (g, Cout_g, Cin_g, P)
    return w.reshape(cout, cin_g, *kshape)


def energy_curve(singular_values: torch.Tensor) -> torch.Tensor:
    """Fraction of the kernel's squared Frobenius norm kept at ranks 1..R (length R)."""
    sq = singular_values.to(torch.float64).pow(2).sum(dim=0)  # (R,)
    total = sq.sum()
    if total <= 0:
        return torch.ones_like(sq)
    return sq.cumsum(0) / total


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest rank whose kept spectral energy reaches ``energy`` (0 < energy <= 1)."""
    curve = energy_curve(singular_values)
    hits = (curve >= energy - 1e-12).nonzero()
    return int(hits[0, 0].item()) + 1 if len(hits) else int(curve.numel())


def relative_error(singular_values: torch.Tensor, rank: int) -> float:
    """Relative Frobenius error ``||W - W_K|| / ||W||`` of the rank-``rank`` factors."""
    curve = energy_curve(singular_values)
    kept = curve[rank - 1].item() if rank >= 1 else 0.0
    return max(0.0, 1.0 - kept) ** 0.5


def solve_least_squares(ata: torch.Tensor, atb: torch.Tensor, ridge: float = 1e-6) -> torch.Tensor:
    """Solve ``(AᵀA + λI) X = AᵀB`` with λ = ridge · mean diagonal; batched over a leading dim.

    Args:
        ata: ``(..., n, n)`` accumulated normal matrix.
        atb: ``(..., n, m)`` accumulated right-hand side.
        ridge: relative Tikhonov regulariser keeping the solve stable.
    """
    n = ata.shape[-1]
    diag = ata.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)
    reg = ata + (ridge * diag)[..., None, None] * torch.eye(n, dtype=ata.dtype, device=ata.device)
    return torch.linalg.solve(reg, atb)
