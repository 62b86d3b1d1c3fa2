"""Wide enough to tell? F against SAE width, and F against tokens seen, on three hooks of the
offline Gemma 3 270M: an early MLP output, a middle residual stream, a late attention output.

    python -m experiments.gemma_width_ladder                     # -> results/gemma3_270m_width_ladder/
    python -m experiments.gemma_width_ladder --multiples 2 4 --max-training-tokens 50000 --out /tmp/ladder  # a taste

1. The width ladder. For each width d_sae = m x N (m in --multiples), SAEs of the validated
   default recipe (lm_superposition.config.SAETrainingConfig) are trained on cached activations
   of --distinct-tokens tokens of the offline corpus, for T = --start-training-tokens tokens,
   then 2T, 4T, ... The rule: a hook's SAE is trained enough once doubling T raised its held-out
   variance explained by less than --plateau (the SAE of the larger T is kept); a hook that
   still improves at --max-training-tokens is kept there and marked "not plateaued". Every SAE
   is then measured the way a layer is (measure_layers: duplicates merged, quality gate) on
   held-out windows, 3 data seeds of --measure-tokens tokens each.
2. The sample-size curve. The widest ladder SAEs are measured again on --curve-tokens tokens
   per data seed (three seeds); F against tokens seen is the analyzer's own convergence curve,
   and F_saturated its saturation fit, given per seed and as the mean with the seeds' range.
   The curve's first point is one of --curve-blocks document blocks, so enough blocks take it
   down to ~10^3 tokens (two decades below 10^5).

Trained SAEs are saved under --work (SAE-Lens folders), and each measurement as a CSV there:
a killed run, started again with the same options, picks up where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import shlex
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from lm_superposition.activations import stream_activations  # noqa: E402
from lm_superposition.analyze import measure_layers  # noqa: E402
from lm_superposition.codes import decode, encode  # noqa: E402
from lm_superposition.data import load_texts, token_windows  # noqa: E402
from lm_superposition.models import hook_point, load_model  # noqa: E402
from lm_superposition.report import markdown_table, per_hook_summary, save_figure  # noqa: E402
from lm_superposition.saes import SAETrainingConfig, load_sae_from_disk, train_saes  # noqa: E402
from lm_superposition.saes.loading import save_sae  # noqa: E402
from lm_superposition.saes.quality import variance_explained  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
HOOKS = ("blocks.2.hook_mlp_out", "blocks.9.hook_resid_post", "blocks.15.hook_attn_out")
MEASURE_SEEDS = (0, 1, 2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hooks", nargs="+", default=list(HOOKS))
    parser.add_argument("--multiples", nargs="+", type=int, default=[2, 4, 8, 16, 32], help="d_sae / N")
    parser.add_argument("--distinct-tokens", type=int, default=100_000, help="tokens of text the SAEs train on")
    parser.add_argument("--start-training-tokens", type=int, default=25_000)
    parser.add_argument("--max-training-tokens", type=int, default=200_000)
    parser.add_argument("--plateau", type=float, default=0.01, help="VE gain per doubling below which training stops")
    parser.add_argument("--batch-size-tokens", type=int, default=256)
    parser.add_argument("--heldout-tokens", type=int, default=8_192, help="tokens the plateau rule's VE is read on")
    parser.add_argument("--measure-tokens", type=int, default=8_192, help="tokens per data seed for F per width")
    parser.add_argument("--curve-tokens", type=int, default=100_000, help="tokens per data seed, sample-size curve")
    parser.add_argument(
        "--curve-blocks", type=int, default=256, help="document blocks of the curve (its first point: one block)"
    )
    parser.add_argument("--ce-windows", type=int, default=16, help="held-out windows of 128 tokens for CE recovered")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--work", type=Path, default=REPO_ROOT / "runs" / "gemma_width_ladder")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "results" / "gemma3_270m_width_ladder")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started, load_before = time.time(), _load()
    reused = _work_found(args)
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)

    model = load_model()
    points = [hook_point(model, name) for name in args.hooks]
    n_train_windows = -(-args.distinct_tokens // 127)  # 127 measured tokens per window (BOS left out)
    n_heldout_windows = -(-args.heldout_tokens // 127)
    measure_pool_tokens = 2 * max(args.curve_tokens, args.measure_tokens)
    windows = token_windows(
        load_texts(None, seed=0),
        model.tokenizer,
        context_size=128,
        token_budget=(n_train_windows + n_heldout_windows) * 127 + measure_pool_tokens,
        seed=0,
    )
    train = windows[:n_train_windows]
    heldout = windows[n_train_windows : n_train_windows + n_heldout_windows]
    measure_pool = windows[n_train_windows + n_heldout_windows :]
    print(f"windows: {len(train)} training, {len(heldout)} held out for VE, {len(measure_pool)} to measure on")

    # The 100k-token forward pass only if some SAE is still to train (a finished run reuses every one).
    train_acts = functools.cache(lambda: _activations(model, train, args.hooks))
    heldout_acts = _activations(model, heldout, args.hooks)

    ladder, chosen = [], {}
    for multiple in args.multiples:
        rows, saes = _train_until_plateau(multiple, train_acts, heldout_acts, points, args)
        ladder += rows
        chosen[multiple] = saes
    ladder = pd.DataFrame(ladder)
    ladder.to_csv(args.out / "training.csv", index=False)

    widths = []
    for multiple, saes in chosen.items():
        table = _measured(
            _measure_path(args, multiple),
            lambda saes=saes: measure_layers(
                model,
                saes,
                measure_pool,
                seeds=MEASURE_SEEDS,
                token_budget=args.measure_tokens,
                ce_windows=args.ce_windows,
                progress=False,
            ),
        )
        table.attrs = {}  # the convergence curve stays in its CSV; pandas cannot concat tables carrying it
        widths.append(table.assign(multiple=multiple))
    widths = pd.concat(widths, ignore_index=True)
    widths.to_csv(args.out / "layerwise_by_width.csv", index=False)

    widest = max(chosen)
    curve_table = _measured(
        _curve_path(args),
        lambda: measure_layers(
            model,
            chosen[widest],
            measure_pool,
            seeds=MEASURE_SEEDS,
            token_budget=args.curve_tokens,
            ce_windows=args.ce_windows,
            progress=False,
            n_blocks=args.curve_blocks,
        ),
    )
    curve_table.to_csv(args.out / "sample_size_layerwise.csv", index=False)
    convergence = curve_table.attrs["convergence"]
    convergence.to_csv(args.out / "sample_size_curve.csv", index=False)

    summary = _width_summary(widths, ladder)
    summary.to_csv(args.out / "width_summary.csv", index=False)
    saturation = _saturation_summary(curve_table)
    saturation.to_csv(args.out / "saturation.csv", index=False)
    _plot_ladder(summary, args.out / "width_ladder")
    _plot_sample_size(convergence, saturation, widest, args.out / "sample_size")
    _write_readme(args, summary, saturation, widest, started, load_before, reused)
    print(f"wrote {args.out}")


def _activations(model, windows, hooks) -> dict[str, torch.Tensor]:
    """Every measured token's activation of each hook (BOS and padding left out), in memory."""
    parts: dict[str, list[torch.Tensor]] = {hook: [] for hook in hooks}
    for batch in stream_activations(model, windows, hooks, progress=False):
        for hook in hooks:
            parts[hook].append(batch.activations[hook].float().cpu())
    return {hook: torch.cat(chunks) for hook, chunks in parts.items()}


def _shuffled_epochs(acts: dict[str, torch.Tensor], seed: int):
    """Endless passes over the cached tokens, each in a new order (the same order for every hook)."""
    generator = torch.Generator().manual_seed(seed)
    n_tokens = len(next(iter(acts.values())))
    while True:
        order = torch.randperm(n_tokens, generator=generator)
        for start in range(0, n_tokens, 4096):
            rows = order[start : start + 4096]
            yield {hook: tensor[rows] for hook, tensor in acts.items()}


def _train_until_plateau(multiple, train_acts, heldout_acts, points, args):
    """Train the hooks' SAEs of width multiple x N for T, 2T, ... tokens until the plateau rule
    holds for each hook; returns the training rows and {hook: the SAE kept}. train_acts: a function
    returning the cached training activations {hook: [tokens, d_in]}, called only if an SAE is missing."""
    rows, kept, previous = [], {}, {}
    active = [point.name for point in points]
    training_tokens = args.start_training_tokens
    while active:
        config = SAETrainingConfig(
            expansion_factor=multiple,
            batch_size_tokens=args.batch_size_tokens,
            training_tokens=training_tokens,
            model_name="google/gemma-3-270m-it",
        )
        folders = {hook: args.work / "saes" / f"x{multiple}" / f"tokens{training_tokens}" / hook for hook in active}
        missing = [hook for hook in active if not (folders[hook] / "cfg.json").is_file()]
        if missing:
            tick = time.time()
            acts = train_acts()
            widths = {hook: acts[hook].shape[1] for hook in missing}
            stream = _shuffled_epochs({hook: acts[hook] for hook in missing}, seed=training_tokens)
            trained = train_saes(stream, widths, config, progress=False)
            seconds_each = (time.time() - tick) / len(missing)
            for hook, sae in trained.items():
                save_sae(sae, folders[hook], {"training_seconds.json": json.dumps(seconds_each) + "\n"})
        for hook in list(active):
            sae = load_sae_from_disk(folders[hook])
            with torch.inference_mode():
                acts = heldout_acts[hook]
                ve = variance_explained(acts, decode(sae, encode(sae, acts)))
            gain = ve - previous[hook] if hook in previous else float("nan")
            plateaued = hook in previous and gain < args.plateau
            last = training_tokens * 2 > args.max_training_tokens
            rows.append(
                {
                    "hook": hook,
                    "multiple": multiple,
                    "d_sae": sae.cfg.d_sae,
                    "training_tokens": training_tokens,
                    "heldout_variance_explained": ve,
                    "gain_over_half_the_tokens": gain,
                    "training_seconds": json.loads((folders[hook] / "training_seconds.json").read_text()),
                    "kept": plateaued or last,
                    "plateaued": plateaued,
                }
            )
            print(f"x{multiple} {hook}: {training_tokens:,} tokens, held-out VE {ve:.3f} (gain {gain:+.3f})")
            previous[hook] = ve
            if plateaued or last:
                kept[hook] = sae
                active.remove(hook)
        training_tokens *= 2
    return rows, {hook: kept[hook] for hook in (point.name for point in points)}


def _measured(path: Path, measure) -> pd.DataFrame:
    """measure() once; its table (and convergence curve) cached at `path` for a rerun."""
    convergence_path = path.with_name(path.stem + "_convergence.csv")
    if path.is_file() and convergence_path.is_file():
        table = pd.read_csv(path)
        table.attrs["convergence"] = pd.read_csv(convergence_path)
        return table
    table = measure()
    table.attrs["convergence"].to_csv(convergence_path, index=False)
    table.to_csv(path, index=False)
    return table


def _width_summary(widths: pd.DataFrame, ladder: pd.DataFrame) -> pd.DataFrame:
    """One row per hook and width: F (mean over data seeds, 95% interval spanning theirs), psi,
    the gate's pooled verdict, and how the SAE was trained."""
    rows = []
    for multiple, table in widths.groupby("multiple", sort=True):
        summary = per_hook_summary(table.drop(columns="multiple")).assign(multiple=multiple)
        rows.append(summary)
    summary = pd.concat(rows, ignore_index=True)
    kept = ladder[ladder["kept"]].set_index(["hook", "multiple"])
    summary["training_tokens"] = [kept.loc[(h, m), "training_tokens"] for h, m in zip(summary.hook, summary.multiple)]
    summary["plateaued"] = [bool(kept.loc[(h, m), "plateaued"]) for h, m in zip(summary.hook, summary.multiple)]
    columns = [
        "hook",
        "multiple",
        "d_sae",
        "training_tokens",
        "plateaued",
        "variance_explained",
        "ce_recovered",
        "mean_l0",
        "F",
        "F_low",
        "F_high",
        "psi",
        "F_per_d_sae",
        "merged_latents",
        "interval_over",
        "quality",
    ]
    return summary[columns]


def _saturation_summary(curve_table: pd.DataFrame) -> pd.DataFrame:
    """F at the most tokens and F_saturated per hook: mean over data seeds and the seeds' range."""
    rows = []
    for hook, table in curve_table.groupby("hook", sort=False):
        fitted = table["F_saturated"].dropna()
        rows.append(
            {
                "hook": hook,
                "tokens": int(table["tokens"].mean()),
                "F": table["F"].mean(),
                "F_min_seed": table["F"].min(),
                "F_max_seed": table["F"].max(),
                "F_saturated": fitted.mean() if len(fitted) else float("nan"),
                "F_saturated_min_seed": fitted.min() if len(fitted) else float("nan"),
                "F_saturated_max_seed": fitted.max() if len(fitted) else float("nan"),
                "seeds_fitted": f"{len(fitted)} of {len(table)}",
                "not_fitted_because": "; ".join(sorted(set(table["F_saturated_note"].dropna().astype(str)) - {""})),
                "last_doubling_growth": table["last_doubling_growth"].mean(),
                "quality": table["quality"].iloc[0],
            }
        )
    return pd.DataFrame(rows)


def _plot_ladder(summary: pd.DataFrame, path_stem: Path) -> None:
    fig, (ax_f, ax_ve) = plt.subplots(1, 2, figsize=(12, 4.6))
    for index, (hook, rows) in enumerate(summary.groupby("hook", sort=False)):
        color = f"C{index}"
        errors = [(rows["F"] - rows["F_low"]).clip(lower=0), (rows["F_high"] - rows["F"]).clip(lower=0)]
        ax_f.errorbar(rows["d_sae"], rows["F"], yerr=errors, color=color, capsize=3, label=hook)
        passed = rows["quality"] == "ok"
        ax_f.scatter(rows["d_sae"][passed], rows["F"][passed], color=color, zorder=3)
        ax_f.scatter(rows["d_sae"][~passed], rows["F"][~passed], facecolors="white", edgecolors=color, zorder=3)
        ax_ve.plot(rows["d_sae"], rows["variance_explained"], color=color, marker="o", label=hook)
    ax_f.plot(
        summary["d_sae"].sort_values(),
        summary["d_sae"].sort_values() * 0.5,
        color="grey",
        ls=":",
        lw=0.8,
        label="F = d_sae / 2 (the gate's width limit)",
    )
    ax_f.set_ylabel("effective features F (95%: documents, 3 data seeds)")
    ax_ve.axhline(0.9, color="grey", ls="--", lw=0.8)
    ax_ve.set_ylabel("variance explained (measurement windows)")
    for ax in (ax_f, ax_ve):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("SAE width d_sae")
        ax.grid(alpha=0.3, which="both")
    ax_f.set_yscale("log")
    ax_f.scatter([], [], facecolors="white", edgecolors="grey", label="failed the quality gate")
    ax_f.legend(fontsize=7)
    fig.suptitle("Gemma 3 270M: F against SAE width (validated recipe, each SAE trained to its VE plateau)")
    fig.tight_layout()
    save_figure(fig, path_stem)


def _plot_sample_size(convergence: pd.DataFrame, saturation: pd.DataFrame, multiple: int, path_stem: Path) -> None:
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for index, (hook, rows) in enumerate(convergence.groupby("hook", sort=False)):
        color = f"C{index}"
        for n, (_, seed_rows) in enumerate(rows.groupby("seed")):
            ax.plot(seed_rows["tokens"], seed_rows["F"], color=color, lw=1, marker=".", label=hook if n == 0 else None)
            ax.fill_between(seed_rows["tokens"], seed_rows["F_low"], seed_rows["F_high"], color=color, alpha=0.08)
        fit = saturation.set_index("hook").loc[hook]
        if fit["F_saturated"] == fit["F_saturated"]:  # not NaN
            ax.axhspan(fit["F_saturated_min_seed"], fit["F_saturated_max_seed"], color=color, alpha=0.15)
            ax.axhline(fit["F_saturated"], color=color, ls="--", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("effective features F")
    ax.set_title(
        f"F against tokens seen, d_sae = {multiple}N (dashed: saturation fit, band: its range over seeds)", fontsize=9
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path_stem)


def _load() -> str:
    return ", ".join(f"{value:.2f}" for value in os.getloadavg())


def _measure_path(args, multiple: int) -> Path:
    """The cached F-per-width measurement of the SAEs of width multiple x N."""
    return args.work / f"measure_x{multiple}.csv"


def _curve_path(args) -> Path:
    """The cached sample-size measurement of the widest SAEs, in --curve-blocks blocks."""
    return args.work / f"curve_x{max(args.multiples)}_blocks{args.curve_blocks}.csv"


def _work_found(args) -> str:
    """What this run will reuse instead of redoing (its SAEs and measurements already under
    --work), for the wall time to be read right."""
    saes = sum(len(list((args.work / "saes" / f"x{multiple}").glob("*/*/cfg.json"))) for multiple in args.multiples)
    measurements = [_measure_path(args, multiple) for multiple in args.multiples] + [_curve_path(args)]
    found = sum(path.is_file() for path in measurements)
    return f"{saes} trained SAEs and {found} measurements were already under {args.work} and reused"


def _write_readme(args, summary, saturation, widest, started, load_before, reused) -> None:
    command = "python -m experiments.gemma_width_ladder " + shlex.join(sys.argv[1:])
    minutes = (time.time() - started) / 60
    defaults = dataclasses.asdict(SAETrainingConfig())
    text = f"""# Gemma 3 270M: F against SAE width and against tokens seen

Command: `{command.strip()}`
Wall time: {minutes:.0f} min on this project's 2-core CPU (torch threads: {torch.get_num_threads()}; {reused});
load average (1, 5, 15 min) before: {load_before}; after: {_load()}

Hooks: {", ".join(args.hooks)} of the offline Gemma 3 270M (N = 640), the offline corpus.
SAEs: the validated default recipe (architecture {defaults["architecture"]}, L1 {defaults["l1_coefficient"]},
normalised inputs, lr 2e-4 x sqrt(16384 / d_sae)), batches of {args.batch_size_tokens} tokens, trained on cached
activations of {args.distinct_tokens:,} tokens of text. Training rule: T = {args.start_training_tokens:,}, 2T, 4T, ...
tokens until doubling T raises the held-out variance explained ({args.heldout_tokens:,} tokens) by less than
{args.plateau}; at most {args.max_training_tokens:,} tokens ("plateaued" False: still improving there).
F per width: measure_layers on held-out windows, data seeds {list(MEASURE_SEEDS)} x {args.measure_tokens:,} tokens,
duplicates merged, CE recovered on {args.ce_windows} windows; interval: 95% over documents and the data seeds.

## F against width

![F against width](width_ladder.png)

{markdown_table(summary)}

## F against tokens seen (d_sae = {widest}N)

{len(MEASURE_SEEDS)} data seeds x {args.curve_tokens:,} tokens in {args.curve_blocks} document blocks (the curve's
first point: one block, the mean over 16 random orders); F_saturated is the analyzer's saturation fit
(F(T) = F_inf T / (T + T_half)) per seed: mean and the seeds' range.

![F against tokens](sample_size.png)

{markdown_table(saturation)}

Files: training.csv (every SAE trained, its tokens and held-out VE), layerwise_by_width.csv (every row of the
measurement), width_summary.csv, sample_size_curve.csv, sample_size_layerwise.csv, saturation.csv.
"""
    (args.out / "README.md").write_text(text)


if __name__ == "__main__":
    main()
