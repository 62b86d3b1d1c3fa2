"""The matmul kernels a roofline times: the fastest of them bounds what a measurement's matmuls cost."""

from __future__ import annotations

from collections.abc import Callable

import torch

from lm_superposition.analyze import ENCODE_CHUNK_ELEMENTS
from lm_superposition.kernels import linear, uses_onednn


def matmul_kernels(a: torch.Tensor, b: torch.Tensor) -> dict[str, Callable[[], object]]:
    """{kernel: a call without arguments that computes a @ b}: torch.matmul into a preallocated
    output, and for 2-D float32 operands on a CPU, oneDNN's linear (`lm_superposition.kernels`),
    which on this project's AMD EPYC ran 1.8-2.2x faster than torch.matmul's MKL.

    oneDNN's linear allocates its output, so it is timed in row slices of at most
    ENCODE_CHUNK_ELEMENTS output elements, as the analyzer calls it: those come from the heap,
    where a fresh 128 MiB output would be page-faulted on every call."""
    kernels = {"torch.matmul": lambda out=torch.matmul(a, b): torch.matmul(a, b, out=out)}
    if a.ndim == 2 and a.dtype == torch.float32 and uses_onednn(b):
        rows = max(1, ENCODE_CHUNK_ELEMENTS // b.shape[1])

        kernels["oneDNN"] = lambda: [linear(part, b) for part in a.split(rows)]
    return kernels
