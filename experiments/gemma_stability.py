"""Klindt et al.'s solution-stability check on a real model: do two SAE seeds find the same dictionary per hook?

For several hooks of the offline Gemma 3 270M (lm_superposition.models.load_model's default), the
activations of ~--tokens offline-corpus tokens are collected once; per hook, SAEs of the validated
default recipe (experiments.findings_stats, d_sae = --expansion x d_model) are trained from two seeds
on the same batches, and their dictionaries (live latents on held-out documents, one per duplicate
group) matched one-to-one (experiments.sparse_code_checks.matched_cosine). No ground truth here:
the toy half of experiments.sparse_code_checks says what the number means (identifiable toys 0.81-1.0,
dense toys 0.68). F and variance explained on held-out documents are reported next to it, because a
short CPU budget leaves these SAEs far from converged. Writes table.csv, stability.png/.svg, README.md.

    python -m experiments.gemma_stability            # 4 hooks, ~15 min on 1 CPU thread
    python -m experiments.gemma_stability --quick    # synthetic sparse activations, no model, seconds (tests)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt
import pandas as pd
import torch

from experiments import study_command, torch_threads
from experiments.findings_stats import gate_pass, gate_summary, measure_default_sae, save_figure, train_default_saes
from experiments.sparse_code_checks import dictionary, matched_cosine
from experiments.toy import sample_features
from lm_superposition.activations import stream_activations
from lm_superposition.data import load_texts, token_windows

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "results" / "gemma_stability"
DEFAULT_HOOKS = [f"blocks.{layer}.hook_resid_post" for layer in (0, 6, 12, 17)]
QUICK = dict(tokens=3000, steps=30, batch=128, expansion=2, hooks=["a", "b"])


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--quick", action="store_true", help=f"tiny run for tests: {QUICK}")
    parser.add_argument("--hooks", nargs="+", default=DEFAULT_HOOKS)
    parser.add_argument("--tokens", type=int, default=24_000, help="offline-corpus tokens (20% of documents held out)")
    parser.add_argument("--expansion", type=int, default=4, help="d_sae / d_model")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--sae-seeds", type=int, nargs=2, default=[0, 1])
    parser.add_argument("--threads", type=int, default=1)
    if "--quick" in argv:
        parser.set_defaults(**QUICK)
    return parser.parse_args(argv)


def synthetic_activations(hooks: list[str], tokens: int) -> tuple[dict, torch.Tensor]:
    """For --quick: per hook, 32 sparse toy features written into 16 dimensions; 50 tokens per document."""
    generator = torch.Generator().manual_seed(0)
    activations = {
        hook: sample_features(tokens, 32, 0.9, generator) @ torch.randn(32, 16, generator=generator) for hook in hooks
    }
    return activations, torch.arange(tokens) // 50


def collect(model, hooks: list[str], tokens: int) -> tuple[dict, torch.Tensor]:
    windows = token_windows(load_texts(None), model.tokenizer, context_size=64, token_budget=tokens, seed=0)
    batches = list(stream_activations(model, windows, hooks, batch_size=8, progress=False))
    activations = {hook: torch.cat([b.activations[hook] for b in batches]).float() for hook in hooks}
    return activations, torch.cat([b.doc_ids for b in batches])


def main(argv: list[str] | None = None) -> pd.DataFrame:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    started = time.perf_counter()
    rows = []
    with torch_threads(args.threads):
        if args.quick:
            activations, doc_ids = synthetic_activations(args.hooks, args.tokens)
        else:
            from lm_superposition.models import load_model

            activations, doc_ids = collect(load_model(), args.hooks, args.tokens)
        documents = doc_ids.unique()
        held_out = doc_ids >= documents[int(len(documents) * 0.8)]
        for hook in args.hooks:
            train, test = activations[hook][~held_out], activations[hook][held_out]
            d_sae = args.expansion * train.shape[1]
            saes = train_default_saes(train, d_sae, args.steps, args.sae_seeds, args.batch)
            dictionaries = {seed: dictionary(sae, test) for seed, sae in saes.items()}
            measured = {seed: measure_default_sae(sae, test, language_model=True) for seed, sae in saes.items()}
            seed_a, seed_b = args.sae_seeds
            rows.append(
                {
                    "hook": hook,
                    "d_in": train.shape[1],
                    "d_sae": d_sae,
                    "train_tokens": len(train),
                    "held_out_tokens": len(test),
                    "cross_seed_cosine": matched_cosine(dictionaries[seed_a], dictionaries[seed_b]),
                    "live_latents_a": len(dictionaries[seed_a]),
                    "live_latents_b": len(dictionaries[seed_b]),
                    "F_a": measured[seed_a]["F"],
                    "F_b": measured[seed_b]["F"],
                    "variance_explained": min(m["variance_explained"] for m in measured.values()),
                    "mean_l0": measured[seed_a]["mean_l0"],
                    "gate_pass": gate_pass(m["quality"] for m in measured.values()),
                    "quality_a": measured[seed_a]["quality"],
                    "quality_b": measured[seed_b]["quality"],
                }
            )
            print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "table.csv", index=False)
    figure, ax = plt.subplots(figsize=(7, 3.8))
    ax.bar(range(len(table)), table["cross_seed_cosine"], label="matched cosine, seed 0 vs 1")
    ax.plot(range(len(table)), table["variance_explained"], color="black", marker="o", label="variance explained")
    ax.set_xticks(range(len(table)), table["hook"], rotation=30, ha="right", fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    verdicts = [*table["quality_a"], *table["quality_b"]]
    ax.set_title(f"Solution stability across SAE seeds, per hook\n({gate_summary(verdicts)})", fontsize=8)
    figure.tight_layout()
    save_figure(figure, args.out / "stability")
    plt.close(figure)
    load = os.getloadavg()
    command = study_command("experiments.gemma_stability", argv)
    (args.out / "README.md").write_text(f"""# Solution stability across SAE seeds on Gemma 3 270M, per hook

Made by (from the repository root, {(time.perf_counter() - started) / 60:.1f} min on {args.threads} CPU thread(s); load
average {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f} at the end, shared machine):

    {command}

```
{table.drop(columns=["quality_a", "quality_b"]).round(3).to_string(index=False)}
```

Quality gate (`gate.QualityGate.verdict` on each SAE; CE loss recovered is not measured by this study, and
the gate says so): {gate_summary(verdicts)}. Each SAE's verdict (`quality_a`, `quality_b` in `table.csv`):

```
{table[["hook", "quality_a", "quality_b"]].to_string(index=False)}
```

Two SAEs of the default recipe per hook (seeds {args.sae_seeds}, the same {args.steps} batches of {args.batch} tokens
from {table["train_tokens"].iloc[0]:,} training tokens; d_sae = {args.expansion} x d_model), dictionaries = live
latents on {table["held_out_tokens"].iloc[0]:,} held-out tokens (the last 20% of documents), one per duplicate
group (decoder cosine >= 0.9); `cross_seed_cosine`: mean cosine of the Hungarian one-to-one matching.
On the toys of experiments.sparse_code_checks the same number is 0.81-1.0 where the SAE recovers the true
features and 0.68 where it does not (results/sparse_code_checks/). These SAEs see a CPU budget of
{args.steps * args.batch:,} tokens: read the stability next to their variance explained.

Files: `table.csv`, `stability.png` / `.svg`.
""")
    print(table.round(3).to_string(index=False))
    return table


if __name__ == "__main__":
    main()
