"""Do networks on algorithmic tasks stay at psi <= 1? psi per layer of MLPs on modular addition and sparse parity.

Algorithmic inputs are dense (every bit or every one-hot slot is always in play), so the paper
expects no compression beyond the layer's width: psi = F / N <= 1. For each task and seed:
train a two-hidden-layer ReLU MLP (lm_superposition.tasks), then measure F of each hidden layer
through the paper's tied SAE (4 x N latents, the SAE that validated on toy models) and in the
neuron basis. Writes table.csv, psi_per_layer.png and README.md to --out.

    python -m experiments.algorithmic            # 3 tasks x 3 seeds, a few minutes on 1 CPU thread
    python -m experiments.algorithmic --quick    # 1 seed, tiny networks, seconds
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
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
    modular_addition_pairs,
    neuron_basis_measure,
    one_hot_pairs,
    tied_sae_measure,
    train_classifier,
    train_test_split,
)
from experiments.toy import ToySAEConfig

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "results" / "algorithmic"
TASKS = ("modular_addition", "sparse_parity", "multitask_sparse_parity")
TRAIN_SEED_OFFSET, TEST_SEED_OFFSET = 1_000, 2_000
QUICK = dict(seeds=[0], hidden=[16, 16], steps=200, sae_steps=100, p=11, n_train=2000, n_test=1000)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--quick", action="store_true", help=f"tiny run for tests: {QUICK}")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--hidden", type=int, nargs="+", default=[64, 64], help="hidden layer widths")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--p", type=int, default=53, help="modulus of modular addition")
    parser.add_argument("--train-fraction", type=float, default=0.6, help="share of the p^2 sums trained on")
    parser.add_argument(
        "--weight-decay",
        type=float,
        default=1.0,
        help="AdamW weight decay for modular addition (it generalises only with it)",
    )
    parser.add_argument("--n-bits", type=int, default=16)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--n-tasks", type=int, default=8, help="tasks of the multi-task sparse parity")
    parser.add_argument("--n-train", type=int, default=20_000, help="sparse parity training samples")
    parser.add_argument("--n-test", type=int, default=10_000, help="fresh sparse parity samples F is measured on")
    parser.add_argument("--sae-expansion", type=int, default=4)
    parser.add_argument(
        "--l1", type=float, default=0.3, help="tied SAE L1 coefficient (activations scaled to unit RMS)"
    )
    parser.add_argument("--sae-steps", type=int, default=1500)
    parser.add_argument("--threads", type=int, default=1)
    if "--quick" in argv:
        parser.set_defaults(**QUICK)
    return parser.parse_args(argv)


@dataclass
class TaskData:
    train_inputs: torch.Tensor
    train_labels: torch.Tensor
    measure_inputs: torch.Tensor  # the inputs F is measured on
    test_inputs: torch.Tensor  # held-out inputs for the accuracy
    test_labels: torch.Tensor
    n_classes: int
    weight_decay: float
    description: str


def task_data(args: argparse.Namespace, task: str, seed: int) -> TaskData:
    if task == "modular_addition":
        pairs, labels = modular_addition_pairs(args.p)
        inputs = one_hot_pairs(pairs, args.p)
        train, test = train_test_split(len(labels), args.train_fraction, seed)
        # F over every one of the p^2 inputs (a finite task); accuracy on the held-out sums.
        return TaskData(
            inputs[train],
            labels[train],
            inputs,
            inputs[test],
            labels[test],
            args.p,
            args.weight_decay,
            f"(a + b) mod {args.p}, one-hot a and b, {args.train_fraction:.0%} of sums trained on, "
            f"weight decay {args.weight_decay}",
        )
    n_tasks = args.n_tasks if task == "multitask_sparse_parity" else 1
    parity = SparseParityTask(n_tasks=n_tasks, n_bits=args.n_bits, k=args.k, seed=0)
    train_inputs, train_labels, _ = parity.sample(args.n_train, seed=TRAIN_SEED_OFFSET + seed)
    test_inputs, test_labels, _ = parity.sample(args.n_test, seed=TEST_SEED_OFFSET + seed)
    return TaskData(
        train_inputs,
        train_labels,
        test_inputs,
        test_inputs,
        test_labels,
        2,
        0.0,
        f"{n_tasks} task(s) (one-hot prefix), {args.n_bits} bits, parity of k = {args.k}, no weight decay",
    )


def measure_model(args: argparse.Namespace, task: str, seed: int) -> list[dict]:
    data = task_data(args, task, seed)
    model = MLPClassifier(data.train_inputs.shape[1], args.hidden, data.n_classes, seed=seed)
    training = ClassifierTraining(steps=args.steps, lr=args.lr, weight_decay=data.weight_decay, seed=seed)
    train_classifier(model, data.train_inputs, data.train_labels, training)
    train_accuracy = accuracy(model, data.train_inputs, data.train_labels)
    test_accuracy = accuracy(model, data.test_inputs, data.test_labels)
    with torch.no_grad():
        train_layers = model.hidden_activations(data.train_inputs)
        measure_layers = model.hidden_activations(data.measure_inputs)
    rows = []
    for layer, (train_acts, measure_acts) in enumerate(zip(train_layers, measure_layers)):
        width = train_acts.shape[1]
        sae_config = ToySAEConfig(
            d_sae=args.sae_expansion * width, l1_coefficient=args.l1, steps=args.sae_steps, seed=seed
        )
        measured = tied_sae_measure(train_acts, measure_acts, sae_config)
        rows.append(
            {
                "task": task,
                "seed": seed,
                "layer": layer,
                "N": width,
                "input_width": data.train_inputs.shape[1],
                "train_accuracy": train_accuracy,
                "test_accuracy": test_accuracy,
                "F": measured["F"],
                "F_low": measured["F_low"],
                "F_high": measured["F_high"],
                "psi": measured["psi"],
                "psi_low": measured["psi_low"],
                "psi_high": measured["psi_high"],
                "variance_explained": measured["variance_explained"],
                "mean_l0": measured["mean_l0"],
                "d_sae": sae_config.d_sae,
                "neuron_psi": neuron_basis_measure(measure_acts)["psi"],
                "measured_samples": measured["tokens"],
            }
        )
    return rows


def summarise(table: pd.DataFrame) -> pd.DataFrame:
    return (
        table.groupby(["task", "layer"], sort=False)
        .agg(
            psi_mean=("psi", "mean"),
            psi_std=("psi", "std"),
            psi_max=("psi", "max"),
            neuron_psi=("neuron_psi", "mean"),
            variance_explained=("variance_explained", "mean"),
            train_accuracy=("train_accuracy", "mean"),
            test_accuracy=("test_accuracy", "mean"),
        )
        .reset_index()
    )


def plot(summary: pd.DataFrame, path: Path) -> None:
    figure, axes = plt.subplots(figsize=(6.5, 4.5))
    n_tasks = summary["task"].nunique()
    for offset, (task, group) in enumerate(summary.groupby("task", sort=False)):
        x = group["layer"] + (offset - (n_tasks - 1) / 2) * 0.2
        axes.bar(x, group["psi_mean"], width=0.2, yerr=group["psi_std"].fillna(0), capsize=3, label=task)
    axes.axhline(1.0, color="gray", linestyle="--", label="psi = 1 (F = N)")
    axes.set_xticks(sorted(summary["layer"].unique()))
    axes.set_xlabel("hidden layer")
    axes.set_ylabel("psi = F / N (tied SAE; mean ± std over seeds)")
    axes.set_title("Algorithmic tasks: superposition ratio per layer")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_readme(path: Path, args, table, summary, descriptions: dict, command: str, seconds: float) -> None:
    task_lines = "\n".join(f"- `{task}`: {text}" for task, text in descriptions.items())
    share_below = (table["psi"] <= 1).mean()
    largest = table.loc[table["psi"].idxmax()]
    text = f"""# Algorithmic tasks: psi per layer

Made by (from the repository root, {seconds / 60:.1f} min on {args.threads} CPU thread(s)):

    {command}

Paper's direction: networks on algorithmic tasks stay at psi <= 1 (no input sparsity to exploit).

Ours: psi <= 1 in {share_below:.0%} of the {len(table)} (task, seed, layer) measurements;
largest psi {table["psi"].max():.3f} ({largest["task"]}, layer {largest["layer"]}).

```
{summary.round(3).to_string(index=False)}
```

Tasks (MLP hidden widths {args.hidden}, ReLU, AdamW lr {args.lr}, {args.steps} steps of 256, seeds {args.seeds}):
{task_lines}

F is measured through the paper's tied SAE (`lm_superposition.toy.TiedSAE`; {args.sae_expansion} x N latents,
L1 {args.l1}, {args.sae_steps} steps) trained on the layer's activations over the training inputs
(scaled to unit RMS per dimension), measured with `FeatureBudget` on every p^2 input (modular
addition) or {args.n_test} fresh inputs (parity); psi = F / N with N the layer's width. `neuron_psi`
is F of the neurons' own |activations| over N (no SAE; at most 1 by construction).

Files: `table.csv` (one row per task, seed and layer, with bootstrap intervals), `psi_per_layer.png`.
"""
    path.write_text(text)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    started = time.perf_counter()
    rows = []
    with torch_threads(args.threads):
        for task in tqdm(args.tasks, desc="tasks"):
            for seed in args.seeds:
                rows += measure_model(args, task, seed)
    table = pd.DataFrame(rows)
    summary = summarise(table)
    descriptions = {task: task_data(args, task, 0).description for task in args.tasks}
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "table.csv", index=False)
    plot(summary, args.out / "psi_per_layer.png")
    command = study_command("experiments.algorithmic", argv)
    write_readme(args.out / "README.md", args, table, summary, descriptions, command, time.perf_counter() - started)
    print(summary.round(3).to_string(index=False))
    return table


if __name__ == "__main__":
    main()
