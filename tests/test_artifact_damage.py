"""Crafted or damaged ``.dsd`` internals end in one line (ArtifactError), never an internal error.

Each part of a valid artifact (source record, plan, state_dict, metadata, history) is replaced
by data of the wrong type or size; a fuzz test replaces random parts with random data.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsdeploy.conversion.artifact import load_artifact, read_payload
from dsdeploy.errors import ArtifactError, DsdeployError
from tests.clirun import invoke
from tests.test_security import good, one_line_error  # noqa: F401  (fixture)

FAST = settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))


def _first_converted(p):
    return next(layer for layer in p["plan"]["layers"] if layer["convert"])


def _first_key(p):
    return next(iter(p["state_dict"]))


def _first_running_var(p):
    return next(k for k in p["state_dict"] if k.endswith("running_var"))


MUTATIONS = {
    "plan-not-a-table": lambda p: p.update(plan="garbage"),
    "plan-layers-not-a-list": lambda p: p["plan"].update(layers=5),
    "plan-layer-an-int": lambda p: p["plan"].update(layers=[1]),
    "plan-layer-unknown-field": lambda p: _first_converted(p).update(evil=1),
    "plan-layer-not-in-model": lambda p: _first_converted(p).update(name="nope.nope"),
    "plan-layer-name-an-int": lambda p: _first_converted(p).update(name=5),
    "plan-layer-not-a-conv": lambda p: _first_converted(p).update(name=""),
    "plan-rank-huge": lambda p: _first_converted(p).update(rank=10 ** 9),
    "plan-rank-negative": lambda p: _first_converted(p).update(rank=-1),
    "plan-layout-unknown": lambda p: p["plan"].update(layout="evil"),
    "plan-layer-twice": lambda p: p["plan"]["layers"].append(dict(_first_converted(p))),
    "state-negative-bn-variance": lambda p: p["state_dict"][_first_running_var(p)].fill_(-1.0),
    "state-nan-bn-variance": lambda p: p["state_dict"][_first_running_var(p)].fill_(float("nan")),
    "state-not-a-table": lambda p: p.update(state_dict=[1]),
    "state-non-tensor": lambda p: p["state_dict"].update({_first_key(p): "x"}),
    "state-int-key": lambda p: p["state_dict"].update({1: torch.zeros(1)}),
    "state-sparse": lambda p: p["state_dict"].update({_first_key(p): p["state_dict"][_first_key(p)].to_sparse()}),
    "state-meta": lambda p: p["state_dict"].update(
        {_first_key(p): torch.empty(p["state_dict"][_first_key(p)].shape, device="meta")}),
    "state-missing-key": lambda p: p["state_dict"].pop(_first_key(p)),
    "state-wrong-shape": lambda p: p["state_dict"].update({_first_key(p): torch.zeros(7, 7)}),
    "state-complex": lambda p: p["state_dict"].update(
        {_first_key(p): p["state_dict"][_first_key(p)].to(torch.complex64)}),
    "source-not-a-table": lambda p: p.update(source="x"),
    "source-spec-an-int": lambda p: p["source"].update(spec=5),
    "source-spec-unknown": lambda p: p["source"].update(spec="no such spec"),
    "source-kwargs-a-list": lambda p: p["source"].update(model_kwargs=[1]),
    "source-kwargs-a-tensor": lambda p: p["source"].update(model_kwargs={"a": torch.zeros(1)}),
    "source-weights-an-int": lambda p: p["source"].update(weights=5),
    "metadata-not-a-table": lambda p: p.update(metadata=[1]),
    "metadata-shape-text": lambda p: p["metadata"].update(input_shape="abc"),
    "metadata-labels-ints": lambda p: p["metadata"].update(labels=[1, 2]),
    "metadata-labels-duplicate": lambda p: p["metadata"].update(labels=["a\nb"] * 2 + [str(i) for i in range(8)]),
    "metadata-input-shape-huge": lambda p: p["metadata"].update(input_shape=[1, 1, 10 ** 9, 10 ** 9]),
    "metadata-preprocessing-text-size": lambda p: p["metadata"]["preprocessing"].update(size="x"),
    "metadata-preprocessing-huge-size": lambda p: p["metadata"]["preprocessing"].update(size=[10 ** 9, 10 ** 9]),
    "metadata-preprocessing-nan-mean": lambda p: p["metadata"]["preprocessing"].update(mean=[float("nan")]),
    "history-not-a-list": lambda p: p.update(history=5),
    "version-a-table": lambda p: p.update(format_version={"a": 1}),
}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_crafted_internals_are_one_line(good, tmp_path, name):
    payload = read_payload(good)
    MUTATIONS[name](payload)
    path = tmp_path / f"{name}.dsd"
    torch.save(payload, path)
    with pytest.raises(ArtifactError) as err:
        load_artifact(path)
    assert len(str(err.value).splitlines()) == 1
    one_line_error(invoke("inspect", path))
    one_line_error(invoke("evaluate", path, "--data", "digits", "--limit", "16"))


def test_labels_with_newlines_keep_errors_one_line(good, tmp_path):
    """Crafted labels holding newlines are shown through repr: the data-vs-labels error stays one line."""
    from dsdeploy.data.labels import check_outputs, to_model_labels
    from dsdeploy.errors import DataError

    labels = [f"evil\nline {i}\r" for i in range(10)]
    with pytest.raises(DataError) as err:
        to_model_labels(["0", "x\ny"], labels)
    assert len(str(err.value).splitlines()) == 1
    with pytest.raises(DataError) as err:
        check_outputs([f"c\n{i}" for i in range(12)], 10)
    assert len(str(err.value).splitlines()) == 1
    payload = read_payload(good)
    payload["metadata"]["labels"] = labels
    path = tmp_path / "newlines.dsd"
    torch.save(payload, path)
    proc = invoke("evaluate", path, "--data", "digits", "--limit", "16")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and lines[-1].startswith("error: data class '0'"), proc.stderr
    assert all(line.startswith(("error: ", "preprocessing: ")) for line in lines), proc.stderr


LEAF = st.one_of(st.none(), st.booleans(), st.integers(-3, 10 ** 10), st.floats(allow_nan=True), st.text(max_size=6),
                 st.just(torch.zeros(2)), st.just(torch.zeros(2).to_sparse()), st.just(torch.empty(3, device="meta")))
VALUE = st.recursive(LEAF, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
                     max_leaves=6)


@FAST
@given(data=st.data())
def test_random_damage_is_an_artifact_error_or_a_model(good, tmp_path_factory, data):
    """Fuzz: replace any part of a valid payload with random data: ArtifactError or a model that evaluates."""
    payload = read_payload(good)
    node, key = payload, None
    for _ in range(data.draw(st.integers(1, 4))):
        if not isinstance(node, (dict, list)) or not node:
            break
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        key = data.draw(st.sampled_from(keys))
        parent, node = node, node[key]
    if key is not None:
        parent[key] = data.draw(VALUE)
    path = tmp_path_factory.mktemp("fuzz") / "d.dsd"
    torch.save(payload, path)
    try:
        art = load_artifact(path)
    except DsdeployError as exc:
        assert len(str(exc).splitlines()) == 1
        return
    assert isinstance(art.model, torch.nn.Module)
    proc = invoke("evaluate", path, "--data", "digits", "--limit", "16")
    assert proc.returncode in (0, 2), proc.stderr  # a result or one clear line, never an internal error
