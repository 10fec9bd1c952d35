"""The dynamo-export speed patch (:func:`dsdeploy.export.exporters._torchlib_ops_reused`): the ONNX written is
the same with and without it, torch's function is restored after it, and a torch/onnxscript laid out
otherwise gets plain exports."""

from __future__ import annotations

import onnx
import torch
from torch import nn

from dsdeploy.conversion.rewrite import convert
from dsdeploy.export import exporters
from dsdeploy.export.exporters import _torchlib_module, _torchlib_ops_reused, run_exporter


def small_ds_model() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 4)).eval()
    return convert(net, input_shape=(1, 3, 12, 12), rank=1, convert_stem=True).model.eval()


def export_graph(model: nn.Module, path) -> onnx.GraphProto:
    run_exporter(model, torch.randn(2, 3, 12, 12), path, "dynamo", 18, dynamic_batch=True, n_outputs=1)
    graph = onnx.load(str(path)).graph
    assert len(graph.node) > 0
    return graph


def test_the_export_is_the_same_with_and_without_the_torchlib_table_kept(tmp_path):
    model = small_ds_model()
    plain = export_graph(model, tmp_path / "plain.onnx")
    module = _torchlib_module()
    original = module.get_torchlib_ops if module is not None else None
    with _torchlib_ops_reused():
        kept = export_graph(model, tmp_path / "kept.onnx")  # the table from the process-wide cache
        if module is not None:  # this torch/onnxscript layout is the one the patch knows
            assert module.get_torchlib_ops is not original and exporters._TORCHLIB_OPS
    if module is not None:
        assert module.get_torchlib_ops is original  # restored: outside dsdeploy's export nothing changes
    assert kept.SerializeToString(deterministic=True) == plain.SerializeToString(deterministic=True)


def test_nested_use_leaves_torch_as_it_was():
    module = _torchlib_module()
    if module is None:
        with _torchlib_ops_reused(), _torchlib_ops_reused():
            return
    original = module.get_torchlib_ops
    with _torchlib_ops_reused():
        outer = module.get_torchlib_ops
        with _torchlib_ops_reused():  # another export inside one (or another thread's): no second patch
            assert module.get_torchlib_ops is outer
        assert module.get_torchlib_ops is outer
        table = module.get_torchlib_ops()
        assert table == module.get_torchlib_ops() and table is not module.get_torchlib_ops()  # own copies
    assert module.get_torchlib_ops is original


def test_another_torch_layout_exports_plainly(monkeypatch, tmp_path):
    """Where torch's internals are laid out otherwise the patch does nothing and the export works as torch's:
    no lazy ``onnxscript_apis`` (exported), or no ``get_torchlib_ops`` in it (left alone)."""
    from torch.onnx._internal import _lazy_import

    module = _torchlib_module()
    real = module.get_torchlib_ops if module is not None else None
    with monkeypatch.context() as mp:
        mp.delattr(_lazy_import, "onnxscript_apis")  # torch's exporter holds its own reference
        assert _torchlib_module() is None
        with exporters._dynamo_context():
            if module is not None:
                assert module.get_torchlib_ops is real
            graph = export_graph(small_ds_model(), tmp_path / "m.onnx")
    assert any(n.op_type == "Conv" for n in graph.node)
    if module is None:
        return
    with monkeypatch.context() as mp:
        mp.setattr(module, "get_torchlib_ops", None)
        assert _torchlib_module() is None
        with _torchlib_ops_reused():
            assert module.get_torchlib_ops is None
    assert module.get_torchlib_ops is real
