"""Adversarial training and F, pre-registered: the tests named in preregistration.toml, 10 seeds, Holm-corrected.

The exploratory sweep (sweep.py) ran 32 uncorrected Spearman tests on 3 seeds. This study runs
only what experiments/adversarial/preregistration.toml names, written and committed before the
models were trained: per regime (abundance, scarcity) one model, one layer, one attack and the
predicted sign of the slope of clean-input F against the training epsilon; and a capacity sweep
at one epsilon that locates where the sign of the effect changes. F is read by SAEs of the
validated default recipe (experiments.findings_stats; duplicates merged); a conv layer per spatial
position (rows of N = channels), bootstrap over whole images. Every p-value of the study is
Holm-corrected together. Writes table.csv, tests.csv, preregistered.png/.svg and README.md to --out.

    python -m experiments.adversarial.preregistered            # ~20 min on 1 CPU thread
    python -m experiments.adversarial.preregistered --quick    # tiny, seconds
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from scipy import stats

from experiments import study_command, torch_threads
from experiments.adversarial.attacks import train_adversarially
from experiments.adversarial.sweep import Run, activation_rows, data_and_model
from experiments.findings_stats import (
    gate_pass,
    gate_summary,
    holm,
    measure_default_sae,
    save_figure,
    slope_interval,
    train_default_saes,
)
from experiments.tasks import ClassifierTraining, accuracy

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

DEFAULT_CONFIG = Path(__file__).resolve().parent / "preregistration.toml"
DEFAULT_OUT = Path(__file__).resolve().parents[2] / "results" / "adversarial_preregistered"
DEAD_LAYER = "dead layer: never active, no SAE trained (F undefined)"
QUICK_COMMON = dict(
    seeds=[0, 1, 2], cnn_steps=20, n_train=256, n_test=64, sae_steps=20, sae_batch=256, image_size=6, n_features=8
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="the pre-registration")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--quick", action="store_true", help=f"tiny run for tests, overriding {QUICK_COMMON}")
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


def load_registration(path: Path, quick: bool) -> dict:
    registration = tomllib.loads(path.read_text())
    if quick:
        registration["common"] |= QUICK_COMMON
        registration["capacity"]["channels"] = registration["capacity"]["channels"][:2]
    return registration


def planned_runs(registration: dict) -> dict[Run, set[int]]:
    """{model run: the layers to measure on it}, each model trained once however many tests use it."""
    plan: dict[Run, set[int]] = {}
    seeds = registration["common"]["seeds"]

    def add(model, n_classes, channels, attack, epsilon, layer):
        for seed in seeds:
            run = Run(model, n_classes, channels, attack if epsilon > 0 else "none", epsilon, seed)
            plan.setdefault(run, set()).add(layer)

    for regime in registration["regime"]:
        for epsilon in regime["epsilons"]:
            add(regime["model"], regime["n_classes"], regime["channels"], regime["attack"], epsilon, regime["layer"])
    capacity = registration["capacity"]
    for channels in capacity["channels"]:
        for epsilon in (0.0, capacity["epsilon"]):
            add(capacity["model"], capacity["n_classes"], channels, capacity["attack"], epsilon, capacity["layer"])
    return plan


def measure_run(common: dict, run: Run, layers: set[int]) -> list[dict]:
    settings = SimpleNamespace(**common)
    train_inputs, train_labels, test_inputs, test_labels, model = data_and_model(settings, run)
    training = ClassifierTraining(steps=common["cnn_steps"], lr=common["lr"], seed=run.seed)
    kind = "pgd" if run.attack == "none" else run.attack
    train_adversarially(model, train_inputs, train_labels, training, kind, run.epsilon, common["pgd_steps"])
    rows = []
    with torch.no_grad():
        train_layers = model.hidden_activations(train_inputs)
        test_layers = model.hidden_activations(test_inputs)
    for layer in sorted(layers):
        train_rows, _ = activation_rows(train_layers[layer])
        test_rows, image_ids = activation_rows(test_layers[layer])
        row = {
            "model": run.model,
            "n_classes": run.n_classes,
            "channels": run.width,
            "attack": run.attack,
            "epsilon": run.epsilon,
            "seed": run.seed,
            "layer": layer,
            "clean_accuracy": accuracy(model, test_inputs, test_labels),
        }
        if not train_rows.abs().sum() > 0:  # a dead layer: F undefined, the accuracy still counts
            rows.append(row | {"F": math.nan, "dead_layer": True, "quality": DEAD_LAYER})
            continue
        sae = train_default_saes(
            train_rows, common["sae_expansion"] * run.width, common["sae_steps"], [run.seed], common["sae_batch"]
        )[run.seed]
        measured = measure_default_sae(sae, test_rows, doc_ids=image_ids)
        rows.append(
            row
            | {key: measured[key] for key in ("F", "F_low", "F_high", "psi", "variance_explained", "mean_l0")}
            | {"dead_layer": False, "dead_sae": measured["dead_sae"]}
            | {"last_doubling_growth": measured["last_doubling_growth"], "quality": measured["quality"]}
        )
    return rows


def regime_tests(table: pd.DataFrame, registration: dict) -> list[dict]:
    tests = []
    for regime in registration["regime"]:
        part = table[
            (table["n_classes"] == regime["n_classes"])
            & (table["channels"] == regime["channels"])
            & (table["layer"] == regime["layer"])
            & (table["epsilon"].isin(regime["epsilons"]))
            & (table["attack"].isin([regime["attack"], "none"]))
        ].dropna(subset=["F"])
        fit = slope_interval(part["epsilon"], part["F"])
        tests.append(
            {
                "test": f"{regime['name']}: slope of F on epsilon",
                "setting": f"{regime['model']} {regime['n_classes']} classes, {regime['channels']} channels, "
                f"layer {regime['layer']}, {regime['attack']}",
                "predicted": regime["predicted_sign"],
                "estimate": fit["slope"],
                "low95": fit["slope_low"],
                "high95": fit["slope_high"],
                "p": fit["p"],
                "n": len(part),
                "gate_pass": gate_pass(part["quality"]),
            }
        )
    return tests


def capacity_tests(table: pd.DataFrame, registration: dict) -> list[dict]:
    capacity = registration["capacity"]
    tests = []
    for channels in capacity["channels"]:
        part = table[
            (table["n_classes"] == capacity["n_classes"])
            & (table["channels"] == channels)
            & (table["layer"] == capacity["layer"])
        ]
        clean = part[part["epsilon"] == 0].set_index("seed")["F"]
        attacked = part[(part["epsilon"] == capacity["epsilon"]) & (part["attack"] == capacity["attack"])]
        used = pd.concat([part[part["epsilon"] == 0], attacked])
        log_ratio = (np.log(attacked.set_index("seed")["F"]) - np.log(clean)).dropna()
        mean = float(log_ratio.mean())
        if len(log_ratio) >= 2 and log_ratio.std() > 0:
            result = stats.ttest_1samp(log_ratio, 0.0)
            half = stats.t.ppf(0.975, len(log_ratio) - 1) * log_ratio.std(ddof=1) / math.sqrt(len(log_ratio))
            p_value = float(result.pvalue)
        else:
            half, p_value = math.nan, math.nan
        tests.append(
            {
                "test": f"capacity {channels} channels: ln F(eps {capacity['epsilon']}) - ln F(0)",
                "setting": f"{capacity['model']} {capacity['n_classes']} classes, layer {capacity['layer']}, "
                f"{capacity['attack']}",
                "predicted": "locate the sign change",
                "channels": channels,
                "estimate": mean,
                "low95": mean - half,
                "high95": mean + half,
                "p": p_value,
                "n": len(log_ratio),
                "gate_pass": gate_pass(used["quality"]),
            }
        )
    return tests


def sign_change(capacity: pd.DataFrame) -> str:
    below = capacity[capacity["high95"] < 0]["channels"]
    above = capacity[capacity["low95"] > 0]["channels"]
    if len(below) and len(above):
        return (
            f"F falls under attack-training (interval below 0) at {sorted(below.astype(int).tolist())} channels "
            f"and rises (interval above 0) at {sorted(above.astype(int).tolist())}"
        )
    if len(below):
        return f"F falls at {sorted(below.astype(int).tolist())} channels; no capacity where it clearly rises"
    if len(above):
        return f"F rises at {sorted(above.astype(int).tolist())} channels; no capacity where it clearly falls"
    return "no capacity where the interval excludes 0: the sweep locates no sign change"


def plot(table: pd.DataFrame, tests: pd.DataFrame, registration: dict, path: Path) -> None:
    regimes = registration["regime"]
    figure, axes = plt.subplots(1, len(regimes) + 1, figsize=(4.6 * (len(regimes) + 1), 4))
    for ax, regime in zip(axes, regimes):
        part = table[
            (table["n_classes"] == regime["n_classes"])
            & (table["channels"] == regime["channels"])
            & (table["layer"] == regime["layer"])
        ]
        ok = part["quality"] == "ok"
        ax.scatter(part["epsilon"][ok], part["F"][ok], alpha=0.5, s=14, color="C0", label="one seed, gate ok")
        ax.scatter(
            part["epsilon"][~ok],
            part["F"][~ok],
            s=14,
            facecolors="none",
            edgecolors="C0",
            label=f"one seed, fails the gate ({(~ok).sum()})",
        )
        means = part.groupby("epsilon")["F"].mean()
        ax.plot(means.index, means.values, marker="o", color="black", label="mean")
        test = tests[tests["test"].str.startswith(regime["name"])].iloc[0]
        ax.set_title(
            f"{regime['name']}: slope {test['estimate']:.1f} [{test['low95']:.1f}, {test['high95']:.1f}]", fontsize=9
        )
        ax.set_xlabel(f"training epsilon ({regime['attack']})")
        ax.set_ylabel(f"F, conv layer {regime['layer']}")
        ax.legend(fontsize=7)
    capacity = tests.dropna(subset=["channels"]) if "channels" in tests else tests.iloc[0:0]
    errors = [capacity["estimate"] - capacity["low95"], capacity["high95"] - capacity["estimate"]]
    axes[-1].errorbar(capacity["channels"], capacity["estimate"], yerr=errors, marker="o", capsize=3)
    axes[-1].axhline(0, color="gray", linestyle=":")
    axes[-1].set_xscale("log", base=2)
    axes[-1].set_xlabel("channels")
    axes[-1].set_ylabel(f"ln F(eps {registration['capacity']['epsilon']}) - ln F(0), 95% interval")
    used = tests.dropna(subset=["channels"])["gate_pass"] if "channels" in tests else []
    axes[-1].set_title(f"capacity sweep (SAEs passing the gate per point: {', '.join(used)})", fontsize=8)
    figure.tight_layout()
    save_figure(figure, path)
    plt.close(figure)


def write_readme(path: Path, registration, table, tests, change: str, command: str, seconds: float) -> None:
    load = os.getloadavg()
    alpha = registration["common"]["alpha"]
    accuracy_table = (
        table.groupby(["n_classes", "channels", "epsilon"])
        .agg(
            clean_accuracy=("clean_accuracy", "mean"),
            F=("F", "mean"),
            F_std=("F", "std"),
            gate_pass=("quality", gate_pass),
        )
        .reset_index()
    )
    verdicts = []
    for _, test in tests[~tests["test"].str.startswith("capacity")].iterrows():
        sign = "positive" if test["low95"] > 0 else "negative" if test["high95"] < 0 else "undetermined"
        confirmed = test["p_holm"] < alpha and sign == test["predicted"]
        verdicts.append(
            f"- {test['test']} ({test['setting']}): {test['estimate']:.2f} "
            f"[{test['low95']:.2f}, {test['high95']:.2f}], Holm p {test['p_holm']:.3g}; predicted {test['predicted']}: "
            f"{'confirmed' if confirmed else 'not confirmed'}; SAEs passing the quality gate: {test['gate_pass']}"
        )
    text = f"""# Adversarial training and F, pre-registered

Made by (from the repository root, {seconds / 60:.1f} min on 1 CPU thread; load average {load[0]:.2f},
{load[1]:.2f}, {load[2]:.2f} at the end, shared machine):

    {command}

What is tested, the seeds and the predicted signs are in `experiments/adversarial/preregistration.toml`,
committed before these models were trained. Family-wise alpha {alpha}, Holm-corrected over all
{len(tests)} tests of this study.

{chr(10).join(verdicts)}

Capacity sweep: {change}.

Quality gate (`gate.QualityGate.verdict`; CE loss recovered does not apply to a classifier):
{gate_summary(table["quality"])}. `gate_pass` below: SAEs passing / SAEs behind each test or setting;
every SAE's verdict is the `quality` column of `table.csv` (hollow points in the plot fail it).

Every test (estimate with its 95% interval; p two-sided; p_holm adjusted over the family):

```
{tests.drop(columns=["setting"]).round(4).to_string(index=False)}
```

Clean accuracy, F and `gate_pass` per model setting (means over {len(registration["common"]["seeds"])} seeds):

```
{accuracy_table.round(3).to_string(index=False)}
```

Setting: sparse-feature classification (`SparseFeatureTask`, {registration["common"]["n_features"]} features,
sparsity {registration["common"]["sparsity"]}) drawn as {registration["common"]["image_size"]} x
{registration["common"]["image_size"]} images; CNN (conv 3x3 -> ReLU -> conv 3x3 stride 2 -> ReLU -> linear),
{registration["common"]["cnn_steps"]} AdamW steps (lr {registration["common"]["lr"]}) with every minibatch replaced by
its PGD version ({registration["common"]["pgd_steps"]} steps) at the training epsilon. F: SAEs of the validated default
recipe, {registration["common"]["sae_expansion"]} x channels latents, {registration["common"]["sae_steps"]} steps of
{registration["common"]["sae_batch"]} positions of clean training images, measured on
{registration["common"]["n_test"]} clean test images (every spatial position a row, bootstrap over images).

Files: `table.csv` (one row per model and measured layer), `tests.csv`, `preregistered.png` / `.svg`.
"""
    path.write_text(text)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    registration = load_registration(args.config, args.quick)
    started = time.perf_counter()
    rows = []
    with torch_threads(args.threads):
        for run, layers in planned_runs(registration).items():
            rows += measure_run(registration["common"], run, layers)
            print(f"{run}: {time.perf_counter() - started:.0f}s", flush=True)
    table = pd.DataFrame(rows)
    tests = pd.DataFrame(regime_tests(table, registration) + capacity_tests(table, registration))
    tests["p_holm"] = holm(tests["p"].fillna(1.0).tolist())
    change = sign_change(tests.dropna(subset=["channels"]))
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "table.csv", index=False)
    tests.to_csv(args.out / "tests.csv", index=False)
    plot(table, tests, registration, args.out / "preregistered")
    command = study_command("experiments.adversarial.preregistered", argv)
    write_readme(args.out / "README.md", registration, table, tests, change, command, time.perf_counter() - started)
    print(tests.round(4).to_string(index=False))
    return table


if __name__ == "__main__":
    main()
