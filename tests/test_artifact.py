"""The .dsd artifact: exact round trip, weights_only, versioned, deterministic."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsdeploy.conversion.artifact import (
    FORMAT,
    load_artifact,
    load_source_model,
    read_payload,
    save_artifact,
    source_record,
)
from dsdeploy.conversion.loading import load_model
from dsdeploy.conversion.rewrite import convert
from dsdeploy.errors import ArtifactError, DsdeployError

SHAPE = (2, 3, 16, 16)
FACTORY = "tests.conftest:small_net"


def write(net, path, **policy):
    res = convert(net, input_shape=SHAPE, **policy)
    save_artifact(path, res.model, res.plan, source_record(FACTORY), {"input_shape": list(SHAPE)})
    return res


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rank=st.integers(1, 4), layout=st.sampled_from(["branches", "concat", "multiplier"]))
def test_round_trip_is_exact(net, tmp_path_factory, rank, layout):
    path = tmp_path_factory.mktemp("a") / "m.dsd"
    res = write(net, path, rank=rank, layout=layout)
    art = load_artifact(path, trust_code=True)
    x = torch.randn(*SHAPE)
    with torch.no_grad():
        assert torch.equal(art.model(x), res.model.eval()(x))
    assert art.plan == res.plan
    assert art.metadata["input_shape"] == list(SHAPE)


def test_artifact_loads_with_weights_only_and_via_load_model(net, tmp_path):
    path = tmp_path / "m.dsd"
    write(net, path, mac_budget=0.3)
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == FORMAT
    loaded = load_model(str(path), trust_code=True)
    assert loaded.artifact is not None and loaded.input_shape == SHAPE
    teacher = load_source_model(loaded.artifact)
    assert type(teacher).__name__ == "SmallNet"


def test_same_conversion_gives_identical_bytes(net, tmp_path):
    write(net, tmp_path / "a.dsd", mac_budget=0.3)
    write(net, tmp_path / "b.dsd", mac_budget=0.3)
    assert (tmp_path / "a.dsd").read_bytes() == (tmp_path / "b.dsd").read_bytes()


def test_incompatible_version_and_corrupt_files(net, tmp_path):
    path = tmp_path / "m.dsd"
    write(net, path, rank=1)
    payload = read_payload(path)
    payload["format_version"] = 99
    torch.save(payload, tmp_path / "v99.dsd")
    with pytest.raises(ArtifactError, match="format version 99"):
        load_artifact(tmp_path / "v99.dsd")
    data = path.read_bytes()
    (tmp_path / "trunc.dsd").write_bytes(data[: len(data) // 3])
    with pytest.raises(ArtifactError, match="corrupt"):
        load_artifact(tmp_path / "trunc.dsd")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.dsd")
    with pytest.raises(ArtifactError, match="not a dsdeploy artifact"):
        load_artifact(tmp_path / "other.dsd")


def test_failed_write_keeps_previous_file(net, tmp_path, monkeypatch):
    import errno
    from pathlib import Path

    path = tmp_path / "m.dsd"
    res = write(net, path, rank=1)
    before = path.read_bytes()

    def disk_full(self, data):  # fault injection: half the bytes land, then ENOSPC
        with open(self, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", disk_full)
    with pytest.raises(DsdeployError, match="No space left"):
        save_artifact(path, res.model, res.plan, source_record(FACTORY))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.dsd"]
