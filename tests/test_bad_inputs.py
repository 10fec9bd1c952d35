"""Bad inputs through the real CLI: one clear line on stderr, a non-zero exit status,
no traceback, and no partial output file.

Each case is (id, argv builder, expected exit status, a phrase the message must hold).
The builders receive a ``Files`` object with real broken files made in a temp folder.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.clirun import invoke
from tests.conftest import small_net

FACTORY = "tests.conftest:small_net"
SHAPE = ["--input-shape", "1,3,16,16"]


@dataclass
class Files:
    root: Path

    def p(self, name: str) -> str:
        return str(self.root / name)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Files:
    root = tmp_path_factory.mktemp("bad")
    f = Files(root)
    state = small_net().state_dict()
    torch.save(state, root / "good.pt")
    data = (root / "good.pt").read_bytes()
    (root / "truncated.pt").write_bytes(data[: len(data) // 2])
    (root / "garbage.pt").write_bytes(random.Random(1).randbytes(4096))
    torch.save(small_net(), root / "pickled.pt")
    wrong_keys = {("x." + k): v for k, v in state.items()}
    torch.save(wrong_keys, root / "wrong_keys.pt")
    torch.save({**state, "head.weight": torch.zeros(5, 16)}, root / "wrong_shape.pt")
    proc = invoke("convert", FACTORY, "-o", root / "good.dsd", *SHAPE)  # an input: in-process (suite time)
    assert proc.returncode == 0, proc.stderr
    dsd = (root / "good.dsd").read_bytes()
    (root / "truncated.dsd").write_bytes(dsd[: len(dsd) // 2])
    (root / "garbage.dsd").write_bytes(random.Random(2).randbytes(2048))
    payload = torch.load(root / "good.dsd", weights_only=True)
    payload["format_version"] = 999
    torch.save(payload, root / "future.dsd")
    (root / "garbage.onnx").write_bytes(random.Random(3).randbytes(1024))
    (root / "empty_data").mkdir()
    one = root / "one_class" / "cat"
    one.mkdir(parents=True)
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(one / f"{i}.png")
    (root / "unknown_key.toml").write_text('[model]\nspec = "sample:digits_cnn"\nwieghts = "x.pt"\n')
    (root / "wrong_type.toml").write_text('[model]\nspec = "sample:digits_cnn"\n[convert]\nrank = "one"\n')
    _write_onnx(root)
    return f


def _write_onnx(root: Path) -> None:
    """A real small ONNX model, and one whose op no execution provider implements."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    ok = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "ok", [x], [y]),
                           opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(ok, root / "relu.onnx")
    odd = helper.make_model(
        helper.make_graph([helper.make_node("Frobnicate", ["x"], ["y"], domain="com.example")], "odd", [x], [y]),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    onnx.save(odd, root / "custom_op.onnx")


OUT = "out.dsd"  # every case that writes, writes here; it must not exist afterwards

CASES = [
    ("missing-weights", lambda f: ["inspect", FACTORY, "--weights", f.p("nope.pt")], 2, "not found"),
    ("truncated-pt", lambda f: ["convert", FACTORY, "--weights", f.p("truncated.pt"), "-o", f.p(OUT)], 2, "corrupt"),
    ("garbage-pt", lambda f: ["convert", FACTORY, "--weights", f.p("garbage.pt"), "-o", f.p(OUT)], 2, "corrupt"),
    ("pickled-model", lambda f: ["convert", FACTORY, "--weights", f.p("pickled.pt"), "-o", f.p(OUT)], 2,
     "--trust-pickle"),
    ("wrong-keys", lambda f: ["convert", FACTORY, "--weights", f.p("wrong_keys.pt"), "-o", f.p(OUT)], 2, "missing"),
    ("wrong-shapes", lambda f: ["convert", FACTORY, "--weights", f.p("wrong_shape.pt"), "-o", f.p(OUT)], 2,
     "shape mismatch"),
    ("missing-dsd", lambda f: ["inspect", f.p("nope.dsd")], 2, "not found"),
    ("truncated-dsd", lambda f: ["inspect", f.p("truncated.dsd")], 2, "corrupt"),
    ("garbage-dsd", lambda f: ["inspect", f.p("garbage.dsd")], 2, "corrupt"),
    ("future-dsd", lambda f: ["inspect", f.p("future.dsd")], 2, "format version 999"),
    ("unknown-spec", lambda f: ["inspect", "resnet18"], 2, "unknown model spec"),
    ("unknown-torchvision", lambda f: ["inspect", "torchvision:resnet19"], 2, "did you mean"),
    ("missing-module", lambda f: ["inspect", "nosuch_pkg.models:build"], 2, "cannot import"),
    ("factory-raises", lambda f: ["inspect", "tests.conftest:failing_factory"], 2, "exploded on purpose"),
    ("shape-wrong-rank", lambda f: ["convert", FACTORY, "--input-shape", "1,3,16", "-o", f.p(OUT)], 2,
     "cannot run on input shape"),
    ("shape-wrong-channels", lambda f: ["convert", FACTORY, "--input-shape", "1,5,16,16", "-o", f.p(OUT)], 2,
     "cannot run on input shape"),
    ("shape-not-numbers", lambda f: ["inspect", FACTORY, "--input-shape", "a,b"], 2, "comma-separated integers"),
    ("nothing-to-convert", lambda f: ["convert", FACTORY, *SHAPE, "--exclude", ".", "-o", f.p(OUT)], 3,
     "nothing to convert"),
    ("two-rank-policies", lambda f: ["convert", FACTORY, *SHAPE, "--rank", "1", "--energy", "0.5", "-o", f.p(OUT)], 2,
     "choose one"),
    ("bad-regex", lambda f: ["convert", FACTORY, *SHAPE, "--include", "(", "-o", f.p(OUT)], 2, "regular expression"),
    ("infeasible-budget", lambda f: ["convert", FACTORY, *SHAPE, "--mac-budget", "0.01", "-o", f.p(OUT)], 2,
     "below what rank 1"),
    ("already-converted", lambda f: ["convert", f.p("good.dsd"), "--trust-code", "-o", f.p(OUT)], 2, "already converted"),
    ("weights-for-dsd", lambda f: ["inspect", f.p("good.dsd"), "--weights", f.p("good.pt")], 2,
     "does not apply to a .dsd"),
    ("bad-model-kwargs", lambda f: ["inspect", FACTORY, "--model-kwargs", "{nope"], 2, "not valid JSON"),
    ("data-missing", lambda f: ["evaluate", "sample:digits_cnn", "--data", f.p("nope_dir")], 2, "not found"),
    ("data-empty", lambda f: ["evaluate", "sample:digits_cnn", "--data", f.p("empty_data")], 2, "no image"),
    ("data-one-class", lambda f: ["evaluate", "sample:digits_cnn", "--data", f.p("one_class")], 2, "one class"),
    ("calibrate-corrupt-dsd", lambda f: ["calibrate", f.p("truncated.dsd"), "--data", "digits", "-o", f.p(OUT)], 2,
     "corrupt"),
    ("recipe-unknown-key", lambda f: ["run", f.p("unknown_key.toml"), "--out", f.p("run_out")], 2, "wieghts"),
    ("recipe-wrong-type", lambda f: ["run", f.p("wrong_type.toml"), "--out", f.p("run_out")], 2, "rank"),
    ("onnx-corrupt-bench", lambda f: ["bench", f.p("garbage.onnx"), "--iters", "2"], 2, "garbage.onnx"),
    ("onnx-corrupt-deploy", lambda f: ["deploy", f.p("garbage.onnx"), "-o", f.p("bundle")], 2, "garbage.onnx"),
    ("ep-unavailable", lambda f: ["bench", f.p("relu.onnx"), "--providers", "tensorrt", "--iters", "2"], 2,
     "not available"),
    ("ep-cannot-run-model", lambda f: ["bench", f.p("custom_op.onnx"), "--providers", "cpu", "--iters", "2"], 2,
     "Frobnicate"),
]


def assert_clean_failure(proc, code: int, phrase: str) -> None:
    err = proc.stderr.strip()
    assert proc.returncode == code, (proc.returncode, err)
    assert "Traceback" not in proc.stderr, err
    # what a terminal shows: a progress bar redraws itself with \r and is cleared at the end
    lines = [l.split("\r")[-1] for l in err.split("\n")]
    lines = [l for l in lines if l.strip()]
    # click usage errors print a usage block; dsdeploy's own errors are exactly one line
    assert lines and (len(lines) == 1 or lines[-1].startswith("Error:")), err
    assert phrase.lower() in lines[-1].lower(), err


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(files, case):
    _, argv, code, phrase = case
    before = set(os.listdir(files.root))
    proc = invoke(*argv(files))
    assert_clean_failure(proc, code, phrase)
    assert set(os.listdir(files.root)) == before  # nothing written, not even a temp file
