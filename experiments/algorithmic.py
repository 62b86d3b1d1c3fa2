"""Do networks on algorithmic tasks stay at psi <= 1, and does the same measure give psi > 1 where it should?

Algorithmic inputs are dense (every bit or every one-hot slot is always in play), so the paper
expects no compression beyond the layer's width: psi = F / N <= 1. For each task and seed:
train a two-hidden-layer ReLU MLP (experiments.tasks), then measure F of each hidden layer
through SAEs of the validated default recipe (experiments.findings_stats: SAE-Lens standard SAE,
4 x N latents, duplicates merged) at each L1 coefficient of a sweep, and in the neuron basis.

Positive control (`sparse_features`): the same MLP and the same SAEs on a task with far more
sparse features than neurons: say which of 256 toy features (Uniform[0, 1], each on with
probability 1%) are on, through the 64-wide hidden layers (one logistic output per feature). A
measure that reads superposition must give psi > 1 there. The L1 sweep shows how much of
psi <= 1 is the SAE's sparsity setting.
Writes table.csv, summary.csv, psi_per_layer.png/.svg and README.md to --out.

    python -m experiments.algorithmic            # 4 tasks x 3 seeds x 4 L1: ~15 min on 1 CPU thread
    python -m experiments.algorithmic --quick    # 1 seed, tiny networks, seconds
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from experiments import study_command, torch_threads
from experiments.findings_stats import (
    gate_pass,
    gate_summary,
    mean_interval,
    measure_default_sae,
    save_figure,
    train_default_saes,
)
from experiments.tasks import (
    ClassifierTraining,
    MLPClassifier,
    SparseParityTask,
    accuracy,
    modular_addition_pairs,
    neuron_basis_measure,
    one_hot_pairs,
    train_classifier,
    train_test_split,
)
from experiments.toy import sample_features

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "results" / "algorithmic"
ALGORITHMIC = ("modular_addition", "sparse_parity", "multitask_sparse_parity")
CONTROL = "sparse_features"
TASKS = (*ALGORITHMIC, CONTROL)
DEFAULT_L1 = 1.0  # SAETrainingConfig's default: the verdict is read there
TRAIN_SEED_OFFSET, TEST_SEED_OFFSET = 1_000, 2_000
QUICK = dict(
    seeds=[0],
    hidden=[16, 16],
    steps=200,
    sae_steps=60,
    sae_batch=256,
    p=11,
    n_train=2000,
    n_test=1000,
    l1=[1.0, 3.0],
    control_features=32,
)


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
    parser.add_argument("--n-train", type=int, default=20_000, help="training samples (parity, control)")
    parser.add_argument("--n-test", type=int, default=10_000, help="fresh samples F is measured on (parity, control)")
    parser.add_argument("--control-features", type=int, default=256, help="features of the positive control")
    parser.add_argument(
        "--control-sparsity", type=float, default=0.99, help="probability a control feature is zero in a sample"
    )
    parser.add_argument("--sae-expansion", type=int, default=4)
    parser.add_argument("--l1", type=float, nargs="+", default=[0.1, 0.3, 1.0, 3.0], help="L1 coefficients swept")
    parser.add_argument("--sae-steps", type=int, default=1200)
    parser.add_argument("--sae-batch", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1)
    if "--quick" in argv:
        parser.set_defaults(**QUICK)
    return parser.parse_args(argv)


@dataclass
class TaskData:
    train_inputs: torch.Tensor
    train_targets: torch.Tensor
    measure_inputs: torch.Tensor  # the inputs F is measured on
    test_inputs: torch.Tensor  # held-out inputs for the score
    test_targets: torch.Tensor
    n_outputs: int
    weight_decay: float
    description: str
    multilabel: bool = False  # the positive control: which features are on


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
    if task == CONTROL:
        generator = torch.Generator().manual_seed(TRAIN_SEED_OFFSET + seed)
        train = sample_features(args.n_train, args.control_features, args.control_sparsity, generator)
        generator = torch.Generator().manual_seed(TEST_SEED_OFFSET + seed)
        test = sample_features(args.n_test, args.control_features, args.control_sparsity, generator)
        return TaskData(
            train,
            train,
            test,
            test,
            test,
            args.control_features,
            0.0,
            f"positive control: say which of {args.control_features} input features (Uniform[0, 1], each zero "
            f"with probability {args.control_sparsity}) are on, one logistic output per feature (BCE); score = F1 "
            "of the features called on, on fresh samples (a network that kept only N features could reach recall "
            "N / features)",
            multilabel=True,
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


def train_detection(model: MLPClassifier, inputs: torch.Tensor, training: ClassifierTraining) -> MLPClassifier:
    """The MLP trained to say which of its input features are on (one logistic output per feature, mean BCE)."""
    generator = torch.Generator().manual_seed(training.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=training.lr, weight_decay=training.weight_decay)
    model.train()
    for _ in range(training.steps):
        rows = inputs[torch.randint(inputs.shape[0], (training.batch_size,), generator=generator)]
        loss = F.binary_cross_entropy_with_logits(model(rows), (rows > 0).float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


@torch.no_grad()
def detection_f1(model: MLPClassifier, inputs: torch.Tensor) -> float:
    """F1 of the features the model calls on (logit > 0) against those that are on, pooled over samples."""
    called, on = model(inputs) > 0, inputs > 0
    hits = (called & on).sum().item()
    return 2 * hits / max(1, called.sum().item() + on.sum().item())


def trained_model(args: argparse.Namespace, data: TaskData, seed: int) -> tuple[MLPClassifier, dict]:
    model = MLPClassifier(data.train_inputs.shape[1], args.hidden, data.n_outputs, seed=seed)
    training = ClassifierTraining(steps=args.steps, lr=args.lr, weight_decay=data.weight_decay, seed=seed)
    if data.multilabel:
        train_detection(model, data.train_inputs, training)
        return model, {
            "train_score": detection_f1(model, data.train_inputs),
            "test_score": detection_f1(model, data.test_inputs),
        }
    train_classifier(model, data.train_inputs, data.train_targets, training)
    return model, {
        "train_score": accuracy(model, data.train_inputs, data.train_targets),
        "test_score": accuracy(model, data.test_inputs, data.test_targets),
    }


def measure_model(args: argparse.Namespace, task: str, seed: int) -> list[dict]:
    data = task_data(args, task, seed)
    model, scores = trained_model(args, data, seed)
    with torch.no_grad():
        train_layers = model.hidden_activations(data.train_inputs)
        measure_layers = model.hidden_activations(data.measure_inputs)
    rows = []
    for layer, (train_acts, measure_acts) in enumerate(zip(train_layers, measure_layers)):
        width = train_acts.shape[1]
        neuron_psi = neuron_basis_measure(measure_acts)["psi"] if measure_acts.abs().sum() > 0 else float("nan")
        for l1 in args.l1:
            sae = train_default_saes(
                train_acts, args.sae_expansion * width, args.sae_steps, [seed], args.sae_batch, l1, shuffle_seed=seed
            )[seed]
            measured = measure_default_sae(sae, measure_acts)
            rows.append(
                {
                    "task": task,
                    "seed": seed,
                    "layer": layer,
                    "l1_coefficient": l1,
                    "N": width,
                    "input_width": data.train_inputs.shape[1],
                    **scores,
                    **{key: measured[key] for key in ("F", "F_low", "F_high", "psi", "psi_low", "psi_high")},
                    "variance_explained": measured["variance_explained"],
                    "mean_l0": measured["mean_l0"],
                    "merged_latents": measured["merged_latents"],
                    "dead_sae": measured["dead_sae"],
                    "d_sae": args.sae_expansion * width,
                    "neuron_psi": neuron_psi,
                    "measured_samples": measured["tokens"],
                    "last_doubling_growth": measured["last_doubling_growth"],
                    "quality": measured["quality"],
                }
            )
    return rows


def summarise(table: pd.DataFrame) -> pd.DataFrame:
    """Per task, layer and L1: mean psi over seeds with its 95% t interval, and the quality columns."""
    rows = []
    for (task, layer, l1), group in table.groupby(["task", "layer", "l1_coefficient"], sort=False):
        mean, low, high = mean_interval(group["psi"])
        rows.append(
            {
                "task": task,
                "layer": layer,
                "l1": l1,
                "psi_mean": mean,
                "psi_low95": low,
                "psi_high95": high,
                "seeds": len(group),
                "variance_explained": group["variance_explained"].mean(),
                "mean_l0": group["mean_l0"].mean(),
                "neuron_psi": group["neuron_psi"].mean(),
                "test_score": group["test_score"].mean(),
                "gate_pass": gate_pass(group["quality"]),
            }
        )
    return pd.DataFrame(rows)


def plot(summary: pd.DataFrame, path: Path, verdicts: pd.Series) -> None:
    layers = sorted(summary["layer"].unique())
    figure, axes = plt.subplots(1, len(layers), figsize=(5.5 * len(layers), 4.3), sharey=True, squeeze=False)
    for ax, layer in zip(axes[0], layers):
        for task, group in summary[summary["layer"] == layer].groupby("task", sort=False):
            errors = [
                (group["psi_mean"] - group["psi_low95"]).fillna(0),
                (group["psi_high95"] - group["psi_mean"]).fillna(0),
            ]
            style = dict(linestyle="--", marker="s") if task == CONTROL else dict(marker="o")
            ax.errorbar(group["l1"], group["psi_mean"], yerr=errors, capsize=3, label=task, **style)
        ax.axhline(1.0, color="gray", linestyle=":", label="psi = 1 (F = N)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("SAE L1 coefficient (default recipe: 1)")
        ax.set_title(f"hidden layer {layer}")
    axes[0][0].set_ylabel("psi = F / N (mean, 95% interval over seeds)")
    axes[0][0].legend(fontsize=8)
    figure.suptitle("Algorithmic tasks vs a sparse-feature positive control, same MLP and SAE recipe")
    figure.text(0.5, 0.01, f"psi: means over seeds. {gate_summary(verdicts)}.", ha="center", fontsize=7, wrap=True)
    figure.tight_layout(rect=(0, 0.05, 1, 1))
    save_figure(figure, path)
    plt.close(figure)


def verdict_lines(summary: pd.DataFrame) -> list[str]:
    at_default = summary[summary["l1"] == DEFAULT_L1]
    lines = []
    for _, row in at_default.iterrows():
        lines.append(
            f"- {row['task']}, layer {row['layer']}: psi {row['psi_mean']:.2f} "
            f"[{row['psi_low95']:.2f}, {row['psi_high95']:.2f}] (VE {row['variance_explained']:.3f}; "
            f"SAEs passing the quality gate: {row['gate_pass']})"
        )
    return lines


def write_readme(path: Path, args, table, summary, descriptions: dict, command: str, seconds: float) -> None:
    task_lines = "\n".join(f"- `{task}`: {text}" for task, text in descriptions.items())
    at_default = table[table["l1_coefficient"] == DEFAULT_L1]
    algorithmic = at_default[at_default["task"] != CONTROL]
    control = at_default[at_default["task"] == CONTROL]
    share_below = (algorithmic["psi"] <= 1).mean() if len(algorithmic) else float("nan")
    control_line = (
        f"Positive control at L1 {DEFAULT_L1}: psi > 1 in {(control['psi'] > 1).sum()} of {len(control)} "
        f"(seed, layer) measurements."
        if len(control)
        else "No positive control in this run."
    )
    pivot = summary.pivot_table(index=["task", "layer"], columns="l1", values="psi_mean", sort=False)
    gate_pivot = summary.pivot_table(
        index=["task", "layer"], columns="l1", values="gate_pass", aggfunc="first", sort=False
    )
    load = os.getloadavg()
    text = f"""# Algorithmic tasks, with a positive control and an L1 sweep

Made by (from the repository root, {seconds / 60:.1f} min on {args.threads} CPU thread(s); load average
{load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f} at the end, shared machine):

    {command}

Paper's direction: networks on algorithmic tasks stay at psi <= 1 (no input sparsity to exploit).

At the default recipe's L1 ({DEFAULT_L1}): psi <= 1 in {share_below:.0%} of the {len(algorithmic)} algorithmic
(task, seed, layer) measurements. {control_line}

psi at L1 {DEFAULT_L1}, mean over seeds with its 95% t interval:

{chr(10).join(verdict_lines(summary))}

Quality gate (`gate.QualityGate.verdict` on each SAE; CE loss recovered does not apply to these networks):
{gate_summary(at_default["quality"])} at L1 {DEFAULT_L1}; over the whole sweep, {gate_summary(table["quality"])}.
Every SAE's verdict is the `quality` column of `table.csv`.

Mean psi over seeds by L1 coefficient (columns):

```
{pivot.round(3).to_string()}
```

SAEs passing the quality gate, of the seeds, by L1 coefficient (columns):

```
{gate_pivot.to_string()}
```

Every row (mean, 95% interval, variance explained, L0, neuron-basis psi, test score, SAEs passing the gate):

```
{summary.round(3).to_string(index=False)}
```

Tasks (MLP hidden widths {args.hidden}, ReLU, AdamW lr {args.lr}, {args.steps} steps of 256, seeds {args.seeds}):
{task_lines}

F is measured through SAEs of the validated default recipe (`SAETrainingConfig()`: SAE-Lens standard
ReLU SAE, inputs normalised, L1 on |z| * ||W_dec||, lr 2e-4 * sqrt(16384 / d_sae), b_dec from the data
mean) with {args.sae_expansion} x N latents, {args.sae_steps} steps of {args.sae_batch} activations over the training
inputs, one SAE per (model seed, layer, L1); F by `lm_superposition.analyze.sae_budget` (decoder-norm
weights, duplicate latents at cosine >= 0.9 merged) on every p^2 input (modular addition) or
{args.n_test} fresh inputs (parity, control); psi = F / N with N the layer's width. `neuron_psi`
is F of the neurons' own |activations| over N (no SAE; at most 1 by construction). The interval is
over model seeds (Student t, n = {len(args.seeds)}); table.csv also has each SAE's bootstrap interval over samples.

Files: `table.csv` (one row per task, seed, layer and L1), `summary.csv`, `psi_per_layer.png` / `.svg`.
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
                print(f"{task} seed {seed}: done ({(time.perf_counter() - started) / 60:.1f} min)", flush=True)
    table = pd.DataFrame(rows)
    summary = summarise(table)
    descriptions = {task: task_data(args, task, 0).description for task in args.tasks}
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "table.csv", index=False)
    summary.to_csv(args.out / "summary.csv", index=False)
    plot(summary, args.out / "psi_per_layer", table["quality"])
    command = study_command("experiments.algorithmic", argv)
    write_readme(args.out / "README.md", args, table, summary, descriptions, command, time.perf_counter() - started)
    print(summary.round(3).to_string(index=False))
    return table


if __name__ == "__main__":
    main()
