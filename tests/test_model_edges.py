"""Model edge cases: old weight_norm, damaged numbers, shared convs, 1-image batches, fixed batches."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import dsdeploy
from dsdeploy.conversion.artifact import load_artifact
from dsdeploy.conversion.loading import load_model
from dsdeploy.conversion.opcount import profile_model, trace_calls
from dsdeploy.conversion.plan import Policy
from dsdeploy.conversion.rewrite import convert, copy_model
from dsdeploy.errors import DsdeployError, ExportError, InputShapeError, ModelError
from dsdeploy.export.graph import load_onnx, summarize
from dsdeploy.export.onnx_export import export_onnx
from dsdeploy.recover.reconstruct import calibrate

pytestmark = pytest.mark.usefixtures("users_exporter")  # export edge cases: "auto" as users get it

# -- factories (pkg.module:factory specs point here) --------------------------------------------


def wnnet() -> nn.Module:
    """Convs wrapped by the old hook-based torch.nn.utils.weight_norm (one converted, one kept)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                      nn.Conv2d(16, 16, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nn.utils.weight_norm(m[2])
        nn.utils.weight_norm(m[4])
    return m


class Hidden(nn.Module):
    """Keeps a random scale OUTSIDE its state_dict: a rebuilt copy computes something else."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(8, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.scale = float(torch.rand(()) + 1.0)

    def forward(self, x):
        return self.c2(torch.relu(self.c1(x))).mean((2, 3)) * self.scale


def hidden() -> nn.Module:
    return Hidden()


class Reuse(nn.Module):
    def __init__(self, calls: int = 2) -> None:
        super().__init__()
        self.inp = nn.Conv2d(8, 16, 3, padding=1)
        self.shared = nn.Conv2d(16, 16, 3, padding=1)
        self.calls = calls

    def forward(self, x):
        x = torch.relu(self.inp(x))
        for _ in range(self.calls):
            x = torch.relu(self.shared(x))
        return x.mean((2, 3))


def necknet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.BatchNorm1d(16), nn.Linear(16, 2))


class FixedBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Conv2d(8, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(self.body(x).reshape(1, -1))


SHAPE8 = (1, 8, 8, 8)

# -- artifacts always load back ----------------------------------------------------------------


def test_weight_norm_model_artifact_loads_back(tmp_path):
    loaded = load_model("tests.test_model_edges:wnnet")
    out = tmp_path / "w.dsd"
    dsdeploy.save(dsdeploy.convert(loaded, policy=Policy(rank=1), input_shape=SHAPE8), out)
    art = load_artifact(out, trust_code=True)
    x = torch.randn(2, 8, 8, 8)
    fresh = convert(wnnet(), input_shape=SHAPE8, rank=1).model.eval()
    with torch.no_grad():
        assert torch.allclose(art.model(x), fresh(x), atol=1e-5)
    copy_model(art.model)  # a loaded artifact (non-leaf hook weights again) copies too


def test_copy_model_leaves_the_original_untouched():
    m = wnnet()
    before = {id(v): v for v in vars(m[2]).values() if isinstance(v, torch.Tensor)}
    c = copy_model(m)
    assert c is not m and c[2].weight is not m[2].weight
    assert {id(v): v for v in vars(m[2]).values() if isinstance(v, torch.Tensor)} == before
    assert m[2].weight.grad_fn is not None  # the original's hook state is unchanged


def test_convert_refuses_to_write_an_artifact_that_would_not_rebuild(tmp_path):
    loaded = load_model("tests.test_model_edges:hidden")
    out = tmp_path / "h.dsd"
    with pytest.raises(ModelError, match="nothing was written"):
        dsdeploy.save(dsdeploy.convert(loaded, policy=Policy(rank=1), input_shape=SHAPE8), out)
    assert not out.exists() and list(tmp_path.iterdir()) == []


# -- numbers that make a conversion meaningless ------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(where=st.sampled_from(["3.weight", "3.bias", "1.weight", "4.running_mean", "9.weight"]),
       bad=st.sampled_from([float("nan"), float("inf"), -float("inf")]), index=st.integers(0, 15))
def test_non_finite_weights_are_one_line_naming_the_tensor(where, bad, index):
    model = necknet().eval()
    t = dict(model.named_parameters(), **dict(model.named_buffers()))[where]
    with torch.no_grad():
        t.view(-1)[index % t.numel()] = bad
    with pytest.raises(ModelError) as err:
        convert(model, input_shape=(1, 3, 8, 8), rank=1)
    assert str(err.value).startswith(where) and "NaN/infinite" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("bn", ["1", "4", "8"])
def test_negative_or_nan_batchnorm_variance_is_refused(bn):
    for bad in (-0.5, float("nan")):
        model = necknet().eval()
        with torch.no_grad():
            model.get_submodule(bn).running_var[2] = bad
        with pytest.raises(ModelError, match=f"^{bn}.running_var"):
            convert(model, input_shape=(1, 3, 8, 8), rank=1)


# -- MACs count every call ---------------------------------------------------------------------


@pytest.mark.parametrize("calls", [1, 2, 3])
def test_macs_count_each_call_and_agree_with_the_graph(tmp_path, calls):
    model = Reuse(calls).eval()
    calls_seen = trace_calls(model, SHAPE8)
    one = 16 * 16 * 9 * 64
    assert calls_seen["shared"][2] == calls * one
    prof = profile_model(model, SHAPE8)
    export_onnx(model, tmp_path / "r.onnx", SHAPE8, simplify=False)
    assert prof.conv_macs == summarize(load_onnx(tmp_path / "r.onnx"), SHAPE8).conv_macs
    res = convert(model, input_shape=SHAPE8, rank=1)
    export_onnx(res.model, tmp_path / "c.onnx", SHAPE8, simplify=False)
    assert res.after.conv_macs == summarize(load_onnx(tmp_path / "c.onnx"), SHAPE8).conv_macs
    budget = convert(model, input_shape=SHAPE8, mac_budget=0.5)  # the budget is met per call too
    assert budget.after.conv_macs <= 0.5 * budget.before.conv_macs + 1


# -- a batch of one image ----------------------------------------------------------------------


@pytest.mark.parametrize("n,batch", [(65, 64), (9, 4), (3, 2)])
def test_bn_reestimation_survives_a_one_image_last_batch(n, batch):
    from torch.utils.data import DataLoader, TensorDataset

    teacher = necknet().eval()
    res = convert(teacher, input_shape=(1, 3, 8, 8), rank=1)
    x = torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(x), batch_size=batch)
    report = calibrate(res.model, teacher, res.plan, loader, progress=False)
    assert report.bn_layers >= 2
    neck = res.model.get_submodule("8")
    assert torch.isfinite(neck.running_var).all() and (neck.running_var > 0).all()


def test_bn_reestimation_with_only_single_images_is_one_line():
    from torch.utils.data import DataLoader, TensorDataset

    from dsdeploy.errors import DataError
    from dsdeploy.recover.reconstruct import recalibrate_bn

    res = convert(necknet().eval(), input_shape=(1, 3, 8, 8), rank=1)
    with pytest.raises(DataError, match="at least 2 images"):
        recalibrate_bn(res.model, DataLoader(TensorDataset(torch.randn(3, 3, 8, 8)), batch_size=1))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 200), batch=st.integers(1, 70))
def test_training_batches_never_hold_one_image_when_avoidable(n, batch):
    from torch.utils.data import TensorDataset

    from dsdeploy.recover.finetune import steps_per_epoch, train_loader

    sizes = [len(b[0]) for b in train_loader(TensorDataset(torch.zeros(n, 1)), batch, seed=0)]
    assert len(sizes) == steps_per_epoch(n, batch)
    if n > batch:
        assert set(sizes) == {batch}
    else:
        assert sizes == [n]


def test_finetune_with_batchnorm1d_and_a_one_image_remainder(tmp_path):
    from torch.utils.data import TensorDataset

    from dsdeploy.data.datasets import DataSplits
    from dsdeploy.recover.config import FinetuneConfig
    from dsdeploy.recover.finetune import finetune

    teacher = necknet().eval()
    student = convert(teacher, input_shape=(1, 3, 8, 8), rank=1).model
    g = torch.Generator().manual_seed(0)
    train = TensorDataset(torch.randn(17, 3, 8, 8, generator=g), torch.randint(0, 2, (17,), generator=g))
    val = TensorDataset(torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 2, (6,), generator=g))
    res = finetune(student, teacher, DataSplits(train, val, ["a", "b"], None),
                   FinetuneConfig(epochs=1, batch_size=8, progress=False, channels_last=False),
                   out_path=tmp_path / "f.dsd")
    assert res.steps == 2 and res.stopped == "completed"


# -- static INT8 calibration of a fixed-batch model ---------------------------------------------


@pytest.mark.parametrize("n", [65, 3])
def test_int8_static_calibration_of_a_fixed_batch_model(tmp_path, n):
    from dsdeploy.export.quantize import _Calibration, quantize_model

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 2)).eval()
    export_onnx(model, tmp_path / "t4.onnx", (4, 3, 10, 12), dynamic_batch=False)
    images = np.random.default_rng(0).standard_normal((n, 3, 10, 12)).astype(np.float32)
    reader = _Calibration("input", images, 4, fixed=True)
    chunks = list(iter(reader.get_next, None))
    assert all(c["input"].shape[0] == 4 for c in chunks) and len(chunks) == -(-n // 4)
    quantize_model(tmp_path / "t4.onnx", tmp_path / "q.onnx", "int8", calib=images, input_name="input", fixed_batch=4)
    assert (tmp_path / "q.onnx").is_file()


# -- unclear export errors become one line naming the cause and the fix ---------------------------


def test_fixed_batch_model_exported_with_dynamic_batch_says_use_a_static_batch(tmp_path):
    shape = (1, 8, 6, 6)
    with pytest.raises(InputShapeError, match=r"cannot run at batch 3.*static batch") as err:
        export_onnx(FixedBatch().eval(), tmp_path / "b.onnx", shape)
    assert "\n" not in str(err.value) and not (tmp_path / "b.onnx").exists()
    export_onnx(FixedBatch().eval(), tmp_path / "b.onnx", shape, dynamic_batch=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_non_float32_model_export_names_the_dtype(tmp_path, dtype):
    model = Reuse(1).to(dtype).eval()
    with pytest.raises(ExportError, match=r"float\(\)") as err:
        export_onnx(model, tmp_path / "h.onnx", SHAPE8)
    assert str(dtype).replace("torch.", "") in str(err.value)


def test_graph_ort_cannot_run_names_no_temp_file_and_suggests_dynamo(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding="same"), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding="same", dilation=2), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    res = convert(model, input_shape=(1, 8, 12, 12), rank=1)
    try:
        export_onnx(res.model, tmp_path / "s.onnx", (1, 8, 12, 12), exporter="torchscript")
    except ExportError as exc:  # this ONNX Runtime refuses TorchScript's dilated SAME padding
        assert "dynamo" in str(exc) and "dsdeploy-export-" not in str(exc) and "\n" not in str(exc)
    export_onnx(res.model, tmp_path / "d.onnx", (1, 8, 12, 12), exporter="dynamo")


@pytest.mark.parametrize("layout", ["branches", "concat", "multiplier"])
@pytest.mark.parametrize("rank", [1, 2])
def test_one_channel_stem_ds_block_is_not_a_structure_problem(tmp_path, layout, rank):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    res = convert(model, input_shape=(1, 1, 8, 8), rank=rank, layout=layout, convert_stem=True)
    assert "0" in {d.name for d in res.plan.converted}
    report = export_onnx(res.model, tmp_path / "m.onnx", (1, 1, 8, 8))
    assert report.ds_problems == []


def test_errors_are_dsdeploy_errors():
    assert issubclass(ModelError, DsdeployError)
