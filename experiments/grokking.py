"""Does F drop (feature consolidation) when a network groks? A one-layer transformer on modular addition, 5 seeds.

For each seed, trains a one-layer TransformerLens HookedTransformer on (a + b) mod p
(experiments.tasks: full-batch AdamW, weight decay 1, half of the p^2 sums), keeping a checkpoint
every 250 steps. At each checkpoint, on all p^2 inputs at the "=" position (the task is finite, so
this is the whole data set):

- F of the MLP neurons (blocks.0.mlp.hook_post) and of the residual stream
  (blocks.0.hook_resid_post) through SAEs of the validated default recipe
  (experiments.findings_stats, duplicates merged), 2 SAE seeds per checkpoint, trained afresh on
  that checkpoint's activations (the features change during training);
- F of the MLP in the neuron basis (|activation| per neuron, no SAE).

Per seed: the step test accuracy first reaches 0.9 (grokked), the checkpoint with the largest
fall of F (mean of the SAE seeds) after its peak, and the lag between them; over seeds the mean
lag with its 95% interval and its range. Writes table.csv, lags.csv, grokking.png/.svg, README.md.

    python -m experiments.grokking            # p = 43, 2,500 steps, 5 seeds: ~20 min on 1 CPU thread
    python -m experiments.grokking --quick    # p = 11, a tiny model, seconds
"""

from __future__ import annotations

import argparse
import dataclasses
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
    mean_interval,
    measure_default_sae,
    save_figure,
    train_default_saes,
)
from experiments.tasks import (
    GrokkingConfig,
    GrokkingRun,
    first_step_reaching,
    grokking_tokens,
    neuron_basis_measure,
    train_grokking,
)

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "results" / "grokking"
MLP_HOOK, RESID_HOOK = "blocks.0.mlp.hook_post", "blocks.0.hook_resid_post"
GROKKED_ACCURACY = 0.9
LABELS = ("mlp", "resid")  # the SAE-measured hooks' column prefixes
QUALITY_SEPARATOR = " | "  # between the SAE seeds' verdicts in the mlp_quality / resid_quality columns


def all_passed(gate_pass: str) -> bool:
    """Whether a "k/n" gate_pass cell has every SAE passing."""
    passed, total = gate_pass.split("/")
    return passed == total


QUICK = dict(
    p=11, d_model=16, n_heads=2, d_mlp=32, steps=40, checkpoint_every=10, sae_steps=20, seeds=[0, 1], sae_batch=64
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    defaults = GrokkingConfig()
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--quick", action="store_true", help=f"tiny run for tests: {QUICK}")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="model seeds")
    parser.add_argument("--sae-seeds", type=int, nargs="+", default=[0, 1])
    for name in ("p", "d_model", "n_heads", "d_mlp", "steps"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    for name in ("train_fraction", "lr", "weight_decay"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name))
    parser.add_argument("--checkpoint-every", type=int, default=250)
    parser.add_argument("--mlp-sae-expansion", type=int, default=2, help="SAE latents per MLP neuron")
    parser.add_argument("--resid-sae-expansion", type=int, default=4, help="SAE latents per residual dimension")
    parser.add_argument("--sae-steps", type=int, default=400)
    parser.add_argument("--sae-batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    if "--quick" in argv:
        parser.set_defaults(**QUICK)
    return parser.parse_args(argv)


def measure_checkpoints(run: GrokkingRun, args: argparse.Namespace) -> pd.DataFrame:
    tokens, _ = grokking_tokens(run.config)
    rows = []
    for checkpoint in run.checkpoints:
        model = run.model_at(checkpoint)
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens, names_filter=[MLP_HOOK, RESID_HOOK])
        row = {
            "seed": run.config.seed,
            "step": checkpoint.step,
            "train_loss": checkpoint.train_loss,
            "train_accuracy": checkpoint.train_accuracy,
            "test_accuracy": checkpoint.test_accuracy,
            # parameters only: the state dict also holds the attention mask buffers (with -inf)
            "weight_norm": float(torch.cat([w.detach().flatten() for w in model.parameters()]).norm()),
        }
        for label, hook, expansion in (
            ("mlp", MLP_HOOK, args.mlp_sae_expansion),
            ("resid", RESID_HOOK, args.resid_sae_expansion),
        ):
            activations = cache[hook][:, -1, :]  # the "=" position, where the answer is read
            saes = train_default_saes(
                activations, expansion * activations.shape[1], args.sae_steps, args.sae_seeds, args.sae_batch
            )
            measured = [measure_default_sae(sae, activations) for sae in saes.values()]
            values = {key: [m[key] for m in measured] for key in ("F", "variance_explained", "mean_l0")}
            row |= {
                f"{label}_F": sum(values["F"]) / len(measured),
                f"{label}_F_sae_min": min(values["F"]),
                f"{label}_F_sae_max": max(values["F"]),
                f"{label}_variance_explained": min(values["variance_explained"]),
                f"{label}_mean_l0": sum(values["mean_l0"]) / len(measured),
                f"{label}_gate_pass": gate_pass(m["quality"] for m in measured),
                f"{label}_quality": QUALITY_SEPARATOR.join(m["quality"] for m in measured),
            }
        row["mlp_neuron_F"] = neuron_basis_measure(cache[MLP_HOOK][:, -1, :])["F"]
        rows.append(row)
    return pd.DataFrame(rows)


def drop_step(table: pd.DataFrame, column: str) -> int | None:
    """The checkpoint with the largest fall of `column` from the previous one, after its peak."""
    table = table.reset_index(drop=True)
    peak = table[column].idxmax()
    after_peak = table.loc[peak:, column].diff()
    return int(table.loc[after_peak.idxmin(), "step"]) if after_peak.notna().any() else None


def lags(table: pd.DataFrame, runs: list[GrokkingRun]) -> pd.DataFrame:
    """Per seed: when test accuracy reaches 0.9, when each F falls most, and the lags (F drop - grokked)."""
    rows = []
    for run in runs:
        seed_table = table[table["seed"] == run.config.seed]
        grokked = first_step_reaching(run.checkpoints, "test_accuracy", GROKKED_ACCURACY)
        row = {
            "seed": run.config.seed,
            "memorised_step": first_step_reaching(run.checkpoints, "train_accuracy", 0.99),
            "grokked_step": grokked,
        }
        for column in ("mlp_F", "resid_F", "mlp_neuron_F"):
            step = drop_step(seed_table, column)
            row[f"{column}_drop_step"] = step
            row[f"{column}_lag"] = step - grokked if step is not None and grokked is not None else float("nan")
            row[f"{column}_peak_to_final"] = float(seed_table[column].iloc[-1] / seed_table[column].max())
            row[f"{column}_corr_test_accuracy"] = float(seed_table[column].corr(seed_table["test_accuracy"]))
        rows.append(row)
    return pd.DataFrame(rows)


def lag_summary(lag_table: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for column in ("mlp_F", "resid_F", "mlp_neuron_F"):
        values = lag_table[f"{column}_lag"].dropna()
        mean, low, high = mean_interval(values)
        rows.append(
            {
                "measure": column,
                "seeds_grokked": len(values),
                "lag_mean": mean,
                "lag_low95": low,
                "lag_high95": high,
                "lag_min": values.min() if len(values) else float("nan"),
                "lag_max": values.max() if len(values) else float("nan"),
                "peak_to_final_mean": lag_table[f"{column}_peak_to_final"].mean(),
                "corr_test_accuracy_mean": lag_table[f"{column}_corr_test_accuracy"].mean(),
            }
        )
    return pd.DataFrame(rows)


def plot(table: pd.DataFrame, lag_table: pd.DataFrame, path: Path) -> None:
    seeds = sorted(table["seed"].unique())
    figure, axes = plt.subplots(2, len(seeds), figsize=(3.4 * len(seeds), 6), sharex=True, squeeze=False)
    for column_index, seed in enumerate(seeds):
        part = table[table["seed"] == seed]
        top, bottom = axes[0][column_index], axes[1][column_index]
        top.plot(part["step"], part["train_accuracy"], marker=".", label="train")
        top.plot(part["step"], part["test_accuracy"], marker=".", label="test")
        top.set_title(f"seed {seed}")
        for column, label in (("mlp_F", "MLP, SAE"), ("resid_F", "residual, SAE"), ("mlp_neuron_F", "MLP neurons")):
            line = bottom.plot(part["step"], part[column], marker=".", label=label)[0]
            if f"{column}_sae_min" in part:
                bottom.fill_between(part["step"], part[f"{column}_sae_min"], part[f"{column}_sae_max"], alpha=0.25)
                failed = ~part[column.replace("_F", "_gate_pass")].map(all_passed)
                bottom.scatter(
                    part["step"][failed],
                    part[column][failed],
                    s=30,
                    facecolors="white",
                    edgecolors=line.get_color(),
                    zorder=3,
                )
        grokked = lag_table.loc[lag_table["seed"] == seed, "grokked_step"].iloc[0]
        for ax in (top, bottom):
            if pd.notna(grokked):
                ax.axvline(grokked, color="gray", linestyle="--")
        bottom.set_xlabel("training step")
    axes[0][0].set_ylabel("accuracy")
    axes[1][0].set_ylabel("F (band: the SAE seeds)")
    axes[0][0].legend(fontsize=7)
    axes[1][0].legend(fontsize=7)
    figure.suptitle(
        f"Grokking modular addition (dashed: test accuracy >= {GROKKED_ACCURACY}; "
        "hollow: an SAE of the checkpoint fails the quality gate)"
    )
    figure.tight_layout()
    save_figure(figure, path)
    plt.close(figure)


def write_readme(path: Path, args, config, table, lag_table, summary, command: str, seconds: float) -> None:
    load = os.getloadavg()
    low_ve = table[(table["mlp_variance_explained"] < 0.9) | (table["resid_variance_explained"] < 0.9)]
    columns = ["seed", "step", "train_accuracy", "test_accuracy", "mlp_F", "mlp_F_sae_min", "mlp_F_sae_max"]
    columns += ["mlp_variance_explained", "mlp_gate_pass", "mlp_neuron_F", "resid_F", "resid_variance_explained"]
    columns += ["resid_gate_pass"]
    per_sae = {
        label: [v for cell in table[f"{label}_quality"] for v in cell.split(QUALITY_SEPARATOR)] for label in LABELS
    }
    gate_lines = "\n".join(f"- {label}: {gate_summary(per_sae[label])}" for label in LABELS)
    text = f"""# Grokking across seeds: when F falls, next to when test accuracy jumps

Made by (from the repository root, {seconds / 60:.1f} min on {args.threads} CPU thread(s); load average
{load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f} at the end, shared machine):

    {command}

Paper's direction: F drops sharply (feature consolidation) when the network groks, in step with the
test-accuracy jump.

Lag = (checkpoint of F's largest fall after its peak) - (first checkpoint with test accuracy >=
{GROKKED_ACCURACY}), in steps, checkpoints every {config.checkpoint_every}; mean over the seeds that grokked with
its 95% t interval, and its range:

```
{summary.round(3).to_string(index=False)}
```

Per seed:

```
{lag_table.round(3).to_string(index=False)}
```

Checkpoints where an SAE explains less than 0.9 of the variance (its F is not to be read): {len(low_ve)} of
{len(table)}.

Quality gate (`gate.QualityGate.verdict` on each SAE; CE loss recovered is not checked, this toy
transformer is not a language model over a corpus):

{gate_lines}

`mlp_gate_pass` / `resid_gate_pass`: SAEs of the checkpoint that pass; `mlp_quality` / `resid_quality` in
`table.csv`: each SAE's verdict, in SAE-seed order, separated by "{QUALITY_SEPARATOR.strip()}". Hollow points in the
plot: an SAE of that checkpoint fails the gate.

Setup: {dataclasses.replace(config, seed=-1)} (seed: each of {args.seeds}); a one-layer `HookedTransformer`
without LayerNorm on inputs "a b =", loss at "=", full-batch AdamW (betas 0.9, 0.98). At each checkpoint,
activations at "=" over all {config.p}^2 inputs; SAEs of the validated default recipe (`SAETrainingConfig()`),
{args.mlp_sae_expansion} x {config.d_mlp} latents for `{MLP_HOOK}`, {args.resid_sae_expansion} x {config.d_model} for
`{RESID_HOOK}`, {args.sae_steps} steps of {args.sae_batch}, SAE seeds {args.sae_seeds}, trained afresh per checkpoint
and measured on the same inputs by `analyze.sae_budget` (duplicates merged); F is their mean, the band in the
plot their range. `mlp_neuron_F` is F of the MLP neurons' own activations (no SAE).

```
{table[columns].round(3).to_string(index=False)}
```

Files: `table.csv` (all columns), `lags.csv`, `grokking.png` / `.svg`.
"""
    path.write_text(text)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    started = time.perf_counter()
    runs, tables = [], []
    with torch_threads(args.threads):
        for seed in args.seeds:
            config = GrokkingConfig(
                p=args.p,
                train_fraction=args.train_fraction,
                d_model=args.d_model,
                n_heads=args.n_heads,
                d_mlp=args.d_mlp,
                steps=args.steps,
                checkpoint_every=args.checkpoint_every,
                lr=args.lr,
                weight_decay=args.weight_decay,
                seed=seed,
            )
            run = train_grokking(config)
            runs.append(run)
            tables.append(measure_checkpoints(run, args))
            print(f"seed {seed}: done ({(time.perf_counter() - started) / 60:.1f} min)", flush=True)
    table = pd.concat(tables, ignore_index=True)
    lag_table = lags(table, runs)
    summary = lag_summary(lag_table)
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "table.csv", index=False)
    lag_table.to_csv(args.out / "lags.csv", index=False)
    plot(table, lag_table, args.out / "grokking")
    command = study_command("experiments.grokking", argv)
    write_readme(
        args.out / "README.md", args, runs[0].config, table, lag_table, summary, command, time.perf_counter() - started
    )
    print(summary.round(3).to_string(index=False))
    return table


if __name__ == "__main__":
    main()
