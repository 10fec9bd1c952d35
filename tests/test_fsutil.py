"""No command destroys data it did not create: outputs that are inputs, wrong suffixes, files of
another kind, user folders, and paths whose names are not valid UTF-8."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsdeploy.errors import OutputError
from dsdeploy.fsutil import owned_dir, remove_stale_temps, sniff, write_json, write_text
from dsdeploy.outputs import check_output, written_by_dsdeploy
from tests.clirun import ROOT, invoke


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory):
    from dsdeploy.export.onnx_export import export_model

    path = tmp_path_factory.mktemp("onnx") / "m.onnx"
    export_model("sample:digits_cnn", path)
    return path


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    path = tmp_path_factory.mktemp("dsd") / "a.dsd"
    assert invoke("convert", "sample:digits_cnn", "--rank", "1", "-o", path).returncode == 0
    return path


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(proc, *words):
    assert proc.returncode not in (0, 70), proc.stdout + proc.stderr
    err = proc.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for w in words:
        assert w in err, err
    return err


# ------------------------------------------------------------------------------------------
# the mechanism
# ------------------------------------------------------------------------------------------

def test_sniff_tells_the_kinds_apart(tmp_path, onnx_model, artifact):
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    (tmp_path / "r.json").write_text('{"a": 1}')
    (tmp_path / "e").write_bytes(b"")
    (tmp_path / "b").write_bytes(bytes(range(256)))
    assert [sniff(p) for p in (onnx_model, artifact, legacy, tmp_path / "r.json", tmp_path / "e", tmp_path / "b",
                               tmp_path / "none")] == ["onnx", "torch", "torch", "text", None, "binary", None]


def test_atomic_write_never_replaces_a_file_of_another_kind(tmp_path, onnx_model):
    model = tmp_path / "m.onnx"
    shutil.copyfile(onnx_model, model)
    before = model.read_bytes()
    with pytest.raises(OutputError, match="holds an ONNX model, not a text file"):
        write_json(model, {"report": 1})
    assert model.read_bytes() == before and os.listdir(tmp_path) == ["m.onnx"]  # no temp left
    report = tmp_path / "r.json"
    write_json(report, {"run": 1})
    write_json(report, {"run": 2})  # a previous output of the same kind is replaced
    assert json.loads(report.read_text()) == {"run": 2}


def test_check_output_refuses_inputs_links_suffixes_and_folders(tmp_path, artifact):
    link = tmp_path / "link.dsd"
    link.symlink_to(artifact)
    with pytest.raises(OutputError, match="also the artifact"):
        check_output(link, kind="torch", suffixes=(".dsd",), inputs=[("artifact", artifact)])
    with pytest.raises(OutputError, match=r"must end in \.onnx"):
        check_output(tmp_path / "x.dsd", kind="onnx", suffixes=(".onnx",))
    with pytest.raises(OutputError, match="is a folder"):
        check_output(tmp_path, kind="text")
    assert check_output(tmp_path / "new.dsd", kind="torch", suffixes=(".dsd",), inputs=[("artifact", artifact)])


def test_check_output_refuses_a_folder_that_cannot_take_the_file_before_any_work(tmp_path):
    """A parent that is a file, or a folder the operating system will not write (here /proc), is refused by the
    check a command runs first, with the real reason; nothing is left in a writable folder; missing folders pass
    (the command creates them)."""
    note = tmp_path / "notes.log"
    note.write_text("mine")
    with pytest.raises(OutputError, match=r"notes.log is a file, not a folder"):
        check_output(note / "x.dsd", kind="torch", suffixes=(".dsd",))
    if Path("/proc/self").is_dir():  # Linux: /proc takes no new files, even for root
        with pytest.raises(OutputError, match=r"^cannot write output /proc/x.dsd: /proc: "):
            check_output("/proc/x.dsd", kind="torch", suffixes=(".dsd",))
    assert check_output(tmp_path / "new" / "deeper" / "m.dsd", kind="torch", suffixes=(".dsd",))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.log"] and note.read_text() == "mine"


def test_owned_dir_keeps_foreign_files_and_replaces_only_its_own(tmp_path):
    owned = lambda d: set(json.loads((d / "mark.json").read_text())["files"]) if (d / "mark.json").exists() else None
    out = tmp_path / "out"
    with owned_dir(out, owned=owned) as tmp:
        (tmp / "a.txt").write_text("1")
        (tmp / "old.txt").write_text("1")
        write_json(tmp / "mark.json", {"files": ["a.txt", "old.txt", "mark.json", "../escape"]})
    (out / "user.txt").write_text("mine")
    with pytest.raises(OutputError, match="overwrite"), owned_dir(out, owned=owned) as tmp:
        pass
    with owned_dir(out, owned=owned, overwrite=True) as tmp:
        (tmp / "a.txt").write_text("2")
        write_json(tmp / "mark.json", {"files": ["a.txt", "mark.json"]})
    assert sorted(os.listdir(out)) == ["a.txt", "mark.json", "user.txt"]
    assert (out / "a.txt").read_text() == "2" and (out / "user.txt").read_text() == "mine"
    with pytest.raises(OutputError, match="user.txt, which dsdeploy did not write"):
        with owned_dir(out, owned=owned, overwrite=True) as tmp:
            (tmp / "user.txt").write_text("clobber")
    assert (out / "user.txt").read_text() == "mine" and not [n for n in os.listdir(out) if n.endswith(".tmp")]


def test_stale_temps_are_recognised_by_name_only(tmp_path):
    import tempfile

    fd, left_file = tempfile.mkstemp(prefix=".f.json.", suffix=".tmp", dir=tmp_path)  # what atomic_path makes
    os.close(fd)
    left_dir = tempfile.mkdtemp(prefix=".convert.", suffix=".tmp", dir=tmp_path)  # what atomic_dir makes
    (tmp_path / ".hidden.tmp").write_text("user")
    (tmp_path / "notes.tmp").write_text("user")
    (tmp_path / "stage").mkdir()
    (tmp_path / ".stage.old").mkdir()
    (tmp_path / ".mine.old").mkdir()  # no "mine" beside it: not a swap leftover
    removed = remove_stale_temps(tmp_path)
    assert sorted(removed) == sorted([os.path.basename(left_file), os.path.basename(left_dir), ".stage.old"])
    assert sorted(os.listdir(tmp_path)) == [".hidden.tmp", ".mine.old", "notes.tmp", "stage"]


# ------------------------------------------------------------------------------------------
# the commands (cases bench-clobbers-input and deploy-wipes-dir)
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("option", ["--json", "--csv", "--markdown", "--plot"])
def test_bench_report_over_its_model_is_refused(tmp_path, onnx_model, option):
    model = tmp_path / "m.png" if option == "--plot" else tmp_path / "m.onnx"
    shutil.copyfile(onnx_model, model)
    before = model.read_bytes()
    one_line_error(invoke("bench", model, "--iters", "2", option, model), "also the model")
    assert model.read_bytes() == before


def test_bench_report_over_another_kind_or_twice_is_refused(tmp_path, onnx_model, artifact):
    other = tmp_path / "other.json"
    shutil.copyfile(artifact, other)
    one_line_error(invoke("bench", onnx_model, "--iters", "2", "--json", other), "PyTorch file")
    one_line_error(invoke("bench", onnx_model, "--iters", "2", "--json", tmp_path / "r", "--csv", tmp_path / "r"),
                   "same file")
    assert other.read_bytes() == artifact.read_bytes() and not (tmp_path / "r").exists()


def test_text_reports_replace_only_files_dsdeploy_wrote(tmp_path, onnx_model, artifact):
    """A user's notes/config/data/readme under a report name is kept; dsdeploy's own reports are replaced."""
    users = {"--json": ("cfg.json", '{"lr": 1}\n'), "--csv": ("data.csv", "a,b\n1,2\n"),
             "--markdown": ("README.md", "# My project\n")}
    for option, (name, text) in users.items():
        (tmp_path / name).write_text(text)
        one_line_error(invoke("bench", onnx_model, "--iters", "2", option, tmp_path / name),
                       "exists and was not written by dsdeploy")
        assert (tmp_path / name).read_text() == text
    (tmp_path / "notes.txt").write_text("mine\n")
    for option, suffix in (("--json", ".json"), ("--csv", ".csv"), ("--markdown", ".md"), ("--plot", ".png")):
        one_line_error(invoke("bench", onnx_model, "--iters", "2", option, tmp_path / "notes.txt"),
                       f"must end in {suffix}")
    assert (tmp_path / "notes.txt").read_text() == "mine\n"
    # the same command twice: the second run replaces the reports the first wrote
    own = ("--json", tmp_path / "r.json", "--csv", tmp_path / "r.csv", "--markdown", tmp_path / "r.md")
    for _ in range(2):
        proc = invoke("bench", onnx_model, "--iters", "2", "--warmup", "0", *own)
        assert proc.returncode == 0, proc.stderr
    assert all(written_by_dsdeploy(p) for p in own[1::2])
    # finetune --history: a user's JSON is kept, a history finetune wrote is dsdeploy's
    one_line_error(invoke("finetune", artifact, "--data", "digits", "-o", tmp_path / "f.dsd", "--history",
                          tmp_path / "cfg.json"), "--history", "not written by dsdeploy")
    one_line_error(invoke("finetune", artifact, "--data", "digits", "-o", tmp_path / "f.dsd", "--history",
                          tmp_path / "notes.txt"), "must end in .json")
    assert (tmp_path / "cfg.json").read_text() == '{"lr": 1}\n' and not (tmp_path / "f.dsd").exists()
    write_json(tmp_path / "h.json", [{"epoch": 1, "train_loss": 0.5, "val_acc": 0.9}])
    assert written_by_dsdeploy(tmp_path / "h.json") and not written_by_dsdeploy(tmp_path / "notes.txt")


def test_export_over_an_artifact_is_refused(tmp_path, artifact):
    a = tmp_path / "a.dsd"
    shutil.copyfile(artifact, a)
    one_line_error(invoke("export", "sample:digits_cnn", "-o", a), "must end in .onnx")
    disguised = tmp_path / "a.onnx"
    shutil.copyfile(artifact, disguised)
    one_line_error(invoke("export", "sample:digits_cnn", "-o", disguised), "PyTorch file")
    assert a.read_bytes() == disguised.read_bytes() == artifact.read_bytes()


def test_artifact_commands_refuse_their_input_and_foreign_files(tmp_path, artifact, onnx_model):
    a = tmp_path / "a.dsd"
    shutil.copyfile(artifact, a)
    one_line_error(invoke("calibrate", a, "--data", "digits", "-o", a), "also the artifact")
    one_line_error(invoke("finetune", a, "--data", "digits", "-o", a), "also the artifact")
    m = tmp_path / "m.dsd"
    shutil.copyfile(onnx_model, m)
    one_line_error(invoke("convert", "sample:digits_cnn", "--rank", "1", "-o", m), "ONNX model")
    assert a.read_bytes() == artifact.read_bytes() and m.read_bytes() == onnx_model.read_bytes()


def test_deploy_over_a_populated_folder_keeps_the_users_files(tmp_path, onnx_model):
    models = tmp_path / "models"
    (models / "sub").mkdir(parents=True)
    (models / "notes.txt").write_text("my notes")
    shutil.copyfile(onnx_model, models / "sub" / "other.onnx")
    shutil.copyfile(onnx_model, models / "m.onnx")
    before = snapshot(models)
    one_line_error(invoke("deploy", models / "m.onnx", "-o", models), "not empty", "not written by dsdeploy")
    one_line_error(invoke("deploy", models / "m.onnx", "-o", models, "--overwrite"), "not written by dsdeploy")
    assert snapshot(models) == before


def test_deploy_into_the_current_folder(tmp_path, onnx_model, monkeypatch):
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert invoke("deploy", onnx_model, "-o", ".").returncode == 0
    assert sorted(os.listdir(here)) == ["manifest.json", "model.onnx", "predict.py"]
    one_line_error(invoke("deploy", onnx_model, "-o", "."), "--overwrite")
    (here / "mine.txt").write_text("x")
    monkeypatch.chdir(tmp_path)
    shutil.copyfile(onnx_model, tmp_path / "m.onnx")
    one_line_error(invoke("deploy", "m.onnx", "-o", "."), "not written by dsdeploy")


def test_deploy_overwrite_replaces_only_the_previous_bundle(tmp_path, onnx_model):
    bundle = tmp_path / "bundle"
    assert invoke("deploy", onnx_model, "-o", bundle, "--ort-format").returncode == 0
    (bundle / "user.txt").write_text("keep me")
    one_line_error(invoke("deploy", onnx_model, "-o", bundle), "--overwrite")
    proc = invoke("deploy", onnx_model, "-o", bundle, "--overwrite", "--quantize", "int8-dynamic")
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(bundle)) == ["manifest.json", "model.onnx", "predict.py", "user.txt"]  # model.ort gone
    assert json.loads((bundle / "manifest.json").read_text())["quantize"] == "int8-dynamic"
    assert (bundle / "user.txt").read_text() == "keep me"
    one_line_error(invoke("deploy", bundle / "model.onnx", "-o", bundle, "--overwrite"), "file of the bundle")


# ------------------------------------------------------------------------------------------
# names that are not valid UTF-8
# ------------------------------------------------------------------------------------------

# One interpreter runs the commands one after another (suite time: one process start, not five): the
# names reach it as bytes on its real command line and its output goes to the real stdout/stderr.
_IN_ONE_PROCESS = """
import sys
from dsdeploy.cli import main
runs = [[]]
for arg in sys.argv[1:]:
    runs.append([]) if arg == "--then" else runs[-1].append(arg)
for args in runs:
    try:
        main(args)
    except SystemExit as exc:
        if exc.code:
            print(f"{args[0]} exited {exc.code}", file=sys.stderr)
            sys.exit(exc.code)
"""


def test_paths_that_are_not_utf8_give_a_result(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def run(*args, prefix=("-m", "dsdeploy")):
        return subprocess.run([sys.executable, *prefix, *args], cwd=tmp_path, env=env, capture_output=True, check=False,
                              timeout=600)

    runs = [("export", "sample:digits_cnn", "-o", b"\xff.onnx"),
            ("convert", "sample:digits_cnn", "--rank", "1", "-o", b"\xfe.dsd"),
            ("export", b"\xfe.dsd", "-o", b"\xfe.onnx"),
            ("bench", b"\xff.onnx", b"\xfe.onnx", "--iters", "2", "--json", b"\xff.json", "--plot", b"\xff.png",
             "--csv", b"\xff.csv", "--markdown", b"\xff.md"),
            ("deploy", b"\xff.onnx", "-o", b"\xffdir")]
    proc = run(*[a for args in runs for a in (*args, "--then")][:-1], prefix=("-c", _IN_ONE_PROCESS))
    assert proc.returncode == 0, proc.stderr[-500:]
    names = set(os.listdir(os.fsencode(tmp_path)))
    assert {b"\xff.onnx", b"\xfe.dsd", b"\xfe.onnx", b"\xff.json", b"\xff.png", b"\xffdir"} <= names
    proc = run("export", "sample:digits_cnn", "-o", b"\xff.dsd")
    assert proc.returncode == 2 and proc.stderr.count(b"\n") == 1 and b"\\xff.dsd" in proc.stderr
    write_text(tmp_path / os.fsdecode(b"\xffr.txt"), "from " + os.fsdecode(b"x/y\xff"))
    assert (tmp_path / os.fsdecode(b"\xffr.txt")).read_text(encoding="utf-8") == "from x/y\\xff"
