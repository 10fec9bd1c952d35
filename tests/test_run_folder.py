"""`dsdeploy run` owns its output folder: refuses a user's folder, locks it against a second run,
resumes an interrupted fine-tuning from its checkpoint and cleans what a killed run left; and
`finetune --resume` refuses a checkpoint of a different run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsdeploy.pipeline.engine import LOCK_FILE
from dsdeploy.recover.resume import load_checkpoint, run_identity
from tests.clirun import ROOT, dsdeploy, invoke

DIGITS = ROOT / "converters" / "digits_cnn.toml"
FAST = ("--set", "export.enabled=false", "--set", "evaluate.enabled=false", "--set", "calibrate.batches=1",
        "--set", "finetune.limit=192", "--set", "finetune.batch_size=32")
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def one_line_error(proc, *words):
    assert proc.returncode not in (0, 70), proc.stdout + proc.stderr
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    for w in words:
        assert w in err, err
    return err


def start_run(out: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, **ONE_THREAD, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "dsdeploy", "run", str(DIGITS), "-o", str(out), *FAST, *args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_run_refuses_a_folder_it_did_not_write(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    one_line_error(invoke("run", DIGITS, "-o", out), "not written by dsdeploy")
    assert os.listdir(out) == ["notes.txt"]


def test_second_run_on_a_locked_folder_fails_at_once(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from filelock import FileLock\n"
        f"with FileLock({str(out / LOCK_FILE)!r}):\n"
        "    print('locked', flush=True); time.sleep(120)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.monotonic()
        one_line_error(invoke("run", DIGITS, "-o", out), "another dsdeploy run")
        assert time.monotonic() - t0 < 30, "the second run must not wait for the first"
        assert os.listdir(out) == [LOCK_FILE]  # nothing written beside the lock
    finally:
        holder.kill()
        holder.wait()


def test_unwritable_out_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    one_line_error(invoke("run", DIGITS, "-o", blocker / "out"), "run folder")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        target = ro / "out" if not os.access(ro, os.W_OK) else Path("/sys/dsdeploy-out")  # root ignores modes
        one_line_error(invoke("run", DIGITS, "-o", target), "cannot")
    finally:
        ro.chmod(0o755)


def wait_for_checkpoint(p, ckpt, timeout: float = 400) -> None:
    """Wait until the running ``dsdeploy run`` ``p`` has written its fine-tuning checkpoint."""
    deadline = time.monotonic() + timeout
    while not ckpt.exists():
        assert p.poll() is None, p.communicate()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)


def test_run_killed_mid_finetune_resumes_on_the_next_run(tmp_path):
    out = tmp_path / "run"
    ckpt = out / "resume" / "finetune.ckpt"
    p = start_run(out, "--set", "finetune.epochs=4")
    wait_for_checkpoint(p, ckpt)
    p.send_signal(signal.SIGSTOP)  # frozen mid-run, holding the lock: a second run on the folder is refused
    one_line_error(dsdeploy("run", DIGITS, "-o", out, *FAST), "another dsdeploy run")
    p.send_signal(signal.SIGKILL)
    p.communicate()
    assert p.returncode == -signal.SIGKILL
    done = load_checkpoint(ckpt)["epoch"]
    assert 1 <= done < 4, "the kill should land before fine-tuning finished"
    assert any(n.startswith(".finetune.") and n.endswith(".tmp") for n in os.listdir(out))  # what SIGKILL leaves

    proc = dsdeploy("run", DIGITS, "-o", out, *FAST, "--set", "finetune.epochs=4", "--json", env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr
    assert "finetune ... done" in proc.stderr and "convert ... cached" in proc.stderr
    record = json.loads((out / "finetune" / "stage.json").read_text())
    assert record["result"]["resumed_from"] == done and record["result"]["epochs"] == 4
    history = json.loads((out / "finetune" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert not [n for n in os.listdir(out) if n.endswith((".tmp", ".old"))] and not (out / "resume").exists()


def test_run_interrupted_mid_finetune_says_how_to_continue(tmp_path):
    out = tmp_path / "run"
    ckpt = out / "resume" / "finetune.ckpt"
    p = start_run(out, "--set", "finetune.epochs=20")
    wait_for_checkpoint(p, ckpt)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate()
    assert p.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert "same output folder" in last and "--resume" not in last and "Traceback" not in err
    assert ckpt.is_file() and not [n for n in os.listdir(out) if n.endswith(".tmp")]


# ------------------------------------------------------------------------------------------
# finetune --resume: the checkpoint belongs to one run
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def students(tmp_path_factory):
    d = tmp_path_factory.mktemp("students")
    for rank in (1, 2):
        assert invoke("convert", "sample:digits_cnn", "--rank", str(rank), "-o", d / f"r{rank}.dsd").returncode == 0
    return d / "r1.dsd", d / "r2.dsd"


def test_finetune_resume_refuses_a_checkpoint_of_another_run(tmp_path, students):
    r1, r2 = students
    out = tmp_path / "ft.dsd"
    common = ("--data", "digits", "-o", out, "--epochs", "1", "--batch-size", "32")
    proc = invoke("finetune", r1, *common, "--limit", "96")
    assert proc.returncode == 0, proc.stderr
    before = (tmp_path / "ft.ckpt").read_bytes()
    one_line_error(invoke("finetune", r1, *common, "--limit", "64", "--resume"), "different run", "split")
    one_line_error(invoke("finetune", r2, *common, "--limit", "96", "--resume"), "different run", "student")
    one_line_error(invoke("finetune", r1, *common, "--limit", "96", "--lr", "0.5", "--resume"), "different options")
    assert (tmp_path / "ft.ckpt").read_bytes() == before


def test_finetune_resume_refuses_changed_preprocessing(tmp_path, students):
    r1, _ = students
    out = tmp_path / "ft.dsd"
    common = ("--data", "digits", "-o", out, "--epochs", "1", "--batch-size", "32", "--limit", "96")
    proc = invoke("finetune", r1, *common)
    assert proc.returncode == 0, proc.stderr
    before = (tmp_path / "ft.ckpt").read_bytes()
    for change in (("--size", "12"), ("--mean", "0.9", "--std", "0.1"), ("--resize", "64")):
        one_line_error(invoke("finetune", r1, *common, *change, "--resume"), "different run", "preprocessing")
    assert (tmp_path / "ft.ckpt").read_bytes() == before


def test_data_identity_follows_content_not_location(tmp_path, students):
    a = tmp_path / "a" / "cls"
    a.mkdir(parents=True)
    (a / "x.png").write_bytes(b"12345")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    ident = lambda d: run_identity(student=students[0], data=str(d), limit=None, val_split=0.2)  # noqa: E731
    assert ident(tmp_path / "a") == ident(tmp_path / "b")
    (tmp_path / "b" / "cls" / "y.png").write_bytes(b"1")
    assert ident(tmp_path / "a")["data"] != ident(tmp_path / "b")["data"]
