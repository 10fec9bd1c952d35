"""Parity of an ONNX model against its torch source on ONNX Runtime's CPU EP.

Every output is compared; failures are collected and raised as ONE :class:`ParityError`
listing each failing output (the shape of HF optimum's exporter validation).

Tolerance (fp32 export, documented default): an output passes when
``max|onnx - torch| <= atol + rtol * max|torch|`` with ``atol = rtol = 1e-4``, i.e. about
1e-4 of the output's own scale. ``max_rel_diff`` is ``max|onnx - torch| / max|torch|``
(relative to the output scale, not element-wise, which explodes near zero), and
``cosine`` is the cosine similarity of the flattened outputs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from dsdeploy.conversion.opcount import run_model
from dsdeploy.errors import ExportError, ParityError
from dsdeploy.runtime.sessions import cpu_session

ATOL = 1e-4
RTOL = 1e-4


@dataclass
class OutputParity:
    """One output's agreement between torch and ONNX Runtime."""

    name: str
    shape: list[int]
    max_abs_diff: float
    max_rel_diff: float
    cosine: float
    tolerance: float
    ok: bool
    inputs: str = "random"
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """One short phrase for error messages."""
        if self.note:
            return f"output {self.name!r} ({self.inputs} inputs): {self.note}"
        return (f"output {self.name!r} ({self.inputs} inputs): max abs {self.max_abs_diff:.3g} > tol "
                f"{self.tolerance:.3g} (rel {self.max_rel_diff:.3g}, cosine {self.cosine:.6f})")


def flatten_outputs(out: Any) -> list[torch.Tensor]:
    """Tensors of a model output (tensor, tuple/list, dict values; nested) in export order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in flatten_outputs(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in flatten_outputs(v)]
    return []


def random_inputs(shape: Sequence[int], seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A seeded input of ``shape`` and ``dtype`` (normal floats; small ints for integer dtypes)."""
    gen = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(*shape, generator=gen).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, tuple(shape), generator=gen).bool()
    return torch.randint(0, 10, tuple(shape), generator=gen).to(dtype)


def as_inputs(inputs: Any, seed: int = 0) -> tuple[list[torch.Tensor], str]:
    """Normalise ``inputs``: a shape tuple (random, seeded), a tensor, or a sequence of tensors."""
    if isinstance(inputs, torch.Tensor):
        return [inputs], "given"
    if isinstance(inputs, (tuple, list)) and inputs and all(isinstance(d, int) for d in inputs):
        return [random_inputs(inputs, seed)], "random"
    if isinstance(inputs, (tuple, list)) and inputs and all(isinstance(t, torch.Tensor) for t in inputs):
        return list(inputs), "given"
    raise TypeError("inputs must be a shape tuple, a tensor or a sequence of tensors")


def torch_outputs(model: nn.Module, inputs: list[torch.Tensor]) -> list[np.ndarray]:
    """Run ``model`` (eval, no_grad) and return its flattened outputs as numpy arrays."""
    with torch.no_grad():
        out = run_model(model, inputs[0]) if len(inputs) == 1 else model(*inputs)
    return [t.detach().cpu().numpy() for t in flatten_outputs(out)]


def compare_outputs(reference: list[np.ndarray], got: list[np.ndarray], names: list[str], *, atol: float = ATOL,
                    rtol: float = RTOL, inputs: str = "random") -> list[OutputParity]:
    """Compare every output pair; a count or shape mismatch is a failing entry, never an exception."""
    results: list[OutputParity] = []
    if len(reference) != len(got):
        return [OutputParity("*", [], float("inf"), float("inf"), 0.0, 0.0, False, inputs,
                             f"torch gives {len(reference)} outputs, ONNX {len(got)}")]
    for name, r, g in zip(names, reference, got):
        r64, g64 = np.asarray(r, np.float64), np.asarray(g, np.float64)
        if r64.shape != g64.shape:
            results.append(OutputParity(name, list(r64.shape), float("inf"), float("inf"), 0.0, 0.0, False, inputs,
                                        f"shape {list(g64.shape)} in ONNX vs {list(r64.shape)} in torch"))
            continue
        if r64.size == 0:
            results.append(OutputParity(name, list(r64.shape), 0.0, 0.0, 1.0, atol, True, inputs))
            continue
        diff = float(np.abs(r64 - g64).max())
        scale = float(np.abs(r64).max())
        denom = float(np.linalg.norm(r64) * np.linalg.norm(g64))
        cosine = float((r64.ravel() @ g64.ravel()) / denom) if denom > 0 else (1.0 if diff == 0 else 0.0)
        tol = atol + rtol * scale
        ok = bool(np.isfinite(g64).all() == np.isfinite(r64).all() and diff <= tol)
        results.append(OutputParity(name, list(r64.shape), diff, diff / scale if scale > 0 else diff, cosine, tol,
                                    ok, inputs))
    return results


def raise_failures(results: list[OutputParity], stage: str) -> None:
    """Raise ONE ParityError listing every failing output (no-op when all pass)."""
    failing = [r for r in results if not r.ok]
    if failing:
        raise ParityError(f"ONNX Runtime (CPU EP) disagrees with torch after {stage}: "
                          + "; ".join(f.describe() for f in failing))


def check_parity(torch_model: nn.Module, onnx_path: str | Path, inputs: Any, *, atol: float = ATOL,
                 rtol: float = RTOL, seed: int = 0, stage: str = "export", raise_on_fail: bool = True,
                 label: str | None = None, session: Any = None) -> list[OutputParity]:
    """Run torch and ONNX Runtime (CPU EP) on the same inputs and compare every output.

    Args:
        torch_model: the source model (run in eval mode, no_grad).
        onnx_path: the exported file.
        inputs: a shape tuple (a seeded random input), a tensor, or a sequence of tensors
            (one per ONNX input, in order).
        atol, rtol: an output passes when ``max abs diff <= atol + rtol * max|torch output|``.
        seed: seed for random inputs.
        stage: named in the error ("export", "simplification").
        raise_on_fail: raise ParityError listing every failing output (else just return).
        label: recorded as ``OutputParity.inputs`` (default: "random" or "given").
        session: an existing ONNX Runtime session for ``onnx_path``.

    Returns:
        One :class:`OutputParity` per output.
    """
    tensors, kind = as_inputs(inputs, seed)
    sess = session or cpu_session(onnx_path)
    feed_names = [i.name for i in sess.get_inputs()]
    if len(feed_names) != len(tensors):
        raise ExportError(f"{onnx_path} takes {len(feed_names)} inputs ({', '.join(feed_names)}), "
                          f"parity was given {len(tensors)}")
    torch_model.eval()
    reference = torch_outputs(torch_model, tensors)
    feed = {n: t.detach().cpu().numpy() for n, t in zip(feed_names, tensors)}
    try:
        got = sess.run(None, feed)
    except Exception as exc:  # onnxruntime's own error types: one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExportError(f"ONNX Runtime cannot run {onnx_path} on inputs {[list(t.shape) for t in tensors]}: "
                          f"{first}") from None
    names = [o.name for o in sess.get_outputs()]
    results = compare_outputs(reference, got, names, atol=atol, rtol=rtol, inputs=label or kind)
    if raise_on_fail:
        raise_failures(results, stage)
    return results
