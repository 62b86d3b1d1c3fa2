"""How much of each hook's activation lies along one direction?

The full-depth run finds F of 1-50 at Gemma 3 270M's early attention outputs, with thousands of
an SAE's latents folded together as duplicates. This reads the activations themselves, without
an SAE: if one direction carries nearly all of a hook's second moment, the reconstruction budget
|z| * ||W_dec|| of any SAE that reconstructs it sits on that direction too, and a small F is the
measure reporting it, not a broken SAE.

    python -m experiments.hook_anisotropy          # -> results/gemma3_270m_full_depth/anisotropy.{csv,md}
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import torch

from lm_superposition.activations import stream_activations
from lm_superposition.data import offline_corpus, token_windows
from lm_superposition.models import load_model, paper_hooks
from lm_superposition.report import markdown_table, per_hook_summary

REPO_ROOT = Path(__file__).resolve().parents[1]


def top_direction_shares(activations: torch.Tensor) -> tuple[float, float]:
    """Share of the sum of squares on the top singular direction, raw and after removing the mean."""
    raw = torch.linalg.svdvals(activations.double()) ** 2
    centered = torch.linalg.svdvals((activations - activations.mean(0)).double()) ** 2
    return (raw[0] / raw.sum()).item(), (centered[0] / centered.sum()).item()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="measured tokens of the offline corpus (seed 0)")
    parser.add_argument("--run", type=Path, default=REPO_ROOT / "results" / "gemma3_270m_full_depth")
    args = parser.parse_args(argv)

    model = load_model()
    hooks = [hook.name for hook in paper_hooks(model)]
    windows = token_windows(offline_corpus(0), model.tokenizer, token_budget=args.tokens, seed=0)
    batches = list(stream_activations(model, windows, hooks, progress=False))

    shares = pd.DataFrame(
        [(hook, *top_direction_shares(torch.cat([batch.activations[hook] for batch in batches]))) for hook in hooks],
        columns=["hook", "top_direction_share", "top_direction_share_centered"],
    )
    # psi as the run reports it: seeds pooled, its interval and the gate's pooled verdict
    run = per_hook_summary(pd.read_csv(args.run / "layerwise.csv"))
    table = shares.merge(run[["hook", "psi", "psi_low", "psi_high", "merged_latents", "quality"]], on="hook")
    table.to_csv(args.run / "anisotropy.csv", index=False)
    rank_correlation = table["top_direction_share_centered"].corr(table["psi"], method="spearman")
    text = (
        "# How much of each hook lies along one direction\n\n"
        f"    python -m experiments.hook_anisotropy --tokens {args.tokens}\n\n"
        f"Activations of the offline Gemma 3 270M on {args.tokens:,} tokens of the offline corpus (seed 0, BOS\n"
        "and padding left out, as in every measurement); per hook the share of the sum of squares on the\n"
        "top singular direction, of the raw activations and after removing their mean, beside the\n"
        "full-depth run's psi (validated recipe; mean over its data and SAE seeds, 95% over documents,\n"
        "data seeds and SAE seeds), merged latents and the gate's pooled verdict. Spearman rank\n"
        "correlation of the centered share with psi over the "
        f"{len(table)} hooks: {rank_correlation:.2f}.\n\n" + markdown_table(table) + "\n"
    )
    (args.run / "anisotropy.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
