"""What the findings studies share: SAEs of the validated default recipe on a small network's layer, and the
statistics (intervals over seeds, slopes, Holm's correction) their READMEs report.

Every study reads a layer the way `lm_superposition` reads a hook: SAE-Lens standard SAEs trained by
`saes.train_saes` with `SAETrainingConfig`'s defaults (the recipe results/toy_validation/ validated;
only the width, the L1 coefficient of a sweep and the token budget are set here), and F measured by
`analyze.sae_budget` (|z_i| * ||W_dec,i||, latents with decoder cosine >= 0.9 merged), judged by
`gate.QualityGate.verdict` (the `quality` column).
"""

from __future__ import annotations

import itertools
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from scipy import stats

from lm_superposition.analyze import sae_budget
from lm_superposition.config import SAETrainingConfig
from lm_superposition.gate import QualityGate
from lm_superposition.metric import last_doubling_growth
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
    sae,
    activations: torch.Tensor,
    width: int | None = None,
    doc_ids: torch.Tensor | None = None,
    language_model: bool = False,
) -> dict:
    """F (merged duplicates), its bootstrap interval, psi, L0, merged latents, variance explained and
    the quality gate's verdict on activations.

    `quality` is `QualityGate().verdict` (the one verdict every output of the project shows) on the
    variance explained, dead fraction, F, d_sae and F's growth over the last doubling of samples
    (`last_doubling_growth`, from the budget's sample-size curve). language_model False (the toy
    networks): CE loss recovered does not apply and is not checked; True (a language model's hook):
    it is not measured here, and the verdict says so. An SAE whose latents never fire on these
    activations (an L1 too strong for the layer) has no budget: F and psi are NaN, `dead_sae` is
    True and the verdict says "no latent fires".
    """
    budget = sae_budget(sae, activations, width=width, doc_ids=doc_ids)
    summary = budget.summary()
    summary["dead_sae"] = summary["alive_features"] == 0
    growth = last_doubling_growth(budget.sample_size_curve()) if not summary["dead_sae"] else math.nan
    reconstruction = sae.decode(sae.encode(activations))
    ve = variance_explained(activations, reconstruction)
    quality = QualityGate().verdict(
        variance_explained=ve,
        ce_recovered=math.nan,
        ce_tokens=0,
        dead_fraction=summary["dead_fraction"],
        effective_features=summary["F"],
        d_sae=summary["d_sae"],
        last_doubling_growth=growth,
        language_model=language_model,
    )
    return {**summary, "variance_explained": ve, "last_doubling_growth": growth, "quality": quality}


def quality_reason(problem: str) -> str:
    """One reason of a verdict without its measured value:
    "variance explained 0.80 < 0.9" -> "variance explained < 0.9"."""
    reason = problem.split(" (")[0]
    return re.sub(r" [-+]?[\d.,]+(?= [<>])", "", reason)


def gate_pass(verdicts: Iterable[str]) -> str:
    """How many of n verdicts are "ok", as "k/n" (a summary table's `gate_pass` column)."""
    verdicts = list(verdicts)
    return f"{sum(verdict == 'ok' for verdict in verdicts)}/{len(verdicts)}"


def gate_summary(verdicts: Iterable[str], what: str = "SAEs") -> str:
    """How many verdicts are "ok", and the reasons of the rest with their counts, most common first:
    "12 of 15 SAEs pass the quality gate; the rest: dictionary too narrow to tell (3)"."""
    verdicts = list(verdicts)
    passed = sum(verdict == "ok" for verdict in verdicts)
    text = f"{passed} of {len(verdicts)} {what} pass the quality gate"
    reasons = Counter(quality_reason(p) for verdict in verdicts if verdict != "ok" for p in verdict.split("; "))
    if reasons:
        text += "; the rest: " + ", ".join(f"{reason} ({count})" for reason, count in reasons.most_common())
    return text


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
