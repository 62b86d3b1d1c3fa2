"""The matmul kernels a roofline times: the fastest of them bounds what a measurement's matmuls cost."""

from __future__ import annotations

from collections.abc import Callable

import torch

from lm_superposition.kernels import uses_onednn

# oneDNN's linear allocates its output; outputs of at most this many float32 elements (16 MiB)
# come from the heap, where a fresh 128 MiB one is page-faulted on every call, so it is timed in row
# slices of this size, as the analyzer calls it (lm_superposition.analyze.ENCODE_CHUNK_ELEMENTS).
ONEDNN_SLICE_ELEMENTS = 2**22


def matmul_kernels(a: torch.Tensor, b: torch.Tensor) -> dict[str, Callable[[], object]]:
    """{kernel: a call without arguments that computes a @ b}: torch.matmul into a preallocated
    output, and for 2-D float32 operands on a CPU, oneDNN's linear (`lm_superposition.kernels`),
    which on this project's AMD EPYC ran 1.8-2.2x faster than torch.matmul's MKL."""
    kernels = {"torch.matmul": lambda out=torch.matmul(a, b): torch.matmul(a, b, out=out)}
    if a.ndim == 2 and a.dtype == torch.float32 and uses_onednn(b):
        rows = max(1, ONEDNN_SLICE_ELEMENTS // b.shape[1])
        linear = torch.ops.mkldnn._linear_pointwise
        kernels["oneDNN"] = lambda: [linear(part, b.t(), None, "none", [], "") for part in a.split(rows)]
    return kernels
