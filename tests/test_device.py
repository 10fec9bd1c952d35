"""Devices and precision: device names, one-line refusals of absent devices, autocast fine-tuning and
evaluation (the artifact stays fp32 on the CPU), float64 least-squares sums, and the same runs on CUDA
where a CUDA device exists (skipped with that reason elsewhere)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dsdeploy.conversion.artifact import read_payload
from dsdeploy.conversion.block import ds_blocks
from dsdeploy.conversion.rewrite import convert
from dsdeploy.data.datasets import make_loader
from dsdeploy.errors import DeviceError, RecipeError
from dsdeploy.pipeline.recipe import recipe_from_dict
from dsdeploy.recover.als import PatchEquations
from dsdeploy.recover.config import FinetuneConfig
from dsdeploy.recover.device import Precision, lsq_placement, module_device, placed, resolve_device
from dsdeploy.recover.evaluate import evaluate as evaluate_model
from dsdeploy.recover.finetune import finetune
from dsdeploy.recover.lsq import NormalEquations
from dsdeploy.recover.metrics import evaluate
from dsdeploy.recover.reconstruct import calibrate
from tests.clirun import dsdeploy, dsdeploy_chain, invoke
from tests.test_calibrate import DIGITS8, ONE_THREAD, one_thread, sample_digits, train_digits  # noqa: F401 (fixture)

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device")


@pytest.fixture(scope="module")
def digits(one_thread):  # noqa: F811
    teacher, splits = train_digits()
    res = convert(teacher, input_shape=(1, 1, 8, 8), rank=1)
    calibrate(res.model, teacher, res.plan, make_loader(splits.train, 64, shuffle=False), max_batches=12,
              progress=False, device="cpu")
    return teacher, res, splits


@pytest.fixture(scope="module")
def sample_dsd(tmp_path_factory):
    """sample:digits_cnn converted at rank 1 and calibrated on digits with --device cpu (the CLI in-process)."""
    out = tmp_path_factory.mktemp("dev") / "cal.dsd"
    proc = invoke("convert", "sample:digits_cnn", "-o", out, "--rank", "1", "--calib-data", "digits",
                  "--calib-batches", "4", "--device", "cpu")  # in-process (suite time); the commands below run it
    assert proc.returncode == 0, proc.stderr
    return out


def cfg(**kw) -> FinetuneConfig:
    return FinetuneConfig(**{"epochs": 1, "progress": False, "lr": 0.02, **kw})


# -- names -> devices ---------------------------------------------------------------------------

def test_auto_picks_cuda_when_present_else_the_cpu(monkeypatch):
    monkeypatch.delenv("DSDEPLOY_DEVICE", raising=False)
    assert resolve_device("auto") == (torch.device("cuda") if CUDA else torch.device("cpu"))
    assert resolve_device(None) == resolve_device("auto")
    assert resolve_device("cpu") == resolve_device(" CPU ") == torch.device("cpu")


def test_dsdeploy_device_sets_what_auto_means(monkeypatch):
    monkeypatch.setenv("DSDEPLOY_DEVICE", "cpu")
    assert resolve_device("auto") == torch.device("cpu")
    if not CUDA:
        monkeypatch.setenv("DSDEPLOY_DEVICE", "cuda")
        with pytest.raises(DeviceError, match="^DSDEPLOY_DEVICE 'cuda' is not available"):
            resolve_device("auto")


@pytest.mark.parametrize("name", ["cuda", "cuda:1", "cuda:7", "mps"])
def test_an_absent_device_is_refused_in_one_line_naming_the_field(name):
    present = (name == "mps" and torch.backends.mps.is_available()) or (
        name.startswith("cuda") and CUDA and int((name + ":0").split(":")[1]) < torch.cuda.device_count())
    if present:
        pytest.skip(f"{name} is present on this machine")
    with pytest.raises(DeviceError) as err:
        resolve_device(name, "finetune.device")
    msg = str(err.value)
    assert msg.startswith(f"finetune.device {name!r} is not available") and "\n" not in msg
    assert "'cpu'" in msg or "CUDA_VISIBLE_DEVICES" in msg


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "tpu", ""])
def test_an_unknown_device_name_is_refused(name):
    with pytest.raises(DeviceError, match="device must be one of auto, cpu, cuda, cuda:N, mps"):
        resolve_device(name)
    with pytest.raises(Exception, match="finetune.device must be one of"):
        FinetuneConfig(device=name)


def test_recipe_keys_for_device_and_precision_are_validated_with_the_field_named():
    r = recipe_from_dict({"model": {"spec": "sample:digits_cnn"}, "calibrate": {"device": "cpu"},
                          "finetune": {"device": "cuda:0", "precision": "bf16"},
                          "evaluate": {"device": "auto", "precision": "fp16"}}, "r.toml")
    assert (r.calibrate.device, r.finetune.config().device, r.finetune.config().precision) == ("cpu", "cuda:0", "bf16")
    assert (r.evaluate.config().device, r.evaluate.config().precision) == ("auto", "fp16")
    for section, table, named in [("calibrate", {"device": "gpu"}, "calibrate.device"),
                                  ("finetune", {"precision": "fp8"}, "finetune.precision"),
                                  ("evaluate", {"device": "cuda:a"}, "evaluate.device")]:
        with pytest.raises(RecipeError, match=f"r.toml: {named} must be one of"):
            recipe_from_dict({"model": {"spec": "sample:digits_cnn"}, section: table}, "r.toml")


# -- the CLI: absent devices are one line, cpu runs end to end -----------------------------------

def _absent(device: str) -> bool:
    if device == "mps":
        return not torch.backends.mps.is_available()
    return not (CUDA and int(device.partition(":")[2] or 0) < torch.cuda.device_count())


def _refused_in_one_line(proc, device: str, command: str) -> None:
    assert proc.returncode == 2, (command, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --device {device!r} is not available"), proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("device", ["cuda", "cuda:1", "mps"])
def test_the_cli_refuses_an_absent_device_in_one_line(device, sample_dsd, tmp_path):
    """Every command taking --device, in-process (the CLI's own error handling; the real-process
    run of the same refusal is the test below)."""
    if not _absent(device):
        pytest.skip(f"{device} is present on this machine")
    runs = [("finetune", sample_dsd, "--data", "digits", "-o", tmp_path / "f.dsd", "--epochs", "1"),
            ("evaluate", sample_dsd, "--data", "digits"),
            ("calibrate", sample_dsd, "--data", "digits", "-o", tmp_path / "c.dsd"),
            ("convert", "sample:digits_cnn", "-o", tmp_path / "v.dsd", "--rank", "1", "--calib-data", "digits")]
    for args in runs:
        _refused_in_one_line(invoke(*args, "--device", device), device, args[0])
    assert not list(tmp_path.iterdir())  # nothing written


def test_a_real_cli_process_refuses_an_absent_device_in_one_line(sample_dsd, tmp_path):
    """The refusal from ``python -m dsdeploy`` itself: exit status 2, one stderr line, nothing written."""
    device = next((d for d in ("cuda:7", "mps") if _absent(d)), None)
    if device is None:
        pytest.skip("this machine has 8 CUDA devices and MPS")
    proc = dsdeploy("finetune", sample_dsd, "--data", "digits", "-o", tmp_path / "f.dsd", "--epochs", "1",
                    "--device", device, env=ONE_THREAD)
    _refused_in_one_line(proc, device, "finetune")
    assert not list(tmp_path.iterdir())


def test_explicit_cpu_runs_calibrate_finetune_evaluate_end_to_end(sample_dsd, tmp_path):
    cal, fin = tmp_path / "cal.dsd", tmp_path / "fin.dsd"
    runs = dsdeploy_chain(  # one real process for the three commands (suite time: one interpreter start)
        ("calibrate", sample_dsd, "--data", "digits", "-o", cal, "--max-batches", "4", "--device", "cpu"),
        ("finetune", cal, "--data", "digits", "-o", fin, "--epochs", "1", "--device", "cpu", "--precision", "fp32",
         "--json"),
        ("evaluate", fin, "--data", "digits", "--device", "cpu", "--json"), env=ONE_THREAD)
    assert [p.returncode for p in runs] == [0, 0, 0], runs[-1].stderr
    assert '"top1": 0.9' in runs[-1].stdout  # the sample recovers to > 90% (measured about 98%)


def test_inspect_calib_data_runs_on_the_named_device_and_refuses_an_absent_one(one_thread):  # noqa: F811
    """``inspect --calib-data`` runs the model on data (the sensitivity table), so it takes --device like
    ``convert --calib-data``: cpu works; an absent device is one line before any work, and the device
    reaches the sensitivity passes (the library path refuses it there too)."""
    import json

    from dsdeploy.conversion.loading import load_model
    from dsdeploy.conversion.plan import Policy
    from dsdeploy.conversion.workflow import inspect_model
    from tests.clirun import invoke

    args = ("inspect", "sample:digits_cnn", "--calib-data", "digits", "--calib-batches", "1")
    res = invoke(*args, "--device", "cpu", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["sensitivity"]["layers"]
    if CUDA:
        pytest.skip("cuda is present on this machine")
    res = invoke(*args, "--device", "cuda")
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert lines[0].startswith("error: --device 'cuda' is not available"), res.stderr
    with pytest.raises(DeviceError, match="'cuda' is not available"):
        inspect_model(load_model("sample:digits_cnn"), Policy(), calib_data="digits", calib_batches=1,
                      device="cuda")


# -- precision ------------------------------------------------------------------------------------

def _fp32_on_cpu(path) -> None:
    state = read_payload(path)["state_dict"]
    floats = [t for t in state.values() if t.is_floating_point()]
    assert floats and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in floats)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_finetune_on_cpu_trains_and_writes_an_fp32_artifact(precision, sample_dsd, tmp_path):
    """bf16 and fp16 autocast both run on the CPU (torch's CPU autocast has both; fp16 with a gradient
    scaler); the weights and the artifact stay float32 and the accuracy stays that of a recovered model."""
    out = tmp_path / "o.dsd"
    proc = dsdeploy("finetune", sample_dsd, "--data", "digits", "-o", out, "--epochs", "1", "--device", "cpu",
                    "--precision", precision, "--json", env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr
    import json

    res = json.loads(proc.stdout)
    assert res["history"][0]["train_loss"] == res["history"][0]["train_loss"]  # finite, not NaN
    assert res["best_accuracy"] > 0.9, res  # measured: about 0.98 either way
    assert res["teacher_accuracy"] - res["best_accuracy"] < 0.05
    _fp32_on_cpu(out)
    scaler = torch.load(out.with_suffix(".ckpt"), weights_only=True)["scaler"]  # checkpointed for resume
    assert (scaler["scale"] > 0) if precision == "fp16" else scaler == {}


def test_fp32_precision_steps_exactly_as_a_plain_optimizer_step():
    torch.manual_seed(0)
    a = nn.Linear(4, 3)
    b = nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    x = torch.randn(8, 4)
    oa, ob = torch.optim.SGD(a.parameters(), 0.1), torch.optim.SGD(b.parameters(), 0.1)
    loss = a(x).square().mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(list(a.parameters()), 0.5)
    oa.step()
    Precision(torch.device("cpu"), "fp32").step(b(x).square().mean(), ob, list(b.parameters()), 0.5)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_bf16_evaluation_agrees_with_fp32(digits):
    teacher, _res, splits = digits
    val = make_loader(splits.val, 256, shuffle=False)
    assert abs(evaluate(teacher, val, precision="bf16") - evaluate(teacher, val)) < 0.03


def test_evaluate_puts_a_given_module_back_where_it_was(digits):
    teacher, _res, _splits = digits
    out = evaluate_model(teacher, "digits", device="cpu", precision="bf16", limit=64, preprocess=DIGITS8)
    assert out["models"][0]["metrics"]["top1"] > 0.8 and module_device(teacher).type == "cpu"


# -- least squares stays float64 ----------------------------------------------------------------

def test_least_squares_sums_are_float64_on_the_cpu(digits):
    teacher, res, _splits = digits
    name, block = next(iter(ds_blocks(res.model).items()))
    conv = dict(teacher.named_modules())[name]
    x = torch.randn(4, block.in_channels, 8, 8)
    ne, pe = NormalEquations(block, conv), PatchEquations(block, conv)
    ne.add(x)
    pe.add(x)
    for t in (ne.ata, ne.atb, ne.btb, pe.xtx, pe.xtb, pe.btb):
        assert t.dtype == torch.float64 and t.device.type == "cpu"
    assert lsq_placement(torch.device("cpu")) == (torch.device("cpu"), torch.float64)
    # MPS has no float64: products in float32 there, sums in float64 on the CPU (decided without an MPS device)
    assert lsq_placement(torch.device("mps")) == (torch.device("cpu"), torch.float32)


def test_placed_moves_back_also_on_error(digits):
    teacher = digits[0]
    with pytest.raises(RuntimeError, match="boom"), placed(torch.device("cpu"), teacher):
        raise RuntimeError("boom")
    assert module_device(teacher).type == "cpu"


# -- on CUDA, where there is one ------------------------------------------------------------------

@needs_cuda
def test_calibration_on_cuda_matches_the_cpu(digits):
    import copy

    teacher, _res, splits = digits
    loader = make_loader(splits.train, 64, shuffle=False)
    errs = {}
    for dev in ("cpu", "cuda"):
        r = convert(teacher, input_shape=(1, 1, 8, 8), rank=1)
        rep = calibrate(r.model, copy.deepcopy(teacher), r.plan, loader, max_batches=6, progress=False, device=dev)
        assert module_device(r.model).type == "cpu"  # given back where it was
        errs[dev] = [layer.error_after for layer in rep.layers]
    assert errs["cuda"] == pytest.approx(errs["cpu"], rel=0.05, abs=1e-4)


@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_finetune_on_cuda_writes_an_fp32_cpu_artifact(precision, digits, tmp_path):
    import copy

    teacher, res, splits = digits
    student = copy.deepcopy(res.model)
    result = finetune(student, copy.deepcopy(teacher), splits, cfg(device="cuda", precision=precision),
                      out_path=tmp_path / "o.dsd")
    assert module_device(student).type == "cpu" and result.best_accuracy >= result.accuracy_before


def test_run_device_sets_every_stage_and_an_absent_one_is_one_line(tmp_path):
    if CUDA:
        pytest.skip("cuda is present on this machine")
    recipe = tmp_path / "r.toml"
    recipe.write_text('[model]\nspec = "sample:digits_cnn"\n[data]\nspec = "digits"\n[convert]\nrank = 1\n'
                      '[calibrate]\nbatches = 2\n', encoding="utf-8")
    proc = dsdeploy("run", recipe, "-o", tmp_path / "out", "--device", "cuda", env=ONE_THREAD)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[-1].startswith("error: ") and "'cuda' is not available" in lines[-1], proc.stderr
