"""Interleaved BatchNorm re-estimation and row-subsampled patch statistics in calibration (real digits models)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock

from dsdeploy.conversion.block import ds_blocks
from dsdeploy.conversion.rewrite import convert, original_convs
from dsdeploy.data.datasets import load_data, make_loader
from dsdeploy.recover import als
from dsdeploy.recover.als import PatchEquations, alternate
from dsdeploy.recover.reconstruct import calibrate, layer_errors
from tests.test_calibrate import DIGITS8, one_thread  # noqa: F401 (one_thread: autouse fixture)


def digits_resnet() -> nn.Module:
    """A small residual CNN with BatchNorm for 8x8 digits (stem, two BasicBlocks, one downsampling)."""
    down = nn.Sequential(nn.Conv2d(16, 32, 1, stride=2, bias=False), nn.BatchNorm2d(32))
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         BasicBlock(16, 16), BasicBlock(16, 32, 2, down), BasicBlock(32, 32),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


@pytest.fixture(scope="module")
def trained(one_thread):  # noqa: F811
    torch.manual_seed(0)
    splits = load_data("digits", DIGITS8)
    model = digits_resnet()
    opt = torch.optim.Adam(model.parameters(), 5e-3)
    for ep in range(5):
        model.train()
        for x, y in make_loader(splits.train, 32, shuffle=True, seed=ep):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval(), splits


def test_interleaved_bn_lowers_the_final_per_layer_errors(trained):
    """Re-estimating each BN right after the layer before it is fitted (instead of only at the end)
    leaves every later layer fitted on its final inputs: lower summed output error on the final model."""
    teacher, splits = trained
    loader = make_loader(splits.train, 64, shuffle=False)
    sums = {}
    for interleave in (False, True):
        res = convert(teacher, input_shape=(1, 1, 8, 8), rank=1)
        rep = calibrate(res.model, teacher, res.plan, loader, max_batches=10, progress=False, interleave_bn=interleave)
        assert len(rep.layers) >= 4 and all(c.error_bn is not None for c in rep.layers)
        sums[interleave] = sum(c.error_bn for c in rep.layers)
        # the reported errors are those of the final model
        final = layer_errors(res.model, original_convs(teacher, res.plan), loader, 10)
        assert sum(final.values()) == pytest.approx(sums[interleave], rel=1e-6)
    assert sums[True] < 0.9 * sums[False], sums


def test_interleaved_bn_alone_sets_the_bn_to_the_fitted_outputs(trained):
    """Without the final pass, each following BN holds the mean/variance of its fitted layer's outputs."""
    teacher, splits = trained
    loader = make_loader(splits.train, 64, shuffle=False)
    res = convert(teacher, input_shape=(1, 1, 8, 8), rank=1)
    rep = calibrate(res.model, teacher, res.plan, loader, max_batches=4, progress=False, bn=False)
    assert rep.bn_layers == len(rep.layers)
    s = res.model
    x = torch.cat([b[0] for b, _ in zip(loader, range(4))])
    with torch.no_grad():
        h = s[3].conv1(s[2](s[1](s[0](x))))  # block 3's first conv output on its (final) inputs
    assert s[3].bn1.running_mean == pytest.approx(h.mean((0, 2, 3)), abs=1e-4)
    assert s[3].bn1.running_var == pytest.approx(h.var((0, 2, 3)), rel=1e-3)


def test_subsampled_patch_statistics_fit_nearly_as_well_as_all_rows(trained, monkeypatch):
    """A seeded ~10 % subset of the rows gives factors whose error on ALL rows is within 5 % of the full fit's."""
    teacher, splits = trained
    loader = make_loader(splits.train, 64, shuffle=False)
    xs = [x for x, _ in zip((b[0] for b in loader), range(12))]
    res = convert(teacher, input_shape=(1, 1, 8, 8), rank=1)
    name = "3.conv1"
    with torch.no_grad():
        inputs = [teacher[2](teacher[1](teacher[0](x))) for x in xs]  # the block's inputs in the original model
    conv = original_convs(teacher, res.plan)[name]
    fits = {}
    for sub in (False, True):
        block = copy.deepcopy(ds_blocks(res.model)[name])
        monkeypatch.setattr(als, "PATCH_ROWS_MIN", 4096)
        monkeypatch.setattr(als, "PATCH_ROWS_PER_FEATURE", 8)
        eq = PatchEquations(block, conv, batches=len(inputs), subsample=sub)
        with torch.no_grad():
            for x in inputs:
                eq.add(x)
        alternate(eq, 3, 1e-6)
        fits[sub] = (eq.rows, block)
    full = PatchEquations(fits[False][1], conv, subsample=False)
    with torch.no_grad():
        for x in inputs:
            full.add(x)
    assert fits[True][0] <= 4096 + len(inputs) and fits[False][0] == 12 * 64 * 64
    errs = {}
    for sub, (_, block) in fits.items():
        errs[sub] = full.error(full.dense(*PatchEquations(block, conv).factors()))
    assert errs[True] <= 1.05 * errs[False], errs


def test_accuracy_is_scored_on_at_most_eval_images(trained):
    """calibrate_data scores before and after on the first ``eval_images`` validation images; 0 scores nothing."""
    from torch.utils.data import Subset

    from dsdeploy.errors import DsdeployError
    from dsdeploy.recover.distill import evaluate
    from dsdeploy.recover.reconstruct import calibrate_data

    teacher, splits = trained
    seen = []
    for cap in (40, 0):
        res = convert(teacher, input_shape=(1, 1, 8, 8), rank=1)
        naive40 = evaluate(res.model, make_loader(Subset(splits.val, range(40)), 256, shuffle=False))
        hook = res.model.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0]))
        rep = calibrate_data(res.model, teacher, res.plan, "digits", DIGITS8, max_batches=2, batch_size=32,
                             progress=False, eval_images=cap)
        hook.remove()
        if cap:
            assert rep.accuracy_before == pytest.approx(naive40) and rep.accuracy_after is not None
            assert round(rep.accuracy_after * cap, 6) == round(rep.accuracy_after * cap)  # a fraction of 40
        else:
            assert rep.accuracy_before is None and rep.accuracy_after is None
    assert max(seen) <= 40 < len(splits.val)  # no forward pass saw more than the cap (calibration batches: 32)
    with pytest.raises(DsdeployError, match="calibrate.eval_images"):
        calibrate(res.model, teacher, res.plan, [torch.randn(4, 1, 8, 8)], progress=False, eval_images=-1)
