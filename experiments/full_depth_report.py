"""The full-depth run's results folder: the run's tables and plots copied out of runs/, and a
README with the per-layer table, the gate's count and what the curve says.

    lm-superposition run experiments/gemma3_270m_full_depth.toml      # the run (first)
    python -m experiments.full_depth_report --conditions "..."         # -> results/gemma3_270m_full_depth/

--conditions says how the run was made (threads, machine load, what else ran): the run folder
cannot know it. The recipe comparison (experiments/full_depth_recipes.py) writes recipes.md into
the same folder; the README links it when it is there.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pandas as pd

from experiments.findings_stats import gate_summary
from experiments.full_depth_recipes import BASE_CONFIG, KINDS, REPO_ROOT, statements
from lm_superposition.config import RunConfig
from lm_superposition.report import markdown_summary, markdown_table, per_hook_summary

COPIED = [
    "layerwise.csv",
    "layerwise.json",
    "convergence.csv",
    "manifest.json",
    *(f"{stem}.{suffix}" for stem in ("compression_curve", "convergence") for suffix in ("png", "svg")),
]


def per_layer_table(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per depth, psi [95%] per hook kind, and how many of the row's hooks pass the gate."""
    rows = []
    for depth, at_depth in summary.sort_values("depth").groupby("depth", sort=False):
        row = {"depth": int(depth)}
        for kind in KINDS:
            hook = at_depth[at_depth["group"].isin([kind, "embedding"] if kind == "resid" else [kind])]
            row[f"{kind} psi [95%]"] = (
                f"{hook['psi'].iloc[0]:.2f} [{hook['psi_low'].iloc[0]:.2f}, {hook['psi_high'].iloc[0]:.2f}]"
                if len(hook)
                else ""
            )
        row["pass the gate"] = f"{int((at_depth['quality'] == 'ok').sum())} of {len(at_depth)}"
        rows.append(row)
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=BASE_CONFIG)
    parser.add_argument("--conditions", required=True, help="threads, machine load, what else ran")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "results" / "gemma3_270m_full_depth")
    args = parser.parse_args(argv)
    config = RunConfig.from_toml(args.config)
    run_folder = REPO_ROOT / config.run.output
    args.out.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        shutil.copy2(run_folder / name, args.out / name)
    for quality in sorted(run_folder.glob("saes/*/sae_seed*/*/quality.json")):
        target = args.out / "sae_quality" / quality.parent.parent.name / f"{quality.parent.name}.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(quality, target)

    table = pd.read_csv(run_folder / "layerwise.csv")
    summary = per_hook_summary(table)
    manifest = json.loads((run_folder / "manifest.json").read_text())
    train = config.saes.train
    minutes = manifest["timings_s"]["total"] / 60
    config_path = args.config.resolve()
    shown_config = config_path.relative_to(REPO_ROOT) if config_path.is_relative_to(REPO_ROOT) else config_path
    recipes = "recipes.md" if (args.out / "recipes.md").is_file() else None
    anisotropy = "anisotropy.md" if (args.out / "anisotropy.md").is_file() else None
    text = f"""# Gemma 3 270M, every layer: per-layer psi through the validated recipe

Made by (from the repository root):

    lm-superposition run {shown_config}
    python -m experiments.full_depth_report --conditions "{args.conditions}"

Wall time of the run: {minutes:.0f} min ({args.conditions}); manifest.json has the commit, versions
and per-stage timings.

Setup: the offline Gemma 3 270M (N = 640), the offline corpus; {len(train.hooks)} hooks (the embedding
output and every block's attention, MLP and residual outputs); SAEs of the validated default recipe
(`recipe` = {table["recipe"].iloc[0]}: standard ReLU SAE, L1 {train.l1_coefficient} on |z| * ||W_dec||,
normalised inputs; {train.expansion_factor} x N latents; {train.training_tokens:,} token-steps,
{train.epochs} epochs of batches of {train.batch_size_tokens}) trained on the spot from one activation
stream, SAE seeds {train.sae_seeds}; data seeds {config.run.seeds}, each measuring its own
{config.run.token_budget:,}-token sample; CE recovered on {config.run.ce_windows} held-out windows.
psi per hook: mean over data seeds and SAE seeds; 95%: the union of every row's bootstrap interval
over documents, so it spans documents, data seeds and SAE seeds; quality: the gate's verdict
pooled over the rows.

![psi and F / d_sae per layer](compression_curve.png)

## What the gate says

{gate_summary(table["quality"], "rows (hook x data seed x SAE seed)")}.

## Per layer

Depth 0 is the embedding output (shown in the resid column), depth L + 1 the output of block L.

{markdown_table(per_layer_table(summary))}

## What the curve says

{markdown_table(statements({"validated": summary}))}

{f"Through other SAE recipes, and which of these statements survive: [{recipes}]({recipes})." if recipes else ""}
{f"How much of each hook lies on one direction (no SAE): [{anisotropy}]({anisotropy})." if anisotropy else ""}

## Every hook

{markdown_summary(table)}

Files: layerwise.csv/json (every row: hook x data seed x SAE seed), convergence.csv and
convergence.png (F against tokens seen per row), sae_quality/ (each SAE's held-out quality).
"""
    (args.out / "README.md").write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
