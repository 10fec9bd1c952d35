"""Distillation fine-tuning: losses, modes, early stop, budget, checkpoints, kill + resume identity."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from dsdeploy.conversion.artifact import load_artifact, save_artifact, source_record
from dsdeploy.conversion.block import ds_blocks
from dsdeploy.conversion.rewrite import convert
from dsdeploy.data.datasets import load_data, make_loader
from dsdeploy.errors import CheckpointError
from dsdeploy.outputs import written_by_dsdeploy
from dsdeploy.recover.config import FinetuneConfig
from dsdeploy.recover.distill import (
    Distiller,
    LossWeights,
    evaluate,
    following_norms,
    fresh_parameters,
    init_parameters,
    kd_loss,
)
from dsdeploy.recover.finetune import finetune
from dsdeploy.recover.reconstruct import calibrate
from dsdeploy.recover.resume import load_checkpoint
from dsdeploy.recover.schedule import Schedule
from tests.clirun import ROOT, dsdeploy
from tests.test_calibrate import (  # noqa: F401 (fixture)
    DIGITS8,
    ONE_THREAD,
    one_thread,
    sample_digits,
    train_digits,
)

FACTORY = "tests.test_calibrate:tiny_digits_cnn"


@pytest.fixture(scope="module")
def digits(one_thread):  # noqa: F811
    teacher, splits = train_digits()
    res = convert(teacher, input_shape=(1, 1, 8, 8), rank=1)
    calibrate(res.model, teacher, res.plan, make_loader(splits.train, 64, shuffle=False), max_batches=12,
              progress=False)
    return teacher, res, splits


def cfg(**kw) -> FinetuneConfig:
    return FinetuneConfig(**{"epochs": 3, "lr": 0.02, "progress": False, **kw})


def test_kd_loss_is_t2_scaled_kl():
    s, t = torch.randn(5, 10), torch.randn(5, 10)
    T = 3.0
    p_t = F.softmax(t / T, 1)
    want = (p_t * (p_t.log() - F.log_softmax(s / T, 1))).sum(1).mean() * T * T
    torch.testing.assert_close(kd_loss(s, t, T), want)
    assert float(kd_loss(t, t, T)) == pytest.approx(0.0, abs=1e-6)


def test_distiller_combines_kd_feature_and_ce_on_labelled_items(digits):
    teacher, res, _ = digits
    student = copy.deepcopy(res.model).eval()
    w = LossWeights(kd=0.7, feature=2.0, ce=0.3, temperature=2.0)
    dist = Distiller(student, teacher, w)
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([1, -1, 3, 4, -1, 0])
    loss, logits, parts = dist(x, y)
    t_out, s_out = {}, {}
    hooks = [teacher.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: t_out.__setitem__(n, o))
             for n in ds_blocks(student)]
    hooks += [b.register_forward_hook(lambda m, a, o, n=n: s_out.__setitem__(n, o))
              for n, b in ds_blocks(student).items()]
    with torch.no_grad():
        t_logits, s_logits = teacher(x), student(x)
    for h in hooks:
        h.remove()
    feat = torch.stack([F.mse_loss(s_out[n], t_out[n]) / t_out[n].square().mean() for n in s_out]).mean()
    mask = y >= 0
    want = 0.7 * kd_loss(s_logits, t_logits, 2.0) + 2.0 * feat + 0.3 * F.cross_entropy(s_logits[mask], y[mask])
    torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=1e-6)
    assert set(parts) == {"kd", "feature", "ce"}
    dist.close()
    _, _, parts = dist(x, torch.full((6,), -1))  # unlabelled: no cross-entropy term
    assert "ce" not in parts


def test_finetune_recovers_the_digits_sample_to_within_3_points_of_the_original(tmp_path):
    teacher, splits = sample_digits()
    res = convert(teacher, input_shape=(1, 1, 16, 16), rank=1)
    calibrate(res.model, teacher, res.plan, make_loader(splits.train, 64, shuffle=False), max_batches=10,
              progress=False)
    student = res.model
    result = finetune(student, teacher, splits, cfg(epochs=2), out_path=tmp_path / "o.dsd")
    assert result.accuracy_before < result.best_accuracy
    assert result.best_accuracy >= result.teacher_accuracy - 0.03, result  # measured: 0.914 -> 0.989 (teacher 0.997)
    assert result.stopped == "completed" and result.epochs == 2 and result.steps == 2 * (len(splits.train) // 64)  # short last batch dropped
    hist = json.loads((tmp_path / "o.history.json").read_text())
    assert [h["epoch"] for h in hist] == [1, 2]
    assert set(hist[0]) >= {"epoch", "train_loss", "train_acc", "val_acc", "lr", "images_per_s", "seconds"}
    assert hist[-1]["lr"] < hist[0]["lr"]  # cosine decay
    # the student ends holding the best epoch's weights: evaluated as fine-tuning evaluated it (NHWC, same
    # batches, same process), the accuracy is the best epoch's exactly; NCHW kernels may round differently
    val = make_loader(splits.val, 256, shuffle=False)
    assert evaluate(student.to(memory_format=torch.channels_last), val, channels_last=True) == result.best_accuracy


def test_partial_mode_trains_only_ds_blocks_and_their_norms(digits, tmp_path):
    teacher, res, splits = digits
    student = copy.deepcopy(res.model)
    norms = following_norms(student, torch.randn(2, 1, 8, 8))
    assert norms == {"3": "4", "7": "8"}
    before = copy.deepcopy(student.state_dict())
    finetune(student, teacher, splits, cfg(mode="partial", epochs=1), out_path=tmp_path / "p.dsd")
    after = student.state_dict()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"3", "4", "7", "8"}


def test_mode_none_changes_nothing(digits, tmp_path):
    teacher, res, splits = digits
    student = copy.deepcopy(res.model)
    result = finetune(student, teacher, splits, cfg(mode="none"), out_path=tmp_path / "n.dsd")
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), res.model.state_dict().values()))
    assert result.best_accuracy == result.accuracy_before and result.stopped == "none"


def patience_stop(scores: list[float], patience: int) -> int | None:
    """The epoch at which ``patience`` epochs in a row without a new best end the run (``scores[0]``: the input)."""
    best, bad = scores[0], 0
    for epoch, acc in enumerate(scores[1:], 1):
        if acc > best:
            best, bad = acc, 0
        else:
            bad += 1
        if bad >= patience:
            return epoch
    return None


def test_early_stopping_on_a_plateau(digits, tmp_path):
    """At lr 1e-9 the accuracy can only wobble by an image or two (how, depends on the CPU's rounding):
    the run must end ``patience`` epochs after its best one (the input, epoch 0, included), well before the limit."""
    teacher, res, splits = digits
    student = copy.deepcopy(res.model)
    result = finetune(student, teacher, splits, cfg(epochs=10, lr=1e-9, patience=2, schedule="constant"),
                      out_path=tmp_path / "e.dsd")
    accs = [result.accuracy_before] + [h["val_acc"] for h in result.history]
    assert result.stopped == "early-stop" and result.epochs == len(accs) - 1 < 10
    assert result.epochs == patience_stop(accs, 2)  # not one epoch earlier or later than the rule says
    assert result.best_accuracy == max(accs) and result.best_epoch == accs.index(max(accs))  # ties keep the earlier
    assert result.epochs == result.best_epoch + 2
    assert result.kept_input == (result.best_epoch == 0)
    # the student ends holding the best epoch's weights (evaluated as fine-tuning evaluates: NHWC)
    val = make_loader(splits.val, 256, shuffle=False)
    assert evaluate(student.to(memory_format=torch.channels_last), val, channels_last=True) == result.best_accuracy


def test_patience_rule_of_the_early_stopping_test():
    assert patience_stop([0.5, 0.5, 0.5], 2) == 2
    assert patience_stop([0.4, 0.5, 0.6, 0.6, 0.7, 0.7, 0.6], 2) == 6
    assert patience_stop([0.4, 0.5, 0.6, 0.7], 2) is None


def test_time_budget_sizes_the_schedule(digits, tmp_path):
    teacher, res, splits = digits
    result = finetune(copy.deepcopy(res.model), teacher, splits, cfg(epochs=None, time_budget=2.0),
                      out_path=tmp_path / "b.dsd")
    assert result.stopped == "budget" and result.steps >= 8 and result.epochs >= 1
    ck = load_checkpoint(tmp_path / "b.ckpt")
    assert ck["schedule"]["total_steps"] == result.steps  # sized from the measured speed, not 10**6 placeholder


def test_fresh_parameters_get_xavier_or_he_init():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8, 10))
    student = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8, 4))  # a replaced classifier
    assert fresh_parameters(student, teacher) == ["2.weight", "2.bias"]
    assert fresh_parameters(student, teacher, reinit="^0$") == ["0.weight", "0.bias", "2.weight", "2.bias"]
    with torch.no_grad():
        student[2].bias.fill_(3.0)
    init_parameters(student, ["2.weight", "2.bias"], "xavier")
    bound = (6 / (8 + 4)) ** 0.5
    assert float(student[2].weight.detach().abs().max()) <= bound and torch.equal(student[2].bias, torch.zeros(4))
    with pytest.raises(ValueError):
        init_parameters(student, ["2.weight"], "orthogonal")


def write_student(tmp_path, teacher, res) -> str:
    weights = tmp_path / "teacher.pt"
    torch.save(teacher.state_dict(), weights)
    path = tmp_path / "student.dsd"
    save_artifact(path, res.model, res.plan, source_record(FACTORY, weights=str(weights)),
                  {"input_shape": [1, 1, 8, 8], "preprocessing": DIGITS8.to_dict()}, [{"stage": "convert"}])
    return str(path)


FT_ARGS = ("--data", "digits", "--epochs", "5", "--lr", "0.02", "--feature-weight", "0.5", "--seed", "3",
           "--trust-code", "--json")


def state(path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def start(*args) -> subprocess.Popen:
    env = {**os.environ, **ONE_THREAD, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "dsdeploy", "finetune", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint_then(proc: subprocess.Popen, ckpt, sig: int) -> None:
    """Send ``sig`` as soon as the first epoch's checkpoint exists (i.e. early in epoch 2)."""
    deadline = time.monotonic() + 120
    while not ckpt.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.002)
    proc.send_signal(sig)


def test_sigkill_mid_epoch_then_resume_ends_identical_to_an_uninterrupted_run(digits, tmp_path):
    teacher, res, _ = digits
    student = write_student(tmp_path, teacher, res)
    full = tmp_path / "full.dsd"
    proc = dsdeploy("finetune", student, "-o", full, *FT_ARGS, env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["epochs"] == 5

    out = tmp_path / "killed.dsd"
    p = start(student, "-o", out, *FT_ARGS)
    wait_for_checkpoint_then(p, tmp_path / "killed.ckpt", signal.SIGKILL)
    p.communicate()
    assert p.returncode == -signal.SIGKILL
    done = load_checkpoint(tmp_path / "killed.ckpt")["epoch"]
    assert 1 <= done < 5, "the kill should land before the run finished"

    proc = dsdeploy("finetune", student, "-o", out, *FT_ARGS, "--resume", env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["resumed_from"] == done and result["epochs"] == 5
    a, b = state(full), state(out)  # best weights
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la, lb = load_checkpoint(tmp_path / "full.ckpt"), load_checkpoint(tmp_path / "killed.ckpt")  # last weights
    assert all(torch.equal(la["model"][k], lb["model"][k]) for k in la["model"])
    assert la["history"][-1]["val_acc"] == lb["history"][-1]["val_acc"]
    art = load_artifact(out, trust_code=True)
    assert [h["stage"] for h in art.history] == ["convert", "finetune"]
    assert art.history[-1]["best_accuracy"] == result["best_accuracy"]


def test_sigterm_stops_without_saving_partial_work_and_says_how_to_resume(digits, tmp_path):
    teacher, res, _ = digits
    splits = load_data("digits", DIGITS8)
    student = write_student(tmp_path, teacher, res)
    out = tmp_path / "t.dsd"
    p = start(student, "-o", out, *FT_ARGS)
    wait_for_checkpoint_then(p, tmp_path / "t.ckpt", signal.SIGTERM)
    _, err = p.communicate()
    assert p.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err
    ck = load_checkpoint(tmp_path / "t.ckpt")
    assert ck["epoch"] == len(ck["history"]) == len(json.loads((tmp_path / "t.history.json").read_text()))
    assert written_by_dsdeploy(tmp_path / "t.history.json")  # a rerun may replace it, a user's JSON not
    # options that change the trajectory cannot be mixed into a resume
    art = load_artifact(student, trust_code=True)
    with pytest.raises(CheckpointError, match="different options.*lr"):
        finetune(art.model, teacher, splits, cfg(epochs=5, lr=0.5, feature_weight=0.5, seed=3), out_path=out,
                 resume=True)


def test_corrupt_checkpoint_is_one_clear_error(tmp_path):
    bad = tmp_path / "x.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(bad)


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_destructive_learning_rate_returns_the_input_unchanged_and_says_so(digits, tmp_path):
    teacher, res, splits = digits
    student = copy.deepcopy(res.model)
    before = copy.deepcopy(student.state_dict())
    result = finetune(student, teacher, splits, cfg(epochs=2, lr=10.0, optimizer="sgd"), out_path=tmp_path / "x.dsd")
    assert all(h["val_acc"] < result.accuracy_before for h in result.history)  # lr 10 wrecks every epoch
    assert result.kept_input and result.worse_than_input and result.best_epoch == 0
    assert "input model is returned unchanged" in result.warning
    assert result.best_accuracy == result.accuracy_before
    assert same_state(student.state_dict(), before)  # the very same weights (and BatchNorm statistics)
    val = make_loader(splits.val, 256, shuffle=False)
    assert evaluate(student, val) == evaluate(res.model, val)


def test_cli_keeps_the_input_artifact_weights_and_warns_when_training_makes_it_worse(digits, tmp_path):
    teacher, res, _ = digits
    student = write_student(tmp_path, teacher, res)
    out = tmp_path / "worse.dsd"
    proc = dsdeploy("finetune", student, "-o", out, "--data", "digits", "--epochs", "1", "--lr", "10",
                    "--trust-code", env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr
    assert "warning: fine-tuning did not improve on the input" in proc.stderr and "Traceback" not in proc.stderr
    assert "data " in proc.stdout and "training " in proc.stdout and "evaluation " in proc.stdout
    assert same_state(state(out), state(student))
    entry = load_artifact(out, trust_code=True).history[-1]
    assert entry["stage"] == "finetune" and entry["kept_input"] is True and entry["best_epoch"] == 0
    assert entry["warning"] and entry["train_seconds"] > 0 and entry["decode_seconds"] > 0


def test_learning_rate_warms_up_by_default(digits, tmp_path):
    teacher, res, splits = digits
    assert FinetuneConfig().warmup_epochs > 0
    finetune(copy.deepcopy(res.model), teacher, splits, cfg(epochs=1), out_path=tmp_path / "w.dsd")
    sched = Schedule(**load_checkpoint(tmp_path / "w.ckpt")["schedule"])
    assert sched.warmup_steps >= 1 and sched.lr_at(0) < cfg().lr
    assert sched.lr_at(sched.warmup_steps) == pytest.approx(cfg().lr)
    finetune(copy.deepcopy(res.model), teacher, splits, cfg(epochs=1, warmup_epochs=0), out_path=tmp_path / "n.dsd")
    assert Schedule(**load_checkpoint(tmp_path / "n.ckpt")["schedule"]).lr_at(0) == cfg().lr  # 0: no warmup


class SlowStart(Dataset):
    """A real dataset whose first access sleeps (slow data preparation) and whose next ``slow`` items are
    slow too (the first training steps, as when another job shares the cores for a while)."""

    def __init__(self, base, first_s: float, slow: int, item_s: float) -> None:
        self.base, self.first_s, self.slow, self.item_s, self.touched = base, first_s, slow, item_s, False

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        if not self.touched:
            self.touched = True
            time.sleep(self.first_s)
        elif self.slow > 0:
            self.slow -= 1
            time.sleep(self.item_s)
        return self.base[i]


def test_time_budget_is_sized_from_the_training_steps_not_a_slow_start(digits, tmp_path):
    """1 s of data preparation and ~1 s of slow first steps in a 5 s budget: the run is re-sized as the pace
    recovers (sized once from its first steps, as before, it ran about 15 steps), ends within the budget, and says where
    the time went."""
    teacher, res, splits = digits
    slow = dataclasses.replace(splits, train=SlowStart(splits.train, 1.0, 8 * 64, 0.002))
    budget = 5.0
    result = finetune(copy.deepcopy(res.model), teacher, slow, cfg(epochs=None, time_budget=budget),
                      out_path=tmp_path / "s.dsd")
    assert result.stopped == "budget" and result.steps > 30, result
    assert result.decode_seconds >= 1.0 and result.train_seconds > 0 and result.eval_seconds > 0
    assert result.decode_seconds + result.train_seconds + result.eval_seconds <= result.seconds
    assert result.seconds <= budget + 1.0  # the budget holds (a second of slack for a busy machine)
    assert result.time_budget == budget and result.checked_on.startswith("validation")
    lrs = [h["lr"] for h in result.history]
    assert lrs[-1] < max(lrs)  # the schedule decayed to its end


def test_without_a_validation_split_the_check_is_named_and_still_guards(digits, tmp_path):
    teacher, res, splits = digits
    no_val = dataclasses.replace(splits, val=None)
    student = copy.deepcopy(res.model)
    before = copy.deepcopy(student.state_dict())
    result = finetune(student, teacher, no_val, cfg(epochs=1, lr=10.0), out_path=tmp_path / "v.dsd")
    assert "training images" in result.checked_on and "no validation split" in result.checked_on
    assert result.kept_input and same_state(student.state_dict(), before)
    unlabelled = dataclasses.replace(splits, classes=None)  # unlabelled validation images: the distillation loss
    result = finetune(copy.deepcopy(res.model), teacher, unlabelled, cfg(epochs=1), out_path=tmp_path / "u.dsd")
    assert "distillation loss" in result.checked_on and result.best_accuracy is None
    assert result.best_score >= result.score_before


def test_a_budget_spent_before_training_returns_the_input_and_says_why(digits, tmp_path):
    teacher, res, splits = digits
    slow = dataclasses.replace(splits, train=SlowStart(splits.train, 1.5, 0, 0.0))
    student = copy.deepcopy(res.model)
    before = copy.deepcopy(student.state_dict())
    result = finetune(student, teacher, slow, cfg(epochs=None, time_budget=1.0), out_path=tmp_path / "z.dsd")
    assert result.stopped == "budget" and result.steps == 0 and result.kept_input
    assert "time budget was spent before training" in result.warning
    assert same_state(student.state_dict(), before)
