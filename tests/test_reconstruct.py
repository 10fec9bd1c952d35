"""Activation-aware factorization (alternating least squares), per-layer error reports and the stage cache."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

from dsdeploy.conversion.block import DSConv
from dsdeploy.conversion.rewrite import convert
from dsdeploy.data.datasets import make_loader
from dsdeploy.errors import DsdeployError, RecipeError
from dsdeploy.pipeline.recipe import recipe_from_dict
from dsdeploy.recover.als import PatchEquations, alternate
from dsdeploy.recover.config import CalibrationParams
from dsdeploy.recover.lsq import NormalEquations, patch_rows, patches, positions
from dsdeploy.recover.reconstruct import calibrate
from tests.clirun import invoke
from tests.test_calibrate import one_thread, plan_for, train_digits  # noqa: F401 (one_thread: autouse fixture)

CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
# (dims, padding, padding_mode, stride, dilation, groups): every geometry DSConv supports
GEOMETRIES = [(2, 1, "zeros", 2, 1, 1), (2, 2, "reflect", 1, 2, 2), (1, "same", "circular", 1, 2, 1),
              (3, 1, "replicate", (1, 2, 1), 1, 2), (2, "valid", "zeros", 1, 1, 4), (2, "same", "zeros", 1, (2, 1), 1)]


def rel_error(block: nn.Module, conv: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        y = conv(x)
        return float((block(x) - y).double().square().sum() / y.double().square().sum())


@pytest.mark.parametrize("dims,padding,mode,stride,dilation,groups", GEOMETRIES)
def test_patches_reproduce_the_conv(dims, padding, mode, stride, dilation, groups):
    torch.manual_seed(0)
    conv = CONVS[dims](8, 6 * groups, 3, padding=padding, padding_mode=mode, stride=stride, dilation=dilation,
                       groups=groups, bias=True)
    x = torch.randn(2, 8, *([7] * dims))
    p = patches(DSConv.from_conv(conv, 1), x)  # (N, Cin, T, L)
    cg = 8 // groups
    w = conv.weight.reshape(groups, -1, cg, p.shape[2])
    out = torch.einsum("ngctl,goct->ngol", p.reshape(2, groups, cg, p.shape[2], -1), w)
    with torch.no_grad():
        ref = conv(x)
    torch.testing.assert_close(out.reshape(ref.shape) + conv.bias.reshape(1, -1, *([1] * dims)), ref,
                               atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dims,padding,mode,stride,dilation,groups", GEOMETRIES)
def test_patch_rows_are_the_same_rows_of_the_patches(dims, padding, mode, stride, dilation, groups):
    torch.manual_seed(0)
    conv = CONVS[dims](8, 6 * groups, 3, padding=padding, padding_mode=mode, stride=stride, dilation=dilation,
                       groups=groups)
    block = DSConv.from_conv(conv, 1)
    x = torch.randn(3, 8, *([7] * dims))
    p = patches(block, x)  # (N, Cin, T, L)
    assert positions(block, x) == p.shape[-1]
    rows = torch.randperm(3 * p.shape[-1], generator=torch.Generator().manual_seed(1))[:20]
    assert torch.equal(patch_rows(block, x, rows), p[rows // p.shape[-1], :, :, rows % p.shape[-1]])


@pytest.mark.parametrize("d", [5, 37, 64])
def test_banded_gram_is_the_full_product(monkeypatch, d):
    from dsdeploy.recover import lsq

    monkeypatch.setattr(lsq, "SYMMETRIC_FEATURES", 4)  # the banded path at test sizes (uneven last band too)
    a = torch.randn(2, 300, d, dtype=torch.float64)
    gram = lsq._gram(a)
    torch.testing.assert_close(gram, a.transpose(1, 2) @ a, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(gram, gram.transpose(1, 2), rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("layout", ["branches", "concat", "multiplier"])
@pytest.mark.parametrize("geometry", GEOMETRIES[:4], ids=["strided", "reflect-dilated-grouped", "1d", "3d"])
def test_alternating_rounds_lower_the_error_they_report(layout, geometry):
    dims, padding, mode, stride, dilation, groups = geometry
    torch.manual_seed(1)
    conv = CONVS[dims](8, 4 * groups, 3, padding=padding, padding_mode=mode, stride=stride, dilation=dilation,
                       groups=groups, bias=True)
    block = DSConv.from_conv(conv, 2 if dims < 3 else 1, layout)
    x = torch.randn(32, 8, *([8] * dims)) ** 2  # not centred: the bias matters
    eq = PatchEquations(block, conv)
    with torch.no_grad():
        for i in range(0, 32, 8):
            eq.add(x[i:i + 8])
        res = alternate(eq, rounds=4, ridge=1e-9)
    assert res.error_svd > res.error_pointwise > res.error_rounds[0] and res.error_rounds == sorted(res.error_rounds,
                                                                                                   reverse=True)
    assert rel_error(block, conv, x) == pytest.approx(res.error, rel=1e-3)  # the factors loaded are the ones reported


@pytest.mark.parametrize("layout", ["branches", "multiplier"])
def test_alternating_fit_stays_exact_at_full_rank(layout):
    torch.manual_seed(2)
    conv = nn.Conv2d(6, 5, 3, padding=1, groups=1, bias=True)
    block = DSConv.from_conv(conv, 5, layout)  # min(Cout, 9) = 5: exact
    x = torch.randn(16, 6, 8, 8)
    eq = PatchEquations(block, conv)
    with torch.no_grad():
        eq.add(x)
        res = alternate(eq, rounds=3, ridge=1e-10)
    assert res.error_svd < 1e-10 and res.error < 1e-9
    with torch.no_grad():
        torch.testing.assert_close(block(x), conv(x), atol=1e-4, rtol=1e-4)


def test_the_pointwise_step_is_the_pointwise_only_fit():
    torch.manual_seed(3)
    conv = nn.Conv2d(8, 12, 3, padding=1, groups=2, bias=True)
    x = torch.randn(16, 8, 6, 6)
    errors = []
    for cls in (NormalEquations, PatchEquations):
        eq = cls(DSConv.from_conv(conv, 1), conv)
        with torch.no_grad():
            eq.add(x)
        errors.append(eq.error(eq.solve(1e-6)) if cls is NormalEquations else alternate(eq, 0, 1e-6).error)
    assert errors[0] == pytest.approx(errors[1], rel=1e-6)


@pytest.fixture(scope="module")
def digits(one_thread):  # noqa: F811
    return train_digits()


def test_alternating_beats_pointwise_only_on_real_data(digits):
    teacher, splits = digits
    loader = make_loader(splits.train, 64, shuffle=False)
    reports = {}
    for rounds in (0, 3):
        res = convert(teacher, input_shape=(1, 1, 8, 8), rank=1)
        reports[rounds] = calibrate(res.model, teacher, res.plan, loader, max_batches=8, progress=False,
                                    rounds=rounds)
    pw, als = reports[0].layers, reports[3].layers
    assert [c.name for c in pw] == [c.name for c in als] and len(als) == 2
    assert all(c.method == "alternating" and c.error_rounds for c in als) and all(c.method == "pointwise" for c in pw)
    # the first layer sees the same inputs in both runs: same SVD start, same pointwise solve
    assert als[0].error_pointwise == pytest.approx(pw[0].error_after, rel=1e-4)
    for a, p in zip(als, pw):
        assert a.error_after <= a.error_pointwise <= a.error_before
        assert a.error_after <= p.error_after * (1 + 1e-6), (a, p)
        assert a.error_bn is not None and p.error_bn is not None
    assert sum(c.error_after for c in als) < 0.98 * sum(c.error_after for c in pw)
    entry = reports[3].history_entry()
    assert entry["rounds"] == 3 and {"error_before", "error_after", "error_rounds", "error_bn"} <= set(entry["layers"][0])
    text = reports[3].render()
    assert "after BN" in text and "alternating" in text


def test_error_after_bn_is_measured_on_the_final_model():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                            nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)).eval()
    res = convert(teacher, input_shape=(1, 3, 8, 8), rank=1, convert_stem=True)
    x = torch.randn(32, 3, 8, 8)
    report = calibrate(res.model, teacher, res.plan, [x[i:i + 8] for i in range(0, 32, 8)], progress=False)
    s = res.model
    with torch.no_grad():
        h = s[2](s[1](s[0](x)))
    assert report.layers[1].error_bn == pytest.approx(rel_error(s[3], teacher[3], h), rel=1e-3)


class TinyResNet(nn.Module):
    """A ResNet with residual BasicBlocks (downsampling ones too) in nn.Sequential stages, at small widths."""

    def __init__(self, gap: bool = False) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True))

        def down(i: int, o: int) -> nn.Module:
            return nn.Sequential(nn.Conv2d(i, o, 1, stride=2, bias=False), nn.BatchNorm2d(o))

        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, 2, down(8, 16)), BasicBlock(16, 16))
        self.layer3 = nn.Sequential(BasicBlock(16, 16, 2, down(16, 16)))
        self.fc = nn.Linear(16, 10)
        self.gap = gap  # True: something happens between two stages (the chain is broken there)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer1(self.stem(x))
        x = self.layer2(x * 0.5 if self.gap else x)
        return self.fc(self.layer3(x).mean(dim=(2, 3)))


def _bn_teacher(gap: bool = False) -> nn.Module:
    torch.manual_seed(0)
    teacher = TinyResNet(gap)
    with torch.no_grad():  # BN statistics of a trained-ish model
        for m in teacher.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2)
    return teacher.eval()


def _uncached_and_cached(teacher: nn.Module, cache_mb: float, rounds: int):
    """Calibrate copies of one rank-1 conversion of ``teacher`` without a cache and with ``cache_mb``;
    assert both give the same layers' errors and weights. Returns the cached run's report."""
    res = convert(teacher, input_shape=(1, 3, 16, 16), rank=1, convert_stem=True)
    loader = [torch.randn(6, 3, 16, 16) for _ in range(4)]
    runs = []
    for mb in (0, cache_mb):
        model = copy.deepcopy(res.model)
        runs.append((model, calibrate(model, teacher, res.plan, loader, progress=False, cache_mb=mb, rounds=rounds)))
    (m0, r0), (m1, r1) = runs
    for a, b in zip(r0.layers, r1.layers, strict=True):
        assert a.name == b.name and a.error_after == pytest.approx(b.error_after, rel=1e-4, abs=1e-7)
    s0, s1 = m0.state_dict(), m1.state_dict()
    for k in s0:
        torch.testing.assert_close(s1[k], s0[k], atol=1e-4, rtol=1e-3)
    return r0, r1


@pytest.mark.parametrize("gap", [False, True], ids=["chained", "broken-chain"])
def test_cached_calibration_equals_the_uncached_one(gap):
    r0, r1 = _uncached_and_cached(_bn_teacher(gap), 64, rounds=2)
    assert r0.cache["stage_layers"] == 0 and r1.cache["stage_layers"] >= 8 and r1.cache["prefix_layers"] <= 1
    assert r1.cache["prefix_passes"] < r0.cache["prefix_passes"] and 0 < r1.cache["peak_mb"] <= 64
    assert len(r0.layers) == len(r1.layers) >= 10


def test_stages_too_large_to_cache_are_streamed_from_the_last_one_that_fits():
    # 24 images: the 8 x 16 x 16 stage inputs (192 KiB) exceed a 0.12 MiB cache, the image (72 KiB) and the
    # 16 x 8 x 8 ones (96 KiB) fit: layer1's and layer2.0's layers are fed by running the stages after the
    # cached image batches, layer2.1's inputs become the cache; the result equals the uncached calibration.
    _, r1 = _uncached_and_cached(_bn_teacher(), 0.12, rounds=1)
    c = r1.cache
    assert c["streamed_layers"] >= 4 and c["stage_layers"] >= 3 and c["prefix_layers"] == 0
    assert c["prefix_passes"] == 1 and 0 < c["peak_mb"] <= 0.12
    assert all(layer.seconds > 0 for layer in r1.layers)


def test_auto_cache_size_is_half_the_available_memory(monkeypatch):
    from dsdeploy.recover import stagecache

    monkeypatch.setattr(stagecache, "available_mb", lambda: 3000.0)
    assert stagecache.cache_budget_mb("auto") == 1500.0 and stagecache.cache_budget_mb(64) == 64.0
    monkeypatch.setattr(stagecache, "available_mb", lambda: None)  # not Linux: a fixed size
    assert stagecache.cache_budget_mb("auto") == stagecache.AUTO_FALLBACK_MB
    monkeypatch.setattr(stagecache, "available_mb", lambda: 0.2)  # too little memory: the prefix path, same result
    teacher = _bn_teacher()
    res = convert(teacher, input_shape=(1, 3, 16, 16), rank=1)
    report = calibrate(res.model, teacher, res.plan, [torch.randn(6, 3, 16, 16) for _ in range(2)],
                       progress=False, rounds=0)
    assert report.cache["auto"] and report.cache["cache_mb"] == 0.1
    assert report.cache["prefix_layers"] + report.cache["stage_layers"] + report.cache["streamed_layers"] == len(
        report.layers)
    monkeypatch.undo()
    real = stagecache.available_mb()  # the real reader: a number on Linux, None elsewhere
    assert real is None or real > 0


def test_cache_size_option_takes_auto_or_mib(tmp_path):
    assert CalibrationParams().cache_mb == "auto" and CalibrationParams(cache_mb="AUTO").cache_mb == "auto"
    assert CalibrationParams(cache_mb="64").cache_mb == 64.0 and CalibrationParams(cache_mb=0).cache_mb == 0
    for bad in ("lots", -1, float("inf")):
        with pytest.raises(DsdeployError, match="calibrate.cache_mb"):
            CalibrationParams(cache_mb=bad)
    r = recipe_from_dict({"model": {"spec": "sample:digits_cnn"}, "calibrate": {"cache_mb": "auto"}}, "r.toml")
    assert r.calibrate.cache_mb == "auto"
    with pytest.raises(RecipeError, match="calibrate.cache_mb"):
        recipe_from_dict({"model": {"spec": "sample:digits_cnn"}, "calibrate": {"cache_mb": "big"}}, "r.toml")
    proc = invoke("convert", "sample:digits_cnn", "-o", tmp_path / "x.dsd", "--calib-data", "digits",
                  "--calib-cache-mb", "lots")
    assert proc.returncode != 0 and "--calib-cache-mb must be 'auto' or a number" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "x.dsd").exists()


def test_a_cache_too_small_falls_back_to_the_prefix_pass():
    torch.manual_seed(0)
    teacher = TinyResNet().eval()
    res = convert(teacher, input_shape=(1, 3, 16, 16), rank=1)
    report = calibrate(res.model, teacher, res.plan, [torch.randn(4, 3, 16, 16) for _ in range(2)],
                       progress=False, cache_mb=1e-4, rounds=0)
    assert report.cache["stage_layers"] == 0 and report.cache["prefix_layers"] == len(report.layers)


def test_new_options_are_validated_naming_the_field():
    with pytest.raises(DsdeployError, match="calibrate.rounds"):
        CalibrationParams(rounds=-1)
    with pytest.raises(DsdeployError, match="calibrate.cache_mb"):
        CalibrationParams(cache_mb=float("nan"))
    with pytest.raises(RecipeError, match="calibrate.rounds"):
        recipe_from_dict({"model": {"spec": "sample:digits_cnn"}, "calibrate": {"rounds": 1.5}}, "r.toml")
    plan = plan_for({"0": 1})
    with pytest.raises(DsdeployError, match="calibrate.rounds"):
        calibrate(nn.Sequential(nn.Conv2d(1, 1, 1)), nn.Sequential(nn.Conv2d(1, 1, 1)), plan, [], rounds=-2)
