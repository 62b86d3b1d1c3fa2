"""Does adversarial training raise or lower the number of effective features? Abundance vs scarcity.

Task (generated, offline; sparse_features.py): sparse-feature classification. An input is
n_features sparse toy features; its label is the argmax of n_classes fixed random linear scores
of them. More classes carve the input space into more regions (a harder task); the width is the
capacity. Two classifiers, as in the paper:
- "mlp": a two-hidden-layer ReLU MLP (lm_superposition.tasks.MLPClassifier) on the feature
  vector; regime CLASSESxWIDTH sets both hidden widths.
- "cnn": a two-conv-layer ReLU CNN (lm_superposition.tasks.CNNClassifier) on the same features
  drawn as single-channel images (`SparseFeatureImages`: one fixed +-1 stamp per feature);
  regime CLASSESxCHANNELS sets both layers' channel count.

For every model, regime, attack (FGSM, PGD), epsilon and seed: train adversarially
(attacks.train_adversarially), then measure
- clean accuracy, accuracy under the training attack at the training epsilon, and accuracy
  under PGD at a common --eval-epsilon (to compare robustness across models);
- per hidden layer, F and psi through the paper's tied SAE, trained on the layer's activations
  over clean training inputs and measured on clean test inputs and on their PGD versions at the
  training epsilon (the clean ones at epsilon 0). A conv layer's activations are taken per
  spatial position, vectors of length channels (N = channels), as the paper's code does; the
  budget sums over all positions of all test images, and the bootstrap resamples whole images;
- the sparse-coding checks (lm_superposition.sparse_coding): linear additivity of the layer
  (cosine of h(a) + h(b) with h(a + b) over pairs of test inputs) and the compressed-sensing
  margin of the SAE's code.
Writes table.csv, f_vs_epsilon.png and README.md to --out.

    python -m experiments.adversarial.sweep            # the committed results
    python -m experiments.adversarial.sweep --quick    # tiny, seconds
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

from experiments import study_command, torch_threads
from experiments.adversarial.attacks import ATTACKS, attack, train_adversarially
from experiments.adversarial.sparse_features import SparseFeatureImages, SparseFeatureTask
from experiments.tasks import ClassifierTraining, CNNClassifier, MLPClassifier, accuracy, scaled_to_unit_rms
from experiments.toy import ToySAEConfig, train_toy_sae
from lm_superposition.metric import FeatureBudget
from lm_superposition.saes import variance_explained
from lm_superposition.sparse_coding import compressed_sensing_margin, linear_additivity

DEFAULT_OUT = Path(__file__).resolve().parents[2] / "results" / "adversarial"
TRAIN_SEED_OFFSET, TEST_SEED_OFFSET, ATTACK_SEED_OFFSET = 1_000, 2_000, 3_000
MODELS = ("mlp", "cnn")
QUICK = dict(
    regimes=["2x8"],
    cnn_regimes=["2x4"],
    epsilons=[0.0, 0.1],
    seeds=[0],
    steps=30,
    cnn_steps=30,
    sae_steps=20,
    n_train=512,
    n_test=256,
)


@dataclass(frozen=True)
class Run:
    """One trained model of the sweep."""

    model: str
    n_classes: int
    width: int  # hidden width (mlp) or channels (cnn)
    attack: str  # "none" at epsilon 0
    epsilon: float
    seed: int


def parse_regime(text: str) -> tuple[int, int]:
    try:
        n_classes, width = (int(part) for part in text.split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a regime is CLASSESxWIDTH, e.g. 2x64, got {text!r}") from None
    return n_classes, width


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--quick", action="store_true", help=f"tiny run for tests: {QUICK}")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument(
        "--regimes",
        nargs="+",
        default=["2x64", "2x8", "16x64", "16x8"],
        help="mlp: CLASSESxWIDTH, task complexity and hidden width (both hidden layers)",
    )
    parser.add_argument(
        "--cnn-regimes",
        nargs="+",
        default=["2x16", "2x4", "16x16", "16x4"],
        help="cnn: CLASSESxCHANNELS, task complexity and channels (both conv layers)",
    )
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=ATTACKS)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[0.0, 0.02, 0.05, 0.1])
    parser.add_argument(
        "--eval-epsilon", type=float, default=0.05, help="PGD radius at which every model's robustness is compared"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--n-features", type=int, default=32)
    parser.add_argument("--sparsity", type=float, default=0.75)
    parser.add_argument("--pgd-steps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=800, help="mlp training steps")
    parser.add_argument(
        "--cnn-steps", type=int, default=400, help="cnn training steps (fewer than the mlp: a cnn step costs more)"
    )
    parser.add_argument("--image-size", type=int, default=8, help="cnn input images are IMAGE_SIZE x IMAGE_SIZE")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--n-train", type=int, default=10_000)
    parser.add_argument("--n-test", type=int, default=4_000)
    parser.add_argument("--sae-expansion", type=int, default=4)
    parser.add_argument(
        "--l1", type=float, default=0.3, help="tied SAE L1 coefficient (activations scaled to unit RMS)"
    )
    parser.add_argument("--sae-steps", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1)
    if "--quick" in argv:
        parser.set_defaults(**QUICK)
    args = parser.parse_args(argv)
    args.regimes = [parse_regime(r) for r in args.regimes]
    args.cnn_regimes = [parse_regime(r) for r in args.cnn_regimes]
    if any(e < 0 for e in args.epsilons):
        parser.error(f"--epsilons must be >= 0, got {args.epsilons}")
    return args


def runs(args) -> list[Run]:
    """Every model to train; epsilon 0 once per model, regime and seed (no attack)."""
    out = []
    for model in args.models:
        for n_classes, width in args.regimes if model == "mlp" else args.cnn_regimes:
            for seed in args.seeds:
                out += [Run(model, n_classes, width, "none", 0.0, seed)] if 0.0 in args.epsilons else []
                out += [
                    Run(model, n_classes, width, kind, eps, seed)
                    for kind in args.attacks
                    for eps in args.epsilons
                    if eps > 0
                ]
    return out


def data_and_model(args, run: Run):
    """(train inputs, train labels, test inputs, test labels, untrained classifier) for `run`."""
    task = SparseFeatureTask(args.n_features, run.n_classes, args.sparsity, seed=0)
    if run.model == "mlp":
        source = task
        model = MLPClassifier(args.n_features, [run.width, run.width], run.n_classes, seed=run.seed)
    else:
        source = SparseFeatureImages(task, image_size=args.image_size)
        model = CNNClassifier(args.image_size, [run.width, run.width], run.n_classes, seed=run.seed)
    return (
        *source.sample(args.n_train, TRAIN_SEED_OFFSET + run.seed),
        *source.sample(args.n_test, TEST_SEED_OFFSET + run.seed),
        model,
    )


def activation_rows(activations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's activations as [vectors, N] rows, and the input each row belongs to.

    An MLP layer gives one row per input; a conv layer [inputs, channels, height, width] one
    row per spatial position (N = channels), as the paper's code measures conv layers.
    """
    if activations.ndim == 2:
        return activations, torch.arange(activations.shape[0])
    n_inputs, channels, height, width = activations.shape
    rows = activations.permute(0, 2, 3, 1).reshape(-1, channels)
    return rows, torch.arange(n_inputs).repeat_interleave(height * width)


@torch.no_grad()
def measure(sae, rows: torch.Tensor, input_ids: torch.Tensor) -> dict:
    """toy.measure_sae with bootstrap blocks of whole inputs (one image's positions are not independent samples)."""
    codes = sae.encode(rows)
    budget = FeatureBudget(codes.shape[-1], rows.shape[-1])
    budget.update(codes, doc_ids=input_ids)
    return {**budget.summary(), "variance_explained": variance_explained(rows, sae.decode(codes))}


def measure_model(args, run: Run) -> list[dict]:
    train_inputs, train_labels, test_inputs, test_labels, model = data_and_model(args, run)
    steps = args.steps if run.model == "mlp" else args.cnn_steps
    training = ClassifierTraining(steps=steps, lr=args.lr, seed=run.seed)
    kind, epsilon, seed, width = run.attack, run.epsilon, run.seed, run.width
    train_adversarially(
        model, train_inputs, train_labels, training, "pgd" if kind == "none" else kind, epsilon, args.pgd_steps
    )

    generator = torch.Generator().manual_seed(ATTACK_SEED_OFFSET + seed)
    adversarial = attack(model, test_inputs, test_labels, "pgd", epsilon, args.pgd_steps, generator)
    at_eval_epsilon = attack(model, test_inputs, test_labels, "pgd", args.eval_epsilon, args.pgd_steps, generator)
    common = {
        "model": run.model,
        "n_classes": run.n_classes,
        "width": width,
        "attack": kind,
        "epsilon": epsilon,
        "seed": seed,
        "clean_accuracy": accuracy(model, test_inputs, test_labels),
        "adversarial_accuracy": accuracy(model, adversarial, test_labels),
        "robust_accuracy_eval_eps": accuracy(model, at_eval_epsilon, test_labels),
    }
    half = args.n_test // 2
    with torch.no_grad():
        layers = zip(*(model.hidden_activations(x) for x in (train_inputs, test_inputs, adversarial)))
        rows = []
        for layer, activations in enumerate(layers):
            (train_acts, _), (clean_acts, input_ids), (adversarial_acts, _) = map(activation_rows, activations)
            positions = clean_acts.shape[0] // args.n_test
            if (
                not train_acts.abs().sum() > 0
            ):  # a collapsed (all-dead) layer: F is undefined, keep the model's accuracies
                rows.append({**common, "layer": layer, "N": width, "positions": positions, "dead_neurons": width})
                continue
            sae_config = ToySAEConfig(
                d_sae=args.sae_expansion * width, l1_coefficient=args.l1, steps=args.sae_steps, seed=seed
            )
            with torch.enable_grad():
                sae = train_toy_sae(scaled_to_unit_rms(train_acts), sae_config)
            clean = measure(sae, scaled_to_unit_rms(clean_acts, reference=train_acts), input_ids)
            adv = measure(sae, scaled_to_unit_rms(adversarial_acts, reference=train_acts), input_ids)
            hidden = lambda x, layer=layer: model.hidden_activations(x)[layer]  # noqa: E731
            additivity = linear_additivity(hidden, test_inputs[:half], test_inputs[half : 2 * half])
            rows.append(
                {
                    **common,
                    "layer": layer,
                    "N": width,
                    "positions": positions,
                    "d_sae": sae_config.d_sae,
                    "F_clean": clean["F"],
                    "F_clean_low": clean["F_low"],
                    "F_clean_high": clean["F_high"],
                    "psi_clean": clean["psi"],
                    "F_adversarial": adv["F"],
                    "psi_adversarial": adv["psi"],
                    "variance_explained_clean": clean["variance_explained"],
                    "variance_explained_adversarial": adv["variance_explained"],
                    "mean_l0_clean": clean["mean_l0"],
                    "cs_margin": compressed_sensing_margin(width, clean["mean_l0"], sae_config.d_sae)
                    if clean["mean_l0"] > 0
                    else float("nan"),
                    "additivity": additivity.mean,
                    "dead_neurons": int((clean_acts.abs().sum(0) == 0).sum()),
                    "test_samples": clean["tokens"],
                }
            )
    return rows


def regime_name(model: str, n_classes: int, width: int) -> str:
    return f"{n_classes} classes, " + (f"width {width}" if model == "mlp" else f"{width} channels")


def summarise(table: pd.DataFrame) -> pd.DataFrame:
    """Means and stds over seeds per model, regime, attack, epsilon and layer."""
    return (
        table.groupby(["model", "n_classes", "width", "layer", "attack", "epsilon"], sort=False)
        .agg(
            F_clean=("F_clean", "mean"),
            F_clean_std=("F_clean", "std"),
            F_adv=("F_adversarial", "mean"),
            psi_clean=("psi_clean", "mean"),
            VE=("variance_explained_clean", "mean"),
            clean_acc=("clean_accuracy", "mean"),
            adv_acc=("adversarial_accuracy", "mean"),
            robust_acc=("robust_accuracy_eval_eps", "mean"),
            additivity=("additivity", "mean"),
            cs_margin=("cs_margin", "mean"),
        )
        .reset_index()
    )


def trends(table: pd.DataFrame) -> pd.DataFrame:
    """Per model, regime, layer and attack: Spearman of clean F with epsilon (eps 0 rows shared) and
    F(max eps) / F(0)."""
    rows = []
    keys = ["model", "n_classes", "width", "layer"]
    baselines = dict(list(table[table["attack"] == "none"].groupby(keys)))
    for (model, n_classes, width, layer, kind), group in table[table["attack"] != "none"].groupby(
        [*keys, "attack"], sort=False
    ):
        both = pd.concat([baselines[(model, n_classes, width, layer)], group])
        means = both.groupby("epsilon")["F_clean"].mean()
        ratio = means.iloc[-1] / means.iloc[0]
        rows.append(
            {
                "model": model,
                "regime": regime_name(model, n_classes, width),
                "layer": layer,
                "attack": kind,
                "spearman_F_eps": both["F_clean"].corr(both["epsilon"], method="spearman"),
                "F_max_eps_over_F_0": ratio,
                "direction": "up" if ratio > 1 else "down",
            }
        )
    return pd.DataFrame(rows)


def plot(table: pd.DataFrame, path: Path) -> None:
    """One panel per (model, layer) row and regime column: clean F against training epsilon, per attack."""
    models = [model for model in MODELS if model in set(table.model)]
    panel_rows = [(model, layer) for model in models for layer in sorted(table[table.model == model].layer.unique())]
    regimes = {
        model: list(dict.fromkeys(zip(*(table[table.model == model][key] for key in ("n_classes", "width")))))
        for model in models
    }
    n_columns = max(len(r) for r in regimes.values())
    figure, axes = plt.subplots(
        len(panel_rows), n_columns, figsize=(4.5 * n_columns, 3.5 * len(panel_rows)), squeeze=False
    )
    for ax in axes.flat:
        ax.set_visible(False)  # models with fewer regimes leave panels empty
    for row, (model, layer) in enumerate(panel_rows):
        for column, (n_classes, width) in enumerate(regimes[model]):
            ax = axes[row][column]
            ax.set_visible(True)
            panel = table[
                (table.model == model)
                & (table.n_classes == n_classes)
                & (table.width == width)
                & (table.layer == layer)
            ]
            for kind in sorted(set(table.attack) - {"none"}):
                stats = panel[panel.attack.isin(["none", kind])].groupby("epsilon")["F_clean"].agg(["mean", "std"])
                ax.errorbar(
                    stats.index,
                    stats["mean"],
                    yerr=stats["std"].fillna(0),
                    marker="o",
                    capsize=3,
                    label=f"{kind} training",
                )
            ax.axhline(width, color="grey", linestyle=":", label="N (width)" if model == "mlp" else "N (channels)")
            layer_name = "hidden layer" if model == "mlp" else "conv layer"
            ax.set_title(f"{model.upper()}, {regime_name(model, n_classes, width)}: {layer_name} {layer}", fontsize=9)
            ax.set_xlabel("training epsilon (L-inf)")
            ax.set_ylabel("F on clean inputs (mean ± std)")
            ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_readme(path: Path, args, summary, trend, command: str, seconds: float) -> None:
    setups = []
    if "mlp" in args.models:
        regimes = ", ".join(f"{c}x{w}" for c, w in args.regimes)
        setups.append(
            f"MLP (regimes CLASSESxWIDTH {regimes}): two hidden ReLU layers of that width on the feature\n"
            f"vector; {args.steps} training steps."
        )
    if "cnn" in args.models:
        regimes = ", ".join(f"{c}x{w}" for c, w in args.cnn_regimes)
        setups.append(
            f"CNN (regimes CLASSESxCHANNELS {regimes}): conv 3x3 -> ReLU -> conv 3x3 stride 2 -> ReLU ->\n"
            "linear, both convs with that many channels, on the features drawn as "
            f"{args.image_size}x{args.image_size} images\n"
            f"(`SparseFeatureImages`: a fixed random +-1 3x3 stamp per feature at a fixed place); {args.cnn_steps}\n"
            "training steps. A conv layer is measured per spatial position (rows of N = channels; the\n"
            "`positions` column), with one budget over all positions of all test images."
        )
    setup = "\n".join(setups)
    expansion = args.sae_expansion
    path.write_text(f"""# Adversarial training: F against epsilon in the abundance and scarcity regimes

Made by (from the repository root, {seconds / 60:.1f} min on {args.threads} CPU thread(s)):

    {command}

Paper's direction: adversarial training raises F with a simple task and ample capacity
(abundance) and lowers it with a complex task or little capacity (scarcity).

Direction of clean-input F with training epsilon, per model, regime, layer and attack (Spearman
over {len(args.seeds)} seeds x {len(args.epsilons)} epsilons, the epsilon-0 models shared; ratio = mean F at
epsilon {max(args.epsilons)} / at 0):

```
{trend.round(3).to_string(index=False)}
```

Setup: sparse-feature classification ({args.n_features} features, sparsity {args.sparsity}, label = argmax
of n_classes fixed random linear scores; `SparseFeatureTask` in sparse_features.py).
{setup}
AdamW lr {args.lr}, steps of 256 from {args.n_train} samples, every minibatch replaced by its FGSM or PGD
({args.pgd_steps} steps, random start, step 2.5 eps / steps) version; seeds {args.seeds}. Adversarial accuracy: PGD
at the training epsilon; robust_acc: PGD at epsilon {args.eval_epsilon} for every model. Tied SAE ({expansion} x N
latents, L1 {args.l1}, {args.sae_steps} steps) trained on clean training activations (unit RMS), measured on
{args.n_test} clean test inputs (F_clean) and their PGD versions (F_adv). additivity: mean cosine of
h(a) + h(b) with h(a + b) over {args.n_test // 2} test pairs; cs_margin: N / (L0 ln(d_sae / L0)).

Means over seeds:

```
{summary.round(3).to_string(index=False)}
```

Files: `table.csv` (one row per model and layer, with bootstrap intervals of F_clean), `f_vs_epsilon.png`.
""")


def main(argv: list[str] | None = None) -> pd.DataFrame:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    started = time.perf_counter()
    rows = []
    with torch_threads(args.threads):
        for run in runs(args):
            rows += measure_model(args, run)
            print(
                f"{run.model} {run.n_classes}x{run.width} {run.attack} eps={run.epsilon} seed={run.seed}: "
                f"{time.perf_counter() - started:.0f}s",
                flush=True,
            )
    table = pd.DataFrame(rows)
    summary, trend = summarise(table), trends(table)
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "table.csv", index=False)
    plot(table, args.out / "f_vs_epsilon.png")
    command = study_command("experiments.adversarial.sweep", argv)
    write_readme(args.out / "README.md", args, summary, trend, command, time.perf_counter() - started)
    print(summary.round(3).to_string(index=False))
    print(trend.round(3).to_string(index=False))
    return table


if __name__ == "__main__":
    main()
