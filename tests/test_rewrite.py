"""The module-level rewrite: structure changes as planned, numerics hold, input untouched."""

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsdeploy.conversion.block import DSConv, ds_blocks
from dsdeploy.conversion.rewrite import convert, original_convs
from dsdeploy.errors import NothingToConvertError

SHAPE = (2, 3, 16, 16)


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rank=st.integers(1, 9), layout=st.sampled_from(["branches", "concat", "multiplier"]), stem=st.booleans())
def test_convert_never_mutates_its_input(net, rank, layout, stem):
    before = state(net)
    structure = repr(net)
    res = convert(net, input_shape=SHAPE, rank=rank, layout=layout, convert_stem=stem, require_gain=False)
    assert repr(net) == structure
    after = net.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert res.model is not net


@pytest.mark.parametrize("layout", ["branches", "concat", "multiplier"])
def test_full_rank_rewrite_is_exact_and_structure_changes(net, layout):
    res = convert(net, input_shape=SHAPE, rank=100, layout=layout, require_gain=False)
    blocks = ds_blocks(res.model)
    assert set(blocks) == {"conv1", "grouped", "conv2"}
    assert all(isinstance(b, DSConv) for b in blocks.values())
    assert {n: b.rank for n, b in blocks.items()} == {"conv1": 9, "grouped": 3, "conv2": 9}
    assert set(original_convs(net, res.plan)) == set(blocks)
    x = torch.randn(*SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(res.model(x), net(x), atol=1e-5, rtol=1e-4)


def test_rank_one_reduces_macs_as_planned(net):
    res = convert(net, input_shape=SHAPE, rank=1)
    for d in res.plan.converted:
        assert d.macs_after < d.macs
    assert res.after.conv_macs < res.before.conv_macs
    assert res.after.total_params < res.before.total_params


def test_nothing_to_convert_lists_reasons():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 8, 1))
    with pytest.raises(NothingToConvertError) as err:
        convert(model, input_shape=(1, 3, 8, 8), rank=1)
    assert "stem" in str(err.value) and "1x1" in str(err.value)
    assert err.value.exit_code == 3


def test_training_mode_is_preserved_per_module(net):
    res = convert(net, input_shape=SHAPE, rank=1)
    assert not res.model.training
    model = copy.deepcopy(net).train()
    res = convert(model, input_shape=SHAPE, rank=1)
    assert model.training  # the input's mode is restored


def test_rewrite_works_on_a_detection_model():
    import torchvision

    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None).eval()
    res = convert(model, input_shape=(1, 3, 320, 320), rank=1)
    assert res.plan.converted and ds_blocks(res.model)
    with torch.no_grad():
        out = res.model([torch.rand(3, 320, 320)])
    assert isinstance(out, list) and "boxes" in out[0]
