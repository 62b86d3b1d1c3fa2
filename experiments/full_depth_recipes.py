"""Is the full-depth compression curve a property of Gemma or of the SAE recipe? The run of
experiments/gemma3_270m_full_depth.toml repeated through other recipes, and what survives.

    lm-superposition run experiments/gemma3_270m_full_depth.toml        # the validated recipe (first)
    python -m experiments.full_depth_recipes                             # the other recipes, then the comparison
    python -m experiments.full_depth_recipes --compare-only              # only the comparison, from the run folders

Each other recipe runs the base config with its [saes.train] fields replaced (RECIPES below) into
its own run folder (resumable); to fit the budget, with one SAE seed (--sae-seeds), one data seed
(--data-seeds) and CE loss recovered on one held-out window (--ce-windows): the comparison is of
per-hook psi, which the validated run gives with all its seeds. Then:
Spearman rank correlation of per-hook psi between every pair of recipes (all hooks, and per hook
kind over depth), and for each recipe the statements a reader would take from the curve: where
psi peaks per kind, the order of the kinds by mean psi, and whether the late half of the blocks
sits above the early half. Writes results/gemma3_270m_full_depth/recipes.{md,csv} and
recipes.png/.svg.
"""

from __future__ import annotations

import argparse
import itertools
import shlex
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from lm_superposition.config import RunConfig  # noqa: E402
from lm_superposition.report import markdown_table, per_hook_summary, save_figure  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = REPO_ROOT / "experiments" / "gemma3_270m_full_depth.toml"
# name -> the [saes.train] fields that differ from the base config's (the validated recipe).
RECIPES = {
    "validated": {},
    "topk32": {"architecture": "topk", "k": 32},
    "topk128": {"architecture": "topk", "k": 128},
}
KINDS = ("resid", "mlp_out", "attn_out")


def recipe_config(
    base: RunConfig, name: str, sae_seeds: list[int], data_seeds: list[int], ce_windows: int
) -> RunConfig:
    """The base config through recipe `name`, into its own run folder."""
    if name == "validated":
        return base
    values = base.to_dict()
    values["saes"]["train"].update(RECIPES[name], sae_seeds=sae_seeds)
    values["run"].update(output=f"{base.run.output}_{name}", seeds=data_seeds, ce_windows=ce_windows)
    return RunConfig.from_dict(values)


def psi_by_hook(folder: Path) -> pd.DataFrame:
    summary = per_hook_summary(pd.read_csv(folder / "layerwise.csv"))
    columns = ["hook", "group", "layer", "depth", "psi", "psi_low", "psi_high", "F_per_d_sae", "mean_l0"]
    return summary[[*columns, "variance_explained", "ce_recovered", "quality"]]


def correlations(runs: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Spearman rank correlation of per-hook psi between every pair of recipes, over all hooks
    and per hook kind (the order over depth)."""
    rows = []
    for (a, table_a), (b, table_b) in itertools.combinations(runs.items(), 2):
        both = table_a.merge(table_b, on=["hook", "group", "depth"], suffixes=("_a", "_b"))
        for group in ("all", *KINDS):
            pairs = both if group == "all" else both[both["group"] == group]
            rho, p_value = spearmanr(pairs["psi_a"], pairs["psi_b"])
            rows.append(
                {"recipes": f"{a} vs {b}", "hooks": group, "n": len(pairs), "spearman": rho, "p_value": p_value}
            )
    return pd.DataFrame(rows)


def statements(runs: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The statements a reader would take from each recipe's curve: where psi peaks per kind,
    whether the late half of the blocks sits above the early half, the kinds by mean psi."""
    rows = []
    for name, table in runs.items():
        row = {"recipe": name}
        kind_means = {}
        for kind in KINDS:
            of_kind = table[table["group"] == kind]
            row[f"{kind} peak depth"] = float(of_kind.loc[of_kind["psi"].idxmax(), "depth"])
            early, late = of_kind[of_kind["depth"] <= 9], of_kind[of_kind["depth"] > 9]
            row[f"{kind} late > early"] = bool(late["psi"].mean() > early["psi"].mean())
            kind_means[kind] = of_kind["psi"].mean()
        row["kinds by mean psi"] = " > ".join(sorted(kind_means, key=kind_means.get, reverse=True))
        row["hooks passing the gate"] = int((table["quality"] == "ok").sum())
        rows.append(row)
    return pd.DataFrame(rows)


def plot(runs: dict[str, pd.DataFrame], path_stem: Path) -> None:
    fig, axes = plt.subplots(1, len(KINDS), figsize=(15, 4.4), sharey=True)
    for ax, kind in zip(axes, KINDS):
        for index, (name, table) in enumerate(runs.items()):
            rows = table[table["group"].isin([kind, "embedding"] if kind == "resid" else [kind])].sort_values("depth")
            errors = [(rows["psi"] - rows["psi_low"]).clip(lower=0), (rows["psi_high"] - rows["psi"]).clip(lower=0)]
            ax.errorbar(rows["depth"], rows["psi"], yerr=errors, color=f"C{index}", capsize=2, label=name)
            passed = rows["quality"] == "ok"
            ax.scatter(rows["depth"][~passed], rows["psi"][~passed], facecolors="white", edgecolors=f"C{index}")
            ax.scatter(rows["depth"][passed], rows["psi"][passed], color=f"C{index}")
        ax.set_title(kind)
        ax.set_xlabel("depth (0 = embedding, L+1 = output of block L)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("psi = F / N")
    axes[0].legend(fontsize=8)
    fig.suptitle("Gemma 3 270M, every layer, through three SAE recipes (hollow: failed the quality gate)")
    fig.tight_layout()
    save_figure(fig, path_stem)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=BASE_CONFIG, help="the validated recipe's run config")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--sae-seeds", nargs="+", type=int, default=[0], help="SAE seeds of the other recipes")
    parser.add_argument(
        "--data-seeds",
        nargs="+",
        type=int,
        help="data seeds of the other recipes (default: the base run's last; a run trains on the text of its "
        "largest seed + 1000, so this keeps every recipe's training text the same)",
    )
    parser.add_argument("--ce-windows", type=int, default=1, help="CE recovered windows of the other recipes")
    parser.add_argument("--compare-only", action="store_true", help="only compare the run folders there are")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "results" / "gemma3_270m_full_depth")
    args = parser.parse_args(argv)
    base = RunConfig.from_toml(args.config)
    data_seeds = args.data_seeds or [max(base.run.seeds)]

    folders = {}
    for name in args.recipes:
        config = recipe_config(base, name, args.sae_seeds, data_seeds, args.ce_windows)
        folder = Path(config.run.output)
        if not args.compare_only and not (folder / "layerwise.csv").is_file():
            from lm_superposition.runs import run

            run(config, resume=folder.exists())
        if (folder / "layerwise.csv").is_file():
            folders[name] = folder
    if len(folders) < 2:
        raise SystemExit(f"need at least two finished runs to compare, have {sorted(folders)}")

    runs = {name: psi_by_hook(folder) for name, folder in folders.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    # every recipe's per-hook numbers beside the comparison, so results/ holds what it rests on
    pd.concat([table.assign(recipe=name) for name, table in runs.items()]).to_csv(
        args.out / "recipes_per_hook.csv", index=False
    )
    spearman = correlations(runs)
    spearman.to_csv(args.out / "recipes_spearman.csv", index=False)
    what_they_say = statements(runs)
    what_they_say.to_csv(args.out / "recipes_statements.csv", index=False)
    plot(runs, args.out / "recipes")
    command = "python -m experiments.full_depth_recipes " + shlex.join(sys.argv[1:])
    (args.out / "recipes.md").write_text(
        f"# The full-depth curve through {len(runs)} recipes\n\nCommand: `{command.strip()}`\n"
        f"Run folders: {', '.join(f'{name}: {folder}' for name, folder in folders.items())}\n"
        f"Recipes: {RECIPES}\n\n![psi per recipe](recipes.png)\n\n"
        f"## Spearman rank correlation of per-hook psi\n\n{markdown_table(spearman)}\n\n"
        f"## What each recipe's curve says\n\n{markdown_table(what_they_say)}\n\n"
        "Every recipe's psi, F / d_sae, L0, VE, CE recovered and verdict per hook: recipes_per_hook.csv.\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
