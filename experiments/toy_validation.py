"""Does F = exp(H) count the features a network stores? The SAE recipes users run, on toy models.

For every (feature sparsity S, number of features n) of the sweep: train a toy model of
superposition (experiments.toy), count the features it represents (the ground truth), then train
SAEs on its hidden layer with each recipe and measure F exactly as a layer is measured
(`lm_superposition.analyze.sae_budget`: decoder-norm units, duplicate latents grouped) on fresh
samples. The recipes are the project's own `[saes.train]` path (`saes.train_saes`, SAE-Lens's
trainers): the default recipe and TopK at several k, each with 3 SAE seeds from one stream; and
two references, the paper's exact tied SAE and the unit-norm tied SAE of experiments.toy.

Identifiable configs are those with S >= 0.8 (12 of 18): there the toy packs more features than
dimensions sparsely enough for a dictionary to recover them; at S = 0 and 0.5 it stores about m
dense features that no sparse code separates. Writes to --out: table.csv (one row per config,
recipe and SAE seed), scatter.png, README.md (r and mean |F - ground truth| per recipe).

    python -m experiments.toy_validation                             # every recipe, ~1 h on 2 threads
    python -m experiments.toy_validation --recipes default --seeds 0  # one recipe, one seed
    python -m experiments.toy_validation --quick                      # tiny, for the tests
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt
import pandas as pd
import torch

from experiments import study_command, torch_threads
from experiments.toy import (
    ToyConfig,
    ToySAEConfig,
    hidden_activations,
    oracle_effective_features,
    represented_features,
    train_paper_tied_sae,
    train_tied_sae,
    train_toy_model,
)
from lm_superposition.analyze import sae_budget
from lm_superposition.config import SAETrainingConfig
from lm_superposition.saes import train_saes, variance_explained

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "results" / "toy_validation"
# The SAEs train on, and F is measured on, samples drawn from seeds offset from the toy model's own.
TRAIN_SEED_OFFSET, TEST_SEED_OFFSET = 1_000, 2_000
IDENTIFIABLE_SPARSITY = 0.8
TARGET_R, TARGET_MAE = 0.9, 2.0  # what the default recipe must reach on the identifiable configs
PROJECT_RECIPES = {
    "default": {},  # SAETrainingConfig()'s own settings: what [saes.train] trains unless told otherwise
    "topk k=2": {"architecture": "topk", "k": 2},
    "topk k=4": {"architecture": "topk", "k": 4},
    "topk k=8": {"architecture": "topk", "k": 8},
}
REFERENCE_RECIPES = {"paper's tied SAE": train_paper_tied_sae, "unit-norm tied SAE": train_tied_sae}
RECIPES = [*PROJECT_RECIPES, *REFERENCE_RECIPES]
QUICK = dict(n_features=[20], sparsities=[0.0, 0.9], seeds=[0], toy_steps=300, sae_steps=60, n_train=4096, n_test=2048)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.add_argument("--quick", action="store_true", help=f"tiny sweep for tests: {QUICK}")
    parser.add_argument("--recipes", nargs="+", default=RECIPES, choices=RECIPES)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="SAE seeds per recipe")
    parser.add_argument("--n-features", type=int, nargs="+", default=[20, 40, 80])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.0, 0.5, 0.8, 0.9, 0.95, 0.99])
    parser.add_argument("--n-hidden", type=int, default=10, help="hidden width m (= N for psi)")
    parser.add_argument("--d-sae", type=int, default=40, help="SAE latents (4 x m)")
    parser.add_argument("--toy-steps", type=int, default=4000)
    parser.add_argument("--sae-steps", type=int, default=3000, help="steps of 1024 samples for every recipe")
    parser.add_argument("--tied-l1", type=float, default=0.1, help="L1 coefficient of the two tied references")
    parser.add_argument("--n-train", type=int, default=100_000, help="hidden activations the SAEs train on")
    parser.add_argument("--n-test", type=int, default=50_000, help="fresh samples F is measured on")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--duplicate-cosines",
        type=float,
        nargs="+",
        default=None,
        help="also measure every SAE with these duplicate thresholds (1.0: no merging): the sensitivity table",
    )
    parser.add_argument(
        "--combine",
        type=Path,
        nargs="+",
        default=None,
        help="instead of training: pool the table.csv of these folders (runs of other recipes) into --out",
    )
    if "--quick" in argv:
        parser.set_defaults(**QUICK)
    return parser.parse_args(argv)


def train_recipe(recipe: str, hidden: torch.Tensor, args: argparse.Namespace) -> dict[int, object]:
    """{SAE seed: SAE} for one recipe on one toy's hidden activations."""
    if recipe in REFERENCE_RECIPES:
        lr = 1e-3 if recipe == "paper's tied SAE" else 3e-3
        return {
            seed: REFERENCE_RECIPES[recipe](
                hidden,
                ToySAEConfig(
                    kind="tied", d_sae=args.d_sae, l1_coefficient=args.tied_l1, lr=lr, steps=args.sae_steps, seed=seed
                ),
            )
            for seed in args.seeds
        }
    config = SAETrainingConfig(
        d_sae=args.d_sae, batch_size_tokens=1024, training_tokens=args.sae_steps * 1024, **PROJECT_RECIPES[recipe]
    )
    generator = torch.Generator().manual_seed(args.seeds[0])
    epochs = ({"toy": hidden[torch.randperm(len(hidden), generator=generator)]} for _ in itertools.count())
    return train_saes(epochs, {"toy": hidden.shape[1]}, config, progress=False, sae_seeds=args.seeds)["toy"]


def measure_config(toy_config: ToyConfig, args: argparse.Namespace) -> list[dict]:
    model = train_toy_model(toy_config)
    _, train_hidden = hidden_activations(model, args.n_train, toy_config.seed + TRAIN_SEED_OFFSET)
    test_features, test_hidden = hidden_activations(model, args.n_test, toy_config.seed + TEST_SEED_OFFSET)
    shared = {
        "n_features": toy_config.n_features,
        "sparsity": toy_config.sparsity,
        "identifiable": toy_config.sparsity >= IDENTIFIABLE_SPARSITY,
        "ground_truth": represented_features(model, "norm"),
        "oracle_F": oracle_effective_features(model, test_features),
    }
    rows = []
    for recipe in args.recipes:
        started = time.perf_counter()
        saes = train_recipe(recipe, train_hidden, args)
        seconds = (time.perf_counter() - started) / len(saes)
        for seed, sae in saes.items():
            with torch.no_grad():
                budget = sae_budget(sae, test_hidden)
                summary = budget.summary()
                by_threshold = {
                    f"F at cosine {tau}": sae_budget(
                        sae, test_hidden, merge_duplicates=tau < 1, duplicate_cosine=min(tau, 1)
                    ).effective_features()
                    for tau in args.duplicate_cosines or []
                }
                explained = variance_explained(test_hidden, sae.decode(sae.encode(test_hidden)))
            rows.append(
                {
                    **shared,
                    "recipe": recipe,
                    "sae_seed": seed,
                    "F": summary["F"],
                    "F_low": summary["F_low"],
                    "F_high": summary["F_high"],
                    "variance_explained": explained,
                    "mean_l0": summary["mean_l0"],
                    "merged_latents": summary["merged_latents"],
                    "seconds_per_sae": round(seconds, 1),
                    **by_threshold,
                }
            )
    return rows


def run_sweep(args: argparse.Namespace) -> pd.DataFrame:
    rows = []
    for n_features in args.n_features:
        for sparsity in args.sparsities:
            toy = ToyConfig(n_features=n_features, n_hidden=args.n_hidden, sparsity=sparsity, steps=args.toy_steps)
            rows += measure_config(toy, args)
            print(f"n={n_features} S={sparsity}: done", file=sys.stderr, flush=True)
    return pd.DataFrame(rows)


def agreement(table: pd.DataFrame) -> pd.DataFrame:
    """Per recipe: Pearson r(F, ground truth) and mean |F - ground truth| over every config x seed,
    over the identifiable ones, and over the rows that pass variance explained >= 0.9."""
    rows = []
    for recipe, group in table.groupby("recipe", sort=False):
        row = {"recipe": recipe, "SAE seeds": group["sae_seed"].nunique()}
        subsets = {
            "all": group,
            "identifiable": group[group["identifiable"]],
            "VE >= 0.9": group[group["variance_explained"] >= 0.9],
        }
        for name, subset in subsets.items():
            row[f"r {name}"] = subset["F"].corr(subset["ground_truth"]) if len(subset) > 2 else math.nan
            row[f"MAE {name}"] = (subset["F"] - subset["ground_truth"]).abs().mean()
        row["rows VE >= 0.9"] = f"{len(subsets['VE >= 0.9'])} of {len(group)}"
        row["mean VE"] = group["variance_explained"].mean()
        row["mean L0"] = group["mean_l0"].mean()
        rows.append(row)
    return pd.DataFrame(rows)


def threshold_sensitivity(table: pd.DataFrame) -> pd.DataFrame:
    """`agreement` with F measured at each duplicate threshold (the --duplicate-cosines columns)."""
    columns = [c for c in table.columns if c.startswith("F at cosine ")]
    return pd.concat(
        [agreement(table.assign(F=table[c], recipe=table["recipe"] + ", " + c.removeprefix("F at "))) for c in columns],
        ignore_index=True,
    )


def plot_scatter(table: pd.DataFrame, path: Path) -> None:
    recipes = list(dict.fromkeys(table["recipe"]))
    figure, axes = plt.subplots(
        1, len(recipes), figsize=(3.2 * len(recipes), 3.4), sharex=True, sharey=True, squeeze=False
    )
    top = max(table["ground_truth"].max(), table["F"].max()) * 1.05
    for ax, recipe in zip(axes[0], recipes):
        rows = table[table["recipe"] == recipe]
        for identifiable, marker in ((True, "o"), (False, "x")):
            part = rows[rows["identifiable"] == identifiable]
            ax.scatter(
                part["ground_truth"],
                part["F"],
                marker=marker,
                s=14,
                alpha=0.7,
                label="S >= 0.8" if identifiable else "S < 0.8",
            )
        ax.plot([0, top], [0, top], color="grey", ls="--", lw=0.8)
        ax.set_title(recipe, fontsize=9)
        ax.set_xlabel("ground truth (||W_i|| > 0.5)")
    axes[0][0].set_ylabel("F through the SAE")
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_readme(
    path: Path, args: argparse.Namespace, table: pd.DataFrame, stats: pd.DataFrame, command: str, made_by: str
) -> None:
    default = stats.set_index("recipe").loc["default"] if "default" in set(stats["recipe"]) else None
    verdict = ""
    if default is not None:
        met = default["r identifiable"] >= TARGET_R and default["MAE identifiable"] <= TARGET_MAE
        verdict = (
            f"The default recipe {'meets' if met else 'does NOT meet'} the target on the identifiable configs "
            f"(r >= {TARGET_R}, MAE <= {TARGET_MAE}): r = {default['r identifiable']:.3f}, "
            f"MAE = {default['MAE identifiable']:.2f}."
        )
    by_sparsity = table.assign(error=table["F"] - table["ground_truth"]).pivot_table(
        index="sparsity", columns="recipe", values="error", aggfunc="mean", sort=False
    )
    path.write_text(f"""# Toy validation: does F count the features a toy model stores, through the recipes users run?

{made_by}

    {command}

{verdict}

```
{stats.round(3).to_string(index=False)}
```

r and MAE (mean |F - ground truth|) are pooled over configs x SAE seeds; "identifiable": feature
sparsity S >= {IDENTIFIABLE_SPARSITY} (12 of 18 configs); "VE >= 0.9": the rows the quality gate's
variance-explained test passes (the gate's F / d_sae test is left out here: with d_sae = {args.d_sae}
and up to 36 stored features every identifiable toy would fail it).

Setup: toy models of superposition (Elhage et al. 2022, experiments/toy.py), m = {args.n_hidden} hidden
dimensions, n in {args.n_features} features of importance 0.9^i, S in {args.sparsities}, {args.toy_steps}
Adam steps each. Ground truth: features with embedding norm ||W_i|| > 0.5. Every SAE has d_sae =
{args.d_sae} latents and trains {args.sae_steps} steps of 1024 samples of {args.n_train:,} hidden activations;
F is measured on {args.n_test:,} fresh samples through `lm_superposition.analyze.sae_budget`
(|z_i| * ||W_dec,i||, latents with decoder cosine >= 0.9 grouped), the same code a layer goes through.

- `default`: `SAETrainingConfig()` as `[saes.train]` uses it (standard ReLU SAE, inputs scaled to
  mean norm sqrt(d_in), L1 1 on |z| * ||W_dec||, lr 2e-4 * sqrt(16384 / d_sae), b_dec from the data
  mean), through `lm_superposition.saes.train_saes` (SAE-Lens's trainer);
- `topk k=K`: the same with `architecture = "topk"`;
- `paper's tied SAE`: the paper code's tied SAE (Xavier init, no decoder normalisation, MSE + L1
  {args.tied_l1} on mean |z|, lr 1e-3); `unit-norm tied SAE`: experiments.toy.TiedSAE (unit-norm decoder rows,
  summed loss, L1 {args.tied_l1}, lr 3e-3). References only: the project does not train them.

Mean F - ground truth by sparsity:

```
{by_sparsity.round(2).to_string()}
```

On dense features (S < 0.8) an untied SAE with a learned decoder bias centres the data and
covers it with oblique latents, so F exceeds the few dense features stored; those rows explain
less variance, which is what the quality gate reads. Files: `table.csv`, `scatter.png`.
""")


def main(argv: list[str] | None = None) -> pd.DataFrame:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    started = time.perf_counter()
    made_by = f"Made by (from the repository root, {{minutes:.1f}} min on {args.threads} CPU thread(s)):"
    if args.combine:  # the parts' own lines (timing, command), then this command
        table = pd.concat([pd.read_csv(folder / "table.csv") for folder in args.combine], ignore_index=True)
        lines = [(folder / "README.md").read_text().split("\n") for folder in args.combine]
        made_by = (
            "Made by, from the repository root, each part run as its own process:\n\n"
            + "\n\n".join(f"{part[2]}\n\n{part[4]}" for part in lines)
            + "\n\nand pooled by:"
        )
    else:
        with torch_threads(args.threads):
            table = run_sweep(args)
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "table.csv", index=False)
    stats = agreement(table)
    if args.duplicate_cosines:
        stats = pd.concat([stats, threshold_sensitivity(table)], ignore_index=True)
    plot_scatter(table, args.out / "scatter.png")
    command = study_command("experiments.toy_validation", argv)
    write_readme(
        args.out / "README.md",
        args,
        table,
        stats,
        command,
        made_by.format(minutes=(time.perf_counter() - started) / 60),
    )
    print(stats.round(3).to_string(index=False))
    return table


if __name__ == "__main__":
    main()
