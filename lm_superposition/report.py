"""Tables and plots from the analyzer's table: CSV/JSON, the compression curve, convergence."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: runs on machines without a display
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .atomic import atomic_file, write_text  # noqa: E402

# The lines of the compression curve, in legend order.
CURVE_GROUPS = ["embedding", "attn_out", "mlp_out", "resid", "mlp neurons"]


def curve_group(kind: str, layer: int) -> str:
    if kind == "embed" or (kind == "resid_pre" and layer == 0):
        return "embedding"
    if kind.startswith("resid"):
        return "resid"
    return {"mlp_post": "mlp neurons"}.get(kind, kind)


def depth(kind: str, layer: int) -> float:
    """Position along the network: 0 is the embedding, L + 1 is the output of block L."""
    if kind in ("embed", "resid_pre"):
        return float(layer)
    if kind == "resid_mid":
        return layer + 0.5
    return layer + 1.0


def per_hook_summary(table: pd.DataFrame) -> pd.DataFrame:
    """One row per model and hook, data seeds and SAE seeds pooled.

    F and psi are the mean over seeds; low/high span every row's bootstrap 95% interval (the
    union), so the bar shows document sampling, data-seed spread and, where a hook was read
    through several SAEs, SAE-seed spread: `interval_over` says which. `quality` is "ok" only
    if the gate passed every row of the hook, else the distinct problems of its rows.
    """
    table = table.assign(
        sae_seed=table["sae_seed"] if "sae_seed" in table else None,
        recipe=table["recipe"] if "recipe" in table else "",
    )
    grouped = table.groupby(["model", "hook"], sort=False)
    summary = grouped.agg(
        layer=("layer", "first"),
        kind=("kind", "first"),
        N=("N", "first"),
        d_sae=("d_sae", "first"),
        seeds=("seed", "nunique"),
        sae_seeds=("sae_seed", "nunique"),
        tokens=("tokens", "mean"),
        F=("F", "mean"),
        F_seed_std=("F", "std"),
        F_low=("F_low", "min"),
        F_high=("F_high", "max"),
        psi=("psi", "mean"),
        psi_low=("psi_low", "min"),
        psi_high=("psi_high", "max"),
        F_saturated=("F_saturated", "mean"),
        mean_l0=("mean_l0", "mean"),
        merged_latents=("merged_latents", "mean"),
        variance_explained=("variance_explained", "mean"),
        ce_recovered=("ce_recovered", "mean"),
        additivity=("additivity", "first"),  # one value per hook: measured once, not per seed
        quality=("quality", _pooled_verdict),
        recipe=("recipe", "first"),
    ).reset_index()
    summary["interval_over"] = [
        "documents" + (f", {n} data seeds" if n > 1 else "") + (f", {k} SAE seeds" if k > 1 else "")
        for n, k in zip(summary["seeds"], summary["sae_seeds"])
    ]
    summary["group"] = [curve_group(kind, layer) for kind, layer in zip(summary["kind"], summary["layer"])]
    summary["depth"] = [depth(kind, layer) for kind, layer in zip(summary["kind"], summary["layer"])]
    # the share of the dictionary F uses (the gate tests it per row: "too narrow to tell")
    summary["F_per_d_sae"] = summary["F"] / summary["d_sae"]
    return summary


def _pooled_verdict(verdicts: pd.Series) -> str:
    """Every kind of problem any row of the hook has, once (the first row's numbers)."""
    problems: dict[str, str] = {}
    for verdict in verdicts:
        for problem in verdict.split("; ") if verdict != "ok" else []:
            problems.setdefault(re.split(r"[\d(]", problem)[0], problem)
    return "; ".join(problems.values()) or "ok"


def write_tables(table: pd.DataFrame, folder: str | Path, stem: str = "layerwise") -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{stem}.csv", folder / f"{stem}.json"]
    with atomic_file(paths[0]) as path:
        table.to_csv(path, index=False)
    # JSON for scripts: records, NaN written as null.
    write_text(paths[1], json.dumps(json.loads(table.to_json(orient="records")), indent=1))
    return paths


def plot_compression_curve(table: pd.DataFrame, path_stem: str | Path, title: str | None = None) -> list[Path]:
    """psi and F / d_sae against depth, one line per hook group (and per model), 95% error bars;
    rows the gate did not pass are drawn hollow. Writes PATH_STEM.png and PATH_STEM.svg."""
    summary = per_hook_summary(table)
    summary["F_per_d_sae_low"], summary["F_per_d_sae_high"] = (
        summary["F_low"] / summary["d_sae"],
        summary["F_high"] / summary["d_sae"],
    )
    fig, (ax_psi, ax_usage) = plt.subplots(1, 2, figsize=(13, 4.8))
    for index, ((model, group), rows) in enumerate(summary.groupby(["model", "group"], sort=False)):
        rows = rows.sort_values("depth")
        color = f"C{index}"
        label = group if summary["model"].nunique() == 1 else f"{model} {group}"
        for ax, value in ((ax_psi, "psi"), (ax_usage, "F_per_d_sae")):
            errors = [
                (rows[value] - rows[f"{value}_low"]).clip(lower=0).fillna(0),
                (rows[f"{value}_high"] - rows[value]).clip(lower=0).fillna(0),
            ]
            ax.errorbar(rows["depth"], rows[value], yerr=errors, color=color, capsize=3, label=label)
            passed = rows["quality"] == "ok"
            ax.scatter(rows["depth"][passed], rows[value][passed], color=color, zorder=3)
            ax.scatter(rows["depth"][~passed], rows[value][~passed], facecolors="white", edgecolors=color, zorder=3)
    ax_psi.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax_psi.set_ylabel("psi = F / N")
    ax_usage.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax_usage.set_ylabel("F / d_sae (above 0.5: dictionary too narrow to tell)")
    for ax in (ax_psi, ax_usage):
        ax.set_xlabel("depth (0 = embedding, L+1 = output of block L)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    ax_psi.scatter([], [], facecolors="white", edgecolors="grey", label="failed the quality gate")
    ax_psi.legend(fontsize=8)
    tokens = int(summary["tokens"].min())
    fig.suptitle(
        title
        or f"Superposition per layer ({tokens:,} tokens per seed; bars: 95% over {summary['interval_over'].iloc[0]})"
    )
    fig.tight_layout()
    return save_figure(fig, path_stem)


def plot_convergence(convergence: pd.DataFrame, path_stem: str | Path) -> list[Path]:
    """F against tokens seen (log-log), one line per hook (data and SAE seeds as thin lines),
    with the spread over orders of documents as a band (metric.FeatureBudget.sample_size_curve)."""
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    hooks = list(dict.fromkeys(convergence["hook"]))
    for index, hook in enumerate(hooks):
        for n, (_, rows) in enumerate(
            convergence[convergence["hook"] == hook].groupby(["seed", "sae_seed"], dropna=False, sort=False)
        ):
            ax.plot(rows["tokens"], rows["F"], color=f"C{index % 10}", lw=1, marker=".", label=hook if n == 0 else None)
            if "F_low" in rows:
                ax.fill_between(rows["tokens"], rows["F_low"], rows["F_high"], color=f"C{index % 10}", alpha=0.08)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("effective features F")
    ax.grid(alpha=0.3, which="both")
    if len(hooks) <= 24:
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return save_figure(fig, path_stem)


def save_figure(fig, path_stem) -> list[Path]:
    """Write `fig` as PATH_STEM.png and PATH_STEM.svg (each whole or not at all) and close it."""
    path_stem = Path(path_stem)
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [path_stem.with_suffix(".png"), path_stem.with_suffix(".svg")]
    for path in paths:
        with atomic_file(path) as partial:
            fig.savefig(partial, dpi=130, format=path.suffix[1:])
    plt.close(fig)
    return paths


def format_table(table: pd.DataFrame) -> str:
    """A compact text view for the terminal: one line per hook, seeds pooled."""
    summary = per_hook_summary(table)
    columns = [
        "hook",
        "N",
        "d_sae",
        "tokens",
        "F",
        "F_low",
        "F_high",
        "psi",
        "F_saturated",
        "variance_explained",
        "ce_recovered",
        "additivity",
        "quality",
    ]
    view = summary[[c for c in columns if c != "additivity" or summary[c].notna().any()]].copy()
    view["F 95%"] = [
        f"[{lo:,.0f}, {hi:,.0f}]" if not math.isnan(lo) else "n/a"
        for lo, hi in zip(view.pop("F_low"), view.pop("F_high"))
    ]
    return view.to_string(index=False, float_format=lambda x: f"{x:,.3f}")


def markdown_summary(table: pd.DataFrame) -> str:
    """The per-hook summary (seeds pooled) as a Markdown table, for a results README."""
    summary = per_hook_summary(table)
    lines = [
        "| hook | F | F 95% | psi | F_saturated | L0 | merged | VE | CE rec. | additivity | quality |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summary.itertuples():
        interval = f"[{row.F_low:,.0f}, {row.F_high:,.0f}]" if not math.isnan(row.F_low) else "n/a"
        lines.append(
            f"| {row.hook} | {row.F:,.0f} | {interval} | {row.psi:.2f} | {row.F_saturated:,.0f} "
            f"| {row.mean_l0:.1f} | {row.merged_latents:.0f} | {row.variance_explained:.2f} "
            f"| {row.ce_recovered:.2f} | {row.additivity:.2f} | {row.quality} |"
        )
    return "\n".join(lines)


def markdown_table(table: pd.DataFrame) -> str:
    """Any table as GitHub Markdown, numbers to 3 significant digits (pandas' to_markdown needs
    tabulate, which is not a dependency)."""

    def cell(value) -> str:
        if isinstance(value, float):
            if math.isnan(value):
                return ""
            return f"{value:.2e}" if 0 < abs(value) < 1e-3 else f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
        return str(value)

    lines = ["| " + " | ".join(map(str, table.columns)) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)
