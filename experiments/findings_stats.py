"""What the findings studies share: SAEs of the validated default recipe on a small network's layer, and the
statistics (intervals over seeds, slopes, Holm's correction) their READMEs report.

Every study reads a layer the way `lm_superposition` reads a hook: SAE-Lens standard SAEs trained by
`saes.train_saes` with `SAETrainingConfig`'s defaults (the recipe results/toy_validation/ validated;
only the width, the L1 coefficient of a sweep and the token budget are set here), and F measured by
`analyze.sae_budget` (|z_i| * ||W_dec,i||, latents with decoder cosine >= 0.9 merged).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import torch
from scipy import stats

from lm_superposition.analyze import sae_budget
from lm_superposition.config import SAETrainingConfig
from lm_superposition.saes import train_saes, variance_explained


def train_default_saes(
    activations: torch.Tensor,
    d_sae: int,
    steps: int,
    sae_seeds: Sequence[int] = (0,),
    batch_size: int = 1024,
    l1_coefficient: float | None = None,
    shuffle_seed: int = 0,
) -> dict:
    """{SAE seed: SAE} of the default recipe trained `steps` steps of `batch_size` rows on [rows, d_in] activations.

    The rows are cycled (reshuffled each pass); every seed sees the same batches. l1_coefficient
    None keeps the default (1).
    """
    overrides = {} if l1_coefficient is None else {"l1_coefficient": l1_coefficient}
    config = SAETrainingConfig(
        d_sae=d_sae, batch_size_tokens=batch_size, training_tokens=steps * batch_size, seed=shuffle_seed, **overrides
    )
    generator = torch.Generator().manual_seed(shuffle_seed)
    passes = ({"layer": activations[torch.randperm(len(activations), generator=generator)]} for _ in itertools.count())
    return train_saes(passes, {"layer": activations.shape[1]}, config, progress=False, sae_seeds=list(sae_seeds))[
        "layer"
    ]


@torch.no_grad()
def measure_default_sae(
    sae, activations: torch.Tensor, width: int | None = None, doc_ids: torch.Tensor | None = None
) -> dict:
    """F (merged duplicates), its bootstrap interval, psi, L0, merged latents and variance explained on activations.

    An SAE whose latents never fire on these activations (an L1 too strong for the layer) has no
    budget: F and psi are nan there, and `dead_sae` says so.
    """
    budget = sae_budget(sae, activations, width=width, doc_ids=doc_ids)
    if budget.tokens > 0 and float(budget.block_sums.sum()) == 0:
        nan = math.nan
        summary = {"tokens": budget.tokens, "d_sae": budget.d_sae, "N": budget.width, "mean_l0": 0.0}
        summary |= dict.fromkeys(["F", "F_low", "F_high", "psi", "psi_low", "psi_high", "merged_latents"], nan)
        summary["dead_sae"] = True
    else:
        summary = budget.summary() | {"dead_sae": False}
    reconstruction = sae.decode(sae.encode(activations))
    return {**summary, "variance_explained": variance_explained(activations, reconstruction)}


def mean_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student-t interval of the mean over independent seeds (nan bounds for one value)."""
    values = np.asarray([v for v in values if not math.isnan(v)], dtype=float)
    mean = float(values.mean()) if len(values) else math.nan
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = stats.t.ppf(0.5 + level / 2, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def slope_interval(x: Sequence[float], y: Sequence[float], level: float = 0.95) -> dict:
    """Least-squares slope of y on x with its t interval and two-sided p-value (H0: slope 0)."""
    fit = stats.linregress(np.asarray(x, dtype=float), np.asarray(y, dtype=float))
    half = stats.t.ppf(0.5 + level / 2, len(x) - 2) * fit.stderr
    return {"slope": fit.slope, "slope_low": fit.slope - half, "slope_high": fit.slope + half, "p": fit.pvalue}


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the order given."""
    order = np.argsort(p_values)
    adjusted = np.empty(len(p_values))
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted.tolist()


def save_figure(figure, path_without_suffix) -> None:
    """The figure as PNG and SVG."""
    for suffix in (".png", ".svg"):
        figure.savefig(f"{path_without_suffix}{suffix}", dpi=120)
