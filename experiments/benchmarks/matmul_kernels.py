"""The matmul kernels a roofline times: the fastest of them bounds what a measurement's matmuls cost."""

from __future__ import annotations

from collections.abc import Callable

import torch

from lm_superposition.analyze import ENCODE_CHUNK_ELEMENTS
from lm_superposition.kernels import float32_kernel, linear, uses_onednn


def matmul_kernels(a: torch.Tensor, b: torch.Tensor) -> dict[str, Callable[[], object]]:
    """{kernel: a call without arguments that computes a @ b}: torch.matmul into a preallocated
    output, and for 2-D float32 operands on a CPU, oneDNN's linear (`lm_superposition.kernels`),
    timed whichever kernel the package would pick on this CPU: on the project's AMD EPYC oneDNN ran
    1.8-2.2x faster than torch.matmul's MKL, on an Intel Xeon MKL was the faster.

    oneDNN's linear allocates its output, so it is timed in row slices of at most
    ENCODE_CHUNK_ELEMENTS output elements, as the analyzer calls it: those come from the heap,
    where a fresh 128 MiB output would be page-faulted on every call."""
    kernels = {"torch.matmul": lambda out=torch.matmul(a, b): torch.matmul(a, b, out=out)}
    with float32_kernel("onednn"):
        onednn = a.ndim == 2 and a.dtype == torch.float32 and uses_onednn(b)
    if onednn:
        rows = max(1, ENCODE_CHUNK_ELEMENTS // b.shape[1])

        def sliced():
            with float32_kernel("onednn"):
                return [linear(part, b) for part in a.split(rows)]

        kernels["oneDNN"] = sliced
    return kernels
