"""Does dropout lower the number of effective features? The paper's measurement: its layer, its dropout.

The paper's interventions network (experiments.tasks.PreActivationMLP: one hidden layer, dropout
on the pre-activation before the ReLU, one logit) on its multi-task sparse parity (3 tasks x 4
bits of their own, all 12,288 inputs, 80/20 stratified split; Adam lr 1e-3, batch 64), at hidden
widths 16-128 and several dropout rates, 5 seeds each. The measured layer is the paper's, the
hidden pre-activation (dropout off at measurement), read by an SAE of the validated default recipe
(experiments.findings_stats, 4 x N latents as in the paper, duplicates merged); F on held-out inputs.

Accuracy confound: a rate enters the slope only where the mean test accuracy over seeds stays
within --accuracy-tolerance of the width's no-dropout models (decided from the accuracies alone,
before any F is looked at). Per width: the least-squares slope of F against the rate over those
(rate, seed) points, with its 95% interval; the paper's direction is a negative slope.
Writes table.csv, slopes.csv, f_vs_dropout.png/.svg and README.md to --out.

    python -m experiments.dropout            # 4 widths x 5 rates x 5 seeds: ~25 min on 1 CPU thread
    python -m experiments.dropout --quick    # tiny, seconds
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt
import pandas as pd
import torch

from experiments import study_command, torch_threads
from experiments.findings_stats import (
    gate_pass,
    gate_summary,
    holm,
    mean_interval,
    measure_default_sae,
    save_figure,
    slope_interval,
    train_default_saes,
)
from experiments.tasks import DisjointParityTask, PreActivationMLP, binary_accuracy, train_binary

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "results" / "dropout"
QUICK = dict(widths=[8], rates=[0.0, 0.1, 0.5], seeds=[0, 1, 2], epochs=2, sae_steps=30, accuracy_tolerance=1.0)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--quick", action="store_true", help=f"tiny run for tests: {QUICK}")
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 32, 64, 128], help="hidden widths N")
    parser.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3, 0.4])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, default=40, help="model training epochs (the paper: 300)")
    parser.add_argument("--sae-expansion", type=int, default=4, help="d_sae / N (the paper: 4)")
    parser.add_argument("--sae-steps", type=int, default=600)
    parser.add_argument("--sae-batch", type=int, default=256)
    parser.add_argument(
        "--accuracy-tolerance", type=float, default=0.01, help="largest test-accuracy loss a rate may cost"
    )
    parser.add_argument("--threads", type=int, default=1)
    if "--quick" in argv:
        parser.set_defaults(**QUICK)
    return parser.parse_args(argv)


def train_models(args: argparse.Namespace) -> tuple[list[dict], dict]:
    """Every (width, rate, seed) model: ({row of accuracies}, {key: pre-activations (train, test)})."""
    task = DisjointParityTask()
    inputs, labels, _ = task.all_inputs()
    rows, activations = [], {}
    for width in args.widths:
        for rate in args.rates:
            for seed in args.seeds:
                train, test = task.split(seed)
                model = PreActivationMLP(task.input_width, width, dropout=rate, seed=seed)
                train_binary(model, inputs[train], labels[train], args.epochs, seed=seed)
                rows.append(
                    {
                        "N": width,
                        "dropout": rate,
                        "seed": seed,
                        "train_accuracy": binary_accuracy(model, inputs[train], labels[train]),
                        "test_accuracy": binary_accuracy(model, inputs[test], labels[test]),
                    }
                )
                with torch.no_grad():
                    activations[width, rate, seed] = (
                        model.pre_activation(inputs[train]),
                        model.pre_activation(inputs[test]),
                    )
            print(f"N {width} dropout {rate}: models trained", flush=True)
    return rows, activations


def eligible_rates(accuracies: pd.DataFrame, tolerance: float) -> pd.DataFrame:
    """Per (width, rate): mean test accuracy and whether it is within `tolerance` of the width's rate-0 mean."""
    mean = accuracies.groupby(["N", "dropout"])["test_accuracy"].mean().rename("mean_test_accuracy").reset_index()
    baseline = mean[mean["dropout"] == 0].set_index("N")["mean_test_accuracy"]
    mean["eligible"] = mean["mean_test_accuracy"] >= mean["N"].map(baseline) - tolerance
    return mean


def slopes(table: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for width, group in table[table["eligible"]].groupby("N"):
        rates = [float(rate) for rate in sorted(group["dropout"].unique())]
        if len(rates) < 2:
            rows.append({"N": width, "eligible_rates": rates, "slope": float("nan")})
            continue
        fit = slope_interval(group["dropout"], group["F"])
        psi_fit = slope_interval(group["dropout"], group["psi"])
        rows.append(
            {
                "N": width,
                "eligible_rates": rates,
                "points": len(group),
                **fit,
                "psi_slope": psi_fit["slope"],
                "psi_slope_low": psi_fit["slope_low"],
                "psi_slope_high": psi_fit["slope_high"],
            }
        )
    result = pd.DataFrame(rows)
    if "p" in result:
        result["p_holm"] = holm(result["p"].fillna(1.0).tolist())
    return result


def plot(table: pd.DataFrame, path: Path) -> None:
    figure, axes = plt.subplots(1, 2, figsize=(10.5, 4.2))
    for width, group in table.groupby("N"):
        means = [(rate, *mean_interval(g["F"])) for rate, g in group.groupby("dropout")]
        frame = pd.DataFrame(means, columns=["rate", "mean", "low", "high"])
        errors = [(frame["mean"] - frame["low"]).fillna(0), (frame["high"] - frame["mean"]).fillna(0)]
        line = axes[0].errorbar(frame["rate"], frame["mean"], yerr=errors, marker="o", capsize=3, label=f"N = {width}")
        ineligible = group[~group["eligible"]].groupby("dropout")["F"].mean()
        axes[0].scatter(ineligible.index, ineligible.values, marker="x", s=60, color=line[0].get_color())
        accuracy = group.groupby("dropout")["test_accuracy"].mean()
        axes[1].plot(accuracy.index, accuracy.values, marker="o", label=f"N = {width}")
    axes[0].set_xlabel("dropout rate (pre-activation)")
    axes[0].set_ylabel("F (mean, 95% interval over seeds; x: rate excluded)")
    axes[0].set_yscale("log", base=2)
    axes[0].legend(fontsize=8)
    figure.text(
        0.5, 0.01, f"F: means over seeds. {gate_summary(table['quality'])}.", ha="center", fontsize=7, wrap=True
    )
    axes[1].set_xlabel("dropout rate")
    axes[1].set_ylabel("test accuracy (mean over seeds)")
    figure.suptitle("Dropout and F, the paper's layer and placement")
    figure.tight_layout(rect=(0, 0.05, 1, 1))
    save_figure(figure, path)
    plt.close(figure)


def write_readme(path: Path, args, table, rates, slope_table, command: str, seconds: float) -> None:
    load = os.getloadavg()
    lines = []
    for _, row in slope_table.iterrows():
        if pd.isna(row["slope"]):
            lines.append(f"- N = {row['N']}: fewer than two eligible rates, no slope")
            continue
        sign = (
            "negative"
            if row["slope_high"] < 0
            else ("positive" if row["slope_low"] > 0 else "not distinguishable from 0")
        )
        points = table[(table["N"] == row["N"]) & table["eligible"]]["quality"]
        lines.append(
            f"- N = {row['N']}: slope {row['slope']:.1f} F per unit rate [{row['slope_low']:.1f}, "
            f"{row['slope_high']:.1f}] ({sign}; Holm p {row['p_holm']:.3g}), rates {row['eligible_rates']}; "
            f"{gate_summary(points, 'SAEs of its points')}"
        )
    per_cell = table.groupby(["N", "dropout"]).agg(
        F=("F", "mean"),
        F_std=("F", "std"),
        ve=("variance_explained", "mean"),
        test_accuracy=("test_accuracy", "mean"),
        gate_pass=("quality", gate_pass),
    )
    text = f"""# Dropout, as the paper measured it

Made by (from the repository root, {seconds / 60:.1f} min on {args.threads} CPU thread(s); load average
{load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f} at the end, shared machine):

    {command}

Paper's direction: more dropout, fewer effective features.

Ours, slope of F against the dropout rate over the eligible rates (each seed a point; 95% interval;
Holm-corrected over the {len(slope_table)} widths):

{chr(10).join(lines)}

Eligible rates (mean test accuracy within {args.accuracy_tolerance} of the width's no-dropout models, decided
before F):

```
{rates.round(4).to_string(index=False)}
```

Quality gate (`gate.QualityGate.verdict`; CE loss recovered does not apply to this network):
{gate_summary(table["quality"])}. Every SAE's verdict is the `quality` column of `table.csv`.

F, its spread over seeds, variance explained, test accuracy and how many of the cell's SAEs pass the
gate (`gate_pass`) per width and rate:

```
{per_cell.round(3).to_string()}
```

```
{slope_table.round(4).to_string(index=False)}
```

Setting (the paper's `experiments/interventions/dropout.py`, read, not copied): 3 parity tasks of 4 bits each,
all 12,288 inputs, 80/20 split stratified by task and label (per seed); Linear -> Dropout -> ReLU -> one
logit, Adam lr 1e-3, batch 64, {args.epochs} epochs (the paper: 300); seeds {args.seeds}. Measured: the hidden
pre-activation, dropout off. SAE: the validated default recipe (`SAETrainingConfig()`), {args.sae_expansion} x N
latents, {args.sae_steps} steps of {args.sae_batch} training-set activations, one SAE per model; F by
`analyze.sae_budget` (duplicates at cosine >= 0.9 merged) on the held-out inputs.

Files: `table.csv` (one row per width, rate and seed), `slopes.csv`, `f_vs_dropout.png` / `.svg`.
"""
    path.write_text(text)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    started = time.perf_counter()
    with torch_threads(args.threads):
        rows, activations = train_models(args)
        accuracies = pd.DataFrame(rows)
        rates = eligible_rates(accuracies, args.accuracy_tolerance)
        for row in rows:
            train_acts, test_acts = activations[row["N"], row["dropout"], row["seed"]]
            sae = train_default_saes(
                train_acts, args.sae_expansion * row["N"], args.sae_steps, [row["seed"]], args.sae_batch
            )[row["seed"]]
            measured = measure_default_sae(sae, test_acts)
            row.update({key: measured[key] for key in ("F", "F_low", "F_high", "psi", "mean_l0")})
            row.update(
                variance_explained=measured["variance_explained"],
                merged_latents=measured["merged_latents"],
                d_sae=args.sae_expansion * row["N"],
                last_doubling_growth=measured["last_doubling_growth"],
                quality=measured["quality"],
            )
    table = pd.DataFrame(rows).merge(rates[["N", "dropout", "eligible"]], on=["N", "dropout"])
    slope_table = slopes(table)
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "table.csv", index=False)
    slope_table.to_csv(args.out / "slopes.csv", index=False)
    plot(table, args.out / "f_vs_dropout")
    command = study_command("experiments.dropout", argv)
    write_readme(args.out / "README.md", args, table, rates, slope_table, command, time.perf_counter() - started)
    print(slope_table.round(4).to_string(index=False))
    return table


if __name__ == "__main__":
    main()
