"""The two backends of `load_model` on one model, side by side in one run: activations per
second, how far apart their activations are, and F through the same SAEs.

    hooked   HookedTransformer (TransformerLens's hand-written re-implementation)
    bridge   TransformerBridge over the Hugging Face model (the default backend)
    bridge+sdpa  (with --sdpa) the bridge over a Hugging Face model using PyTorch's fused
             attention instead of the eager attention TransformerBridge asks for (eager lets
             hooks see attention patterns; the catalogue's hooks do not need them)

Speed: one batch's activations as `stream_activations` makes them (`forward_activations`, then
the BOS and padding rows dropped) for the paper's hook set (the embedding, then attn_out,
mlp_out and resid_post of every layer: the forward pass runs every block); BOS is not counted
as a token, as the measurement does not count it. The backends take turns batch by batch (the
order alternating), after one untimed warm-up batch each, so load from other work on a shared
machine hits both alike. Reported per backend: tokens per wall-clock second and CPU seconds
(this process, all threads) per 1,000 tokens over all rounds, every round's tok/s, and the
median over batches of the paired ratio bridge time / hooked time.

Agreement: every catalogue hook, token by token (BOS and padding excluded, as measured), the
relative error |a_bridge - a_hooked| / |a_hooked|; and F of a few hooks through one random-init
TopK SAE each (same weights for both backends).

    python -m experiments.benchmarks.backend_speed --quick          # ~2 min: a smoke run
    python -m experiments.benchmarks.backend_speed                  # Gemma 3 270M, 2048 tokens x 3 rounds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from sae_lens import TopKSAE, TopKSAEConfig

from lm_superposition.activations import blocks_needed, forward_activations, stream_activations
from lm_superposition.data import load_texts, token_windows
from lm_superposition.metric import FeatureBudget
from lm_superposition.models import OFFLINE_DEFAULT_MODEL, hook_catalogue, hook_point, load_model, paper_hooks

REPO_ROOT = Path(__file__).resolve().parents[2]
F_HOOKS = ("blocks.0.hook_resid_pre", "blocks.3.hook_attn_out", "blocks.9.hook_mlp_out", "blocks.15.hook_resid_post")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=OFFLINE_DEFAULT_MODEL)
    parser.add_argument("--tokens", type=int, default=2048, help="token budget of the timed windows")
    parser.add_argument("--parity-tokens", type=int, default=1024, help="tokens compared hook by hook")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sdpa", action="store_true", help="also time the bridge with PyTorch's fused attention")
    parser.add_argument("--quick", action="store_true", help="smoke run: 256 tokens, 1 round")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "results" / "backend_speed")
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.parity_tokens, args.rounds = 256, 256, 1
    torch.set_num_threads(args.threads)

    models, load_seconds = {}, {}
    for backend in ("hooked", "bridge"):
        start = time.perf_counter()
        models[backend] = load_model(args.model, backend=backend)
        load_seconds[backend] = time.perf_counter() - start
    if args.sdpa:
        start = time.perf_counter()
        models["bridge+sdpa"] = _bridge_with_sdpa(models["bridge"])
        load_seconds["bridge+sdpa"] = time.perf_counter() - start

    tokenizer = models["hooked"].tokenizer
    windows = token_windows(load_texts("offline"), tokenizer, context_size=args.context, token_budget=args.tokens)
    parity_windows = windows[: max(1, args.parity_tokens // args.context)]
    agreement = _agreement(models["hooked"], models["bridge"], parity_windows, args.batch_size)
    f_rows = _f_through_same_saes(models["hooked"], models["bridge"], parity_windows, args.batch_size)

    hooks = [point.name for point in paper_hooks(models["hooked"])]
    timing = _time_batches(models, windows, hooks, args.batch_size, args.rounds)

    result = {
        "command": "python -m experiments.benchmarks.backend_speed "
        + shlex.join(argv if argv is not None else sys.argv[1:]),
        "model": args.model,
        "tokens_timed": windows.n_tokens,
        "windows": len(windows),
        "context": args.context,
        "batch_size": args.batch_size,
        "hooks_timed": len(hooks),
        "threads": args.threads,
        "load_seconds": load_seconds,
        **timing,
        "agreement": agreement,
        "F": f_rows,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.1f} at the end",
        "versions": _versions(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "backend_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "backend_speed.md").write_text(_markdown(result))
    print(_markdown(result))
    return result


def _time_batches(models: dict, windows, hooks: list[str], batch_size: int, rounds: int) -> dict:
    stop_at_layer = blocks_needed([hook_point(models["hooked"], hook) for hook in hooks])
    starts = range(0, len(windows), batch_size)
    for model in models.values():  # warm-up: first calls pay for allocation and page faults
        _one_batch(model, windows, slice(0, batch_size), hooks, stop_at_layer)
    wall = {backend: [0.0] * rounds for backend in models}
    cpu = dict.fromkeys(models, 0.0)
    ratios = {backend: [] for backend in models if backend != "hooked"}
    order = list(models)
    for round_index in range(rounds):
        for start in starts:
            batch = slice(start, min(start + batch_size, len(windows)))
            seconds = {}
            for backend in order:
                wall_start, cpu_start = time.perf_counter(), time.process_time()
                _one_batch(models[backend], windows, batch, hooks, stop_at_layer)
                seconds[backend] = time.perf_counter() - wall_start
                cpu[backend] += time.process_time() - cpu_start
                wall[backend][round_index] += seconds[backend]
            for backend in ratios:
                ratios[backend].append(seconds[backend] / seconds["hooked"])
            order.reverse()
        speeds = (f"{backend} {windows.n_tokens / wall[backend][round_index]:.0f} tok/s" for backend in models)
        print(f"round {round_index}: " + ", ".join(speeds), flush=True)
    tokens = windows.n_tokens * rounds
    return {
        "tokens_per_second": {backend: [windows.n_tokens / seconds for seconds in wall[backend]] for backend in models},
        "overall_tokens_per_second": {backend: tokens / sum(wall[backend]) for backend in models},
        "cpu_seconds_per_1k_tokens": {backend: 1000 * cpu[backend] / tokens for backend in models},
        "median_time_ratio_to_hooked": {backend: statistics.median(values) for backend, values in ratios.items()},
        "time_ratio_quartiles": {
            backend: statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
            for backend, values in ratios.items()
        },
    }


def _one_batch(model, windows, batch: slice, hooks: list[str], stop_at_layer: int) -> None:
    """What stream_activations does for one batch: the forward pass and the measured rows."""
    tokens = windows.tokens[batch].to(model.cfg.device)
    keep = windows.measured_mask[batch].flatten()
    cache = forward_activations(model, tokens, hooks, stop_at_layer)
    for tensor in cache.values():
        tensor.flatten(0, 1)[keep.to(tensor.device)]


def _bridge_with_sdpa(bridge):
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = bridge.original_model.config._name_or_path
    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    sdpa = TransformerBridge.boot_transformers(folder, hf_model=hf_model, tokenizer=tokenizer)
    sdpa.enable_compatibility_mode(no_processing=True, disable_warnings=True)
    sdpa.cfg.model_name = bridge.cfg.model_name
    return sdpa.eval()


def _agreement(hooked, bridge, windows, batch_size: int) -> dict:
    """Per catalogue hook: the largest per-token relative error and absolute difference of the bridge against hooked."""
    catalogue = [point.name for point in hook_catalogue(hooked)]
    if catalogue != [point.name for point in hook_catalogue(bridge)]:
        raise AssertionError("the two backends list different catalogues")
    worst_relative = dict.fromkeys(catalogue, 0.0)
    worst_absolute = dict.fromkeys(catalogue, 0.0)
    streams = zip(
        stream_activations(hooked, windows, catalogue, batch_size=batch_size, progress=False),
        stream_activations(bridge, windows, catalogue, batch_size=batch_size, progress=False),
    )
    for from_hooked, from_bridge in streams:
        for hook in catalogue:
            reference, other = from_hooked.activations[hook], from_bridge.activations[hook]
            difference = (other - reference).norm(dim=-1)
            relative = difference / reference.norm(dim=-1).clamp_min(torch.finfo(reference.dtype).tiny)
            worst_relative[hook] = max(worst_relative[hook], relative.max().item())
            worst_absolute[hook] = max(worst_absolute[hook], (other - reference).abs().max().item())
    worst_hook = max(worst_relative, key=worst_relative.get)
    return {
        "hooks": len(catalogue),
        "tokens": windows.n_tokens,
        "max_relative": worst_relative[worst_hook],
        "max_relative_hook": worst_hook,
        "median_of_hook_maxima": statistics.median(worst_relative.values()),
        "max_absolute": max(worst_absolute.values()),
        "per_hook_max_relative": worst_relative,
    }


def _f_through_same_saes(hooked, bridge, windows, batch_size: int) -> list[dict]:
    names = [hook for hook in F_HOOKS if hook in {point.name for point in hook_catalogue(hooked)}]
    width = {point.name: point.width for point in hook_catalogue(hooked)}
    torch.manual_seed(0)
    saes = {hook: TopKSAE(TopKSAEConfig(d_in=width[hook], d_sae=4 * width[hook], k=32)).eval() for hook in names}
    rows = []
    budgets = {}
    for backend, model in (("hooked", hooked), ("bridge", bridge)):
        budgets[backend] = {hook: FeatureBudget(saes[hook].cfg.d_sae, width[hook]) for hook in names}
        for batch in stream_activations(model, windows, names, batch_size=batch_size, progress=False):
            for hook in names:
                with torch.no_grad():
                    budgets[backend][hook].update(saes[hook].encode(batch.activations[hook]), batch.doc_ids)
    for hook in names:
        f_hooked = budgets["hooked"][hook].effective_features()
        f_bridge = budgets["bridge"][hook].effective_features()
        rows.append(
            {
                "hook": hook,
                "F_hooked": f_hooked,
                "F_bridge": f_bridge,
                "relative_difference": abs(f_bridge - f_hooked) / f_hooked,
            }
        )
    return rows


def _versions() -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "transformer-lens", "transformers", "sae-lens")}


def _markdown(result: dict) -> str:
    backends = list(result["tokens_per_second"])
    lines = [
        f"# Backends side by side: {result['model']}",
        "",
        f"    {result['command']}",
        "",
        f"{result['machine']}; torch threads {result['threads']}; versions {result['versions']}.",
        "",
        f"## Activations per second ({result['tokens_timed']} measured tokens x "
        f"{len(result['tokens_per_second']['hooked'])} rounds, {result['windows']} windows of {result['context']}, "
        f"batch {result['batch_size']}, {result['hooks_timed']} hooks, every block runs; "
        "backends alternate batch by batch)",
        "",
        "| backend | load (s) | tok/s (all rounds) | CPU s per 1k tokens | tok/s per round | time / hooked's, "
        "median over batches [quartiles] |",
        "|---|---|---|---|---|---|",
    ]
    for backend in backends:
        rounds = ", ".join(f"{value:.0f}" for value in result["tokens_per_second"][backend])
        if backend == "hooked":
            ratio = "1"
        else:
            low, _, high = result["time_ratio_quartiles"][backend]
            ratio = f"{result['median_time_ratio_to_hooked'][backend]:.2f} [{low:.2f}, {high:.2f}]"
        lines.append(
            f"| {backend} | {result['load_seconds'][backend]:.1f} | "
            f"{result['overall_tokens_per_second'][backend]:.0f} | "
            f"{result['cpu_seconds_per_1k_tokens'][backend]:.1f} | {rounds} | {ratio} |"
        )
    agreement = result["agreement"]
    lines += [
        "",
        f"## Agreement of the bridge with hooked ({agreement['hooks']} catalogue hooks, {agreement['tokens']} tokens)",
        "",
        f"Largest per-token relative error |a_bridge - a_hooked| / |a_hooked|: {agreement['max_relative']:.2e} "
        f"({agreement['max_relative_hook']}); median over hooks of each hook's largest: "
        f"{agreement['median_of_hook_maxima']:.2e}; largest absolute difference of one coordinate: "
        f"{agreement['max_absolute']:.2e}.",
        "",
        "| hook | F hooked | F bridge | relative difference |",
        "|---|---|---|---|",
    ]
    for row in result["F"]:
        lines.append(
            f"| {row['hook']} | {row['F_hooked']:.3f} | {row['F_bridge']:.3f} | {row['relative_difference']:.1e} |"
        )
    lines.append("")
    lines.append(
        "F: one random-init TopK SAE per hook (d_sae = 4 N, k = 32, seed 0), the same weights for both backends."
    )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
