"""The DS decomposition: exact at full rank over random conv configurations."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from dsdeploy.conversion.block import CONV_TYPES, LAYOUTS, DSConv
from dsdeploy.conversion.decompose import (
    energy_curve,
    factorize,
    full_rank,
    rank_for_energy,
    reconstruct,
    relative_error,
    solve_least_squares,
)


@st.composite
def conv_configs(draw):
    dim = draw(st.sampled_from([1, 2, 3]))
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    cin = groups * draw(st.integers(1, 3))
    cout = groups * draw(st.integers(1, 4))
    kmax = {1: 7, 2: 5, 3: 3}[dim]
    kernel = tuple(draw(st.integers(1, kmax)) for _ in range(dim))
    stride = tuple(draw(st.integers(1, 2)) for _ in range(dim))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dim))
    padding_kind = draw(st.sampled_from(["int", "tuple", "same", "valid"]))
    if padding_kind == "same":
        stride = (1,) * dim
        padding = "same"
    elif padding_kind == "valid":
        padding = "valid"
    elif padding_kind == "int":
        padding = draw(st.integers(0, 2))
    else:
        padding = tuple(draw(st.integers(0, 2)) for _ in range(dim))
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    bias = draw(st.booleans())
    layout = draw(st.sampled_from(LAYOUTS))
    size = tuple(draw(st.integers(6, 10 if dim < 3 else 7)) for _ in range(dim))
    return dim, cin, cout, kernel, stride, padding, dilation, groups, bias, mode, layout, size


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_configs(), st.integers(0, 2**31 - 1))
def test_full_rank_block_equals_conv(cfg, seed):
    dim, cin, cout, kernel, stride, padding, dilation, groups, bias, mode, layout, size = cfg
    torch.manual_seed(seed)
    conv = CONV_TYPES[dim](cin, cout, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups,
                           bias=bias, padding_mode=mode).double()
    span = [d * (k - 1) + 1 for d, k in zip(dilation, kernel)]
    if any(s > n for s, n in zip(span, size)):
        size = tuple(max(n, s) for n, s in zip(size, span))
    x = torch.randn(2, cin, *size, dtype=torch.float64)
    k_full = full_rank(tuple(conv.weight.shape), groups)
    block = DSConv.from_conv(conv, k_full, layout)
    with torch.no_grad():
        expected, got = conv(x), block(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(block.dense_weight(), conv.weight, atol=1e-10, rtol=1e-9)
    assert (block.in_channels, block.out_channels, block.kernel_size) == (cin, cout, kernel)


def test_rank_one_keeps_the_top_singular_direction():
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3, dtype=torch.float64)
    f = factorize(w, 1)
    approx = reconstruct(f.depthwise, f.pointwise)
    err = ((w - approx).norm() / w.norm()).item()
    assert err == pytest.approx(relative_error(f.singular_values, 1), rel=1e-9)
    # Eckart-Young: no rank-1 per-channel approximation does better than the SVD's
    for c in range(4):
        s = torch.linalg.svdvals(w[:, c].reshape(8, 9))
        resid = (w[:, c].reshape(8, 9) - approx[:, c].reshape(8, 9)).norm()
        assert resid.item() == pytest.approx(s[1:].norm().item(), rel=1e-9)


def test_energy_rank_and_error_are_consistent():
    torch.manual_seed(1)
    w = torch.randn(16, 8, 3, 3)
    s = factorize(w, 1).singular_values
    curve = energy_curve(s)
    assert curve[-1].item() == pytest.approx(1.0)
    assert torch.all(curve[1:] >= curve[:-1])
    k = rank_for_energy(s, 0.8)
    assert curve[k - 1] >= 0.8 and (k == 1 or curve[k - 2] < 0.8)
    assert rank_for_energy(s, 1.0) == full_rank(tuple(w.shape), 1)
    assert relative_error(s, full_rank(tuple(w.shape), 1)) == pytest.approx(0.0, abs=1e-6)


def test_factorize_rejects_out_of_range_rank():
    with pytest.raises(ValueError):
        factorize(torch.randn(4, 2, 3, 3), 10)


def test_least_squares_recovers_known_solution():
    torch.manual_seed(2)
    a = torch.randn(200, 6, dtype=torch.float64)
    x_true = torch.randn(6, 3, dtype=torch.float64)
    b = a @ x_true
    x = solve_least_squares(a.T @ a, a.T @ b, ridge=1e-12)
    torch.testing.assert_close(x, x_true, atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_cost_formula_matches_counted_macs(layout):
    from dsdeploy.conversion.opcount import profile_model
    from dsdeploy.conversion.plan import ds_mac_ratio

    conv = nn.Conv2d(32, 64, 3, padding=1)
    block = DSConv.from_conv(conv, 2, layout)
    before = profile_model(conv, (1, 32, 16, 16)).conv_macs
    after = profile_model(block, (1, 32, 16, 16)).conv_macs
    assert after / before == pytest.approx(ds_mac_ratio(conv, 2))
    assert ds_mac_ratio(conv, 1) == pytest.approx(1 / 64 + 1 / 9)
    assert math.isclose(ds_mac_ratio(conv, 9), 9 / 64 + 1)
