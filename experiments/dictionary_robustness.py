"""Is F robust to the SAE's width and L1 penalty once the dictionary is wide enough?

Two sweeps of SAE expansion factor x L1 coefficient, F measured with `FeatureBudget` on held-out data:

- toy: one toy model of superposition (lm_superposition.toy, known number of stored features)
  seen through the paper's tied SAE;
- real: one layer of a real model (default: the offline Gemma 3 270M, blocks.6.hook_resid_post).
  Activations of ~20k offline-corpus tokens are collected once and kept in memory; SAE-Lens
  standard (ReLU + L1) SAEs are trained on them via `dictionaries.train_sae` and F measured
  on held-out documents.

Plateau: the smallest expansion factor from which F stays within 10% of its value at every
larger factor of the sweep (`plateau_expansion`); none if only the widest one qualifies.
Writes table.csv, f_vs_width.png and README.md to --out.

    python -m experiments.dictionary_robustness            # toy 0.5-16x, Gemma 0.5-8x, 3 L1 each: minutes
    python -m experiments.dictionary_robustness --quick    # toy only (no real model), tiny, seconds
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt
import pandas as pd
import torch
from tqdm.auto import tqdm

from experiments import study_command, torch_threads
from experiments.toy import (
    ToyConfig,
    ToySAEConfig,
    hidden_activations,
    measure_sae,
    represented_features,
    train_toy_model,
    train_toy_sae,
    variance_explained,
)
from lm_superposition.activations import stream_activations
from lm_superposition.data import load_texts, token_windows
from lm_superposition.metric import FeatureBudget
from lm_superposition.saes import SAETrainingConfig, train_sae

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "results" / "dictionary_robustness"
PLATEAU_TOLERANCE = 0.10
TRAIN_SEED_OFFSET, TEST_SEED_OFFSET = 1_000, 2_000
CONTEXT_SIZE = 128
QUICK = dict(
    toy_expansions=[0.5, 2.0, 8.0], toy_l1=[0.1], toy_steps=300, sae_steps=200, n_train=5000, n_test=2000, model="none"
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--quick", action="store_true", help=f"tiny run for tests: {QUICK}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    toy = parser.add_argument_group("toy model")
    toy.add_argument("--toy-expansions", type=float, nargs="+", default=[0.5, 1, 2, 4, 8, 16], help="d_sae / m")
    toy.add_argument("--toy-l1", type=float, nargs="+", default=[0.03, 0.1, 0.3])
    toy.add_argument("--n-features", type=int, default=40)
    toy.add_argument("--n-hidden", type=int, default=10)
    toy.add_argument("--sparsity", type=float, default=0.9)
    toy.add_argument("--toy-steps", type=int, default=4000)
    toy.add_argument("--sae-steps", type=int, default=2000)
    toy.add_argument("--n-train", type=int, default=100_000)
    toy.add_argument("--n-test", type=int, default=50_000)
    real = parser.add_argument_group("real model")
    real.add_argument("--model", default="google/gemma-3-270m-it", help='a load_model name, or "none" to skip')
    real.add_argument("--hook", default="blocks.6.hook_resid_post")
    real.add_argument("--real-expansions", type=float, nargs="+", default=[0.5, 1, 2, 4, 8], help="d_sae / d_in")
    real.add_argument(
        "--real-l1", type=float, nargs="+", default=[1.0, 3.0, 10.0], help="SAE-Lens standard SAE L1 coefficients"
    )
    real.add_argument("--tokens", type=int, default=20_000, help="offline-corpus tokens, a fifth of them held out")
    real.add_argument(
        "--training-tokens", type=int, default=48_000, help="SAE training budget (epochs over the kept tokens)"
    )
    real.add_argument("--lr", type=float, default=2e-3)
    real.add_argument("--batch-size-tokens", type=int, default=256)
    if "--quick" in argv:
        parser.set_defaults(**QUICK)
    args = parser.parse_args(argv)
    if any(e <= 0 for e in args.toy_expansions + args.real_expansions):
        parser.error("expansion factors must be positive")
    return args


# ---- plateau ---------------------------------------------------------------------------


def plateau_expansion(
    expansions: list[float], effective_features: list[float], tolerance: float = PLATEAU_TOLERANCE
) -> float | None:
    """Smallest expansion from which F stays within `tolerance` (relative) of its value at every larger one.

    None when only the widest expansion qualifies (nothing wider to compare with).
    """
    points = sorted(zip(expansions, effective_features))
    for index, (expansion, f) in enumerate(points[:-1]):
        if all(abs(later - f) <= tolerance * f for _, later in points[index + 1 :]):
            return expansion
    return None


def plateaus(table: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (setting, l1), group in table.groupby(["setting", "l1_coefficient"], sort=False):
        rows.append(
            {
                "setting": setting,
                "l1_coefficient": l1,
                "plateau_expansion": plateau_expansion(group["expansion"].tolist(), group["F"].tolist()),
                "F_at_widest": group.sort_values("expansion")["F"].iloc[-1],
            }
        )
    return pd.DataFrame(rows)


# ---- toy sweep -------------------------------------------------------------------------


def toy_sweep(args: argparse.Namespace) -> tuple[pd.DataFrame, int]:
    """Tied SAEs of every (expansion, L1) on one toy model's hidden layer; (rows, ground-truth feature count)."""
    config = ToyConfig(
        n_features=args.n_features, n_hidden=args.n_hidden, sparsity=args.sparsity, steps=args.toy_steps, seed=args.seed
    )
    model = train_toy_model(config)
    _, train_hidden = hidden_activations(model, args.n_train, args.seed + TRAIN_SEED_OFFSET)
    _, test_hidden = hidden_activations(model, args.n_test, args.seed + TEST_SEED_OFFSET)
    rows = []
    for l1 in args.toy_l1:
        for expansion in tqdm(args.toy_expansions, desc=f"toy SAEs, L1 {l1}", leave=False):
            d_sae = max(1, round(expansion * args.n_hidden))
            sae = train_toy_sae(
                train_hidden, ToySAEConfig(d_sae=d_sae, l1_coefficient=l1, steps=args.sae_steps, seed=args.seed)
            )
            with torch.no_grad():
                measured = measure_sae(sae, test_hidden)
            rows.append(_row("toy (tied SAE)", expansion, l1, args.n_hidden, measured))
    return pd.DataFrame(rows), represented_features(model)


def _row(setting: str, expansion: float, l1: float, width: int, measured: dict) -> dict:
    return {
        "setting": setting,
        "expansion": expansion,
        "l1_coefficient": l1,
        "N": width,
        "d_sae": measured["d_sae"],
        "F": measured["F"],
        "F_low": measured["F_low"],
        "F_high": measured["F_high"],
        "psi": measured["psi"],
        "variance_explained": measured["variance_explained"],
        "mean_l0": measured["mean_l0"],
        "alive_features": measured["alive_features"],
        "tokens": measured["tokens"],
    }


# ---- real-model sweep ------------------------------------------------------------------


def collect_activations(model, hook: str, n_tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations [tokens, d_in] of `hook` over ~n_tokens offline-corpus tokens (BOS/padding dropped) and their
    doc ids."""
    windows = token_windows(
        load_texts(None), model.tokenizer, context_size=CONTEXT_SIZE, token_budget=n_tokens, seed=seed
    )
    batches = list(stream_activations(model, windows, [hook], batch_size=8, progress=False))
    return torch.cat([batch.activations[hook] for batch in batches]), torch.cat([batch.doc_ids for batch in batches])


def split_by_document(doc_ids: torch.Tensor, held_out_share: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean masks (train, held out): the last `held_out_share` of documents are held out whole."""
    documents = doc_ids.unique()
    cut = documents[int(len(documents) * (1 - held_out_share))]
    held_out = doc_ids >= cut
    if held_out.all() or not held_out.any():
        raise ValueError(f"need at least 2 documents to hold some out, got {len(documents)}")
    return ~held_out, held_out


def real_sweep(
    activations: torch.Tensor, doc_ids: torch.Tensor, args: argparse.Namespace, setting: str
) -> pd.DataFrame:
    """SAE-Lens standard SAEs of every (expansion, L1) trained on the kept documents, F on the held-out ones."""
    train_mask, test_mask = split_by_document(doc_ids)
    train_acts, test_acts, test_docs = activations[train_mask], activations[test_mask], doc_ids[test_mask]
    width = activations.shape[1]
    rows = []
    for l1 in args.real_l1:
        for expansion in tqdm(args.real_expansions, desc=f"SAE-Lens SAEs, L1 {l1}", leave=False):
            config = SAETrainingConfig(
                architecture="standard",
                d_sae=max(1, round(expansion * width)),
                l1_coefficient=l1,
                lr=args.lr,
                batch_size_tokens=args.batch_size_tokens,
                training_tokens=args.training_tokens,
                seed=args.seed,
            )
            sae = train_sae(train_acts, config, hook_name=args.hook)
            with torch.no_grad():
                codes = sae.encode(test_acts)
                explained = variance_explained(test_acts, sae.decode(codes))
            budget = FeatureBudget(codes.shape[1], width)
            budget.update(codes, doc_ids=test_docs)
            rows.append(_row(setting, expansion, l1, width, {**budget.summary(), "variance_explained": explained}))
    return pd.DataFrame(rows)


# ---- outputs ---------------------------------------------------------------------------


def plot(table: pd.DataFrame, ground_truth: int, path: Path) -> None:
    settings = list(dict.fromkeys(table["setting"]))
    figure, all_axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 4.5), squeeze=False)
    for axes, setting in zip(all_axes[0], settings):
        for l1, group in table[table["setting"] == setting].groupby("l1_coefficient"):
            group = group.sort_values("expansion")
            axes.errorbar(
                group["expansion"],
                group["F"],
                yerr=[group["F"] - group["F_low"], group["F_high"] - group["F"]],
                marker="o",
                capsize=3,
                label=f"L1 {l1:g}",
            )
        if setting.startswith("toy"):
            axes.axhline(ground_truth, color="gray", linestyle="--", label=f"ground truth ({ground_truth} features)")
        axes.set_xscale("log", base=2)
        axes.set_xlabel("SAE expansion factor d_sae / N")
        axes.set_ylabel("effective features F (95% bootstrap interval)")
        axes.set_title(setting, fontsize=10)
        axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_readme(
    path: Path, args, table: pd.DataFrame, plateau_table: pd.DataFrame, ground_truth: int, command: str, seconds: float
) -> None:
    columns = [
        "setting",
        "l1_coefficient",
        "expansion",
        "d_sae",
        "F",
        "F_low",
        "F_high",
        "psi",
        "variance_explained",
        "mean_l0",
        "alive_features",
    ]
    real_note = (
        f"- real: `{args.hook}` of `{args.model}`, ~{args.tokens} offline-corpus tokens (BOS excluded), "
        "the last 20% of documents held out for F; SAE-Lens standard SAEs (`dictionaries.train_sae`, "
        f"inputs normalised) with {args.training_tokens} training tokens in batches of {args.batch_size_tokens}, "
        f"lr {args.lr}, expansions {args.real_expansions}, L1 {args.real_l1}."
        if args.model != "none"
        else "- real model: skipped (`--model none`)."
    )
    toy_note = (
        f"- toy: a toy model of superposition with n = {args.n_features} features, m = {args.n_hidden} hidden dims, "
        f"sparsity\n  {args.sparsity} (ground truth: {ground_truth} features stored, ||W_i|| > 0.5); "
        f"the paper's tied SAE, {args.sae_steps} steps,\n"
        f"  expansions {args.toy_expansions} x m, L1 {args.toy_l1}; F on {args.n_test} fresh samples."
    )
    text = f"""# Dictionary robustness: F against SAE width and L1 penalty

Made by (from the repository root, {seconds / 60:.1f} min on {args.threads} CPU thread(s)):

    {command}

Paper's direction: F (and psi) is robust to the SAE's hyperparameters once the dictionary is wide enough.

Plateau = the smallest expansion factor from which F stays within {PLATEAU_TOLERANCE:.0%} of its value at every
larger factor in the sweep (empty: no plateau inside the sweep):

```
{plateau_table.round(3).to_string(index=False)}
```

Setups:
{toy_note}
{real_note}

```
{table[columns].round(3).to_string(index=False)}
```

Files: `table.csv` (all columns), `f_vs_width.png`.
"""
    path.write_text(text)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    started = time.perf_counter()
    with torch_threads(args.threads):
        table, ground_truth = toy_sweep(args)
        if args.model != "none":
            from lm_superposition.models import load_model  # the real model only when asked

            model = load_model(args.model)
            activations, doc_ids = collect_activations(model, args.hook, args.tokens, args.seed)
            del model
            setting = f"{args.model.split('/')[-1]} {args.hook} (SAE-Lens standard SAE)"
            table = pd.concat([table, real_sweep(activations, doc_ids, args, setting)], ignore_index=True)
    plateau_table = plateaus(table)
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "table.csv", index=False)
    plot(table, ground_truth, args.out / "f_vs_width.png")
    command = study_command("experiments.dictionary_robustness", argv)
    write_readme(
        args.out / "README.md", args, table, plateau_table, ground_truth, command, time.perf_counter() - started
    )
    print(plateau_table.round(3).to_string(index=False))
    return table


if __name__ == "__main__":
    main()
