"""Every torchvision classification builder under 100M parameters converts at rank 1 and
at full rank; at full rank the outputs match the original.

Tolerance (float32): max |converted - original| <= 1e-4 x max |original| over the
output. Detection and segmentation models go through ``inspect``.
"""

import pytest
import torch
from torch import nn

from dsdeploy.conversion.block import ds_blocks
from dsdeploy.conversion.loading import load_model
from dsdeploy.conversion.opcount import run_model
from dsdeploy.conversion.plan import Policy
from dsdeploy.conversion.rewrite import convert
from dsdeploy.conversion.workflow import inspect_model

MAX_PARAMS = 100_000_000
FULL_RANK_TOL = 1e-4


def classification_models() -> list[str]:
    import torchvision.models as tvm

    names = tvm.list_models(module=tvm)
    return [n for n in names if next(iter(tvm.get_model_weights(n))).meta["num_params"] < MAX_PARAMS]


def input_shape(name: str) -> tuple[int, ...]:
    if name.startswith(("vit_", "maxvit")):
        return (1, 3, 224, 224)  # fixed image size
    if name in ("inception_v3", "alexnet"):
        return (1, 3, 96, 96)  # minimum sizes of these architectures
    return (1, 3, 32, 32)


def test_the_sweep_covers_the_zoo():
    names = classification_models()
    assert len(names) >= 60
    assert {"resnet18", "mobilenet_v2", "vit_b_16", "regnet_y_8gf", "efficientnet_b0"} <= set(names)


@pytest.mark.parametrize("name", classification_models())
def test_classification_model_converts(name):
    torch.manual_seed(0)
    model = load_model(f"torchvision:{name}").model
    for m in model.modules():  # zero-initialised heads (ViT) would hide any difference
        if isinstance(m, nn.Linear) and not m.weight.any():
            nn.init.normal_(m.weight, std=0.02)
    shape = input_shape(name)
    x = torch.randn(*shape)
    with torch.no_grad():
        ref = run_model(model, x)
    # the stem is converted too: some models (ViT, MobileNet) have no other dense kxk conv
    r1 = convert(model, input_shape=shape, rank=1, convert_stem=True)
    assert r1.plan.converted and ds_blocks(r1.model)
    assert r1.after.conv_macs < r1.before.conv_macs
    with torch.no_grad():
        out1 = run_model(r1.model, x)
    assert out1.shape == ref.shape and torch.isfinite(out1).all()
    full = convert(model, input_shape=shape, rank=10**6, convert_stem=True, require_gain=False)
    assert all(b.rank == d.full_rank for b, d in zip(ds_blocks(full.model).values(), full.plan.converted))
    with torch.no_grad():
        out = run_model(full.model, x)
    scale = ref.abs().max().item()
    assert scale > 0
    assert (out - ref).abs().max().item() <= FULL_RANK_TOL * scale


@pytest.mark.parametrize("name,shape", [
    ("fasterrcnn_mobilenet_v3_large_320_fpn", (1, 3, 320, 320)),
    ("ssdlite320_mobilenet_v3_large", (1, 3, 320, 320)),
    ("retinanet_resnet50_fpn", (1, 3, 128, 128)),
    ("fcn_resnet50", (1, 3, 128, 128)),
    ("deeplabv3_mobilenet_v3_large", (1, 3, 128, 128)),
    ("lraspp_mobilenet_v3_large", (1, 3, 128, 128)),
])
def test_inspect_detection_and_segmentation(name, shape):
    loaded = load_model(f"torchvision:{name}")
    report = inspect_model(loaded, Policy(rank=1), shape)
    assert report.plan.layers and all(d.reason for d in report.plan.layers)
    assert report.before.conv_macs > 0
    if not name.startswith(("ssdlite", "lraspp")):  # these are depthwise + 1x1 convs throughout
        assert report.plan.converted
    assert "decision" in report.render()
