"""How well an SAE describes a hook: variance explained, L0, dead features, CE loss recovered.

psi counts the features an SAE uses to describe a layer; that only describes the layer if the
SAE reconstructs it. These are the measurements; gate.QualityGate gives the verdict on them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

import torch
from sae_lens import SAE
from sae_lens.evals import ExplainedVarianceCalculator
from sae_lens.util import extract_stop_at_layer_from_tlens_hook_name, get_special_token_ids
from tqdm.auto import tqdm

from ..activations import forward_activations
from ..codes import decode, sparse_codes
from ..distributed import all_reduce_
from ..metric import FeatureBudget
from ..models import Model

# --- quality -----------------------------------------------------------------------------------


@dataclass
class SAEQuality:
    """How well an SAE describes one hook, on `n_tokens` tokens. CE fields are NaN when not measured."""

    variance_explained: float  # 1 - sum |x - x_hat|^2 / sum |x - mean x|^2
    mean_l0: float  # features active per token
    dead_fraction: float  # features that never fired on these tokens (depends on how many there were)
    n_tokens: int
    ce_loss_clean: float = math.nan
    ce_loss_reconstructed: float = math.nan  # hook replaced by the SAE's reconstruction
    ce_loss_zero_ablated: float = math.nan  # hook replaced by zeros
    ce_loss_recovered: float = math.nan  # (zero - reconstructed) / (zero - clean)

    def to_dict(self) -> dict:
        """The fields, NaN as None (strict JSON has no NaN). The verdict on them is the gate's
        (gate.QualityGate), given with each measured row, not here."""
        return {
            key: None if isinstance(value, float) and math.isnan(value) else value
            for key, value in asdict(self).items()
        }


class VarianceExplained:
    """Streaming variance explained, 1 - sum |x - x_hat|^2 / sum |x - mean x|^2, over batches.

    The sums are SAE-Lens's `ExplainedVarianceCalculator` (float64, no cancellation trouble with
    the large means of residual streams); this class adds the merge over processes it lacks.
    """

    def __init__(self):
        self.calculator = ExplainedVarianceCalculator()

    def update(self, activations: torch.Tensor, reconstruction: torch.Tensor) -> None:
        self.calculator.add_batch(reconstruction, activations)

    @property
    def n_tokens(self) -> int:
        return int(self.calculator.num_samples)

    def compute(self) -> float:
        if self.n_tokens == 0:
            raise ValueError("no tokens were added; call update() with at least one batch first")
        return float(self.calculator.compute())

    def all_reduce(self) -> VarianceExplained:
        """Sum over every process of torch.distributed (in place), reaching into the calculator's sums."""
        calc = self.calculator
        scalars = torch.tensor(
            [calc.sum_squared_norm, calc.sum_squared_residual, calc.num_samples], dtype=torch.float64
        )
        all_reduce_(scalars, calc.sum_x)
        calc.sum_squared_norm, calc.sum_squared_residual, calc.num_samples = (
            scalars[0].item(),
            scalars[1].item(),
            int(scalars[2]),
        )
        return self


def variance_explained(activations: torch.Tensor, reconstruction: torch.Tensor) -> float:
    """Variance explained of one batch [tokens, d_in] (`VarianceExplained` for a stream)."""
    stats = VarianceExplained()
    stats.update(activations, reconstruction)
    return stats.compute()


def evaluate_sae(
    model: Model,
    sae: SAE,
    hook_name: str,
    tokens,
    batch_size: int = 8,
    progress: bool = False,
) -> SAEQuality:
    """Quality of `sae` at `hook_name` of `model` on `tokens` (data.TokenWindows or a LongTensor [n, context]),
    CE loss recovered included: `evaluate_saes` for one SAE."""
    return evaluate_saes(model, {hook_name: sae}, tokens, batch_size, ce_hooks=[hook_name], progress=progress)[
        hook_name
    ]


@torch.no_grad()
def evaluate_saes(
    model: Model,
    saes: Mapping[str, SAE | Mapping[int, SAE]],
    tokens,
    batch_size: int = 8,
    ce_hooks: Iterable[str] = (),
    progress: bool = False,
) -> dict:
    """Quality of every SAE in `saes` ({hook: SAE} or {hook: {sae_seed: SAE}}) on `tokens`
    (data.TokenWindows or a LongTensor [n, context]); returns the same nesting of SAEQuality.

    Variance explained, L0 and dead features of every SAE come from ONE forward pass per batch
    of windows (up to the deepest hook): the check after training many SAEs costs about one
    forward over the held-out windows, not one per hook. CE loss recovered costs forward passes
    with the unembedding (one per SAE, one per hook, one clean pass per batch: `_ce_losses`),
    so it is measured only for the hooks in `ce_hooks` (NaN for the others).

    BOS and padding positions are left out of the statistics and left untouched when the
    reconstruction replaces the hook (as SAE-Lens's evals do); CE losses average over the
    positions whose next token is text. CE losses are SAE-Lens's `get_recons_loss` definition
    with its shared passes done once (`_ce_losses`); the rest come from `VarianceExplained` and a
    `FeatureBudget`, since SAE-Lens's sparsity/variance eval needs its own ActivationsStore
    rather than a given token tensor.
    """
    token_ids, keep, _ = _tokens_and_mask(model, tokens)
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive number of windows, got {batch_size}")
    slots = {
        (hook, seed): sae
        for hook, entry in saes.items()
        for seed, sae in (entry.items() if isinstance(entry, Mapping) else [(None, entry)])
    }
    ce_hooks = set(ce_hooks)
    unknown = ce_hooks - set(saes)
    if unknown:
        raise ValueError(f"ce_hooks {sorted(unknown)} have no SAE here; the SAEs are for {sorted(saes)}")
    hooks = list(saes)
    stops = [extract_stop_at_layer_from_tlens_hook_name(hook) for hook in hooks]
    stop_at_layer = None if None in stops else max(stops)
    variance = {key: VarianceExplained() for key in slots}
    budgets = {key: FeatureBudget(sae.cfg.d_sae, sae.cfg.d_in) for key, sae in slots.items()}
    loss_sums = {key: {"clean": 0.0, "reconstructed": 0.0, "zero_ablated": 0.0} for key in slots}
    n_predictions = 0
    for start in tqdm(
        range(0, len(token_ids), batch_size), desc=f"evaluating {len(slots)} SAE(s)", disable=not progress
    ):
        batch = token_ids[start : start + batch_size].to(model.cfg.device)
        batch_keep = keep[start : start + batch_size].to(model.cfg.device)
        cache = forward_activations(model, batch, hooks, stop_at_layer)
        for (hook, seed), sae in slots.items():
            activations = cache[hook][batch_keep].to(sae.device)
            codes = sparse_codes(sae.encode(activations))
            variance[hook, seed].update(activations, decode(sae, codes))
            budgets[hook, seed].update(codes)
        del cache
        predicts_text = batch_keep[:, 1:]
        if ce_hooks:
            losses = _ce_losses(
                model, batch, batch_keep, {key: sae for key, sae in slots.items() if key[0] in ce_hooks}
            )
            for key, by_name in losses.items():
                for name, per_token in by_name.items():
                    loss_sums[key][name] += per_token[predicts_text.to(per_token.device)].sum().item()
        n_predictions += int(predicts_text.sum())
    result: dict = {}
    for hook, seed in slots:
        budget = budgets[hook, seed]
        quality = SAEQuality(variance[hook, seed].compute(), budget.mean_l0, budget.dead_fraction, budget.tokens)
        if hook in ce_hooks and n_predictions:
            clean, reconstructed, zero = (
                loss_sums[hook, seed][name] / n_predictions for name in ("clean", "reconstructed", "zero_ablated")
            )
            quality.ce_loss_clean, quality.ce_loss_reconstructed, quality.ce_loss_zero_ablated = (
                clean,
                reconstructed,
                zero,
            )
            quality.ce_loss_recovered = (zero - reconstructed) / (zero - clean) if zero != clean else math.nan
        if seed is None:
            result[hook] = quality
        else:
            result.setdefault(hook, {})[seed] = quality
    return result


def _ce_losses(model: Model, batch: torch.Tensor, keep: torch.Tensor, saes: Mapping[tuple, SAE]) -> dict:
    """{(hook, seed): {"clean", "reconstructed", "zero_ablated": per-token loss [batch, pos - 1]}}.

    The definitions of SAE-Lens's `get_recons_loss` (the hook's activations replaced by the SAE's
    reconstruction at text positions, or by zeros everywhere), written out because it runs the
    clean and the zero-ablated pass again for every SAE: with two SAE seeds on each of 55 hooks
    that is 330 full forwards per batch where 166 give the same numbers (one clean pass, one
    zero-ablated pass per hook, one reconstruction per SAE).
    """
    clean = model(batch, return_type="loss", loss_per_token=True)
    zero_ablated = {}
    losses = {}
    for (hook, seed), sae in saes.items():
        if hook not in zero_ablated:
            zero_ablated[hook] = model.run_with_hooks(
                batch, return_type="loss", loss_per_token=True, fwd_hooks=[(hook, _zero_ablation)]
            )
        reconstructed = model.run_with_hooks(
            batch, return_type="loss", loss_per_token=True, fwd_hooks=[(hook, _reconstruction(sae, keep))]
        )
        losses[hook, seed] = {"clean": clean, "reconstructed": reconstructed, "zero_ablated": zero_ablated[hook]}
    return losses


def _zero_ablation(activations: torch.Tensor, hook) -> torch.Tensor:  # noqa: ARG001 (TransformerLens hook signature)
    return torch.zeros_like(activations)


def _reconstruction(sae: SAE, keep: torch.Tensor):
    """A hook replacing the activations at the `keep` positions [batch, pos] by the SAE's
    reconstruction (attention hooks with a head axis are flattened to the SAE's d_in and back)."""

    def hook(activations: torch.Tensor, hook) -> torch.Tensor:  # noqa: ARG001
        flat = activations.flatten(2) if activations.ndim == 4 else activations
        reconstruction = sae.decode(sae.encode(flat.to(sae.device))).to(flat.device, flat.dtype)
        replaced = torch.where(keep.to(flat.device)[..., None], reconstruction, flat)
        return replaced.reshape(activations.shape)

    return hook


def _tokens_and_mask(model: Model, tokens) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Token ids [n, context], the mask of text positions, and the special token ids left alone."""
    if hasattr(tokens, "measured_mask"):  # data.TokenWindows
        special = [i for i in (tokens.bos_token_id, tokens.pad_token_id) if i is not None]
        return tokens.tokens, tokens.measured_mask, special
    tokens = torch.as_tensor(tokens)
    if tokens.ndim != 2 or tokens.dtype not in (torch.long, torch.int):
        raise ValueError(
            "tokens must be TokenWindows or an integer tensor [n_windows, context], "
            f"got {tokens.dtype} {tuple(tokens.shape)}"
        )
    special = get_special_token_ids(model.tokenizer) if model.tokenizer is not None else []
    keep = (
        ~torch.isin(tokens, torch.tensor(special, dtype=tokens.dtype))
        if special
        else torch.ones_like(tokens, dtype=torch.bool)
    )
    return tokens, keep, special
