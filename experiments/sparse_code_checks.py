"""Klindt et al.'s sparse-coding checks ("From superposition to sparse codes", arXiv 2503.01824), measured.

Two checks on toys whose features are known:

1. Solution stability across SAE seeds. For each toy model of superposition (experiments.toy;
   m = 10 hidden dimensions, n features, sparsity S), SAEs of the validated default recipe
   (experiments.findings_stats, d_sae = 4m) from several seeds, all on the same activations. Each
   SAE's dictionary is its live latents' unit decoder directions, one per duplicate group (decoder
   cosine >= 0.9, as the measure merges them). Stability: the mean cosine of a one-to-one
   matching (Hungarian) between two seeds' dictionaries. Correctness: the same matching between an
   SAE's dictionary and the toy's true feature directions (columns of W with ||W_i|| > 0.5), as the
   mean over true features. A stable solution need not be the right one; the toy tells which.
2. Additivity of concepts. The positive-control MLP of experiments.algorithmic (which of 256
   sparse features are on, through hidden layers of 64) trained per seed; a concept is one input
   feature at value 1. For pairs of concepts (i, j): the cosine of f(e_i) + f(e_j) with f(e_i + e_j),
   f a hidden layer's activations minus f(0) (`lm_superposition.sparse_coding.linear_additivity`).
   Next to it the same check on pairs of whole random samples (several features each): the
   analogue of the analyzer's text-segment additivity, where each "segment" mixes many concepts.

Writes stability.csv, additivity.csv, sparse_code_checks.png/.svg and README.md to --out.

    python -m experiments.sparse_code_checks            # ~10 min on 1 CPU thread
    python -m experiments.sparse_code_checks --quick    # tiny, seconds
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt
import pandas as pd
import torch
from scipy.optimize import linear_sum_assignment

from experiments import study_command, torch_threads
from experiments.algorithmic import train_detection
from experiments.findings_stats import (
    gate_pass,
    gate_summary,
    mean_interval,
    measure_default_sae,
    save_figure,
    train_default_saes,
)
from experiments.tasks import ClassifierTraining, MLPClassifier
from experiments.toy import ToyConfig, hidden_activations, represented_features, sample_features, train_toy_model
from lm_superposition.codes import decoder_rows, duplicate_groups, encode
from lm_superposition.sparse_coding import linear_additivity

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "results" / "sparse_code_checks"
DUPLICATE_COSINE = 0.9
TRAIN_SEED_OFFSET, TEST_SEED_OFFSET = 1_000, 2_000
QUICK = dict(
    n_features=[20],
    sparsities=[0.0, 0.9],
    sae_seeds=[0, 1],
    toy_steps=200,
    sae_steps=60,
    n_train=4096,
    n_test=2048,
    mlp_seeds=[0],
    mlp_features=32,
    mlp_hidden=[16, 16],
    mlp_steps=100,
    concept_pairs=50,
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--quick", action="store_true", help=f"tiny run for tests: {QUICK}")
    stability = parser.add_argument_group("stability on toy models")
    stability.add_argument("--n-features", type=int, nargs="+", default=[20, 40])
    stability.add_argument("--sparsities", type=float, nargs="+", default=[0.0, 0.8, 0.9, 0.95, 0.99])
    stability.add_argument("--n-hidden", type=int, default=10)
    stability.add_argument("--sae-seeds", type=int, nargs="+", default=[0, 1, 2])
    stability.add_argument("--toy-steps", type=int, default=4000)
    stability.add_argument("--sae-steps", type=int, default=3000, help="steps of 1024 samples (toy validation's)")
    stability.add_argument("--n-train", type=int, default=100_000)
    stability.add_argument("--n-test", type=int, default=50_000)
    additivity = parser.add_argument_group("concept additivity")
    additivity.add_argument("--mlp-seeds", type=int, nargs="+", default=[0, 1, 2])
    additivity.add_argument("--mlp-features", type=int, default=256)
    additivity.add_argument("--mlp-sparsity", type=float, default=0.99)
    additivity.add_argument("--mlp-hidden", type=int, nargs="+", default=[64, 64])
    additivity.add_argument("--mlp-steps", type=int, default=3000)
    additivity.add_argument("--concept-pairs", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    if "--quick" in argv:
        parser.set_defaults(**QUICK)
    return parser.parse_args(argv)


# ---- 1. stability ---------------------------------------------------------------------


@torch.no_grad()
def dictionary(sae, activations: torch.Tensor) -> torch.Tensor:
    """Unit decoder directions of the latents that fire on `activations`, one per duplicate group."""
    directions = decoder_rows(sae).float()
    alive = (encode(sae, activations) > 0).any(0)
    directions = directions[alive]
    if len(directions) == 0:
        return directions
    groups = duplicate_groups(directions, DUPLICATE_COSINE)
    representatives = torch.unique(groups)
    return torch.nn.functional.normalize(directions[representatives], dim=1)


def matched_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine of the best one-to-one matching between the rows of a and b (min(len) pairs)."""
    if len(a) == 0 or len(b) == 0:
        return float("nan")
    cosines = (a @ b.T).numpy()
    rows, cols = linear_sum_assignment(cosines, maximize=True)
    return float(cosines[rows, cols].mean())


def stability_rows(args: argparse.Namespace) -> list[dict]:
    rows = []
    for n_features, sparsity in itertools.product(args.n_features, args.sparsities):
        toy = train_toy_model(
            ToyConfig(n_features=n_features, n_hidden=args.n_hidden, sparsity=sparsity, steps=args.toy_steps)
        )
        _, train_hidden = hidden_activations(toy, args.n_train, TRAIN_SEED_OFFSET)
        _, test_hidden = hidden_activations(toy, args.n_test, TEST_SEED_OFFSET)
        stored = toy.feature_norms > 0.5
        truth = torch.nn.functional.normalize(toy.W.detach()[:, stored].T, dim=1)
        saes = train_default_saes(train_hidden, 4 * args.n_hidden, args.sae_steps, args.sae_seeds)
        dictionaries = {seed: dictionary(sae, test_hidden) for seed, sae in saes.items()}
        measured = {seed: measure_default_sae(sae, test_hidden) for seed, sae in saes.items()}
        shared = {"n_features": n_features, "sparsity": sparsity, "ground_truth": represented_features(toy)}
        for seed_a, seed_b in itertools.combinations(args.sae_seeds, 2):
            rows.append(
                {
                    **shared,
                    "sae_seed_a": seed_a,
                    "sae_seed_b": seed_b,
                    "cross_seed_cosine": matched_cosine(dictionaries[seed_a], dictionaries[seed_b]),
                    "truth_cosine_a": matched_cosine(truth, dictionaries[seed_a]),
                    "truth_cosine_b": matched_cosine(truth, dictionaries[seed_b]),
                    "latents_a": len(dictionaries[seed_a]),
                    "latents_b": len(dictionaries[seed_b]),
                    "F_a": measured[seed_a]["F"],
                    "F_b": measured[seed_b]["F"],
                    "variance_explained": (
                        measured[seed_a]["variance_explained"] + measured[seed_b]["variance_explained"]
                    )
                    / 2,
                    "quality_a": measured[seed_a]["quality"],
                    "quality_b": measured[seed_b]["quality"],
                }
            )
        print(f"n {n_features} S {sparsity}: {rows[-1]}", flush=True)
    return rows


def sae_verdicts(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (config, SAE seed) with the gate's verdict on that SAE (the pair rows hold each SAE
    in several pairs)."""
    sides = [
        table[["n_features", "sparsity", f"sae_seed_{side}", f"quality_{side}"]].set_axis(
            ["n_features", "sparsity", "sae_seed", "quality"], axis=1
        )
        for side in ("a", "b")
    ]
    keys = ["n_features", "sparsity", "sae_seed"]
    return pd.concat(sides).drop_duplicates(keys).sort_values(keys).reset_index(drop=True)


def stability_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per config: the means over seed pairs, and `gate_pass` (SAEs whose verdict is "ok" / SAEs)."""
    table = table.assign(truth_cosine=(table["truth_cosine_a"] + table["truth_cosine_b"]) / 2)
    summary = (
        table.groupby(["n_features", "sparsity"])
        .agg(
            ground_truth=("ground_truth", "first"),
            cross_seed_cosine=("cross_seed_cosine", "mean"),
            truth_cosine=("truth_cosine", "mean"),
            latents=("latents_a", "mean"),
            F=("F_a", "mean"),
            variance_explained=("variance_explained", "mean"),
        )
        .reset_index()
    )
    verdicts = sae_verdicts(table).groupby(["n_features", "sparsity"])["quality"]
    passed = verdicts.agg(gate_pass).rename("gate_pass")
    return summary.merge(passed.reset_index(), on=["n_features", "sparsity"])


# ---- 2. concept additivity --------------------------------------------------------------


def additivity_rows(args: argparse.Namespace) -> list[dict]:
    rows = []
    n = args.mlp_features
    for seed in args.mlp_seeds:
        generator = torch.Generator().manual_seed(TRAIN_SEED_OFFSET + seed)
        train = sample_features(20_000, n, args.mlp_sparsity, generator)
        model = MLPClassifier(n, args.mlp_hidden, n, seed=seed)
        train_detection(model, train, ClassifierTraining(steps=args.mlp_steps, lr=3e-3, seed=seed))
        pairs = torch.randint(n, (args.concept_pairs, 2), generator=generator)
        pairs = pairs[pairs[:, 0] != pairs[:, 1]]
        concept_a = torch.nn.functional.one_hot(pairs[:, 0], n).float()
        concept_b = torch.nn.functional.one_hot(pairs[:, 1], n).float()
        sample_a = sample_features(args.concept_pairs, n, args.mlp_sparsity, generator)
        sample_b = sample_features(args.concept_pairs, n, args.mlp_sparsity, generator)
        for layer in range(len(args.mlp_hidden)):
            with torch.no_grad():
                origin = model.hidden_activations(torch.zeros(1, n))[layer]

            def represent(inputs, model=model, layer=layer, origin=origin):
                with torch.no_grad():
                    return model.hidden_activations(inputs)[layer] - origin

            concepts = linear_additivity(represent, concept_a, concept_b)
            samples = linear_additivity(represent, sample_a, sample_b)
            rows.append(
                {
                    "seed": seed,
                    "layer": layer,
                    "concept_additivity": concepts.mean,
                    "concept_additivity_p10": float(concepts.cosines.nan_to_num(0).quantile(0.1)),
                    "sample_additivity": samples.mean,
                    "sample_additivity_p10": float(samples.cosines.nan_to_num(0).quantile(0.1)),
                    "pairs": len(pairs),
                }
            )
    return rows


def additivity_summary(table: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for layer, group in table.groupby("layer"):
        row = {"layer": layer, "seeds": len(group)}
        for column in ("concept_additivity", "sample_additivity"):
            mean, low, high = mean_interval(group[column])
            row |= {column: mean, f"{column}_low95": low, f"{column}_high95": high}
        rows.append(row)
    return pd.DataFrame(rows)


# ---- report ---------------------------------------------------------------------------


def plot(stability: pd.DataFrame, additivity: pd.DataFrame, path: Path) -> None:
    figure, (ax_s, ax_a) = plt.subplots(1, 2, figsize=(10.5, 4.2))
    for n_features, group in stability.groupby("n_features"):
        ax_s.plot(group["sparsity"], group["cross_seed_cosine"], marker="o", label=f"seed vs seed, n = {n_features}")
        ax_s.plot(
            group["sparsity"],
            group["truth_cosine"],
            marker="s",
            linestyle="--",
            label=f"SAE vs truth, n = {n_features}",
        )
    ax_s.set_xlabel("toy feature sparsity S")
    ax_s.set_ylabel("mean matched cosine")
    ax_s.set_title("Stability across SAE seeds vs correctness")
    ax_s.legend(fontsize=7)
    x = additivity["layer"].to_numpy()
    for offset, column in ((-0.15, "concept_additivity"), (0.15, "sample_additivity")):
        errors = [
            (additivity[column] - additivity[f"{column}_low95"]).fillna(0),
            (additivity[f"{column}_high95"] - additivity[column]).fillna(0),
        ]
        ax_a.bar(x + offset, additivity[column], width=0.3, yerr=errors, capsize=3, label=column.replace("_", " "))
    ax_a.set_xticks(x)
    ax_a.set_xlabel("hidden layer of the sparse-feature MLP")
    ax_a.set_ylabel("cosine of f(A) + f(B) with f(A + B)")
    ax_a.set_ylim(0, 1.05)
    ax_a.legend(fontsize=8)
    ax_a.set_title("Additivity: concepts vs whole samples")
    figure.tight_layout()
    save_figure(figure, path)
    plt.close(figure)


def write_readme(path: Path, args, stability_table, stability, additivity, command: str, seconds: float) -> None:
    load = os.getloadavg()
    verdicts = sae_verdicts(stability_table)
    identifiable = stability[stability["sparsity"] >= 0.8]
    dense = stability[stability["sparsity"] < 0.8]
    correlation = stability["cross_seed_cosine"].corr(stability["truth_cosine"])
    text = f"""# Klindt et al.'s sparse-coding checks, measured on toys with known features

Made by (from the repository root, {seconds / 60:.1f} min on {args.threads} CPU thread(s); load average
{load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f} at the end, shared machine):

    {command}

## 1. Solution stability across SAE seeds (toy models of superposition)

Mean matched cosine between two SAE seeds' dictionaries (`cross_seed_cosine`) and between an SAE's
dictionary and the toy's true feature directions (`truth_cosine`), per config (mean over the
{len(args.sae_seeds) * (len(args.sae_seeds) - 1) // 2} seed pairs); `F` is the first seed's, and `gate_pass` how many of
the config's SAEs pass the quality gate (`gate.QualityGate.verdict`; CE loss recovered does not apply
to a toy):

```
{stability.round(3).to_string(index=False)}
```

Identifiable configs (S >= 0.8): cross-seed cosine {identifiable["cross_seed_cosine"].mean():.3f}
(range {identifiable["cross_seed_cosine"].min():.3f}-{identifiable["cross_seed_cosine"].max():.3f}), truth cosine
{identifiable["truth_cosine"].mean():.3f}
({identifiable["truth_cosine"].min():.3f}-{identifiable["truth_cosine"].max():.3f}).
Dense configs (S < 0.8): cross-seed {dense["cross_seed_cosine"].mean():.3f}, truth {dense["truth_cosine"].mean():.3f}.
Pearson r between stability and correctness over the {len(stability)} configs: {correlation:.3f}.

Quality gate: {gate_summary(verdicts["quality"])}. Every SAE's verdict is in
`stability.csv` (`quality_a`, `quality_b`); per config and SAE seed:

```
{verdicts.to_string(index=False)}
```

## 2. Additivity of concepts (sparse-feature MLP) next to additivity of whole samples

Mean over {len(args.mlp_seeds)} model seeds with the 95% t interval; per seed the mean cosine over
{args.concept_pairs} pairs (pairs of one feature each for concepts; pairs of random samples, ~
{args.mlp_features * (1 - args.mlp_sparsity):.1f} features on each, for samples):

```
{additivity.round(3).to_string(index=False)}
```

Setup. Stability: toy models m = {args.n_hidden}, n in {args.n_features}, S in {args.sparsities},
{args.toy_steps} steps; SAEs of the default recipe (`SAETrainingConfig()`), d_sae = {4 * args.n_hidden},
{args.sae_steps} steps of 1024 of {args.n_train:,} activations, seeds {args.sae_seeds}; live latents judged on
{args.n_test:,} fresh samples; duplicates (decoder cosine >= {DUPLICATE_COSINE}) count once; matching by
`scipy.optimize.linear_sum_assignment` on cosines. True directions: columns of the toy's W with norm > 0.5.
Additivity: the positive-control MLP of experiments.algorithmic (hidden {args.mlp_hidden}, {args.mlp_features}
features, sparsity {args.mlp_sparsity}, {args.mlp_steps} steps), representations centred at f(0).

The analyzer's own additivity column (`run.additivity_pairs`) concatenates two text segments; on a
language model a segment mixes many concepts, which is what the sample pairs stand in for here.

Files: `stability.csv` (one row per config and seed pair), `additivity.csv` (one row per seed and layer),
`sparse_code_checks.png` / `.svg`.
"""
    path.write_text(text)


def main(argv: list[str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    started = time.perf_counter()
    with torch_threads(args.threads):
        stability_table = pd.DataFrame(stability_rows(args))
        additivity_table = pd.DataFrame(additivity_rows(args))
    stability = stability_summary(stability_table)
    additivity = additivity_summary(additivity_table)
    args.out.mkdir(parents=True, exist_ok=True)
    stability_table.to_csv(args.out / "stability.csv", index=False)
    additivity_table.to_csv(args.out / "additivity.csv", index=False)
    plot(stability, additivity, args.out / "sparse_code_checks")
    command = study_command("experiments.sparse_code_checks", argv)
    write_readme(
        args.out / "README.md", args, stability_table, stability, additivity, command, time.perf_counter() - started
    )
    print(stability.round(3).to_string(index=False))
    print(additivity.round(3).to_string(index=False))
    return stability_table, additivity_table


if __name__ == "__main__":
    main()
