"""The measure: effective features F = exp(H(p)) and the superposition ratio psi = F / N.

For one hook point of width N seen through an SAE with D features and codes z(x):

    a_i = sum over tokens of |z_i(x)|      feature i's share of the activation budget
    p_i = a_i / sum_j a_j
    H   = -sum_i p_i ln p_i                 natural log, 0 ln 0 = 0, no epsilon
    F   = exp(H)                            number of effective features
    psi = F / N                             psi > 1: more features than neurons

`FeatureBudget` accumulates the a_i over a stream of code batches. Sums are float64 so
that millions of tokens add up without drift, and it keeps them in `n_blocks` blocks of
documents (document d goes to block d mod n_blocks) so a bootstrap over documents gives
an uncertainty. Two budgets over disjoint tokens `merge` into the budget over all tokens,
which is what resuming a run and all-reducing across processes rely on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .atomic import atomic_file
from .codes import csr_entries, sparse_codes
from .distributed import all_reduce_
from .validation import check_positive_int

SUM_DTYPE = torch.float64
STATE_KEYS = ("d_sae", "width", "n_blocks", "block_sums", "block_tokens", "active_count", "anonymous_batches")


def entropy(budget: torch.Tensor) -> float:
    """Natural-log entropy of the distribution p = budget / budget.sum(), with 0 ln 0 = 0."""
    budget = torch.as_tensor(budget, dtype=SUM_DTYPE)
    if budget.ndim != 1:
        raise ValueError(f"budget must be a 1-d vector of per-feature sums, got shape {tuple(budget.shape)}")
    if not torch.isfinite(budget).all() or (budget < 0).any():
        raise ValueError("budget must be finite and non-negative (it is a sum of |z|)")
    total = budget.sum()
    if total <= 0:
        raise ValueError("budget is all zero: no feature was ever active, so p (and F) is undefined")
    p = budget[budget > 0] / total
    return float(-(p * p.log()).sum())


def _mixture_entropies(weights: torch.Tensor, sums: torch.Tensor, latents_at_a_time: int = 256) -> torch.Tensor:
    """Entropy of each row of weights @ sums ([k, blocks] @ [blocks, d_sae]: k budgets mixed from
    the same block sums), float64; NaN for a row whose budget is all zero.

    The table reads ~1,000 mixed budgets per hook (bootstrap, sample-size curve), and passes over
    them cost more than the measurement of a short run. So the product is never formed whole: a
    few hundred latents at a time, each slab (1,000 x 256 float32: 1 MiB) is still in the core's
    cache when it is summed and when a ln a is taken, and H = ln T - sum_i a_i ln a_i / T is
    accumulated from both sums in float64. a ln a is ln(max(a, tiny)) * a: 0 for a = 0, xlogy's
    bits elsewhere, in half of xlogy's time. For 1,000 resamples of 64 blocks x 32,768 latents
    in float32 on the Intel Xeon of session 9: 63 ms against 159 ms with the whole product.
    """
    totals = torch.zeros(len(weights), dtype=SUM_DTYPE)
    a_log_a = torch.zeros_like(totals)
    tiny = torch.finfo(sums.dtype).tiny
    for latents in sums.split(latents_at_a_time, dim=1):
        budgets = weights @ latents
        totals += budgets.sum(1)
        a_log_a += budgets.clamp_min(tiny).log_().mul_(budgets).sum(1)
    return totals.log() - a_log_a / totals


def bayesian_bootstrap_weights(n_resamples: int, n: int, seed: int = 0) -> torch.Tensor:
    """[n_resamples, n] float64 weights of a Bayesian bootstrap (Rubin 1981) over n units:
    Dirichlet(1, ..., 1) draws scaled to sum to n, so each row reweights the units as a resample
    would, without dropping any of them."""
    generator = torch.Generator().manual_seed(seed)
    weights = torch.empty(n_resamples, n, dtype=SUM_DTYPE).exponential_(generator=generator)
    return weights * (n / weights.sum(1, keepdim=True))


def effective_features(budget: torch.Tensor) -> float:
    """F = exp(H(p)): the number of equally used features that would give the same entropy."""
    return math.exp(entropy(budget))


def superposition_ratio(budget: torch.Tensor, width: int) -> float:
    """psi = F / N, with N the physical width of the hook (number of neurons)."""
    check_positive_int("width", width)
    return effective_features(budget) / width


def last_doubling_growth(curve: list[dict]) -> float:
    """F's relative growth over the last doubling of tokens of a `FeatureBudget.sample_size_curve`
    (its last point over the one before, minus 1); NaN for a curve of fewer than 2 points."""
    return curve[-1]["F"] / curve[-2]["F"] - 1 if len(curve) >= 2 else math.nan


@dataclass(frozen=True)
class Interval:
    low: float
    high: float


class FeatureBudget:
    """Streaming accumulator of per-feature |z| sums for one hook seen through one SAE.

    d_sae:    number of SAE features D (the last dimension of every code batch).
    width:    physical width N of the hook the SAE reads (d_model, d_mlp...), for psi.
    n_blocks: how many document blocks the sums are kept in, for the bootstrap.
    groups:   optional [d_sae] index of each latent's group (codes.duplicate_groups): latents of
              one group count as one feature, their sums added before the entropy. The sums
              themselves stay per latent, so the raw measure is always one `groups=None` away.
    """

    def __init__(self, d_sae: int, width: int, n_blocks: int = 64, groups: torch.Tensor | None = None):
        check_positive_int("d_sae", d_sae)
        check_positive_int("width", width)
        check_positive_int("n_blocks", n_blocks)
        self.d_sae, self.width, self.n_blocks = d_sae, width, n_blocks
        self.block_sums = torch.zeros(n_blocks, d_sae, dtype=SUM_DTYPE)
        self.block_tokens = torch.zeros(n_blocks, dtype=torch.int64)
        # Number of (token, feature) pairs with z != 0, for the mean L0 per token.
        self.active_count = torch.zeros((), dtype=torch.int64)
        # Batches added without document ids; each counts as one document.
        self.anonymous_batches = 0
        if groups is not None:
            groups = torch.as_tensor(groups, dtype=torch.int64).cpu()
            if groups.shape != (d_sae,) or groups.min() < 0 or groups.max() >= d_sae:
                raise ValueError(
                    f"groups must be a [d_sae={d_sae}] vector of latent indices, got shape {tuple(groups.shape)}"
                )
        self.groups = groups

    # ---- accumulating -------------------------------------------------------------

    def update(self, codes: torch.Tensor, doc_ids: torch.Tensor | int | None = None) -> None:
        """Add a batch of SAE codes: dense [..., d_sae], or [tokens, d_sae] sparse (CSR or COO).

        doc_ids: the document each token came from (shape codes.shape[:-1]) or one id for
        the whole batch; None counts the batch as one new document. Only the bootstrap
        blocks depend on it, never F itself.
        """
        if codes.shape[-1] != self.d_sae:
            raise ValueError(
                f"codes have {codes.shape[-1]} features in their last dimension, this budget expects d_sae={self.d_sae}"
            )
        blocks = self._blocks_of(doc_ids, math.prod(codes.shape[:-1]), codes.device)
        if codes.layout != torch.strided:
            self._add_sparse(sparse_codes(codes), blocks)
            return
        # Dense codes go through the sparse form a slice of tokens at a time, so that codes
        # with many nonzeros never need index tensors for a whole large batch.
        rows_per_slice = 2**22 // self.d_sae + 1
        for code_slice, block_slice in zip(
            codes.detach().reshape(-1, self.d_sae).split(rows_per_slice), blocks.split(rows_per_slice)
        ):
            self._add_sparse(sparse_codes(code_slice), block_slice)

    def _blocks_of(self, doc_ids, n_tokens: int, device) -> torch.Tensor:
        if doc_ids is None:
            doc_ids = self.anonymous_batches
            self.anonymous_batches += 1
        if isinstance(doc_ids, (bool, float)):
            raise ValueError(f"doc_ids must be integer document indices, got {doc_ids!r}")
        if isinstance(doc_ids, int):
            if doc_ids < 0:
                raise ValueError(f"doc_ids must be non-negative document indices, got {doc_ids}")
            return torch.full((n_tokens,), doc_ids % self.n_blocks, dtype=torch.int64, device=device)
        doc_ids = torch.as_tensor(doc_ids, device=device).reshape(-1)
        if doc_ids.shape[0] != n_tokens:
            raise ValueError(f"doc_ids has {doc_ids.shape[0]} entries but codes hold {n_tokens} tokens")
        if doc_ids.is_floating_point() or doc_ids.is_complex():
            bad = (~torch.isfinite(doc_ids) | (doc_ids != doc_ids.real.round())).nonzero().flatten()
            found = (
                f"token {int(bad[0])} has {doc_ids[bad[0]].item()} ({len(bad)} such in all)"
                if len(bad)
                else "whole numbers, but as floats: convert them with .long()"
            )
            raise ValueError(
                f"doc_ids must be integer document indices (an integer tensor), got dtype {doc_ids.dtype}: {found}"
            )
        if doc_ids.dtype == torch.bool:
            raise ValueError("doc_ids must be integer document indices, got a bool tensor")
        negative = (doc_ids < 0).nonzero().flatten()
        if len(negative):
            raise ValueError(
                f"doc_ids must be non-negative document indices; token {int(negative[0])} has "
                f"{int(doc_ids[negative[0]])} ({len(negative)} negative in all; "
                "padding must be dropped before the budget, as stream_activations does)"
            )
        return doc_ids.to(torch.int64) % self.n_blocks

    def _add_sparse(self, codes: torch.Tensor, blocks: torch.Tensor) -> None:
        """Sum |z| of the nonzero entries only: SAE codes are ~99% zeros, and a pass over
        the dense [tokens, d_sae] batch (isfinite, abs, float64) cost more than the encode."""
        rows, features, values = csr_entries(codes)
        finite = torch.isfinite(values)
        if not finite.all():
            bad_rows = rows[~finite].unique()
            first = int((~finite).nonzero()[0])
            raise ValueError(
                f"codes contain {values[first].item()} (NaN or Inf) in {bad_rows.numel()} of {codes.shape[0]} tokens, "
                f"first at token {int(rows[first])} of this batch, feature {int(features[first])}; "
                "the SAE or its input is broken"
            )
        flat_index = (blocks[rows] * self.d_sae + features).cpu()
        self.block_sums.view(-1).index_add_(0, flat_index, values.abs().to(device="cpu", dtype=SUM_DTYPE))
        self.block_tokens += torch.bincount(blocks.cpu(), minlength=self.n_blocks)
        self.active_count += int((values != 0).sum())

    def merge(self, other: FeatureBudget) -> FeatureBudget:
        """Add another budget over disjoint tokens into this one (in place); returns self."""
        if (other.d_sae, other.width, other.n_blocks) != (self.d_sae, self.width, self.n_blocks) or not _same_groups(
            self.groups, other.groups
        ):
            raise ValueError(
                "cannot merge budgets of different shape: "
                f"(d_sae, width, n_blocks) = {(self.d_sae, self.width, self.n_blocks)} "
                f"vs {(other.d_sae, other.width, other.n_blocks)}, "
                "or different duplicate groups"
            )
        self.block_sums += other.block_sums
        self.block_tokens += other.block_tokens
        self.active_count += other.active_count
        self.anonymous_batches += other.anonymous_batches
        return self

    def all_reduce(self) -> FeatureBudget:
        """Sum this budget over every process of torch.distributed (in place); returns self.

        Each process measures its own shard of the windows, so afterwards every process holds
        the budget over all tokens. Sums travel through the backend's device (CUDA for NCCL).
        """
        all_reduce_(self.block_sums, self.block_tokens, self.active_count)
        return self

    # ---- reading ------------------------------------------------------------------

    @property
    def tokens(self) -> int:
        return int(self.block_tokens.sum())

    @property
    def feature_sums(self) -> torch.Tensor:
        """a_i: summed |z_i| over every token seen, float64 [d_sae]."""
        return self.block_sums.sum(0)

    @property
    def group_sums(self) -> torch.Tensor:
        """The a_i the entropy reads: `feature_sums` with each group's sums added onto its first latent."""
        return self._grouped(self.block_sums).sum(0)

    @property
    def merged_latents(self) -> int:
        """Latents counted as part of another latent's group."""
        return 0 if self.groups is None else int((self.groups != torch.arange(self.d_sae)).sum())

    def _grouped(self, block_sums: torch.Tensor) -> torch.Tensor:
        if self.groups is None:
            return block_sums
        return torch.zeros_like(block_sums).index_add_(1, self.groups, block_sums)

    def _active_block_sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What the bootstrap and the sample-size curve mix: the grouped sums of the non-empty
        document blocks, [blocks, latents], with the latents never active dropped (they add
        nothing to any mixture's entropy), and the blocks' token counts."""
        used = (self.block_tokens > 0).nonzero().squeeze(1)
        sums = self._grouped(self.block_sums.index_select(0, used))
        active = (sums.sum(0) > 0).nonzero().squeeze(1)
        return sums.index_select(1, active), self.block_tokens.index_select(0, used)

    @property
    def alive_features(self) -> int:
        return int((self.feature_sums > 0).sum())

    @property
    def dead_fraction(self) -> float:
        return 1.0 - self.alive_features / self.d_sae

    @property
    def mean_l0(self) -> float:
        self._check_has_tokens()
        return int(self.active_count) / self.tokens

    def _check_has_tokens(self) -> None:
        if self.tokens == 0:
            raise ValueError("this FeatureBudget has seen no tokens yet; call update() with SAE codes first")

    def entropy(self) -> float:
        self._check_has_tokens()
        return entropy(self.group_sums)

    def effective_features(self) -> float:
        return math.exp(self.entropy())

    def superposition_ratio(self) -> float:
        return self.effective_features() / self.width

    def bootstrap_effective_features(
        self, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
    ) -> Interval:
        """Interval for F: how much F at this token count varies from one sample of documents
        to another, from a bootstrap over the non-empty document blocks (needs >= 2).

        Two choices, both because F is a concave function of the block weights (entropy of a
        mixture): any reweighting of the blocks lowers F on average, so raw bootstrap
        resamples sit below F even though a fresh sample of as many tokens would not.
        - Bayesian bootstrap (Rubin 1981): blocks are weighted by Dirichlet(1, ..., 1) draws,
          not drawn with replacement, so no resample drops a third of the documents.
        - The percentile interval is re-centred on F: its ends are F minus/plus the distance
          from the resamples' median to their lower/upper quantile. The spread is the
          bootstrap's; the resampling's own downward shift is removed.
        """
        self._check_has_tokens()
        sums, _ = self._active_block_sums()
        if sums.shape[0] < 2:
            raise ValueError("a bootstrap needs at least 2 non-empty document blocks; feed more than one document")
        weights = bayesian_bootstrap_weights(n_resamples, sums.shape[0], seed)
        # The resampled budgets are float32: ~1e-7 relative noise on each resample's F, ~1e-5 of
        # the interval's width, for a fraction of the time of float64 (this is most of the table).
        resampled_f = _mixture_entropies(weights.float(), sums.float()).exp()
        if not torch.isfinite(resampled_f).all():  # float32 overflowed: budgets beyond 1e38
            resampled_f = _mixture_entropies(weights, sums).exp()
        tail = (1 - confidence) / 2
        low, median, high = torch.quantile(resampled_f, torch.tensor([tail, 0.5, 1 - tail], dtype=SUM_DTYPE)).tolist()
        f = self.effective_features()
        return Interval(f - (median - low), f + (high - median))

    def sample_size_curve(self, n_orders: int = 16, confidence: float = 0.95, seed: int = 0) -> list[dict]:
        """F against tokens seen, read off the finished budget: F of nested subsets of the
        non-empty document blocks (1, 2, 4, ... blocks, half of them, all of them), each size
        averaged over `n_orders` seeded random orders of the blocks, with the spread over orders.

        A subset of blocks is a random subset of the documents, so each point is F after about
        that many tokens of documents: the paper's sample-size curve (F against documents seen),
        over as many decades as the budget has blocks, without recording anything while it ran.
        Rows: tokens (mean over orders), F (mean), F_low, F_high (quantiles over orders), blocks.
        """
        self._check_has_tokens()
        sums, tokens = self._active_block_sums()
        n_used = sums.shape[0]
        sizes = sorted({*(2**k for k in range(n_used.bit_length()) if 2**k < n_used // 2), max(1, n_used // 2), n_used})
        generator = torch.Generator().manual_seed(seed)
        # Subset s of order o holds the blocks order[:size_s]: one 0/1 matrix [orders x sizes, blocks]
        # times the block sums gives every subset's budget.
        membership = torch.zeros(n_orders, len(sizes), n_used, dtype=SUM_DTYPE)
        for o in range(n_orders):
            order = torch.randperm(n_used, generator=generator)
            for index, size in enumerate(sizes):
                membership[o, index, order[:size]] = 1
        membership = membership.reshape(-1, n_used)
        subset_tokens = (membership @ tokens.to(SUM_DTYPE)).reshape(n_orders, len(sizes))
        f = _mixture_entropies(membership, sums).exp().reshape(n_orders, len(sizes))  # NaN: no active latent
        mean_tokens = subset_tokens.mean(0)
        tail = (1 - confidence) / 2
        rows = []
        for index, size in enumerate(sizes):
            values = f[:, index]
            values = values[~values.isnan()]
            if len(values) == 0:
                continue
            low, high = torch.quantile(values, torch.tensor([tail, 1 - tail], dtype=SUM_DTYPE)).tolist()
            rows.append(
                {
                    "blocks": size,
                    "tokens": float(mean_tokens[index]),
                    "F": float(values.mean()),
                    "F_low": low,
                    "F_high": high,
                }
            )
        return rows

    def bootstrap_superposition_ratio(self, **kwargs) -> Interval:
        f = self.bootstrap_effective_features(**kwargs)
        return Interval(f.low / self.width, f.high / self.width)

    def summary(self) -> dict:
        """The numbers a results table needs, as plain Python values.

        A budget whose latents never fired (alive_features 0, e.g. an L1 too strong for the
        layer) has no distribution to take the entropy of: entropy, F and psi are NaN there."""
        self._check_has_tokens()
        fired = self.alive_features > 0
        f_interval = (
            self.bootstrap_effective_features()
            if fired and (self.block_tokens > 0).sum() >= 2
            else Interval(math.nan, math.nan)
        )
        h = self.entropy() if fired else math.nan
        f = math.exp(h)
        return {
            "tokens": self.tokens,
            "d_sae": self.d_sae,
            "N": self.width,
            "entropy": h,
            "F": f,
            "F_low": f_interval.low,
            "F_high": f_interval.high,
            "psi": f / self.width,
            "psi_low": f_interval.low / self.width,
            "psi_high": f_interval.high / self.width,
            "mean_l0": self.mean_l0,
            "alive_features": self.alive_features,
            "dead_fraction": self.dead_fraction,
            "merged_latents": self.merged_latents,
        }

    # ---- persistence --------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "d_sae": self.d_sae,
            "width": self.width,
            "n_blocks": self.n_blocks,
            "block_sums": self.block_sums,
            "block_tokens": self.block_tokens,
            "active_count": self.active_count,
            "anonymous_batches": self.anonymous_batches,
            "groups": self.groups,
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> FeatureBudget:
        missing = [key for key in STATE_KEYS if not isinstance(state, dict) or key not in state]
        if missing:
            raise ValueError(f"not a FeatureBudget state: it lacks {missing}")
        budget = cls(int(state["d_sae"]), int(state["width"]), int(state["n_blocks"]), groups=state.get("groups"))
        budget.block_sums = state["block_sums"].to(SUM_DTYPE).clone()
        budget.block_tokens = state["block_tokens"].to(torch.int64).clone()
        budget.active_count = torch.as_tensor(state["active_count"], dtype=torch.int64).clone()
        budget.anonymous_batches = int(state["anonymous_batches"])
        return budget

    def save(self, path: str | Path) -> None:
        with atomic_file(path) as temporary:  # complete or absent, never half-written
            torch.save(self.state_dict(), temporary)

    @classmethod
    def load(cls, path: str | Path) -> FeatureBudget:
        expected = f"{path} is not a saved FeatureBudget (expected a torch file with {', '.join(STATE_KEYS)})"
        try:
            state = torch.load(path, weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as err:  # torch.load raises many unrelated types for a bad file; its messages run to pages
            raise ValueError(
                f"{expected}: torch.load cannot read it ({type(err).__name__}: damaged, cut short, or not a torch file)"
            ) from None
        try:
            return cls.from_state_dict(state)
        except Exception as err:
            found = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"{expected}: it holds {found}; {err}") from None


def _same_groups(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
