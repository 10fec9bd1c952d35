"""No file may run code: hostile .dsd sources and kwargs, recipes, pythonpath shadowing, bundle
model paths; export needs no source weights (crafted .dsd internals: test_artifact_damage.py).

Hostile specs are real: ``os:system`` with a ``touch`` command, ``torch:load`` of a pickle whose
unpickling writes a file, a module on ``sys.path`` whose import writes a marker. Each test
asserts that no marker appears and that a file outside its folder is still there.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsdeploy.conversion.artifact import (
    FORMAT,
    FORMAT_VERSION,
    load_artifact,
    save_artifact,
    source_record,
)
from dsdeploy.conversion.loading import load_model
from dsdeploy.conversion.rewrite import convert
from dsdeploy.errors import ArtifactError, DsdeployError
from tests.clirun import dsdeploy, invoke
from tests.conftest import small_net

FAST = settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
FACTORY = "tests.conftest:small_net"
SHAPE = (1, 3, 16, 16)
COMMANDS = {  # every command that loads a model/artifact; {a} is the artifact, {o} an output in the same folder
    "inspect": ["inspect", "{a}"],
    "convert": ["convert", "{a}", "-o", "{o}.dsd"],
    "calibrate": ["calibrate", "{a}", "--data", "digits", "-o", "{o}.dsd"],
    "finetune": ["finetune", "{a}", "--data", "digits", "-o", "{o}.dsd", "--epochs", "1"],
    "finetune-teacher": ["finetune", "{good}", "--teacher", "{a}", "--data", "digits", "-o", "{o}.dsd",
                         "--epochs", "1"],
    "evaluate": ["evaluate", "{a}", "--data", "digits"],
    "evaluate-compare": ["evaluate", "sample:digits_cnn", "--compare", "{a}", "--data", "digits"],
    "export": ["export", "{a}", "-o", "{o}.onnx"],
}


class Boom:
    """Unpickling this runs ``os.system`` (what a hostile pickle does)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@dataclass
class World:
    """A folder with bait: a marker module on sys.path, a hostile pickle, a file outside the work folder."""

    root: Path
    work: Path
    outside: Path
    keep: Path
    marker: Path
    module: str
    pickle: Path

    def hostile(self) -> list[tuple[str, dict]]:
        """(spec, kwargs) pairs that would run code or touch files if anything called them."""
        m, touch = str(self.marker), f"touch {self.marker}"
        return [
            ("os:system", {"command": touch}),
            ("subprocess:run", {"args": ["touch", m]}),
            ("builtins:exec", {"source": f"open({m!r}, 'w').close()"}),
            ("builtins:eval", {"source": f"open({m!r}, 'w')"}),
            ("torch:load", {"f": str(self.pickle), "weights_only": False}),
            ("torch.hub:load", {"repo_or_dir": str(self.outside), "model": "x", "source": "local"}),
            ("shutil:rmtree", {"path": str(self.outside)}),
            ("os:remove", {"path": str(self.keep)}),
            ("pickle:loads", {"data": "x"}),
            ("importlib:import_module", {"name": self.module}),
            ("numpy:save", {"file": m, "arr": [1]}),
            ("dsdeploy.fsutil:write_json", {"path": m, "data": {}}),
            ("timm.models:load_checkpoint", {"model": None, "checkpoint_path": str(self.pickle)}),
            ("torchvision:resnet18", {"weights": "DEFAULT"}),
            ("sample:../outside/keep", {}),
            (f"{self.module}:build", {"path": m}),
            (f"{self.module}:Net", {}),
        ]

    def assert_untouched(self) -> None:
        assert not self.marker.exists(), "code named in a file ran"
        assert self.keep.read_text() == "keep", "a file outside the test folder changed"
        assert self.module not in sys.modules, "a module a file named was imported"
        assert sorted(p.name for p in self.outside.iterdir()) == ["keep.txt"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("security")
    work, outside, code = root / "work", root / "outside", root / "code"
    for d in (work, outside, code):
        d.mkdir()
    keep = outside / "keep.txt"
    keep.write_text("keep")
    marker = root / "MARKER_code_ran"
    module = f"evil_{uuid.uuid4().hex[:8]}"
    (code / f"{module}.py").write_text(
        "import pathlib\n"
        f"pathlib.Path({str(marker)!r}).write_text('imported')\n"
        "from torch import nn\n"
        "class Net(nn.Sequential):\n"
        "    def __init__(self):\n"
        "        super().__init__(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))\n"
        "def build(path=None):\n"
        "    return Net()\n")
    bad = root / "boom.pkl"
    bad.write_bytes(pickle.dumps(Boom(f"touch {marker}")))
    sys.path.append(str(code))
    try:
        yield World(root, work, outside, keep, marker, module, bad)
    finally:
        sys.path.remove(str(code))
        sys.modules.pop(module, None)


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """A valid artifact of the shipped digits sample (its source needs no opt-in)."""
    loaded = load_model("sample:digits_cnn")
    res = convert(loaded.model, input_shape=loaded.input_shape, rank=1)
    path = tmp_path_factory.mktemp("good") / "digits.dsd"
    save_artifact(path, res.model, res.plan, source_record("sample:digits_cnn"),
                  {"input_shape": list(loaded.input_shape), "preprocessing": loaded.preprocessing,
                   "labels": loaded.labels})
    return path


def crafted(path: Path, spec, kwargs, **parts) -> Path:
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION,
               "source": {"spec": spec, "model_kwargs": kwargs, "weights": None, "weights_sha256": None},
               "plan": {"layers": [], "layout": "branches", "policy": {}, "input_shape": list(SHAPE)},
               "metadata": {"input_shape": list(SHAPE)}, "history": [], "state_dict": {}}
    payload.update(parts)
    torch.save(payload, path)
    return path


def one_line_error(proc) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


# -------------------------------------------------------------------------------------------------
# 1. a .dsd's recorded factory is imported only on explicit opt-in, and only if it is a model factory
# -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_refuses_a_recorded_factory_without_trust_code(world, good, command, monkeypatch):
    """The dsd-code-exec case, for every command that loads an artifact (also as teacher / --compare)."""
    monkeypatch.chdir(world.work)
    art = crafted(world.work / f"{command}.dsd", f"{world.module}:build", {"path": str(world.marker)})
    args = [a.format(a=art, o=world.work / f"out-{command}", good=good) for a in COMMANDS[command]]
    line = one_line_error(invoke(*args))
    assert "--trust-code" in line and f"{world.module}:build" in line and str(art) in line
    world.assert_untouched()
    assert not list(world.work.glob("out-*")), "a refused command wrote its output"


@FAST
@given(data=st.data(), trust=st.booleans(), command=st.sampled_from(["inspect", "export", "evaluate", "calibrate"]))
def test_hostile_recorded_specs_never_run(world, data, trust, command, monkeypatch):
    """Fuzz: hostile spec + hostile/garbage kwargs in a .dsd, with or without --trust-code: one line, nothing ran."""
    monkeypatch.chdir(world.work)
    spec, kwargs = data.draw(st.sampled_from([h for h in world.hostile()
                                              if not (trust and h[0].startswith(world.module))]))
    extra = data.draw(st.dictionaries(st.text(max_size=4), st.one_of(
        st.none(), st.integers(), st.text(max_size=8), st.just(torch.zeros(2)), st.tuples(st.integers()),
        st.just({1: "int key"})), max_size=2))
    art = crafted(world.work / "fuzz.dsd", spec, {**kwargs, **extra})
    args = [a.format(a=art, o=world.work / "fuzz-out", good="") for a in COMMANDS[command]]
    one_line_error(invoke(*args, *(["--trust-code"] if trust else [])))
    world.assert_untouched()
    assert not list(world.work.glob("fuzz-out*"))


@pytest.mark.parametrize("trust", [False, True])
def test_library_loaders_refuse_hostile_specs(world, trust):
    for spec, kwargs in world.hostile():
        if trust and spec.startswith(world.module):
            continue
        art = crafted(world.work / "lib.dsd", spec, kwargs)
        with pytest.raises(DsdeployError) as err:
            load_artifact(art, trust_code=trust)
        assert len(str(err.value).splitlines()) == 1
        if not trust and not spec.startswith(("torchvision:", "sample:")):
            assert "trust_code=True" in str(err.value)  # the library names the argument; the CLI shows --trust-code
        with pytest.raises(DsdeployError):
            load_model(str(art), trust_code=trust)
    world.assert_untouched()


def test_trusted_or_passed_factory_loads_the_artifact(net, tmp_path):
    res = convert(net, input_shape=SHAPE, rank=1)
    path = tmp_path / "m.dsd"
    save_artifact(path, res.model, res.plan, source_record(FACTORY), {"input_shape": list(SHAPE)})
    with pytest.raises(ArtifactError, match="trust_code=True"):
        load_artifact(path)
    x = torch.randn(*SHAPE)
    want = res.model.eval()(x)
    for art in (load_artifact(path, trust_code=True), load_artifact(path, factory=small_net)):
        assert torch.equal(art.model(x), want)
    # kwargs recorded in the file must be plain data even for a factory passed in code
    bad = crafted(tmp_path / "k.dsd", FACTORY, {"num_classes": torch.tensor(3)})
    with pytest.raises(ArtifactError, match="plain JSON"):
        load_artifact(bad, factory=small_net)


def test_named_specs_must_be_model_factories(world):
    """On the command line too: stdlib/tooling callables are refused before import or call."""
    for spec, kwargs in world.hostile():
        if spec.startswith(world.module):
            continue
        proc = invoke("inspect", spec, "--model-kwargs", json.dumps(kwargs))
        one_line_error(proc)
    world.assert_untouched()
    line = one_line_error(invoke("inspect", FACTORY, "--model-kwargs", '{"num_classes": {"1": [null, 2.5]}}'))
    assert "raised" in line  # plain JSON reaches the factory, which decides


# -------------------------------------------------------------------------------------------------
# 2. recipes: user-chosen code, still only model factories; pythonpath never shadows a package
# -------------------------------------------------------------------------------------------------

def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items() if x is not None) + " }"


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_recipes_with_hostile_specs_never_run(world, data, monkeypatch):
    """The recipe-code-exec case and its kind; a recipe naming a hostile .dsd needs --trust-code too."""
    monkeypatch.chdir(world.work)
    hostile = [h for h in world.hostile() if not h[0].startswith(world.module)]
    spec, kwargs = data.draw(st.sampled_from(hostile + [("dsd", {})]))
    if spec == "dsd":
        spec = str(crafted(world.work / "recipe-evil.dsd", "os:system", {"command": f"touch {world.marker}"}))
    recipe = world.work / "evil.toml"
    recipe.write_text(f'name = "evil"\n[model]\nspec = {json.dumps(spec)}\nmodel_kwargs = {toml_value(kwargs)}\n'
                      f'pythonpath = [{json.dumps(str(world.root / "code"))}]\n')
    out = world.work / f"run-{uuid.uuid4().hex[:6]}"
    proc = invoke("run", recipe, "--out", out)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: stage inspect failed")
    world.assert_untouched()


SHADOW = "import pathlib\npathlib.Path({marker!r}).write_text('shadowed {name}')\nraise ImportError('shadow')\n"


def test_recipe_pythonpath_never_shadows_installed_packages(tmp_path):
    """A file named like a dependency beside an innocent recipe is never imported (real subprocess)."""
    code = tmp_path / "code"
    code.mkdir()
    marker = tmp_path / "MARKER_shadow"
    for name in ("onnxsim", "onnx", "numpy", "json"):
        (code / f"{name}.py").write_text(SHADOW.format(marker=str(marker), name=name))
    (code / "mynet.py").write_text("from torch import nn\n"
                                   "def build(width=8):\n"
                                   "    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),\n"
                                   "                         nn.Conv2d(width, 16, 3, padding=1), nn.ReLU(),\n"
                                   "                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))\n")
    recipe = tmp_path / "r.toml"
    recipe.write_text('[model]\nspec = "mynet:build"\npythonpath = ["code"]\ninput_shape = [1, 3, 16, 16]\n'
                      '[export]\nsimplify = true\n[deploy]\nenabled = false\n[bench]\nenabled = false\n')
    proc = dsdeploy("run", recipe, "--out", tmp_path / "out", cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert not marker.exists(), marker.read_text()
    assert (tmp_path / "out" / "export" / "model.onnx").is_file()


# -------------------------------------------------------------------------------------------------
# 3. export needs no source weights; 4. bundles load only their own, verified model
# -------------------------------------------------------------------------------------------------

def test_export_of_an_artifact_does_not_need_the_source_weights(net, tmp_path):
    weights = tmp_path / "w.pt"
    torch.save(net.state_dict(), weights)
    art = tmp_path / "m.dsd"
    proc = invoke("convert", FACTORY, "--weights", weights, "-o", art, "--input-shape", "1,3,16,16", "--rank", "1")
    assert proc.returncode == 0, proc.stderr
    weights.unlink()  # the source weights moved away
    out = tmp_path / "m.onnx"
    proc = invoke("export", art, "--trust-code", "-o", out, "--no-simplify", "--json")
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    assert rep["op_counts"]["Conv"] > rep["original"]["op_counts"]["Conv"] > 0 and out.is_file()
    # a command without --teacher never advises it
    line = one_line_error(invoke("calibrate", art, "--trust-code", "--data", "digits", "-o", tmp_path / "c.dsd"))
    assert "gone" in line and "--teacher" not in line and not (tmp_path / "c.dsd").exists()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from PIL import Image

    from dsdeploy.export.bundle import deploy
    from dsdeploy.export.onnx_export import export_onnx, provenance

    root = tmp_path_factory.mktemp("bundle")
    digits = load_model("sample:digits_cnn")
    onnx_path = root / "digits.onnx"
    export_onnx(digits.model, onnx_path, digits.input_shape, metadata=provenance(digits), simplify=False)
    deploy(onnx_path, root / "b", latency_iters=0, preprocessing=digits.preprocessing, labels=digits.labels)
    image = root / "x.png"
    Image.new("L", (16, 16), 128).save(image)
    return root, image


def predict(folder: Path, image: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(folder / "predict.py"), str(image)], capture_output=True, text=True,
                          timeout=120, cwd=folder)


def _manifest(folder: Path, **changes) -> None:
    path = folder / "manifest.json"
    man = json.loads(path.read_text())
    man.update(changes)
    path.write_text(json.dumps(man))


def _symlink_out(b: Path, other: Path) -> None:
    from dsdeploy.fsutil import sha256_file

    (b / "model.onnx").unlink()
    (b / "model.onnx").symlink_to(other)
    _manifest(b, sha256={"model.onnx": sha256_file(other)})


TAMPER = {
    "parent-path": lambda b, o: _manifest(b, model="../outside.onnx"),
    "absolute-path": lambda b, o: _manifest(b, model=str(o)),
    "symlink-out": _symlink_out,
    "changed-bytes": lambda b, o: shutil.copyfile(o, b / "model.onnx"),
    "no-digest": lambda b, o: _manifest(b, sha256={}),
}


@pytest.mark.parametrize("how", sorted(TAMPER))
def test_bundle_runs_only_its_own_verified_model(bundle, tmp_path, how):
    root, image = bundle
    b = tmp_path / "b"
    shutil.copytree(root / "b", b)
    assert predict(b, image).returncode == 0
    import onnx

    other = tmp_path / "outside.onnx"  # a different, valid model outside the bundle
    model = onnx.load(root / "b" / "model.onnx")
    onnx.helper.set_model_props(model, {"planted": "yes"})
    onnx.save(model, other)
    TAMPER[how](b, other)
    proc = predict(b, image)
    assert proc.returncode != 0 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr


def _pre(b: Path, **changes) -> None:
    man = json.loads((b / "manifest.json").read_text())
    _manifest(b, preprocessing={**man["preprocessing"], **changes})


DAMAGE = {
    "garbage-manifest": lambda b: (b / "manifest.json").write_bytes(b"\x00{garbage\xff"),
    "manifest-not-object": lambda b: (b / "manifest.json").write_text("[1, 2]"),
    "no-preprocessing": lambda b: _manifest(b, preprocessing=None),
    "channels-7": lambda b: _pre(b, channels=7),
    "std-zero": lambda b: _pre(b, std=[0]),
    "std-nan": lambda b: _pre(b, std=[float("nan")]),  # json.dumps writes NaN
    "mean-wrong-length": lambda b: _pre(b, mean=[0.1, 0.2]),
    "huge-size": lambda b: _pre(b, size=[100000, 100000]),
    "size-not-ints": lambda b: _pre(b, size=[16.5, "16"]),
    "size-not-model": lambda b: _pre(b, size=[20, 20]),
    "huge-resize": lambda b: _pre(b, resize=10**9),
    "labels-short": lambda b: _manifest(b, labels=["a", "b"]),
    "labels-not-strings": lambda b: _manifest(b, labels=list(range(10))),
}


@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_bundle_refuses_damaged_manifest_in_one_line(bundle, tmp_path, how):
    """predict.py validates manifest.json (preprocessing ranges, labels against the model's
    outputs) before any image: every damage is one "error: ..." line and exit 2, no NaN scores."""
    root, image = bundle
    b = tmp_path / "b"
    shutil.copytree(root / "b", b)
    DAMAGE[how](b)
    proc = predict(b, image)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and proc.stdout == "", (proc.stdout, proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr


def test_bundle_missing_or_bad_model_argument_is_one_line(bundle, tmp_path):
    root, image = bundle
    for model in (tmp_path / "missing.onnx", image):  # absent, and a file that is not ONNX
        proc = subprocess.run([sys.executable, str(root / "b" / "predict.py"), str(image), "--model", str(model)],
                              capture_output=True, text=True, timeout=120, cwd=tmp_path)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
