"""Parity gate: every output compared, all failures collected into ONE ParityError."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from dsdeploy.errors import ExportError, ParityError
from dsdeploy.export.onnx_export import export_onnx
from dsdeploy.export.parity import ATOL, check_parity, compare_outputs, flatten_outputs


class TwoHeads(nn.Module):
    """A tiny CNN with two outputs (class logits and an embedding)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.cls = nn.Linear(8, 5)
        self.emb = nn.Linear(8, 4)

    def forward(self, x):
        f = torch.relu(self.conv(x)).mean(dim=(2, 3))
        return self.cls(f), self.emb(f)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = TwoHeads().eval()
    path = tmp_path_factory.mktemp("parity") / "two.onnx"
    export_onnx(model, path, (2, 3, 8, 8), simplify=False)
    return model, path


def test_parity_passes_on_every_output(exported):
    model, path = exported
    res = check_parity(model, path, (3, 3, 8, 8), seed=1)
    assert [r.name for r in res] == ["output_0", "output_1"]
    for r in res:
        assert r.ok and r.max_abs_diff <= ATOL and r.cosine > 0.999999
        assert r.shape[0] == 3


def test_every_failing_output_is_listed_in_one_error(exported, tmp_path):
    model, path = exported
    m = onnx.load(str(path))
    for init in m.graph.initializer:  # perturb every weight so both heads drift
        arr = numpy_helper.to_array(init)
        if arr.dtype == np.float32 and arr.ndim >= 1:
            init.CopyFrom(numpy_helper.from_array(arr * 1.05 + 0.01, init.name))
    bad = tmp_path / "bad.onnx"
    onnx.save(m, str(bad))
    with pytest.raises(ParityError) as err:
        check_parity(model, bad, (2, 3, 8, 8))
    msg = str(err.value)
    assert "output_0" in msg and "output_1" in msg and "\n" not in msg
    res = check_parity(model, bad, (2, 3, 8, 8), raise_on_fail=False)
    assert [r.ok for r in res] == [False, False]
    assert all(r.max_abs_diff > r.tolerance for r in res)


def test_compare_reports_shape_and_count_mismatches_without_raising():
    a = np.ones((2, 3), np.float32)
    res = compare_outputs([a, a], [a, np.ones((2, 4), np.float32)], ["x", "y"])
    assert res[0].ok and not res[1].ok and "shape" in res[1].note
    res = compare_outputs([a], [a, a], ["x"])
    assert len(res) == 1 and not res[0].ok and "outputs" in res[0].note


def test_relative_and_cosine_figures():
    ref = np.array([[1.0, -2.0, 4.0]], np.float32)
    got = ref + np.array([[0.0, 0.0, 0.004]], np.float32)
    (r,) = compare_outputs([ref], [got], ["out"], atol=1e-4, rtol=1e-3)
    assert r.max_abs_diff == pytest.approx(0.004, rel=1e-3)
    assert r.max_rel_diff == pytest.approx(0.001, rel=1e-3)  # relative to the output's max |value|
    assert r.tolerance == pytest.approx(1e-4 + 4e-3)
    assert r.ok and 0.99999 < r.cosine <= 1.0


def test_flatten_outputs_handles_nesting():
    t = torch.zeros(1)
    assert len(flatten_outputs({"a": t, "b": (t, [t])})) == 3


def test_wrong_input_count_is_an_export_error(exported):
    model, path = exported
    with pytest.raises(ExportError, match="takes 1 inputs"):
        check_parity(model, path, [torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8)])
