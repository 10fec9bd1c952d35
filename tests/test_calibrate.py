"""Calibration: exact least squares per group/layout, BN re-estimation, and the digits loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dsdeploy.conversion.artifact import load_artifact, save_artifact, source_record
from dsdeploy.conversion.block import DSConv, ds_blocks
from dsdeploy.conversion.decompose import full_rank
from dsdeploy.conversion.plan import LayerDecision, Plan
from dsdeploy.conversion.rewrite import convert
from dsdeploy.data.datasets import Preprocess, load_data, make_loader
from dsdeploy.recover.distill import evaluate
from dsdeploy.recover.reconstruct import calibrate, recalibrate_bn
from tests.clirun import dsdeploy

ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # tiny models: thread sync costs more than it saves on a shared CPU
DIGITS8 = Preprocess(size=(8, 8), resize=None, mean=(0.3,), std=(0.32,), channels=1)


def tiny_digits_cnn(width: int = 16) -> nn.Module:
    """A small CNN for 1x8x8 digits (the tests' teacher; factory spec tests.test_calibrate:tiny_digits_cnn)."""
    torch.manual_seed(0)

    def cbr(i: int, o: int) -> list[nn.Module]:
        return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]

    return nn.Sequential(*cbr(1, width), *cbr(width, 2 * width), nn.MaxPool2d(2), *cbr(2 * width, 2 * width),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 10))


def train_digits(epochs: int = 6) -> tuple[nn.Module, object]:
    """Train the tiny CNN on 8x8 digits (a few seconds); returns (model in eval mode, splits)."""
    splits = load_data("digits", DIGITS8)
    model = tiny_digits_cnn()
    opt = torch.optim.Adam(model.parameters(), 5e-3)
    for ep in range(epochs):
        model.train()
        for x, y in make_loader(splits.train, 32, shuffle=True, seed=ep):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval(), splits


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Run this module's tiny models on one thread (restored afterwards)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def digits(one_thread):
    return train_digits()


def plan_for(names_ranks: dict[str, int], layout: str = "branches") -> Plan:
    return Plan(layers=[LayerDecision(name=n, type="Conv2d", in_channels=0, out_channels=0, kernel_size=[3, 3],
                                      groups=1, convert=True, rank=r) for n, r in names_ranks.items()], layout=layout)


@pytest.mark.parametrize("layout", ["branches", "concat", "multiplier"])
@pytest.mark.parametrize("groups,bias", [(1, True), (2, False), (4, True)])
def test_least_squares_recovers_an_exactly_representable_conv(layout, groups, bias):
    torch.manual_seed(1)
    conv = nn.Conv2d(8, 12, 3, padding=1, stride=2, groups=groups, bias=bias)
    teacher = nn.Sequential(conv)
    k = full_rank(tuple(conv.weight.shape), groups)
    block = DSConv.from_conv(conv, rank=k, layout=layout)  # full rank: exact when the pointwise part is right
    pw, b = block.get_pointwise()
    block.set_pointwise(torch.randn_like(pw), None if b is None else torch.randn_like(b))  # destroy it
    student = nn.Sequential(block)
    x = torch.randn(16, 8, 10, 10)
    assert not torch.allclose(student(x), conv(x), atol=1e-2)
    loader = [(x[i:i + 4], torch.zeros(4, dtype=torch.long)) for i in range(0, 16, 4)]
    report = calibrate(student, teacher, plan_for({"0": k}, layout), loader, ridge=1e-10, progress=False, bn=False)
    with torch.no_grad():
        torch.testing.assert_close(student(x), conv(x), atol=2e-4, rtol=1e-4)
    assert report.layers[0].error_before > 0.5 and report.layers[0].error_after < 1e-6
    assert report.images == 16 and report.batches == 4


def test_layers_are_solved_in_call_order_on_the_students_own_inputs():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()
    res = convert(teacher, input_shape=(1, 6, 8, 8), rank=1)
    x = torch.randn(32, 6, 8, 8)
    loader = [(x[i:i + 8], torch.zeros(8, dtype=torch.long)) for i in range(0, 32, 8)]
    report = calibrate(res.model, teacher, res.plan, loader, progress=False, bn=False)
    assert [c.name for c in report.layers] == ["0", "2"]
    # the second layer's target is the ORIGINAL conv applied to the calibrated student's input
    student = res.model
    with torch.no_grad():
        h = student[1](student[0](x))
        err = (student[2](h) - teacher[2](h)).square().sum() / teacher[2](h).square().sum()
    assert float(err) == pytest.approx(report.layers[1].error_after, rel=1e-3)
    assert all(c.error_after < c.error_before for c in report.layers)


def test_recalibrate_bn_is_the_cumulative_average_of_the_affected_norms():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6))
    res = convert(teacher, input_shape=(1, 3, 8, 8), rank=1, convert_stem=True, include="^2$")
    model = res.model.eval()
    bn_before = model[1].running_mean.clone()
    x = torch.randn(24, 3, 8, 8) * 2 + 1
    loader = [(x[i:i + 8], None) for i in range(0, 24, 8)]
    assert recalibrate_bn(model, loader) == 1  # only the BN after the DS block
    with torch.no_grad():
        feats = model[2](model[1](model[0](x)))
    torch.testing.assert_close(model[3].running_mean, feats.mean(dim=(0, 2, 3)), atol=1e-5, rtol=1e-5)
    per_batch = torch.stack([feats[i:i + 8].var(dim=(0, 2, 3), unbiased=True) for i in range(0, 24, 8)]).mean(0)
    torch.testing.assert_close(model[3].running_var, per_batch, atol=1e-5, rtol=1e-5)
    assert torch.equal(model[1].running_mean, bn_before) and model[3].momentum == 0.1 and not model.training


def test_calibration_beats_naive_svd_on_digits(digits):
    teacher, splits = digits
    val = make_loader(splits.val, 256, shuffle=False)
    teacher_acc = evaluate(teacher, val)
    assert teacher_acc > 0.9
    res = convert(teacher, input_shape=(1, 1, 8, 8), rank=1)
    naive = evaluate(res.model, val)
    report = calibrate(res.model, teacher, res.plan, make_loader(splits.train, 64, shuffle=False), max_batches=12,
                       progress=False, eval_loader=val)
    assert report.accuracy_before == pytest.approx(naive)
    assert report.accuracy_after > naive + 0.2, (naive, report.accuracy_after)
    assert report.accuracy_after > 0.7  # rank 1 everywhere: far from the teacher, far above naive SVD
    assert all(c.error_after < c.error_before for c in report.layers)
    assert report.bn_layers == 2


def sample_digits():
    """sample:digits_cnn (the shipped, trained 1x16x16 digits CNN) with its own preprocessing."""
    from dsdeploy.conversion.loading import load_model

    loaded = load_model("sample:digits_cnn")
    return loaded.model, load_data("digits", Preprocess.from_dict(loaded.preprocessing))


def test_calibration_beats_naive_svd_on_the_digits_sample():
    teacher, splits = sample_digits()
    val = make_loader(splits.val, 256, shuffle=False)
    res = convert(teacher, input_shape=(1, 1, 16, 16), rank=1)
    report = calibrate(res.model, teacher, res.plan, make_loader(splits.train, 64, shuffle=False), max_batches=10,
                       progress=False, eval_loader=val)
    assert evaluate(teacher, val) > 0.97
    assert report.accuracy_before < 0.5 and report.accuracy_after > 0.85, report  # measured: 0.114 -> 0.914


def test_calibrate_cli_writes_a_calibrated_artifact_with_history(digits, tmp_path):
    teacher, splits = digits
    weights = tmp_path / "teacher.pt"
    torch.save(teacher.state_dict(), weights)
    res = convert(teacher, input_shape=(1, 1, 8, 8), rank=1)
    src = tmp_path / "naive.dsd"
    save_artifact(src, res.model, res.plan, source_record("tests.test_calibrate:tiny_digits_cnn", weights=str(weights)),
                  {"input_shape": [1, 1, 8, 8], "preprocessing": DIGITS8.to_dict()}, [{"stage": "convert"}])
    out = tmp_path / "cal.dsd"
    proc = dsdeploy("calibrate", src, "--data", "digits", "-o", out, "--max-batches", "8", "--trust-code",
                    env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr
    assert "accuracy" in proc.stdout and out.is_file()
    assert "\r" not in proc.stderr  # stderr is a pipe here: no progress-bar redraws in a log
    art = load_artifact(out, trust_code=True)
    assert [h["stage"] for h in art.history] == ["convert", "calibrate"]
    entry = art.history[1]
    assert entry["accuracy_after"] > entry["accuracy_before"] + 0.2
    assert entry["images"] == 8 * 64
    val = make_loader(splits.val, 256, shuffle=False)
    # measured in another process, possibly in other batches: a borderline image may round the other way
    assert evaluate(art.model, val) == pytest.approx(entry["accuracy_after"], abs=2 / len(splits.val) + 1e-9)
    assert set(ds_blocks(art.model)) == {d.name for d in art.plan.converted}
    # same inputs + seed -> same file
    out2 = tmp_path / "cal2.dsd"
    proc = dsdeploy("calibrate", src, "--data", "digits", "-o", out2, "--max-batches", "8", "--trust-code",
                    env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr
    a, b = torch.load(out, weights_only=True)["state_dict"], torch.load(out2, weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_calibrate_cli_reports_bad_data_in_one_line(digits, tmp_path):
    teacher, _ = digits
    res = convert(teacher, input_shape=(1, 1, 8, 8), rank=1)
    weights = tmp_path / "t.pt"
    torch.save(teacher.state_dict(), weights)
    src = tmp_path / "n.dsd"
    save_artifact(src, res.model, res.plan, source_record("tests.test_calibrate:tiny_digits_cnn", weights=str(weights)),
                  {"preprocessing": DIGITS8.to_dict()})
    proc = dsdeploy("calibrate", src, "--data", tmp_path / "missing", "-o", tmp_path / "o.dsd", "--trust-code",
                    env=ONE_THREAD)
    assert proc.returncode != 0
    assert proc.stderr.startswith("error: ") and "not found" in proc.stderr and "Traceback" not in proc.stderr
