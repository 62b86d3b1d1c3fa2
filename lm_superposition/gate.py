"""The one verdict on a measured F: "ok", or every reason a reader should doubt it.

The table's `quality` column, the JSON files and the plots (hollow markers) all show the
verdict of `QualityGate.verdict`, so a number is never called fine in one output and doubtful
in another. Thresholds are options (the [gate] table of a run config), not constants.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


def _option(default: float | int, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class QualityGate:
    """When psi through an SAE is worth citing.

    psi counts the features an SAE uses to describe a layer; that only describes the layer
    if the SAE reconstructs it (variance explained) without losing what the model uses it
    for (CE loss recovered, on enough tokens to tell), if the dictionary has room for more
    features than it uses (F / d_sae), and if F has stopped growing with the tokens seen.
    """

    min_variance_explained: float = _option(0.9, "variance explained below this: the SAE describes another vector")
    min_ce_recovered: float = _option(0.9, "CE loss recovered below this: the reconstruction loses what the model uses")
    min_ce_tokens: int = _option(10_000, "CE loss recovered measured on fewer tokens than this is not trusted")
    max_dead_fraction: float = _option(0.5, "more dead latents than this fraction caps F well below d_sae")
    max_width_usage: float = _option(0.5, "F / d_sae above this: the dictionary is too narrow to tell")
    max_last_doubling_growth: float = _option(
        0.05, "F still rising by more than this over the last doubling of tokens: not converged"
    )

    def __post_init__(self) -> None:
        for name in ("min_variance_explained", "min_ce_recovered", "max_dead_fraction", "max_width_usage"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value <= 1):
                raise ValueError(f"{name} must be a fraction in [0, 1], got {value!r}")
        if not (isinstance(self.max_last_doubling_growth, (int, float)) and self.max_last_doubling_growth >= 0):
            raise ValueError(
                f"max_last_doubling_growth must be a non-negative fraction, got {self.max_last_doubling_growth!r}"
            )
        if not (isinstance(self.min_ce_tokens, int) and self.min_ce_tokens >= 0):
            raise ValueError(f"min_ce_tokens must be a non-negative integer, got {self.min_ce_tokens!r}")

    def verdict(
        self,
        *,
        variance_explained: float,
        ce_recovered: float,
        ce_tokens: int,
        dead_fraction: float,
        effective_features: float,
        d_sae: int,
        last_doubling_growth: float,
        language_model: bool = True,
    ) -> str:
        """'ok', or the problems separated by '; ' (NaN inputs count as not measured).

        language_model False: the layer belongs to a network without a next-token loss (a toy
        model, a classifier), so CE loss recovered does not apply and is not checked (ce_recovered
        and ce_tokens are ignored). F NaN: no latent ever fired, so there is no F to judge.
        """
        problems = []
        if not variance_explained >= self.min_variance_explained:
            problems.append(f"variance explained {variance_explained:.3f} < {self.min_variance_explained}")
        if language_model and math.isnan(ce_recovered):
            problems.append("CE recovered not measured")
        elif language_model:
            if ce_recovered < self.min_ce_recovered:
                problems.append(f"CE recovered {ce_recovered:.3f} < {self.min_ce_recovered}")
            if ce_tokens < self.min_ce_tokens:
                problems.append(f"CE on {ce_tokens:,} tokens < {self.min_ce_tokens:,}")
        if dead_fraction > self.max_dead_fraction:
            problems.append(f"dead fraction {dead_fraction:.2f} > {self.max_dead_fraction}")
        if math.isnan(effective_features):
            problems.append("no latent fires (F undefined)")
            return "; ".join(problems)
        if effective_features / d_sae > self.max_width_usage:
            problems.append(
                f"dictionary too narrow to tell (F/d_sae {effective_features / d_sae:.2f} > {self.max_width_usage})"
            )
        if math.isnan(last_doubling_growth):
            problems.append("convergence unknown (too few documents)")
        elif last_doubling_growth > self.max_last_doubling_growth:
            problems.append(f"not converged (F +{last_doubling_growth:.0%} over the last doubling of tokens)")
        return "; ".join(problems) or "ok"
