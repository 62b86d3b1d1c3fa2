"""Sparse-coding checks to report next to psi, usable on any hook.

- `linear_additivity`: is the representation additive? For paired inputs A, B the cosine of
  f(A) + f(B) with f(combine(A, B)). A sparse linear code (features add up in activation space)
  gives cosines near 1; a layer that mixes or gates its inputs gives less. `combine` is addition
  for vector inputs (the default) or concatenation for token sequences, with f pooling over
  positions (e.g. the summed residual stream of a window).
- `compressed_sensing_margin`: M / (K ln(N / K)). Compressed sensing recovers a K-sparse code
  over N dictionary directions from M linear measurements when M exceeds ~K ln(N / K); a margin
  above 1 says the hook (width M) has room for the SAE's code (mean L0 K over d_sae N), below 1
  that the SAE's code is too dense for that width to carry recoverably.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Additivity:
    """Per-pair cosines of f(A) + f(B) with f(combine(A, B)), and their mean."""

    cosines: torch.Tensor
    mean: float


@torch.no_grad()
def linear_additivity(
    f: Callable[[torch.Tensor], torch.Tensor],
    inputs_a: torch.Tensor,
    inputs_b: torch.Tensor,
    combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = torch.add,
) -> Additivity:
    """Cosine, per row pair, of f(A) + f(B) with f(combine(A, B)); f maps a batch to one representation per row.

    Representations with more than one dimension per row are flattened. An affine f (a bias)
    adds the bias twice on the left and once on the right: centre f (subtract f of an empty or
    zero input) when that matters.
    """
    if inputs_a.shape[0] != inputs_b.shape[0] or inputs_a.shape[0] == 0:
        raise ValueError(
            "inputs_a and inputs_b must hold the same, non-zero number of rows (pairs), "
            f"got {inputs_a.shape[0]} and {inputs_b.shape[0]}"
        )
    return additivity_of(f(inputs_a), f(inputs_b), f(combine(inputs_a, inputs_b)))


def additivity_of(f_a: torch.Tensor, f_b: torch.Tensor, f_ab: torch.Tensor) -> Additivity:
    """Per-row cosine of f_a + f_b with f_ab: `linear_additivity` on representations already computed
    (e.g. every hook of a model from the same three forward passes)."""
    separate = (f_a + f_b).flatten(1).double()
    together = f_ab.flatten(1).double()
    if separate.shape != together.shape:
        raise ValueError(
            f"f(A) + f(B) has shape {tuple(separate.shape)} but f(combine(A, B)) has {tuple(together.shape)}: "
            "f must give one representation of fixed size per row (pool over positions for sequences)"
        )
    cosines = F.cosine_similarity(separate, together, dim=1)
    return Additivity(cosines=cosines, mean=float(cosines.mean()))


def compressed_sensing_margin(hook_width: int, mean_l0: float, d_sae: int) -> float:
    """M / (K ln(N / K)) with M = hook width, K = the SAE's mean L0, N = d_sae; > 1 means room to recover the code."""
    if not hook_width > 0:
        raise ValueError(f"hook_width (M, the hook's dimension) must be positive, got {hook_width!r}")
    if not d_sae > 0:
        raise ValueError(f"d_sae (N, the dictionary size) must be positive, got {d_sae!r}")
    if not 0 < mean_l0 < d_sae:
        raise ValueError(
            f"mean_l0 (K) must lie in (0, d_sae) = (0, {d_sae}) for K ln(N/K) to be a positive count, got {mean_l0!r}"
        )
    return hook_width / (mean_l0 * math.log(d_sae / mean_l0))


__all__ = ["Additivity", "additivity_of", "linear_additivity", "compressed_sensing_margin"]
