"""dsdeploy: make pretrained CNNs cheap to run on edge devices.

Rewrites standard convolutions into depthwise-separable blocks initialised from the
pretrained kernels, recovers accuracy, exports to ONNX and measures the result on
ONNX Runtime execution providers.

The Python API (:mod:`dsdeploy.api`), one call per stage::

    import dsdeploy
    m = dsdeploy.convert(model, rank=4)          # -> ConvertedModel (model, plan, op counts)
    dsdeploy.calibrate(m, "digits")              # least squares on activations, in place
    dsdeploy.finetune(m, "digits", epochs=2)     # distillation from the original
    dsdeploy.evaluate(m, "digits"); dsdeploy.export_onnx(m, "m.onnx"); dsdeploy.benchmark("m.onnx")
    dsdeploy.save(m, "m.dsd"); model = dsdeploy.load("m.dsd")

They are imported on first use, so ``import dsdeploy`` (and ``dsdeploy --help``) stays
light and does not import torch.
"""

from __future__ import annotations

from typing import Any

from dsdeploy.errors import DsdeployError  # noqa: F401
from dsdeploy.version import __version__

API = ("ConvertedModel", "convert", "inspect", "calibrate", "finetune", "evaluate", "export_onnx", "benchmark", "deploy",
       "latency_table", "save", "load")
__all__ = ["DsdeployError", "__version__", *API]


def __getattr__(name: str) -> Any:
    """Import :mod:`dsdeploy.api` on first use of one of its names (it imports torch).

    The conversion stage's package is :mod:`dsdeploy.conversion`, so ``dsdeploy.convert`` is
    only ever the API function, whatever was imported before.
    """
    if name in API:
        # lazy: dsdeploy.api imports torch, and `import dsdeploy` stays torch-free
        from dsdeploy import api

        return getattr(api, name)
    raise AttributeError(f"module 'dsdeploy' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(API))
