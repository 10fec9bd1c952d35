"""dsdeploy: make pretrained CNNs cheap to run on edge devices.

Rewrites standard convolutions into depthwise-separable blocks initialised from the
pretrained kernels, recovers accuracy, exports to ONNX and measures the result on
ONNX Runtime execution providers.
"""

__version__ = "0.1.0"

from dsdeploy.errors import DsdeployError  # noqa: E402,F401
