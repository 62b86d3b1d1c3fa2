"""Does F drop (feature consolidation) when a network groks? A one-layer transformer on modular addition.

Trains a one-layer TransformerLens HookedTransformer on (a + b) mod p (lm_superposition.tasks:
full-batch AdamW, weight decay 1, half of the p^2 sums), keeping checkpoints. At each checkpoint,
on all p^2 inputs at the "=" position (the task is finite, so this is the whole data set):

- F of the MLP neurons (blocks.0.mlp.hook_post) and of the residual stream
  (blocks.0.hook_resid_post) through the paper's tied SAE, trained afresh on that
  checkpoint's activations (the paper measured through SAEs; a fresh SAE per checkpoint
  because the features change during training);
- F of the MLP in the neuron basis (|activation| per neuron, no SAE): free, and a check that
  what the SAE shows is not the SAE's doing.

Writes table.csv, grokking.png and README.md to --out.

    python -m experiments.grokking            # p = 43, 2,500 steps, 20 checkpoints: a few minutes on 1 CPU thread
    python -m experiments.grokking --quick    # p = 11, a tiny model, seconds
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
    GrokkingConfig,
    GrokkingRun,
    first_step_reaching,
    grokking_tokens,
    neuron_basis_measure,
    tied_sae_measure,
    train_grokking,
)
from experiments.toy import ToySAEConfig

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "results" / "grokking"
MLP_HOOK, RESID_HOOK = "blocks.0.mlp.hook_post", "blocks.0.hook_resid_post"
GROKKED_ACCURACY = 0.9
QUICK = dict(p=11, d_model=16, n_heads=2, d_mlp=32, steps=40, checkpoint_every=10, sae_steps=20)


def parse_args(argv: list[str]) -> argparse.Namespace:
    defaults = GrokkingConfig()
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--quick", action="store_true", help=f"tiny run for tests: {QUICK}")
    for name in ("p", "d_model", "n_heads", "d_mlp", "steps", "checkpoint_every", "seed"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    for name in ("train_fraction", "lr", "weight_decay"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name))
    parser.add_argument("--mlp-sae-expansion", type=int, default=2, help="tied SAE latents per MLP neuron")
    parser.add_argument("--resid-sae-expansion", type=int, default=4, help="tied SAE latents per residual dimension")
    parser.add_argument(
        "--l1", type=float, default=0.3, help="tied SAE L1 coefficient (activations scaled to unit RMS)"
    )
    parser.add_argument("--sae-steps", type=int, default=400)
    parser.add_argument("--threads", type=int, default=1)
    if "--quick" in argv:
        parser.set_defaults(**QUICK)
    return parser.parse_args(argv)


def measure_checkpoints(run: GrokkingRun, args: argparse.Namespace) -> pd.DataFrame:
    tokens, _ = grokking_tokens(run.config)
    rows = []
    for checkpoint in tqdm(run.checkpoints, desc="checkpoints"):
        model = run.model_at(checkpoint)
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens, names_filter=[MLP_HOOK, RESID_HOOK])
        row = {
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
            sae_config = ToySAEConfig(
                d_sae=expansion * activations.shape[1], l1_coefficient=args.l1, steps=args.sae_steps, seed=args.seed
            )
            measured = tied_sae_measure(activations, activations, sae_config)
            row |= {
                f"{label}_F": measured["F"],
                f"{label}_F_low": measured["F_low"],
                f"{label}_F_high": measured["F_high"],
                f"{label}_psi": measured["psi"],
                f"{label}_variance_explained": measured["variance_explained"],
                f"{label}_mean_l0": measured["mean_l0"],
            }
        row["mlp_neuron_F"] = neuron_basis_measure(cache[MLP_HOOK][:, -1, :])["F"]
        rows.append(row)
    return pd.DataFrame(rows)


def alignment(table: pd.DataFrame, checkpoints) -> dict:
    """When train accuracy saturates, when test accuracy jumps, when F falls, per measure of F.

    test jump: the checkpoint with the largest rise in test accuracy from the previous one.
    consolidation: the checkpoint with the largest fall in F from the previous one, after F's peak.
    """
    test_rise = table["test_accuracy"].diff()
    result = {
        "memorised_step": first_step_reaching(checkpoints, "train_accuracy", 0.99),
        "grokked_step": first_step_reaching(checkpoints, "test_accuracy", GROKKED_ACCURACY),
        "test_jump_step": int(table.loc[test_rise.idxmax(), "step"]) if len(table) > 1 else None,
    }
    for column in ("mlp_F", "resid_F", "mlp_neuron_F"):
        peak = table[column].idxmax()
        after_peak = table.loc[peak:, column].diff()
        result[f"{column}_peak_step"] = int(table.loc[peak, "step"])
        result[f"{column}_drop_step"] = (
            int(table.loc[after_peak.idxmin(), "step"]) if after_peak.notna().any() else None
        )
        result[f"{column}_peak_to_final"] = float(table[column].iloc[-1] / table.loc[peak, column])
        result[f"{column}_corr_test_accuracy"] = float(table[column].corr(table["test_accuracy"]))
    return result


def plot(table: pd.DataFrame, marks: dict, path: Path) -> None:
    figure, (accuracy_axes, f_axes) = plt.subplots(2, 1, figsize=(7, 7), sharex=True)
    accuracy_axes.plot(table["step"], table["train_accuracy"], marker=".", label="train accuracy")
    accuracy_axes.plot(table["step"], table["test_accuracy"], marker=".", label="test accuracy")
    accuracy_axes.set_ylabel("accuracy")
    accuracy_axes.legend(fontsize=8)
    for column, label in (
        ("mlp_F", "MLP neurons, tied SAE"),
        ("mlp_neuron_F", "MLP neurons, neuron basis"),
        ("resid_F", "residual stream, tied SAE"),
    ):
        f_axes.plot(table["step"], table[column], marker=".", label=label)
        if f"{column}_low" in table:
            f_axes.fill_between(table["step"], table[f"{column}_low"], table[f"{column}_high"], alpha=0.2)
    f_axes.set_ylabel("effective features F")
    f_axes.set_xlabel("training step")
    f_axes.legend(fontsize=8)
    for axes in (accuracy_axes, f_axes):
        if marks["grokked_step"] is not None:
            axes.axvline(marks["grokked_step"], color="gray", linestyle="--")
    accuracy_axes.set_title(f"Grokking modular addition (dashed: test accuracy >= {GROKKED_ACCURACY})")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_readme(
    path: Path, args, config: GrokkingConfig, table: pd.DataFrame, marks: dict, command: str, seconds: float
) -> None:
    columns = [
        "step",
        "train_accuracy",
        "test_accuracy",
        "weight_norm",
        "mlp_F",
        "mlp_F_low",
        "mlp_F_high",
        "mlp_variance_explained",
        "mlp_neuron_F",
        "resid_F",
        "resid_variance_explained",
    ]
    mark_lines = "\n".join(
        f"- {name}: {value if not isinstance(value, float) else round(value, 3)}" for name, value in marks.items()
    )
    text = f"""# Grokking: F per checkpoint next to train and test accuracy

Made by (from the repository root, {seconds / 60:.1f} min on {args.threads} CPU thread(s)):

    {command}

Paper's direction: F drops sharply (feature consolidation) when the network groks, in step with the
test-accuracy jump.

Where things happen (steps; `*_drop_step`: the checkpoint with the largest fall of F after its peak;
`*_peak_to_final`: final F / peak F; `*_corr_test_accuracy`: Pearson r of F with test accuracy over checkpoints):

{mark_lines}

Setup: {config}; a one-layer `HookedTransformer` without LayerNorm on inputs "a b =", loss at "=",
full-batch AdamW (betas 0.9, 0.98). At each checkpoint, activations at "=" over all {config.p}^2 inputs;
F through the paper's tied SAE (`lm_superposition.toy.TiedSAE`, trained afresh per checkpoint on those
activations scaled to unit RMS: {args.mlp_sae_expansion} x {config.d_mlp} latents for `{MLP_HOOK}`,
{args.resid_sae_expansion} x {config.d_model} for `{RESID_HOOK}`, L1 {args.l1}, {args.sae_steps} steps) and
measured on the same {config.p}^2 inputs (95% bootstrap intervals over 64 blocks of inputs);
`mlp_neuron_F` is F of the MLP neurons' own activations (no SAE).

```
{table[columns].round(3).to_string(index=False)}
```

Files: `table.csv` (all columns), `grokking.png`.
"""
    path.write_text(text)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
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
        seed=args.seed,
    )
    started = time.perf_counter()
    with torch_threads(args.threads):
        run = train_grokking(config, progress=True)
        table = measure_checkpoints(run, args)
    marks = alignment(table, run.checkpoints)
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "table.csv", index=False)
    plot(table, marks, args.out / "grokking.png")
    command = study_command("experiments.grokking", argv)
    write_readme(args.out / "README.md", args, config, table, marks, command, time.perf_counter() - started)
    print(
        table[["step", "train_accuracy", "test_accuracy", "mlp_F", "mlp_neuron_F", "resid_F"]]
        .round(3)
        .to_string(index=False)
    )
    print(marks)
    return table


if __name__ == "__main__":
    main()
