"""Model + SAEs + token windows -> one row per hook and seed: F, psi, their interval, quality.

One forward pass per batch serves every hook (activations.stream_activations). Each hook's
activations are encoded by its SAE a slice of tokens at a time, so a whole batch of
[tokens, d_sae] codes is never held; the codes are kept as a sparse matrix of their nonzeros,
whose |z| sums go into that hook's FeatureBudget and whose decode gives the quality stats.
A `SeedMeasurement` holds everything one seed has accumulated; it saves and loads, which
is how an interrupted run resumes without losing or double-counting a token.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from .activations import stream_activations
from .atomic import atomic_file
from .codes import decode, encode, encodes_in_place, sparse_codes
from .data import PAD_DOC_ID, TokenWindows
from .distributed import world_size_and_rank
from .metric import FeatureBudget
from .models import HookPoint, hook_point
from .saes.loading import check_sae_fits
from .saes.quality import SAEQuality, VarianceExplained, evaluate_sae, quality_flag
from .sparse_coding import additivity_of, compressed_sensing_margin

# Codes are encoded in slices of about this many elements (tokens x d_sae). SAE-Lens's encode
# allocates fresh [tokens, d_sae] tensors: 2^22 float32 = 16 MiB stays under glibc's largest
# mmap threshold (32 MiB), so they come from the heap instead of being mapped and page-faulted
# afresh every time. An SAE encoded in place into one reused buffer has no such cost, and its
# matmul runs fastest on large slices. Measured: results/benchmarks/README.md.
ENCODE_CHUNK_ELEMENTS = 2**22
IN_PLACE_CHUNK_ELEMENTS = 2**25

TABLE_COLUMNS = [
    "model", "hook", "layer", "kind", "N", "d_sae", "sae", "seed", "tokens",
    "entropy", "F", "F_low", "F_high", "psi", "psi_low", "psi_high", "F_saturated",
    "mean_l0", "alive_features", "dead_fraction", "cs_margin", "additivity", "variance_explained", "ce_recovered", "quality",
]


class MeasurementStopped(Exception):
    """`run_seed` was asked to stop (its `stop` callback said so) and saved its checkpoint first."""


@dataclass
class SeedMeasurement:
    """Everything one seed has accumulated so far, for every hook."""

    seed: int
    budgets: dict[str, FeatureBudget]
    variance: dict[str, VarianceExplained]
    windows_done: int = 0
    # One row per (hook, token count) at log-spaced token counts: the convergence curve.
    convergence: list[dict] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return next(iter(self.budgets.values())).tokens

    def state_dict(self) -> dict:
        return {
            "seed": self.seed,
            "windows_done": self.windows_done,
            "convergence": self.convergence,
            "budgets": {hook: budget.state_dict() for hook, budget in self.budgets.items()},
            # Pickled whole: SAE-Lens's variance calculator inside has no state_dict of its own.
            "variance": self.variance,
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> "SeedMeasurement":
        return cls(
            seed=state["seed"],
            budgets={hook: FeatureBudget.from_state_dict(s) for hook, s in state["budgets"].items()},
            variance=state["variance"],
            windows_done=state["windows_done"],
            convergence=state["convergence"],
        )

    def save(self, path: Path) -> None:
        with atomic_file(path) as temporary:  # a run killed mid-save keeps the previous checkpoint
            torch.save(self.state_dict(), temporary)

    @classmethod
    def load(cls, path: Path) -> "SeedMeasurement":
        try:
            return cls.from_state_dict(torch.load(path, weights_only=False))
        except Exception as err:  # torch.load raises many unrelated types for a bad file
            raise ValueError(
                f"{path} is not a checkpoint this version can resume (expected a SeedMeasurement state: "
                f"seed, windows_done, budgets, variance): {err!r}. Start the run again with --overwrite"
            ) from None


def sample_windows(windows: TokenWindows, seed: int, token_budget: int | None = None) -> TokenWindows:
    """The windows seed `seed` measures: a seeded permutation of `windows`, cut once
    `token_budget` measured tokens are covered. Tokens of the last window past the budget are
    marked as padding (they still run through the model, but are not measured), so the
    selection holds exactly `token_budget` measured tokens however it is batched or sharded."""
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed))
    shuffled = replace(windows, tokens=windows.tokens[order], doc_ids=windows.doc_ids[order])
    if token_budget is None:
        return shuffled
    measured = shuffled.measured_mask
    available = int(measured.sum())
    if token_budget > available:
        raise ValueError(f"token_budget={token_budget} but the windows hold only {available} measurable tokens; give more text or a smaller budget")
    needed = int(torch.searchsorted(measured.sum(1).cumsum(0), token_budget)) + 1
    selected = replace(shuffled[:needed], doc_ids=shuffled.doc_ids[:needed].clone())
    overshoot = selected.n_tokens - token_budget
    if overshoot:
        last_positions = measured[needed - 1].nonzero().flatten()[-overshoot:]
        selected.doc_ids[-1, last_positions] = PAD_DOC_ID
    return selected


def log_spaced_checkpoints(total_tokens: int, start: int = 256) -> list[int]:
    """Token counts at which F is recorded: powers of two from `start`, then the total."""
    points = [2**k for k in range(int(math.log2(start)), int(math.log2(max(total_tokens, 1))) + 1) if 2**k < total_tokens]
    return points + [total_tokens]


class LayerwiseAnalyzer:
    """Measures F and psi for several hooks of one model, each through its own SAE.

    encode_chunk_tokens: tokens encoded at a time; None sizes slices by ENCODE_CHUNK_ELEMENTS
        (IN_PLACE_CHUNK_ELEMENTS for SAEs that `encode` computes in place).
    """

    def __init__(
        self,
        model,
        saes: Mapping[str, object],
        *,
        model_name: str | None = None,
        allow_hook_mismatch: bool = False,
        n_blocks: int = 64,
        batch_size: int = 8,
        encode_chunk_tokens: int | None = None,
    ):
        if not saes:
            raise ValueError("no SAEs given: pass {hook_name: SAE} for at least one hook")
        self.model = model
        self.model_name = model_name or model.cfg.model_name
        self.hooks: dict[str, HookPoint] = {name: hook_point(model, name) for name in saes}
        for name, sae in saes.items():
            check_sae_fits(sae, self.hooks[name], self.model_name, allow_hook_mismatch=allow_hook_mismatch)
        self.saes = dict(saes)
        self.n_blocks = n_blocks
        self.batch_size = batch_size
        self.encode_chunk_tokens = encode_chunk_tokens
        self._code_buffers: dict[tuple, torch.Tensor] = {}

    def new_seed(self, seed: int) -> SeedMeasurement:
        return SeedMeasurement(
            seed=seed,
            budgets={h: FeatureBudget(self.saes[h].cfg.d_sae, self.hooks[h].width, self.n_blocks) for h in self.saes},
            variance={h: VarianceExplained() for h in self.saes},
        )

    @torch.inference_mode()
    def run_seed(
        self,
        windows: TokenWindows,
        seed: int = 0,
        token_budget: int | None = None,
        *,
        resume_from: SeedMeasurement | None = None,
        checkpoint: Callable[[SeedMeasurement], None] | None = None,
        checkpoint_every: int = 50,
        target_relative_interval: float | None = None,
        progress: bool = True,
        stop: Callable[[], bool] | None = None,
    ) -> SeedMeasurement:
        """Measure every hook on seed `seed`'s sample of the windows.

        resume_from: a SeedMeasurement saved part-way; its windows are skipped.
        checkpoint: called with the state every `checkpoint_every` batches and at the end.
        target_relative_interval: stop early once every hook's 95% interval of F is narrower
            than this fraction of F (checked at the log-spaced convergence points).

        Under torch.distributed (torchrun), each process measures every world_size-th window
        of the sample, checkpoints its own share, and returns the state summed over all
        processes; F is then recorded only at the end (no convergence curve, no early stop).
        """
        world_size, rank = world_size_and_rank()
        if world_size > 1 and target_relative_interval is not None:
            raise ValueError("target_relative_interval (early stop) is not supported under torch.distributed")
        shard = sample_windows(windows, seed, token_budget)[rank::world_size]
        total = shard.n_tokens
        state = resume_from or self.new_seed(seed)
        if state.seed != seed:
            raise ValueError(f"resume state is for seed {state.seed}, not seed {seed}")
        pending = [t for t in log_spaced_checkpoints(total) if t > state.tokens] if world_size == 1 else []
        batches = stream_activations(
            self.model, shard[state.windows_done:], list(self.saes), batch_size=self.batch_size, progress=progress and rank == 0
        )
        for n_batch, batch in enumerate(batches, start=1):
            for hook, acts in batch.activations.items():
                self._consume(state, hook, acts, batch.doc_ids)
            state.windows_done += batch.window_slice.stop - batch.window_slice.start
            converged = False
            while pending and state.tokens >= pending[0]:
                pending.pop(0)
                converged = self._record_convergence(state, target_relative_interval)
            if stop is not None and stop():
                if checkpoint:
                    checkpoint(state)
                raise MeasurementStopped(f"seed {seed} stopped after {state.tokens} tokens")
            if checkpoint and n_batch % checkpoint_every == 0:
                checkpoint(state)
            if state.tokens >= total or converged:
                break
        if checkpoint:
            checkpoint(state)
        if world_size == 1:
            return state
        # Sum a copy: the checkpointed state must stay this process's own share, or a resume
        # would count the other processes' tokens twice.
        merged = SeedMeasurement.from_state_dict(copy.deepcopy(state.state_dict()))
        for hook in merged.budgets:
            merged.budgets[hook].all_reduce()
            merged.variance[hook].all_reduce()
        merged.convergence = []
        self._record_convergence(merged, None)
        return merged

    def _consume(self, state: SeedMeasurement, hook: str, acts: torch.Tensor, doc_ids: torch.Tensor) -> None:
        sae = self.saes[hook]
        in_place = encodes_in_place(sae)
        chunk = self.encode_chunk_tokens or max(1, (IN_PLACE_CHUNK_ELEMENTS if in_place else ENCODE_CHUNK_ELEMENTS) // sae.cfg.d_sae)
        buffer = self._code_buffer(sae, chunk) if in_place else None
        for act_chunk, doc_chunk in zip(acts.split(chunk), doc_ids.split(chunk)):
            # ~99% of the codes are zeros: everything after the encode reads only the nonzeros.
            codes = sparse_codes(encode(sae, act_chunk, out=buffer))
            state.budgets[hook].update(codes, doc_chunk)
            state.variance[hook].update(act_chunk.to(sae.dtype), decode(sae, codes))

    def _code_buffer(self, sae, tokens: int) -> torch.Tensor:
        """One [tokens, d_sae] buffer per code shape, reused by every SAE of that shape and every batch."""
        key = (sae.cfg.d_sae, sae.dtype, str(sae.device))
        if key not in self._code_buffers or len(self._code_buffers[key]) < tokens:
            self._code_buffers[key] = torch.empty(tokens, sae.cfg.d_sae, dtype=sae.dtype, device=sae.device)
        return self._code_buffers[key]

    def _record_convergence(self, state: SeedMeasurement, target_relative_interval: float | None) -> bool:
        """Append F at the current token count; True if every hook meets the interval target."""
        all_tight = target_relative_interval is not None
        for hook, budget in state.budgets.items():
            row = {"seed": state.seed, "hook": hook, "tokens": budget.tokens, "F": budget.effective_features()}
            if target_relative_interval is not None:
                interval = _interval_or_none(budget, n_resamples=200)
                row["F_low"], row["F_high"] = (interval.low, interval.high) if interval else (math.nan, math.nan)
                all_tight &= interval is not None and (interval.high - interval.low) < target_relative_interval * row["F"]
            state.convergence.append(row)
        return all_tight

    def table(
        self,
        states: Sequence[SeedMeasurement],
        ce_recovered: Mapping[str, float] | None = None,
        sae_names: Mapping[str, str] | None = None,
        additivity: Mapping[str, float] | None = None,
    ) -> pd.DataFrame:
        """One row per hook x seed, columns TABLE_COLUMNS; CE recovered and additivity are NaN where not given."""
        rows = []
        for state in states:
            for hook, budget in state.budgets.items():
                point = self.hooks[hook]
                summary = budget.summary()
                quality = SAEQuality(
                    variance_explained=state.variance[hook].compute(),
                    mean_l0=summary["mean_l0"],
                    dead_fraction=summary["dead_fraction"],
                    n_tokens=summary["tokens"],
                    ce_loss_recovered=(ce_recovered or {}).get(hook, math.nan),
                )
                convergence = [r for r in state.convergence if r["hook"] == hook]
                rows.append(
                    {
                        "model": self.model_name,
                        "hook": hook,
                        "layer": point.layer,
                        "kind": point.kind,
                        "sae": (sae_names or {}).get(hook, ""),
                        "seed": state.seed,
                        **summary,
                        "F_saturated": saturated_features([r["tokens"] for r in convergence], [r["F"] for r in convergence]),
                        "cs_margin": _margin_or_nan(point.width, summary["mean_l0"], summary["d_sae"]),
                        "additivity": (additivity or {}).get(hook, math.nan),
                        "variance_explained": quality.variance_explained,
                        "ce_recovered": quality.ce_loss_recovered,
                        "quality": quality_flag(quality),
                    }
                )
        return pd.DataFrame(rows, columns=TABLE_COLUMNS)

    def ce_recovered(self, windows: TokenWindows, hooks: Sequence[str] | None = None) -> dict[str, float]:
        """CE loss recovered per hook (all, or `hooks`): the model's loss with the hook replaced by
        its reconstruction, against zero-ablation, on a few windows. Costs three forward passes
        with the unembedding per hook, so keep the windows few."""
        return {
            hook: evaluate_sae(self.model, self.saes[hook], hook, windows, batch_size=self.batch_size).ce_loss_recovered
            for hook in (self.saes if hooks is None else hooks)
        }

    @torch.inference_mode()
    def additivity(self, windows: TokenWindows, n_pairs: int = 16, seed: int = 0) -> dict[str, float]:
        """Linear additivity of every hook (sparse_coding.additivity_of), mean over `n_pairs` pairs.

        A pair is two text segments A, B: the first half of two different windows, picked at
        random (seeded). f(X) is the hook's activations summed over X's tokens, each segment run
        after a BOS as the windows are; the check is the cosine of f(A) + f(B) with f(A then B).
        The hook's mean activation is taken out of every token first: it adds up trivially and
        would otherwise dominate both sums (cosines of 0.99+ for any hook). 1 means the hook's
        representation of a text is the sum of its parts'.
        """
        first, length = _text_segment_span(windows)
        usable = torch.nonzero((windows.doc_ids[:, first : first + length] != PAD_DOC_ID).all(1)).flatten()
        if n_pairs < 1 or len(usable) < 2:
            raise ValueError(f"additivity needs n_pairs >= 1 (got {n_pairs}) and 2 windows whose first {length} tokens "
                             f"are text ({len(usable)} such windows here)")
        if len(usable) < 2 * n_pairs:
            warnings.warn(f"additivity: {n_pairs} pairs asked for, but only {len(usable)} windows have {length} tokens of "
                          f"text; using {len(usable) // 2} pairs")
            n_pairs = len(usable) // 2
        picked = usable[torch.randperm(len(usable), generator=torch.Generator().manual_seed(seed))[: 2 * n_pairs]]
        segments = windows.tokens[picked, first : first + length]
        a, b = segments[:n_pairs], segments[n_pairs:]
        (f_a, n_a), (f_b, n_b), (f_ab, n_ab) = (self._summed_activations(x, windows) for x in (a, b, torch.cat([a, b], dim=1)))
        result = {}
        for hook in self.saes:
            mean = (f_a[hook].sum(0) + f_b[hook].sum(0)) / (n_a.sum() + n_b.sum())
            centred = [f[hook] - n.unsqueeze(1) * mean for f, n in ((f_a, n_a), (f_b, n_b), (f_ab, n_ab))]
            result[hook] = additivity_of(*centred).mean
        return result

    def _summed_activations(self, segments: torch.Tensor, like: TokenWindows) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """({hook: [segments, N]} each segment's activations summed over its tokens, [segments] token counts); BOS excluded."""
        if like.bos_token_id is not None:
            segments = torch.cat([torch.full((len(segments), 1), like.bos_token_id), segments], dim=1)
        doc_ids = torch.arange(len(segments)).unsqueeze(1).expand_as(segments)
        windows = TokenWindows(segments, doc_ids.contiguous(), like.bos_token_id, like.pad_token_id)
        sums = {hook: torch.zeros(len(segments), point.width, dtype=torch.float64) for hook, point in self.hooks.items()}
        for batch in stream_activations(self.model, windows, list(self.saes), batch_size=self.batch_size, progress=False):
            for hook, acts in batch.activations.items():
                sums[hook].index_add_(0, batch.doc_ids, acts.to(device="cpu", dtype=torch.float64))
        return sums, torch.bincount(windows.doc_ids[windows.measured_mask], minlength=len(segments)).to(torch.float64)


    def measure(
        self,
        windows: TokenWindows | Callable[[int], TokenWindows],
        *,
        seeds: Sequence[int] = (0,),
        token_budget: int | None = None,
        ce_windows: int = 4,
        additivity_pairs: int = 0,
        target_relative_interval: float | None = None,
        checkpoint_dir: str | Path | None = None,
        checkpoint_name: str = "measurement",
        checkpoint_every: int = 50,
        known_ce: Mapping[str, float] | None = None,
        sae_names: Mapping[str, str] | None = None,
        progress: bool = True,
        stop: Callable[[], bool] | None = None,
    ) -> pd.DataFrame:
        """Measure every hook for every seed: the one pipeline behind `measure_layers` and `runs`.

        windows: the windows to sample from, or a function seed -> that seed's own windows
            (a run reads a fresh shuffle of its corpus per seed).
        seeds: each seed measures its own seeded sample of `token_budget` tokens (all when None);
            the bootstrap interval is over the documents inside that sample.
        ce_windows: windows for CE loss recovered (0 skips it: NaN), drawn from every seed's sample;
            hooks in `known_ce` (e.g. measured when the SAE was trained) are not re-measured.
        additivity_pairs: segment pairs for the linear-additivity column (0 skips it: NaN), drawn
            from every seed's sample.
        checkpoint_dir: where each seed's state is saved every `checkpoint_every` batches (as
            CHECKPOINT_NAME__seedS.pt) and resumed from, so a killed measurement loses nothing.
        stop: checked after every batch; when it returns True the seed's checkpoint is saved and
            MeasurementStopped raised.
        """
        if not seeds:
            raise ValueError("seeds is empty: give at least one seed, e.g. seeds=[0]")
        windows_for = windows if callable(windows) else (lambda seed: windows)
        states, samples = [], []
        for seed in seeds:
            seed_windows = windows_for(seed)
            path = self._checkpoint_path(checkpoint_dir, checkpoint_name, seed)
            states.append(
                self.run_seed(
                    seed_windows, seed, token_budget,
                    resume_from=SeedMeasurement.load(path) if path and path.exists() else None,
                    checkpoint=(lambda state, p=path: state.save(p)) if path else None,
                    checkpoint_every=checkpoint_every, target_relative_interval=target_relative_interval,
                    progress=progress, stop=stop,
                )
            )
            samples.append(sample_windows(seed_windows, seed, token_budget))
        ce = dict(known_ce or {})
        missing = [hook for hook in self.saes if hook not in ce]
        if ce_windows and missing:
            ce |= self.ce_recovered(_drawn_from_each(samples, ce_windows), missing)
        additivity = self.additivity(TokenWindows.concat(samples), additivity_pairs) if additivity_pairs else None
        table = self.table(states, ce_recovered=ce, sae_names=sae_names, additivity=additivity)
        table.attrs["convergence"] = convergence_table(states)
        return table

    @staticmethod
    def _checkpoint_path(folder: str | Path | None, name: str, seed: int) -> Path | None:
        if folder is None:
            return None
        world_size, rank = world_size_and_rank()
        shard = f"__rank{rank}" if world_size > 1 else ""
        Path(folder).mkdir(parents=True, exist_ok=True)
        return Path(folder) / f"{name}__seed{seed}{shard}.pt"


def _drawn_from_each(samples: Sequence[TokenWindows], n_windows: int) -> TokenWindows:
    """`n_windows` windows taken in turn from the front of each sample (every seed contributes)."""
    per_sample = -(-n_windows // len(samples))
    return TokenWindows.concat([sample[:per_sample] for sample in samples])[:n_windows]


def _text_segment_span(windows: TokenWindows) -> tuple[int, int]:
    """(first position, length) of the half-window segments additivity uses: after the BOS, and
    short enough that BOS + A + B still fits one window."""
    first = 0 if windows.bos_token_id is None else 1
    length = (windows.context_size - first) // 2
    if length < 1:
        raise ValueError(f"windows of {windows.context_size} tokens are too short to cut two text segments from")
    return first, length


def _margin_or_nan(width: int, mean_l0: float, d_sae: int) -> float:
    """Compressed-sensing margin M / (K ln(N/K)) (> 1: the layer has the dimensions to
    recover codes this sparse); NaN where it is undefined (no feature, or every feature, fires)."""
    return compressed_sensing_margin(width, mean_l0, d_sae) if 0 < mean_l0 < d_sae else math.nan


def _interval_or_none(budget: FeatureBudget, **kwargs):
    try:
        return budget.bootstrap_effective_features(**kwargs)
    except ValueError:  # fewer than two document blocks so far
        return None


def saturated_features(tokens: Sequence[int], effective: Sequence[float]) -> float:
    """Estimate F as tokens -> infinity by fitting F(T) = F_inf * T / (T + T_half).

    The saturating (Michaelis-Menten) form matches how F rises fast and then levels off as
    rarer features keep appearing; fitted by least squares in log F to the log-spaced
    convergence points. NaN when there are fewer than 4 points or the fit does not converge
    (then F has clearly not saturated and the measured F is a lower bound).
    """
    from scipy.optimize import curve_fit

    tokens, effective = np.asarray(tokens, dtype=float), np.asarray(effective, dtype=float)
    if len(tokens) < 4:
        return math.nan

    def log_model(t, log_f_inf, log_t_half):
        return log_f_inf + np.log(t) - np.log(t + np.exp(log_t_half))

    start = (np.log(effective[-1] * 1.5), np.log(tokens[len(tokens) // 2]))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            (log_f_inf, _), _ = curve_fit(log_model, tokens, np.log(effective), p0=start, maxfev=5000)
    except RuntimeError:
        return math.nan
    f_inf = float(np.exp(log_f_inf))
    return f_inf if math.isfinite(f_inf) else math.nan


def measure_layers(
    model,
    saes: Mapping[str, object],
    windows: TokenWindows | Callable[[int], TokenWindows],
    *,
    seeds: Sequence[int] = (0,),
    token_budget: int | None = None,
    batch_size: int = 8,
    ce_windows: int = 4,
    additivity_pairs: int = 0,
    target_relative_interval: float | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 50,
    progress: bool = True,
    **analyzer_options,
) -> pd.DataFrame:
    """Per-layer F and psi: one row per hook x seed (see TABLE_COLUMNS).

    `LayerwiseAnalyzer(model, saes, ...).measure(windows, ...)` in one call; see `measure` for
    the arguments. The convergence curve (F at log-spaced token counts) is in
    `table.attrs["convergence"]`.
    """
    analyzer = LayerwiseAnalyzer(model, saes, batch_size=batch_size, **analyzer_options)
    return analyzer.measure(
        windows, seeds=seeds, token_budget=token_budget, ce_windows=ce_windows, additivity_pairs=additivity_pairs,
        target_relative_interval=target_relative_interval, checkpoint_dir=checkpoint_dir,
        checkpoint_every=checkpoint_every, progress=progress,
    )


def convergence_table(states: Sequence[SeedMeasurement]) -> pd.DataFrame:
    return pd.DataFrame([row for state in states for row in state.convergence])


__all__ = [
    "LayerwiseAnalyzer",
    "SeedMeasurement",
    "TABLE_COLUMNS",
    "convergence_table",
    "log_spaced_checkpoints",
    "measure_layers",
    "sample_windows",
    "saturated_features",
]
