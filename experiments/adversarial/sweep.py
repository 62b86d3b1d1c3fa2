"""Does adversarial training raise or lower the number of effective features? Abundance vs scarcity.

Task (generated, offline): sparse-feature classification. An input is n_features toy features
(Uniform[0, 1], each zero with probability `sparsity`, lm_superposition.toy.sample_features);
its label is the argmax of n_classes fixed random linear scores of it. More classes carve the
input space into more regions (a harder task); the hidden width is the capacity.

For every regime (n_classes x hidden width), attack (FGSM, PGD), epsilon and seed: train a
two-hidden-layer ReLU MLP (lm_superposition.tasks.MLPClassifier) adversarially
(attacks.train_adversarially), then measure
- clean accuracy, accuracy under the training attack at the training epsilon, and accuracy
  under PGD at a common --eval-epsilon (to compare robustness across models);
- per hidden layer, F and psi through the paper's tied SAE, trained on the layer's activations
  over clean training inputs and measured on clean test inputs and on their PGD versions at the
  training epsilon (the clean ones at epsilon 0);
- the sparse-coding checks (lm_superposition.sparse_coding): linear additivity of the layer
  (cosine of h(a) + h(b) with h(a + b) over pairs of test inputs) and the compressed-sensing
  margin of the SAE's code.
Writes table.csv, f_vs_epsilon.png and README.md to --out.

    python experiments/adversarial/sweep.py            # the committed results
    python experiments/adversarial/sweep.py --quick    # tiny, seconds
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt
import pandas as pd
import torch

from attacks import ATTACKS, attack, train_adversarially
from lm_superposition.sparse_coding import compressed_sensing_margin, linear_additivity
from lm_superposition.tasks import ClassifierTraining, MLPClassifier, accuracy, scaled_to_unit_rms
from lm_superposition.toy import ToySAEConfig, measure_sae, sample_features, train_toy_sae

DEFAULT_OUT = Path(__file__).resolve().parents[2] / "results" / "adversarial"
TRAIN_SEED_OFFSET, TEST_SEED_OFFSET, ATTACK_SEED_OFFSET = 1_000, 2_000, 3_000
QUICK = dict(regimes=["2x8"], epsilons=[0.0, 0.1], seeds=[0], steps=30, sae_steps=20, n_train=512, n_test=256)


@dataclass(frozen=True)
class SparseFeatureTask:
    """Label = argmax over n_classes of fixed random linear scores (from `seed`) of sparse toy features."""

    n_features: int = 32
    n_classes: int = 2
    sparsity: float = 0.75
    seed: int = 0

    def __post_init__(self):
        if self.n_features <= 0 or self.n_classes < 2:
            raise ValueError(f"need n_features > 0 and n_classes >= 2, got {self.n_features}, {self.n_classes}")

    @property
    def class_scores(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed)
        return torch.randn(self.n_classes, self.n_features, generator=generator)

    def sample(self, n_samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        features = sample_features(n_samples, self.n_features, self.sparsity, generator)
        # Centred features in the scores, so that the all-zero corner is not one class's home.
        labels = ((features - features.mean(0)) @ self.class_scores.T).argmax(-1)
        return features, labels


def parse_regime(text: str) -> tuple[int, int]:
    try:
        n_classes, width = (int(part) for part in text.split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a regime is CLASSESxWIDTH, e.g. 2x64, got {text!r}") from None
    return n_classes, width


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--quick", action="store_true", help=f"tiny run for tests: {QUICK}")
    parser.add_argument("--regimes", nargs="+", default=["2x64", "2x8", "16x64", "16x8"],
                        help="CLASSESxWIDTH: task complexity and hidden width (both hidden layers)")
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=ATTACKS)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[0.0, 0.02, 0.05, 0.1])
    parser.add_argument("--eval-epsilon", type=float, default=0.05, help="PGD radius at which every model's robustness is compared")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--n-features", type=int, default=32)
    parser.add_argument("--sparsity", type=float, default=0.75)
    parser.add_argument("--pgd-steps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--n-train", type=int, default=10_000)
    parser.add_argument("--n-test", type=int, default=4_000)
    parser.add_argument("--sae-expansion", type=int, default=4)
    parser.add_argument("--l1", type=float, default=0.3, help="tied SAE L1 coefficient (activations scaled to unit RMS)")
    parser.add_argument("--sae-steps", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1)
    if "--quick" in argv:
        parser.set_defaults(**QUICK)
    args = parser.parse_args(argv)
    args.regimes = [parse_regime(r) for r in args.regimes]
    if any(e < 0 for e in args.epsilons):
        parser.error(f"--epsilons must be >= 0, got {args.epsilons}")
    return args


def runs(args) -> list[tuple[int, int, str, float, int]]:
    """(n_classes, width, attack, epsilon, seed) for every model; epsilon 0 once per regime and seed (no attack)."""
    out = []
    for n_classes, width in args.regimes:
        for seed in args.seeds:
            out += [(n_classes, width, "none", 0.0, seed)] if 0.0 in args.epsilons else []
            out += [(n_classes, width, kind, eps, seed) for kind in args.attacks for eps in args.epsilons if eps > 0]
    return out


def measure_model(args, n_classes: int, width: int, kind: str, epsilon: float, seed: int) -> list[dict]:
    task = SparseFeatureTask(args.n_features, n_classes, args.sparsity, seed=0)
    train_inputs, train_labels = task.sample(args.n_train, TRAIN_SEED_OFFSET + seed)
    test_inputs, test_labels = task.sample(args.n_test, TEST_SEED_OFFSET + seed)
    model = MLPClassifier(args.n_features, [width, width], n_classes, seed=seed)
    training = ClassifierTraining(steps=args.steps, lr=args.lr, seed=seed)
    train_adversarially(model, train_inputs, train_labels, training, "pgd" if kind == "none" else kind, epsilon, args.pgd_steps)

    generator = torch.Generator().manual_seed(ATTACK_SEED_OFFSET + seed)
    adversarial = attack(model, test_inputs, test_labels, "pgd", epsilon, args.pgd_steps, generator)
    at_eval_epsilon = attack(model, test_inputs, test_labels, "pgd", args.eval_epsilon, args.pgd_steps, generator)
    common = {
        "n_classes": n_classes, "width": width, "attack": kind, "epsilon": epsilon, "seed": seed,
        "clean_accuracy": accuracy(model, test_inputs, test_labels),
        "adversarial_accuracy": accuracy(model, adversarial, test_labels),
        "robust_accuracy_eval_eps": accuracy(model, at_eval_epsilon, test_labels),
    }
    half = args.n_test // 2
    with torch.no_grad():
        layers = zip(*(model.hidden_activations(x) for x in (train_inputs, test_inputs, adversarial)))
        rows = []
        for layer, (train_acts, clean_acts, adversarial_acts) in enumerate(layers):
            if not train_acts.abs().sum() > 0:  # a collapsed (all-dead) layer: F is undefined, keep the model's accuracies
                rows.append({**common, "layer": layer, "N": width, "dead_neurons": width})
                continue
            sae_config = ToySAEConfig(d_sae=args.sae_expansion * width, l1_coefficient=args.l1, steps=args.sae_steps, seed=seed)
            with torch.enable_grad():
                sae = train_toy_sae(scaled_to_unit_rms(train_acts), sae_config)
            clean = measure_sae(sae, scaled_to_unit_rms(clean_acts, reference=train_acts))
            adv = measure_sae(sae, scaled_to_unit_rms(adversarial_acts, reference=train_acts))
            hidden = lambda x, layer=layer: model.hidden_activations(x)[layer]  # noqa: E731
            additivity = linear_additivity(hidden, test_inputs[:half], test_inputs[half : 2 * half])
            rows.append({
                **common, "layer": layer, "N": width, "d_sae": sae_config.d_sae,
                "F_clean": clean["F"], "F_clean_low": clean["F_low"], "F_clean_high": clean["F_high"], "psi_clean": clean["psi"],
                "F_adversarial": adv["F"], "psi_adversarial": adv["psi"],
                "variance_explained_clean": clean["variance_explained"], "variance_explained_adversarial": adv["variance_explained"],
                "mean_l0_clean": clean["mean_l0"],
                "cs_margin": compressed_sensing_margin(width, clean["mean_l0"], sae_config.d_sae) if clean["mean_l0"] > 0 else float("nan"),
                "additivity": additivity.mean,
                "dead_neurons": int((clean_acts.abs().sum(0) == 0).sum()),
                "test_samples": clean["tokens"],
            })
    return rows


def regime_name(n_classes: int, width: int) -> str:
    return f"{n_classes} classes, width {width}"


def summarise(table: pd.DataFrame) -> pd.DataFrame:
    """Means and stds over seeds per regime, attack, epsilon and layer."""
    return (
        table.groupby(["n_classes", "width", "layer", "attack", "epsilon"])
        .agg(F_clean=("F_clean", "mean"), F_clean_std=("F_clean", "std"), F_adv=("F_adversarial", "mean"),
             psi_clean=("psi_clean", "mean"), VE=("variance_explained_clean", "mean"),
             clean_acc=("clean_accuracy", "mean"), adv_acc=("adversarial_accuracy", "mean"),
             robust_acc=("robust_accuracy_eval_eps", "mean"), additivity=("additivity", "mean"),
             cs_margin=("cs_margin", "mean"))
        .reset_index()
    )


def trends(table: pd.DataFrame) -> pd.DataFrame:
    """Per regime, layer and attack: Spearman of clean F with epsilon (eps 0 rows shared) and F(max eps) / F(0)."""
    rows = []
    baseline = table[table["attack"] == "none"]
    for (n_classes, width, layer, kind), group in table[table["attack"] != "none"].groupby(["n_classes", "width", "layer", "attack"]):
        both = pd.concat([baseline[(baseline.n_classes == n_classes) & (baseline.width == width) & (baseline.layer == layer)], group])
        means = both.groupby("epsilon")["F_clean"].mean()
        ratio = means.iloc[-1] / means.iloc[0]
        rows.append({"regime": regime_name(n_classes, width), "layer": layer, "attack": kind,
                     "spearman_F_eps": both["F_clean"].corr(both["epsilon"], method="spearman"),
                     "F_max_eps_over_F_0": ratio,
                     "direction": "up" if ratio > 1 else "down"})
    return pd.DataFrame(rows)


def plot(table: pd.DataFrame, path: Path) -> None:
    regimes = sorted(set(zip(table.n_classes, table.width)))
    layers = sorted(table.layer.unique())
    figure, axes = plt.subplots(len(layers), len(regimes), figsize=(4.5 * len(regimes), 3.5 * len(layers)), squeeze=False)
    baseline = table[table.attack == "none"]
    for column, (n_classes, width) in enumerate(regimes):
        for row, layer in enumerate(layers):
            ax = axes[row][column]
            base = baseline[(baseline.n_classes == n_classes) & (baseline.width == width) & (baseline.layer == layer)]
            for kind in sorted(set(table.attack) - {"none"}):
                group = table[(table.attack == kind) & (table.n_classes == n_classes) & (table.width == width) & (table.layer == layer)]
                stats = pd.concat([base, group]).groupby("epsilon")["F_clean"].agg(["mean", "std"])
                ax.errorbar(stats.index, stats["mean"], yerr=stats["std"].fillna(0), marker="o", capsize=3, label=f"{kind} training")
            ax.axhline(width, color="grey", linestyle=":", label="N (layer width)")
            ax.set_title(f"{regime_name(n_classes, width)}: layer {layer}", fontsize=9)
            ax.set_xlabel("training epsilon (L-inf)")
            ax.set_ylabel("F on clean inputs (mean ± std)")
            ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_readme(path: Path, args, summary, trend, command: str, seconds: float) -> None:
    regimes = ", ".join(regime_name(*r) for r in args.regimes)
    path.write_text(f"""# Adversarial training: F against epsilon in the abundance and scarcity regimes

Made by (from the repository root, {seconds / 60:.1f} min on {args.threads} CPU thread(s)):

    {command}

Paper's direction: adversarial training raises F with a simple task and ample capacity
(abundance) and lowers it with a complex task or little capacity (scarcity).

Direction of clean-input F with training epsilon, per regime, layer and attack (Spearman over
{len(args.seeds)} seeds x {len(args.epsilons)} epsilons, the epsilon-0 models shared; ratio = mean F at
epsilon {max(args.epsilons)} / at 0):

```
{trend.round(3).to_string(index=False)}
```

Setup: sparse-feature classification ({args.n_features} features, sparsity {args.sparsity}, label = argmax
of n_classes fixed random linear scores; `SparseFeatureTask` in sweep.py); regimes {regimes};
MLP with two hidden ReLU layers of that width; AdamW lr {args.lr}, {args.steps} steps of 256 from
{args.n_train} samples, every minibatch replaced by its FGSM or PGD ({args.pgd_steps} steps, random start,
step 2.5 eps / steps) version; seeds {args.seeds}. Adversarial accuracy: PGD at the training epsilon;
robust_acc: PGD at epsilon {args.eval_epsilon} for every model. Tied SAE ({args.sae_expansion} x width latents,
L1 {args.l1}, {args.sae_steps} steps) trained on clean training activations (unit RMS), measured on
{args.n_test} clean test inputs (F_clean) and their PGD versions (F_adv). additivity: mean cosine of
h(a) + h(b) with h(a + b) over {args.n_test // 2} test pairs; cs_margin: width / (L0 ln(d_sae / L0)).

Means over seeds:

```
{summary.round(3).to_string(index=False)}
```

Files: `table.csv` (one row per model and layer, with bootstrap intervals of F_clean), `f_vs_epsilon.png`.
""")


def main(argv: list[str] | None = None) -> pd.DataFrame:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    rows = []
    try:
        for n_classes, width, kind, epsilon, seed in runs(args):
            rows += measure_model(args, n_classes, width, kind, epsilon, seed)
            print(f"{n_classes}x{width} {kind} eps={epsilon} seed={seed}: {time.perf_counter() - started:.0f}s", flush=True)
    finally:
        torch.set_num_threads(threads_before)
    table = pd.DataFrame(rows)
    summary, trend = summarise(table), trends(table)
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "table.csv", index=False)
    plot(table, args.out / "f_vs_epsilon.png")
    command = shlex.join(["python", "experiments/adversarial/sweep.py", *argv])
    write_readme(args.out / "README.md", args, summary, trend, command, time.perf_counter() - started)
    print(summary.round(3).to_string(index=False))
    print(trend.round(3).to_string(index=False))
    return table


if __name__ == "__main__":
    main()
