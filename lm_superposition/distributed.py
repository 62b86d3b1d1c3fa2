"""torch.distributed (torchrun) for the measure: who am I, wait for the others, sum a state.

Each process measures its own share of the windows; the accumulators (`FeatureBudget`,
`VarianceExplained`) are sums, so summing them over processes gives the whole run's state.
"""

from __future__ import annotations

import torch


def world_size_and_rank() -> tuple[int, int]:
    """(world size, rank) of torch.distributed, or (1, 0) when it is not in use."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def barrier() -> None:
    if world_size_and_rank()[0] > 1:
        torch.distributed.barrier()


def all_reduce_(*tensors: torch.Tensor, op: str = "sum") -> None:
    """Sum (or max) each tensor over every process, in place. Tensors travel through the
    backend's device (CUDA for NCCL) and come back to where they were."""
    dist = torch.distributed
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
    for tensor in tensors:
        moved = tensor.to(device)
        dist.all_reduce(moved, op=reduce_op)
        tensor.copy_(moved)
