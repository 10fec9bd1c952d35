"""Conversion: the DS decomposition (pure math), the DS block, planning, the rewrite, op counting, the .dsd artifact.

The package is also the public call ``dsdeploy.convert(model, rank=...)``: the stage folder and the
API function share the name ``dsdeploy.convert``, so calling this package runs
:func:`dsdeploy.api.convert` (whatever imported the package first, the attribute is callable).
"""

from __future__ import annotations

import sys
import types
from typing import Any


class _CallablePackage(types.ModuleType):
    """This package, callable as :func:`dsdeploy.api.convert`."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        import dsdeploy.api as api  # imports torch: only when converting

        return api.convert(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
