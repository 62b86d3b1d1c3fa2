"""Does dropout lower the number of effective features? MLPs on multi-task sparse parity.

For every dropout rate and seed: train a two-hidden-layer ReLU MLP (lm_superposition.tasks) on
multi-task sparse parity (one-hot task prefix + random bits, label = parity of the task's k
bits), then measure F of each hidden layer through the paper's tied SAE (the SAE that tracked
ground truth on toy models, results/toy_validation) trained on the layer's activations over
training inputs and measured on fresh inputs, dropout off. Also F in the neuron basis (no SAE).
Writes table.csv, f_vs_dropout.png and README.md to --out.

    python -m experiments.dropout            # 5 rates x 3 seeds, a few minutes on 1 CPU thread
    python -m experiments.dropout --quick    # 2 rates x 1 seed, tiny networks, seconds
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
from experiments.tasks import (
    ClassifierTraining,
    MLPClassifier,
    SparseParityTask,
    accuracy,
    neuron_basis_measure,
    tied_sae_measure,
    train_classifier,
)
from experiments.toy import ToySAEConfig

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "results" / "dropout"
TRAIN_SEED_OFFSET, TEST_SEED_OFFSET = 1_000, 2_000
QUICK = dict(dropouts=[0.0, 0.5], seeds=[0], hidden=[16, 16], steps=200, sae_steps=100, n_train=2000, n_test=1000)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--quick", action="store_true", help=f"tiny run for tests: {QUICK}")
    parser.add_argument("--dropouts", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3, 0.5])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="model init and minibatch seeds")
    parser.add_argument("--n-tasks", type=int, default=8)
    parser.add_argument("--n-bits", type=int, default=16)
    parser.add_argument("--k", type=int, default=3, help="bits each task's parity reads")
    parser.add_argument("--hidden", type=int, nargs="+", default=[64, 64], help="hidden layer widths")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--n-train", type=int, default=20_000)
    parser.add_argument("--n-test", type=int, default=10_000)
    parser.add_argument("--sae-expansion", type=int, default=4, help="tied SAE latents = expansion x layer width")
    parser.add_argument(
        "--l1", type=float, default=0.3, help="tied SAE L1 coefficient (activations scaled to unit RMS)"
    )
    parser.add_argument("--sae-steps", type=int, default=1500)
    parser.add_argument("--threads", type=int, default=1)
    if "--quick" in argv:
        parser.set_defaults(**QUICK)
    args = parser.parse_args(argv)
    if any(not 0 <= d < 1 for d in args.dropouts):
        parser.error(f"--dropouts must lie in [0, 1), got {args.dropouts}")
    return args


def measure_model(args: argparse.Namespace, task: SparseParityTask, dropout: float, seed: int) -> list[dict]:
    train_inputs, train_labels, _ = task.sample(args.n_train, seed=TRAIN_SEED_OFFSET + seed)
    test_inputs, test_labels, _ = task.sample(args.n_test, seed=TEST_SEED_OFFSET + seed)
    model = MLPClassifier(task.input_width, args.hidden, 2, dropout=dropout, seed=seed)
    train_classifier(model, train_inputs, train_labels, ClassifierTraining(steps=args.steps, lr=args.lr, seed=seed))
    test_accuracy = accuracy(model, test_inputs, test_labels)
    with torch.no_grad():
        train_layers, test_layers = model.hidden_activations(train_inputs), model.hidden_activations(test_inputs)
    rows = []
    for layer, (train_acts, test_acts) in enumerate(zip(train_layers, test_layers)):
        width = train_acts.shape[1]
        sae_config = ToySAEConfig(
            d_sae=args.sae_expansion * width, l1_coefficient=args.l1, steps=args.sae_steps, seed=seed
        )
        measured = tied_sae_measure(train_acts, test_acts, sae_config)
        rows.append(
            {
                "dropout": dropout,
                "seed": seed,
                "layer": layer,
                "N": width,
                "test_accuracy": test_accuracy,
                "F": measured["F"],
                "F_low": measured["F_low"],
                "F_high": measured["F_high"],
                "psi": measured["psi"],
                "variance_explained": measured["variance_explained"],
                "mean_l0": measured["mean_l0"],
                "alive_latents": measured["alive_features"],
                "d_sae": sae_config.d_sae,
                "neuron_F": neuron_basis_measure(test_acts)["F"],
                "dead_neurons": int((test_acts.abs().sum(0) == 0).sum()),
                "test_samples": measured["tokens"],
            }
        )
    return rows


def summarise(table: pd.DataFrame) -> pd.DataFrame:
    """Per layer and dropout: mean and std of F over seeds, and the neuron-basis F and accuracy."""
    return (
        table.groupby(["layer", "dropout"])
        .agg(
            F_mean=("F", "mean"),
            F_std=("F", "std"),
            neuron_F_mean=("neuron_F", "mean"),
            variance_explained=("variance_explained", "mean"),
            test_accuracy=("test_accuracy", "mean"),
        )
        .reset_index()
    )


def trend(table: pd.DataFrame, column: str = "F") -> pd.DataFrame:
    """Per layer: Spearman rank correlation of `column` with dropout (over all seeds) and F(max)/F(0)."""
    rows = []
    for layer, group in table.groupby("layer"):
        means = group.groupby("dropout")[column].mean()
        rows.append(
            {
                "layer": layer,
                "spearman_with_dropout": group[column].corr(group["dropout"], method="spearman"),
                "ratio_highest_to_no_dropout": means.iloc[-1] / means.iloc[0],
            }
        )
    return pd.DataFrame(rows)


def plot(summary: pd.DataFrame, path: Path) -> None:
    figure, axes = plt.subplots(figsize=(6, 4.5))
    for layer, group in summary.groupby("layer"):
        axes.errorbar(
            group["dropout"],
            group["F_mean"],
            yerr=group["F_std"].fillna(0),
            marker="o",
            capsize=3,
            label=f"hidden layer {layer}: F (tied SAE)",
        )
        axes.plot(
            group["dropout"],
            group["neuron_F_mean"],
            linestyle="--",
            marker="x",
            label=f"hidden layer {layer}: F (neuron basis)",
        )
    axes.set_xlabel("dropout rate")
    axes.set_ylabel("effective features F (mean ± std over seeds)")
    axes.set_title("Multi-task sparse parity MLPs: F against dropout")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_readme(path: Path, args, table, summary, trends, neuron_trends, command: str, seconds: float) -> None:
    n_seeds, n_rates = len(args.seeds), len(args.dropouts)
    text = f"""# Dropout: F of sparse-parity MLPs against the dropout rate

Made by (from the repository root, {seconds / 60:.1f} min on {args.threads} CPU thread(s)):

    {command}

Paper's direction: dropout lowers the number of effective features F.

Trend of the tied-SAE F with dropout, per hidden layer (Spearman over all {n_seeds} seeds x {n_rates} rates;
ratio = mean F at dropout {max(args.dropouts)} / mean F at dropout {min(args.dropouts)}):

```
{trends.round(3).to_string(index=False)}
```

Same in the neuron basis (F of |activation| over the {args.hidden} neurons, no SAE):

```
{neuron_trends.round(3).to_string(index=False)}
```

Setup: multi-task sparse parity with {args.n_tasks} tasks over {args.n_bits} bits, k = {args.k}
(`SparseParityTask`, task subsets from seed 0, the same task for every model); MLP hidden widths
{args.hidden}, ReLU, dropout after each hidden layer; AdamW lr {args.lr}, {args.steps} steps of 256 from
{args.n_train} training samples; seeds {args.seeds} set the init and the minibatches. Tied SAE
(`lm_superposition.toy.TiedSAE`, the SAE that validated on toy models) with {args.sae_expansion} x width
latents, L1 {args.l1}, {args.sae_steps} steps, trained on the layer's activations over the training
inputs (scaled to unit RMS per dimension) and measured with `FeatureBudget` on {args.n_test} fresh
inputs, dropout off (eval mode).

Means over seeds:

```
{summary.round(3).to_string(index=False)}
```

Files: `table.csv` (one row per model and layer, with bootstrap intervals), `f_vs_dropout.png`.
"""
    path.write_text(text)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    started = time.perf_counter()
    task = SparseParityTask(n_tasks=args.n_tasks, n_bits=args.n_bits, k=args.k, seed=0)
    rows = []
    with torch_threads(args.threads):
        for dropout in tqdm(args.dropouts, desc="dropout rates"):
            for seed in args.seeds:
                rows += measure_model(args, task, dropout, seed)
    table = pd.DataFrame(rows)
    summary, trends, neuron_trends = summarise(table), trend(table), trend(table, "neuron_F")
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "table.csv", index=False)
    plot(summary, args.out / "f_vs_dropout.png")
    command = study_command("experiments.dropout", argv)
    write_readme(
        args.out / "README.md", args, table, summary, trends, neuron_trends, command, time.perf_counter() - started
    )
    print(summary.round(3).to_string(index=False))
    print(trends.round(3).to_string(index=False))
    return table


if __name__ == "__main__":
    main()
