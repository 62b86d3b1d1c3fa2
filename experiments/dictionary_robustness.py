"""Is F robust to the SAE's width once the dictionary is wide enough? The paper's sparse-parity setting.

The paper's dictionary-scaling experiment, with the project's validated SAE recipe: the
interventions network of the paper's code (experiments.tasks.PreActivationMLP: one hidden layer,
Linear -> ReLU -> one logit) trained on its multi-task sparse parity (3 tasks x 4 bits of their
own, every one of the 12,288 inputs, 80/20 split stratified by task and label; Adam lr 1e-3,
batches of 64), and the layer it measured, the hidden pre-activation. For each of 5 model seeds,
SAEs of the default recipe (experiments.findings_stats) at widths 0.5x to 16x the layer, 3 SAE
seeds each, duplicates merged; F on the held-out inputs.

Training rule ("until variance explained stops improving"): each width trains with budgets of
--budgets steps in turn (each a fresh run with its own schedule); it stops at the first budget
whose held-out variance explained (mean over the SAE seeds) is less than --ve-tolerance above
the previous budget's, or at the last budget (then `ve_plateaued` is False).

--setting toy runs the same sweep on toy models of superposition (m = 10, 40 features, S = 0.9),
where the validated recipe counts the stored features: the contrast case with a known answer.

Plateau of F: the smallest expansion from which the mean F stays within 10% of its value at
every larger expansion of the sweep (`plateau_expansion`); none if only the widest qualifies.
Writes table.csv, summary.csv, f_vs_width.png/.svg and README.md to --out.

    python -m experiments.dictionary_robustness            # 5 models x 6 widths x 3 SAE seeds: ~20 min, 1 thread
    python -m experiments.dictionary_robustness --setting toy --out results/dictionary_robustness/toy
    python -m experiments.dictionary_robustness --quick    # tiny, seconds
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
    mean_interval,
    measure_default_sae,
    save_figure,
    train_default_saes,
)
from experiments.tasks import DisjointParityTask, PreActivationMLP, binary_accuracy, train_binary
from experiments.toy import ToyConfig, hidden_activations, represented_features, train_toy_model

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "results" / "dictionary_robustness"
SETTINGS = ("parity", "toy")
TRAIN_SEED_OFFSET, TEST_SEED_OFFSET = 1_000, 2_000
PLATEAU_TOLERANCE = 0.10
QUICK = dict(model_seeds=[0, 1], sae_seeds=[0, 1], expansions=[0.5, 2.0, 8.0], hidden=16, epochs=3, budgets=[20, 40])


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--quick", action="store_true", help=f"tiny run for tests: {QUICK}")
    parser.add_argument(
        "--setting",
        choices=SETTINGS,
        default="parity",
        help="parity: the paper's MLP; toy: a toy model of superposition with a known feature count",
    )
    parser.add_argument("--model-seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--sae-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--expansions", type=float, nargs="+", default=[0.5, 1, 2, 4, 8, 16], help="d_sae / N")
    parser.add_argument("--hidden", type=int, default=64, help="the measured layer's width N")
    parser.add_argument("--n-tasks", type=int, default=3)
    parser.add_argument("--bits-per-task", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=100, help="model training epochs (the paper: 300)")
    parser.add_argument("--toy-features", type=int, default=40, help="toy setting: n features (N = --hidden)")
    parser.add_argument("--toy-sparsity", type=float, default=0.9, help="toy setting: feature sparsity S")
    parser.add_argument("--toy-steps", type=int, default=4000)
    parser.add_argument("--budgets", type=int, nargs="+", default=[200, 400, 800], help="SAE steps tried in turn")
    parser.add_argument("--sae-batch", type=int, default=256)
    parser.add_argument("--ve-tolerance", type=float, default=0.005, help="VE gain under which training stops")
    parser.add_argument("--threads", type=int, default=1)
    if "--quick" in argv:
        parser.set_defaults(**QUICK)
    if "--setting" in argv and argv[argv.index("--setting") + 1] == "toy" and "--hidden" not in argv:
        parser.set_defaults(hidden=10)
    return parser.parse_args(argv)


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


def saes_until_ve_plateau(train_acts: torch.Tensor, test_acts: torch.Tensor, d_sae: int, args) -> tuple[dict, dict]:
    """({SAE seed: measurement}, training record) for the first budget whose VE gain falls under the tolerance."""
    previous_ve = None
    for budget in args.budgets:
        saes = train_default_saes(train_acts, d_sae, budget, args.sae_seeds, args.sae_batch)
        measured = {seed: measure_default_sae(sae, test_acts) for seed, sae in saes.items()}
        ve = sum(m["variance_explained"] for m in measured.values()) / len(measured)
        plateaued = previous_ve is not None and ve - previous_ve < args.ve_tolerance
        if plateaued:
            break
        previous_ve = ve
    return measured, {"sae_steps": budget, "ve_plateaued": plateaued}


def layer_activations(args: argparse.Namespace, model_seed: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(training activations, held-out activations, columns about the model) of the measured layer."""
    if args.setting == "toy":
        config = ToyConfig(
            n_features=args.toy_features,
            n_hidden=args.hidden,
            sparsity=args.toy_sparsity,
            steps=args.toy_steps,
            seed=model_seed,
        )
        model = train_toy_model(config)
        _, train_acts = hidden_activations(model, 100_000, TRAIN_SEED_OFFSET + model_seed)
        _, test_acts = hidden_activations(model, 50_000, TEST_SEED_OFFSET + model_seed)
        return train_acts, test_acts, {"ground_truth": represented_features(model)}
    task = DisjointParityTask(args.n_tasks, args.bits_per_task)
    inputs, labels, _ = task.all_inputs()
    train, test = task.split(model_seed)
    model = PreActivationMLP(task.input_width, args.hidden, seed=model_seed)
    train_binary(model, inputs[train], labels[train], args.epochs, seed=model_seed)
    scores = {
        "train_accuracy": binary_accuracy(model, inputs[train], labels[train]),
        "test_accuracy": binary_accuracy(model, inputs[test], labels[test]),
    }
    with torch.no_grad():
        return model.pre_activation(inputs[train]), model.pre_activation(inputs[test]), scores


def measure_model(args: argparse.Namespace, model_seed: int) -> list[dict]:
    train_acts, test_acts, scores = layer_activations(args, model_seed)
    rows = []
    for expansion in args.expansions:
        d_sae = max(1, round(expansion * args.hidden))
        measured, record = saes_until_ve_plateau(train_acts, test_acts, d_sae, args)
        for sae_seed, m in measured.items():
            rows.append(
                {
                    "model_seed": model_seed,
                    "sae_seed": sae_seed,
                    "expansion": expansion,
                    "d_sae": d_sae,
                    "N": args.hidden,
                    **scores,
                    **record,
                    **{key: m[key] for key in ("F", "F_low", "F_high", "psi", "variance_explained", "mean_l0")},
                    "merged_latents": m["merged_latents"],
                    "dead_sae": m["dead_sae"],
                    "measured_samples": m["tokens"],
                    "last_doubling_growth": m["last_doubling_growth"],
                    "quality": m["quality"],
                }
            )
        f_values = [round(m["F"], 1) for m in measured.values()]
        print(f"model {model_seed} x{expansion}: F {f_values}, {record}", flush=True)
    return rows


def summarise(table: pd.DataFrame) -> pd.DataFrame:
    """Per expansion: F averaged over SAE seeds per model, then mean and 95% t interval over model seeds."""
    per_model = table.groupby(["expansion", "model_seed"]).agg(
        F=("F", "mean"), ve=("variance_explained", "mean"), sae_spread=("F", "std"), steps=("sae_steps", "first")
    )
    rows = []
    for expansion, group in per_model.groupby(level="expansion"):
        mean, low, high = mean_interval(group["F"])
        rows.append(
            {
                "expansion": expansion,
                "d_sae": int(table.loc[table["expansion"] == expansion, "d_sae"].iloc[0]),
                "F_mean": mean,
                "F_low95": low,
                "F_high95": high,
                "F_sae_seed_std": group["sae_spread"].mean(),
                "variance_explained": group["ve"].mean(),
                "sae_steps": group["steps"].median(),
                "ve_plateaued_share": table.loc[table["expansion"] == expansion, "ve_plateaued"].mean(),
                "model_seeds": len(group),
                "gate_pass": gate_pass(table.loc[table["expansion"] == expansion, "quality"]),
            }
        )
    return pd.DataFrame(rows)


def plot(
    summary: pd.DataFrame, hidden: int, path: Path, verdicts: pd.Series, ground_truth: float | None = None
) -> None:
    figure, (ax_f, ax_ve) = plt.subplots(1, 2, figsize=(10, 4.2))
    errors = [(summary["F_mean"] - summary["F_low95"]).fillna(0), (summary["F_high95"] - summary["F_mean"]).fillna(0)]
    ax_f.errorbar(summary["d_sae"], summary["F_mean"], yerr=errors, marker="o", capsize=3, label="F (95% interval)")
    ax_f.plot(summary["d_sae"], summary["d_sae"], color="gray", linestyle=":", label="F = d_sae")
    ax_f.axhline(hidden, color="gray", linestyle="--", label=f"F = N = {hidden}")
    if ground_truth is not None:
        ax_f.axhline(ground_truth, color="green", linestyle="-.", label=f"stored features ({ground_truth:g})")
    ax_f.set_xscale("log", base=2)
    ax_f.set_yscale("log", base=2)
    ax_f.set_xlabel("SAE width d_sae")
    ax_f.set_ylabel("F, mean over model seeds")
    ax_f.legend(fontsize=8)
    ax_ve.plot(summary["d_sae"], summary["variance_explained"], marker="o")
    ax_ve.set_xscale("log", base=2)
    ax_ve.set_xlabel("SAE width d_sae")
    ax_ve.set_ylabel("held-out variance explained")
    figure.suptitle("Dictionary scaling through the default SAE recipe")
    figure.text(0.5, 0.01, f"Means over every SAE. {gate_summary(verdicts)}.", ha="center", fontsize=7, wrap=True)
    figure.tight_layout(rect=(0, 0.05, 1, 1))
    save_figure(figure, path)
    plt.close(figure)


def write_readme(path: Path, args, table, summary, command: str, seconds: float) -> None:
    plateau = plateau_expansion(summary["expansion"].tolist(), summary["F_mean"].tolist())
    load = os.getloadavg()
    where = (
        f"F plateaus from {plateau:g}x (F within {PLATEAU_TOLERANCE:.0%} of its value at every wider SAE)"
        if plateau is not None
        else f"F does not plateau inside the sweep (no width after which F stays within {PLATEAU_TOLERANCE:.0%})"
    )
    widest = summary.iloc[-1]
    per_width = "\n".join(
        f"- {row['expansion']:g}x ({row['d_sae']:.0f} latents): {gate_summary(part['quality'])}"
        for (_, row), (_, part) in zip(summary.iterrows(), table.groupby("expansion"))
    )
    if args.setting == "toy":
        truth = table.groupby("model_seed")["ground_truth"].first()
        models = f"Toy models store {truth.min()}-{truth.max()} features (||W_i|| > 0.5) over {len(truth)} seeds."
        title = "a toy model of superposition with a known feature count"
        setting = (
            f"Setting: toy models of superposition (experiments/toy.py), m = N = {args.hidden} hidden dimensions, "
            f"n = {args.toy_features}\nfeatures of importance 0.9^i, sparsity S = {args.toy_sparsity}, "
            f"{args.toy_steps} Adam steps, seeds {args.model_seeds};\nSAEs train on 100,000 samples' "
            "hidden activations, F on 50,000 fresh ones."
        )
    else:
        accuracy = table.groupby("model_seed")["test_accuracy"].first()
        models = f"Models: test accuracy {accuracy.min():.3f}-{accuracy.max():.3f} over {len(accuracy)} seeds."
        title = "the paper's sparse-parity setting"
        setting = f"""Setting (the paper's `experiments/interventions` code, read, not copied):
{args.n_tasks} parity tasks of {args.bits_per_task} bits each, input [one-hot task |
{args.n_tasks * args.bits_per_task} bits], every input enumerated, 80/20 split stratified by task and label
(per model seed); one hidden layer of N = {args.hidden}
(Linear -> ReLU -> one logit), Adam lr 1e-3, batch 64, {args.epochs} epochs (the paper: 300). Measured
layer: the hidden pre-activation, as in the paper. SAEs train on the training inputs' activations and F
is measured on the held-out inputs' (the paper took the first 1,000 training rows of an unshuffled
loader, which its stratified split orders by task and label; we use every row)."""
    text = f"""# Dictionary robustness in {title}

Made by (from the repository root, {seconds / 60:.1f} min on {args.threads} CPU thread(s); load average
{load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f} at the end, shared machine):

    {command}

Paper's direction: F plateaus once the SAE is wide enough.

Ours: {where}. At the widest SAE ({widest["d_sae"]:.0f} latents) F = {widest["F_mean"]:.1f}
[{widest["F_low95"]:.1f}, {widest["F_high95"]:.1f}] with held-out variance explained {widest["variance_explained"]:.3f}.
{models}

F per width, mean over {len(args.model_seeds)} model seeds (each the mean of {len(args.sae_seeds)} SAE seeds) with its
95% t interval over model seeds; `F_sae_seed_std` the spread between SAE seeds of one model;
`gate_pass` how many of the width's SAEs pass the quality gate (`gate.QualityGate.verdict`, CE loss
recovered not applicable to this network):

```
{summary.round(3).to_string(index=False)}
```

Quality gate, all widths: {gate_summary(table["quality"])}. Per width:

{per_width}

Every SAE's verdict is the `quality` column of `table.csv`.

{setting}

SAEs: the validated default recipe (`SAETrainingConfig()`, SAE-Lens standard ReLU SAE, L1 1 on
|z| * ||W_dec|| in normalised units, lr 2e-4 * sqrt(16384 / d_sae)), batches of {args.sae_batch}; F by
`analyze.sae_budget` (duplicate latents at decoder cosine >= 0.9 merged). Training rule: budgets of
{args.budgets} steps in turn, each a fresh run; stop at the first whose held-out variance explained (mean
over SAE seeds) gains less than {args.ve_tolerance} over the previous; `ve_plateaued_share` is the share of
(model, width) pairs where that happened before the last budget ran out.

Files: `table.csv` (one row per model seed, width and SAE seed), `summary.csv`, `f_vs_width.png` / `.svg`.
"""
    path.write_text(text)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    started = time.perf_counter()
    rows = []
    with torch_threads(args.threads):
        for model_seed in args.model_seeds:
            rows += measure_model(args, model_seed)
    table = pd.DataFrame(rows)
    summary = summarise(table)
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "table.csv", index=False)
    summary.to_csv(args.out / "summary.csv", index=False)
    truth = table.groupby("model_seed")["ground_truth"].first().mean() if "ground_truth" in table else None
    plot(summary, args.hidden, args.out / "f_vs_width", table["quality"], truth)
    command = study_command("experiments.dictionary_robustness", argv)
    write_readme(args.out / "README.md", args, table, summary, command, time.perf_counter() - started)
    print(summary.round(3).to_string(index=False))
    return table


if __name__ == "__main__":
    main()
