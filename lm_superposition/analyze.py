"""Model + SAEs + token windows -> one row per hook, SAE and seed: F, psi, their interval, the verdict.

One forward pass per batch serves every hook (activations.stream_activations). Each hook's
activations are read through its SAE(s) by a `codes.CodeReader` a slice of tokens at a time:
codes kept as a sparse matrix of their nonzeros, weighted by decoder norms into the hook's
FeatureBudget (duplicate latents grouped), and decoded for variance explained. `sae_budget`
does exactly the same for one SAE and a tensor of activations. A `SeedMeasurement` holds what
one data seed has accumulated; it saves and loads, which is how an interrupted run resumes
without losing or double-counting a token.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .activations import stream_activations
from .atomic import atomic_file
from .codes import (
    CodeReader,
    LowPrecisionSAE,
    ScreenedSAE,
    decode,
    encodes_fused,
    encodes_in_place,
    sparse_encode,
)
from .data import PAD_DOC_ID, TokenWindows
from .distributed import world_size_and_rank
from .gate import QualityGate
from .metric import FeatureBudget, last_doubling_growth
from .models import HookPoint, hook_point
from .saes.loading import check_sae_fits
from .saes.quality import VarianceExplained, evaluate_sae
from .sparse_coding import additivity_of, compressed_sensing_margin

# Codes are encoded in slices of about this many elements (tokens x d_sae). An encode that
# allocates fresh [tokens, d_sae] tensors (SAE-Lens's, oneDNN's fused one): 2^22 float32 = 16 MiB
# stays under glibc's largest mmap threshold (32 MiB), so they come from the heap instead of being
# mapped and page-faulted afresh every time. An SAE encoded into one reused buffer has no such
# cost, and its addmm runs fastest on large slices. Measured: results/benchmarks/README.md.
ENCODE_CHUNK_ELEMENTS = 2**22
# encode_dtype's one value that is not a dtype: float32's codes found by a bfloat16 screen
# (codes.ScreenedSAE); config.ENCODE_DTYPES repeats it (config imports no torch)
SCREENED_ENCODE = "float32_screened"
IN_PLACE_CHUNK_ELEMENTS = 2**25
# Latents whose decoder directions are at least this aligned count as one feature (codes.duplicate_groups).
# On the toy validation (results/toy_validation/duplicate_cosine/) r is 0.964-0.971 and the mean
# error 1.3-1.8 for any threshold from 0.8 to 0.99, against r 0.848 and error 8.2 without merging:
# merging matters, the exact threshold little. 0.9 keeps a margin below near-copies while
# leaving apart related-but-distinct directions (a split feature's children).
DUPLICATE_COSINE = 0.9

TABLE_COLUMNS = [
    "model",
    "hook",
    "layer",
    "kind",
    "N",
    "d_sae",
    "sae",
    "sae_seed",
    "seed",
    "tokens",
    "entropy",
    "F",
    "F_low",
    "F_high",
    "psi",
    "psi_low",
    "psi_high",
    "interval_over",
    "F_saturated",
    "F_saturated_note",
    "last_doubling_growth",
    "mean_l0",
    "alive_features",
    "dead_fraction",
    "merged_latents",
    "cs_margin",
    "additivity",
    "variance_explained",
    "ce_recovered",
    "ce_tokens",
    "quality",
]


class MeasurementStopped(Exception):
    """`run_seed` was asked to stop (its `stop` callback said so) and saved its checkpoint first."""


@dataclass(frozen=True)
class Slot:
    """One SAE reading one hook: the key its accumulators are kept under."""

    key: str  # the hook name, or "HOOK#SAE_SEED" when a hook is read through several SAEs
    hook: str
    sae_seed: int | None
    sae: object


@dataclass
class SeedMeasurement:
    """Everything one data seed has accumulated so far, for every slot (hook x SAE)."""

    seed: int
    budgets: dict[str, FeatureBudget]
    variance: dict[str, VarianceExplained]
    windows_done: int = 0

    @property
    def tokens(self) -> int:
        return next(iter(self.budgets.values())).tokens

    def state_dict(self) -> dict:
        return {
            "seed": self.seed,
            "windows_done": self.windows_done,
            "budgets": {key: budget.state_dict() for key, budget in self.budgets.items()},
            # Pickled whole: SAE-Lens's variance calculator inside has no state_dict of its own.
            "variance": self.variance,
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> SeedMeasurement:
        return cls(
            seed=state["seed"],
            budgets={key: FeatureBudget.from_state_dict(s) for key, s in state["budgets"].items()},
            variance=state["variance"],
            windows_done=state["windows_done"],
        )

    def save(self, path: Path) -> None:
        with atomic_file(path) as temporary:  # a run killed mid-save keeps the previous checkpoint
            torch.save(self.state_dict(), temporary)

    @classmethod
    def load(cls, path: Path) -> SeedMeasurement:
        try:
            return cls.from_state_dict(torch.load(path, weights_only=False))
        except Exception as err:  # torch.load raises many unrelated types for a bad file
            raise ValueError(
                f"{path} is not a checkpoint this version can resume (expected a SeedMeasurement state: "
                f"seed, windows_done, budgets, variance): {err!r}. Delete it to measure that seed again from its "
                "start (other seeds keep theirs), or start over with --overwrite"
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
        raise ValueError(
            f"token_budget={token_budget} but the windows hold only {available} measurable tokens; "
            "give more text or a smaller budget"
        )
    needed = int(torch.searchsorted(measured.sum(1).cumsum(0), token_budget)) + 1
    selected = replace(shuffled[:needed], doc_ids=shuffled.doc_ids[:needed].clone())
    overshoot = selected.n_tokens - token_budget
    if overshoot:
        last_positions = measured[needed - 1].nonzero().flatten()[-overshoot:]
        selected.doc_ids[-1, last_positions] = PAD_DOC_ID
    return selected


def log_spaced_checkpoints(total_tokens: int, start: int = 256) -> list[int]:
    """Token counts at which the early stop looks at the interval: powers of two from `start`, then the total."""
    points = [
        2**k for k in range(int(math.log2(start)), int(math.log2(max(total_tokens, 1))) + 1) if 2**k < total_tokens
    ]
    return points + [total_tokens]


class _SlotReader:
    """Reads one slot's activations into its budget and variance: encode a slice of tokens at a
    time, weight the nonzero codes by decoder norms, decode them for variance explained."""

    def __init__(
        self,
        sae,
        merge_duplicates: bool,
        duplicate_cosine: float,
        chunk_tokens: int | None,
        buffers: dict,
        encode_dtype: str | torch.dtype | None = None,
    ):
        self.sae = sae
        self.codes = CodeReader(sae, merge_duplicates=merge_duplicates, duplicate_cosine=duplicate_cosine)
        self.d_sae, self.d_in = sae.W_dec.shape  # any SAE with encode, decode and W_dec (toy SAEs too)
        self.dtype = sae.W_dec.dtype
        screened = encode_dtype == SCREENED_ENCODE
        dtype = None if screened else _dtype(encode_dtype)
        reduced = dtype in (torch.bfloat16, torch.float16) and dtype != self.dtype
        self.low_precision = LowPrecisionSAE(sae, dtype) if reduced else None
        # an SAE the screen cannot read keeps its own float32 encode: the same codes
        screen = ScreenedSAE(sae) if screened and ScreenedSAE.applies(sae) else None
        self.encoder = self.low_precision or screen
        self.buffer_dtype = self.encoder.dtype if self.encoder else self.dtype
        # codes written into one reused buffer (see codes.encode): an in-place SAE, unless oneDNN encodes it
        self.buffered = encodes_in_place(sae) and (self.encoder is not None or not encodes_fused(sae))
        elements = IN_PLACE_CHUNK_ELEMENTS if self.buffered else ENCODE_CHUNK_ELEMENTS
        self.chunk = chunk_tokens or max(1, elements // self.d_sae)
        self._buffers = buffers

    def new_budget(self, width: int, n_blocks: int) -> FeatureBudget:
        return FeatureBudget(self.d_sae, width, n_blocks, groups=self.codes.groups)

    def read(self, budget: FeatureBudget, variance: VarianceExplained | None, acts: torch.Tensor, doc_ids) -> None:
        buffer = self._buffer() if self.buffered else None
        doc_chunks = (
            doc_ids.split(self.chunk) if isinstance(doc_ids, torch.Tensor) else [doc_ids] * -(-len(acts) // self.chunk)
        )
        for act_chunk, doc_chunk in zip(acts.split(self.chunk), doc_chunks):
            # ~99% of the codes are zeros: everything after the encode reads only the nonzeros.
            act_chunk = act_chunk.to(self.dtype)
            codes = sparse_encode(self.sae, act_chunk, out=buffer, weights=self.encoder)
            budget.update(self.codes.weighted(codes), doc_chunk)
            if variance is not None:
                variance.update(act_chunk, decode(self.sae, codes, self.low_precision))

    def _buffer(self) -> torch.Tensor:
        """One [tokens, d_sae] buffer per code shape, reused by every SAE of that shape and every batch."""
        sae = self.sae
        key = (sae.cfg.d_sae, self.buffer_dtype, str(sae.device))
        if key not in self._buffers or len(self._buffers[key]) < self.chunk:
            self._buffers[key] = torch.empty(self.chunk, sae.cfg.d_sae, dtype=self.buffer_dtype, device=sae.device)
        return self._buffers[key]


def sae_budget(
    sae,
    activations: torch.Tensor,
    *,
    width: int | None = None,
    doc_ids: torch.Tensor | None = None,
    n_blocks: int = 64,
    merge_duplicates: bool = True,
    duplicate_cosine: float = DUPLICATE_COSINE,
    chunk_tokens: int | None = None,
    encode_dtype: str | torch.dtype | None = None,
) -> FeatureBudget:
    """The FeatureBudget of `sae` on a [tokens, d_in] tensor of activations: exactly what
    `measure_layers` sums for a hook (decoder-norm weights, duplicate latents grouped), so
    toys, notebooks and users' own activations are measured the way a layer is.

    width: the hook's N for psi (default d_in); doc_ids: the document of each row for the
    bootstrap (default: each row its own document); encode_dtype: as for `LayerwiseAnalyzer`.
    """
    reader = _SlotReader(sae, merge_duplicates, duplicate_cosine, chunk_tokens, {}, encode_dtype)
    if activations.ndim != 2 or activations.shape[1] != reader.d_in:
        raise ValueError(f"activations must be [tokens, d_in={reader.d_in}], got shape {tuple(activations.shape)}")
    budget = reader.new_budget(width or reader.d_in, n_blocks)
    with torch.inference_mode():
        reader.read(budget, None, activations, torch.arange(len(activations)) if doc_ids is None else doc_ids)
    return budget


class LayerwiseAnalyzer:
    """Measures F and psi for several hooks of one model, each through its own SAE(s).

    saes: {hook name: SAE}, or {hook name: {sae_seed: SAE}} to read a hook through several SAEs
        (e.g. trained from different seeds, so the interval can include SAE variance).
    merge_duplicates, duplicate_cosine: group latents whose decoder directions have cosine >=
        duplicate_cosine (codes.duplicate_groups); merge_duplicates=False gives the raw measure.
    gate: the quality gate whose verdict fills the `quality` column.
    encode_chunk_tokens: tokens encoded at a time; None sizes slices by ENCODE_CHUNK_ELEMENTS
        (IN_PLACE_CHUNK_ELEMENTS for SAEs that `encode` computes into a reused buffer).
    encode_dtype: "bfloat16" (or "float16") runs the SAE encode at reduced precision
        (`codes.LowPrecisionSAE`: 2-4x faster matmuls on CPUs with AVX512-BF16 and on GPUs; F
        differs from the float32 encode in its last digits, see results/benchmarks/); None,
        "float32" or "float64": the SAE's own precision. "float32_screened": float32's codes (to
        float32 rounding) from a bfloat16 matmul that rules out inactive latents and float32 dot
        products for the rest (`codes.ScreenedSAE`, for float32 StandardSAEs; other SAEs keep their
        own encode). The budget is summed in float64 either way.
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
        merge_duplicates: bool = True,
        duplicate_cosine: float = DUPLICATE_COSINE,
        gate: QualityGate | None = None,
        encode_chunk_tokens: int | None = None,
        encode_dtype: str | torch.dtype | None = None,
    ):
        if not saes:
            raise ValueError("no SAEs given: pass {hook_name: SAE} for at least one hook")
        self.model = model
        self.model_name = model_name or model.cfg.model_name
        self.hooks: dict[str, HookPoint] = {name: hook_point(model, name) for name in saes}
        self.slots: dict[str, Slot] = {}
        for hook, entry in saes.items():
            by_seed = entry if isinstance(entry, Mapping) else {None: entry}
            for sae_seed, sae in by_seed.items():
                check_sae_fits(sae, self.hooks[hook], self.model_name, allow_hook_mismatch=allow_hook_mismatch)
                key = hook if sae_seed is None else f"{hook}#{sae_seed}"
                self.slots[key] = Slot(key, hook, sae_seed, sae)
        self.n_blocks = n_blocks
        self.batch_size = batch_size
        self.gate = gate or QualityGate()
        buffers: dict = {}
        self._readers = {
            key: _SlotReader(slot.sae, merge_duplicates, duplicate_cosine, encode_chunk_tokens, buffers, encode_dtype)
            for key, slot in self.slots.items()
        }

    @property
    def saes(self) -> dict[str, object]:
        """{slot key: SAE}."""
        return {key: slot.sae for key, slot in self.slots.items()}

    def new_seed(self, seed: int) -> SeedMeasurement:
        return SeedMeasurement(
            seed=seed,
            budgets={
                key: self._readers[key].new_budget(self.hooks[slot.hook].width, self.n_blocks)
                for key, slot in self.slots.items()
            },
            variance={key: VarianceExplained() for key in self.slots},
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
        """Measure every slot on seed `seed`'s sample of the windows.

        resume_from: a SeedMeasurement saved part-way; its windows are skipped.
        checkpoint: called with the state every `checkpoint_every` batches and at the end.
        target_relative_interval: stop early once every slot's 95% interval of F is narrower
            than this fraction of F (checked at log-spaced token counts).
        stop: checked after every batch; when it returns True the checkpoint is saved and
            MeasurementStopped raised.

        Under torch.distributed (torchrun), each process measures every world_size-th window
        of the sample, checkpoints its own share, and returns the state summed over all
        processes (no early stop).
        """
        world_size, rank = world_size_and_rank()
        if world_size > 1 and target_relative_interval is not None:
            raise ValueError("target_relative_interval (early stop) is not supported under torch.distributed")
        shard = sample_windows(windows, seed, token_budget)[rank::world_size]
        total = shard.n_tokens
        state = resume_from or self.new_seed(seed)
        if state.seed != seed:
            raise ValueError(f"resume state is for seed {state.seed}, not seed {seed}")
        pending = [t for t in log_spaced_checkpoints(total) if t > state.tokens] if target_relative_interval else []
        batches = stream_activations(
            self.model,
            shard[state.windows_done :],
            list(self.hooks),
            batch_size=self.batch_size,
            progress=progress and rank == 0,
        )
        for n_batch, batch in enumerate(batches, start=1):
            for key, slot in self.slots.items():
                self._readers[key].read(
                    state.budgets[key], state.variance[key], batch.activations[slot.hook], batch.doc_ids
                )
            state.windows_done += batch.window_slice.stop - batch.window_slice.start
            converged = False
            while pending and state.tokens >= pending[0]:
                pending.pop(0)
                converged = _all_intervals_within(state, target_relative_interval)
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
        for key in merged.budgets:
            merged.budgets[key].all_reduce()
            merged.variance[key].all_reduce()
        return merged

    def table(
        self,
        states: Sequence[SeedMeasurement],
        ce_recovered: Mapping[str, tuple[float, int]] | None = None,
        sae_names: Mapping[str, str] | None = None,
        additivity: Mapping[str, float] | None = None,
    ) -> pd.DataFrame:
        """One row per slot x seed, columns TABLE_COLUMNS. ce_recovered: {slot key: (CE loss
        recovered, tokens it was measured on)}; CE recovered and additivity are NaN where not given.
        The sample-size curves behind F_saturated are in `table.attrs["convergence"]`."""
        rows, curves = [], []
        for state in states:
            for key, budget in state.budgets.items():
                slot, point = self.slots[key], self.hooks[self.slots[key].hook]
                summary = budget.summary()
                curve = budget.sample_size_curve()
                curves += [{"seed": state.seed, "hook": slot.hook, "sae_seed": slot.sae_seed, **r} for r in curve]
                saturated, note = saturated_features([r["tokens"] for r in curve], [r["F"] for r in curve])
                growth = last_doubling_growth(curve)
                ce, ce_tokens = (ce_recovered or {}).get(key, (math.nan, 0))
                variance_explained = state.variance[key].compute()
                rows.append(
                    {
                        "model": self.model_name,
                        "hook": slot.hook,
                        "layer": point.layer,
                        "kind": point.kind,
                        "sae": (sae_names or {}).get(key, ""),
                        "sae_seed": slot.sae_seed,
                        "seed": state.seed,
                        **summary,
                        "interval_over": "documents",
                        "F_saturated": saturated,
                        "F_saturated_note": note,
                        "last_doubling_growth": growth,
                        "cs_margin": _margin_or_nan(point.width, summary["mean_l0"], summary["d_sae"]),
                        "additivity": (additivity or {}).get(slot.hook, math.nan),
                        "variance_explained": variance_explained,
                        "ce_recovered": ce,
                        "ce_tokens": ce_tokens,
                        "quality": self.gate.verdict(
                            variance_explained=variance_explained,
                            ce_recovered=ce,
                            ce_tokens=ce_tokens,
                            dead_fraction=summary["dead_fraction"],
                            effective_features=summary["F"],
                            d_sae=summary["d_sae"],
                            last_doubling_growth=growth,
                        ),
                    }
                )
        table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
        table.attrs["convergence"] = pd.DataFrame(curves)
        return table

    def ce_recovered(self, windows: TokenWindows, keys: Sequence[str] | None = None) -> dict[str, tuple[float, int]]:
        """CE loss recovered per slot (all, or `keys`) and the tokens it was measured on: the
        model's loss with the hook replaced by the reconstruction, against zero-ablation. Costs
        three forward passes with the unembedding per slot."""
        result = {}
        for key in self.slots if keys is None else keys:
            slot = self.slots[key]
            quality = evaluate_sae(self.model, slot.sae, slot.hook, windows, batch_size=self.batch_size)
            result[key] = (quality.ce_loss_recovered, quality.n_tokens)
        return result

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
            raise ValueError(
                f"additivity needs n_pairs >= 1 (got {n_pairs}) and 2 windows whose first {length} tokens "
                f"are text ({len(usable)} such windows here)"
            )
        if len(usable) < 2 * n_pairs:
            warnings.warn(
                f"additivity: {n_pairs} pairs asked for, but only {len(usable)} windows have {length} tokens of "
                f"text; using {len(usable) // 2} pairs",
                stacklevel=2,
            )
            n_pairs = len(usable) // 2
        picked = usable[torch.randperm(len(usable), generator=torch.Generator().manual_seed(seed))[: 2 * n_pairs]]
        segments = windows.tokens[picked, first : first + length]
        a, b = segments[:n_pairs], segments[n_pairs:]
        (f_a, n_a), (f_b, n_b), (f_ab, n_ab) = (
            self._summed_activations(x, windows) for x in (a, b, torch.cat([a, b], dim=1))
        )
        result = {}
        for hook in self.hooks:
            mean = (f_a[hook].sum(0) + f_b[hook].sum(0)) / (n_a.sum() + n_b.sum())
            centred = [f[hook] - n.unsqueeze(1) * mean for f, n in ((f_a, n_a), (f_b, n_b), (f_ab, n_ab))]
            result[hook] = additivity_of(*centred).mean
        return result

    def _summed_activations(
        self, segments: torch.Tensor, like: TokenWindows
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """({hook: [segments, N]} each segment's activations summed over its tokens, [segments] token counts);
        BOS excluded."""
        if like.bos_token_id is not None:
            segments = torch.cat([torch.full((len(segments), 1), like.bos_token_id), segments], dim=1)
        doc_ids = torch.arange(len(segments)).unsqueeze(1).expand_as(segments)
        windows = TokenWindows(segments, doc_ids.contiguous(), like.bos_token_id, like.pad_token_id)
        sums = {
            hook: torch.zeros(len(segments), point.width, dtype=torch.float64) for hook, point in self.hooks.items()
        }
        for batch in stream_activations(
            self.model, windows, list(self.hooks), batch_size=self.batch_size, progress=False
        ):
            for hook, acts in batch.activations.items():
                sums[hook].index_add_(0, batch.doc_ids, acts.to(device="cpu", dtype=torch.float64))
        return sums, torch.bincount(windows.doc_ids[windows.measured_mask], minlength=len(segments)).to(torch.float64)

    def measure(
        self,
        windows: TokenWindows | Callable[[int], TokenWindows],
        *,
        seeds: Sequence[int] = (0,),
        token_budget: int | None = None,
        ce_windows: int = 80,
        additivity_pairs: int = 0,
        target_relative_interval: float | None = None,
        checkpoint_dir: str | Path | None = None,
        checkpoint_name: str = "measurement",
        checkpoint_every: int = 50,
        known_ce: Mapping[str, tuple[float, int]] | None = None,
        sae_names: Mapping[str, str] | None = None,
        progress: bool = True,
        stop: Callable[[], bool] | None = None,
    ) -> pd.DataFrame:
        """Measure every slot for every seed: the one pipeline behind `measure_layers` and `runs`.

        windows: the windows to sample from, or a function seed -> that seed's own windows
            (a run reads a fresh shuffle of its corpus per seed).
        seeds: each data seed measures its own seeded sample of `token_budget` tokens (all when
            None); each row's bootstrap interval is over the documents inside that sample.
        ce_windows: windows for CE loss recovered (0 skips it: NaN), drawn from every seed's
            sample; slots in `known_ce` (e.g. measured when the SAE was trained) are not re-measured.
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
                    seed_windows,
                    seed,
                    token_budget,
                    resume_from=SeedMeasurement.load(path) if path and path.exists() else None,
                    checkpoint=(lambda state, p=path: state.save(p)) if path else None,
                    checkpoint_every=checkpoint_every,
                    target_relative_interval=target_relative_interval,
                    progress=progress,
                    stop=stop,
                )
            )
            samples.append(sample_windows(seed_windows, seed, token_budget))
        ce = dict(known_ce or {})
        missing = [key for key in self.slots if key not in ce]
        if ce_windows and missing:
            ce |= self.ce_recovered(_drawn_from_each(samples, ce_windows), missing)
        additivity = self.additivity(TokenWindows.concat(samples), additivity_pairs) if additivity_pairs else None
        return self.table(states, ce_recovered=ce, sae_names=sae_names, additivity=additivity)

    @staticmethod
    def _checkpoint_path(folder: str | Path | None, name: str, seed: int) -> Path | None:
        if folder is None:
            return None
        world_size, rank = world_size_and_rank()
        shard = f"__rank{rank}" if world_size > 1 else ""
        Path(folder).mkdir(parents=True, exist_ok=True)
        return Path(folder) / f"{name}__seed{seed}{shard}.pt"


def _dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(
            "encode_dtype must be a floating-point dtype such as 'bfloat16' or 'float32', "
            f"or {SCREENED_ENCODE!r}, got {name!r}"
        )
    return dtype


def _all_intervals_within(state: SeedMeasurement, target_relative_interval: float) -> bool:
    """True if every slot's bootstrap 95% interval of F is narrower than the target fraction of F."""
    for budget in state.budgets.values():
        try:
            interval = budget.bootstrap_effective_features(n_resamples=200)
        except ValueError:  # fewer than two document blocks so far
            return False
        if interval.high - interval.low >= target_relative_interval * budget.effective_features():
            return False
    return True


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


MIN_SATURATION_DECADES = 1.0
MIN_SATURATION_POINTS = 5


def saturated_features(tokens: Sequence[float], effective: Sequence[float]) -> tuple[float, str]:
    """F as tokens -> infinity, fitting F(T) = F_inf * T / (T + T_half), and a note: "" when
    fitted, else why not (F_inf is then NaN and the measured F is a lower bound).

    The saturating (Michaelis-Menten) form matches how F rises fast and then levels off as
    rarer features keep appearing; fitted by least squares in log F. Only where the data can
    support it: at least MIN_SATURATION_POINTS distinct token counts spanning at least
    MIN_SATURATION_DECADES decade(s), and F_inf within 100x the largest F measured.
    """
    from scipy.optimize import curve_fit

    tokens, effective = np.asarray(tokens, dtype=float), np.asarray(effective, dtype=float)
    distinct = np.unique(tokens)
    if len(distinct) < MIN_SATURATION_POINTS:
        return math.nan, f"{len(distinct)} token counts < {MIN_SATURATION_POINTS}"
    decades = math.log10(distinct[-1] / distinct[0])
    if decades < MIN_SATURATION_DECADES:
        return math.nan, f"tokens span {decades:.1f} decades < {MIN_SATURATION_DECADES}"

    def log_model(t, log_f_inf, log_t_half):
        return log_f_inf + np.log(t) - np.log(t + np.exp(log_t_half))

    start = (np.log(effective[-1] * 1.5), np.log(tokens[len(tokens) // 2]))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            (log_f_inf, _), _ = curve_fit(log_model, tokens, np.log(effective), p0=start, maxfev=5000)
    except RuntimeError:
        return math.nan, "fit did not converge"
    f_inf = float(np.exp(log_f_inf))
    if not math.isfinite(f_inf) or f_inf > 100 * effective.max():
        return math.nan, "no saturation in sight (fit runs away)"
    return f_inf, ""


def measure_layers(
    model,
    saes: Mapping[str, object],
    windows: TokenWindows | Callable[[int], TokenWindows],
    *,
    seeds: Sequence[int] = (0,),
    token_budget: int | None = None,
    batch_size: int = 8,
    ce_windows: int = 80,
    additivity_pairs: int = 0,
    target_relative_interval: float | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 50,
    progress: bool = True,
    encode_dtype: str | None = None,
    **analyzer_options,
) -> pd.DataFrame:
    """Per-layer F and psi: one row per hook x SAE x seed (see TABLE_COLUMNS).

    `LayerwiseAnalyzer(model, saes, ...).measure(windows, ...)` in one call; see those for the
    arguments. The sample-size curves (F against tokens) are in `table.attrs["convergence"]`.
    """
    analyzer = LayerwiseAnalyzer(model, saes, batch_size=batch_size, encode_dtype=encode_dtype, **analyzer_options)
    return analyzer.measure(
        windows,
        seeds=seeds,
        token_budget=token_budget,
        ce_windows=ce_windows,
        additivity_pairs=additivity_pairs,
        target_relative_interval=target_relative_interval,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=checkpoint_every,
        progress=progress,
    )


__all__ = [
    "LayerwiseAnalyzer",
    "MeasurementStopped",
    "SeedMeasurement",
    "TABLE_COLUMNS",
    "measure_layers",
    "sae_budget",
    "sample_windows",
    "saturated_features",
]
