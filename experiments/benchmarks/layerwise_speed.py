"""Speed and memory of the layer-wise measurement, against the paper's loop and the matmul roofline.

For a Pythia-70M-shaped random model with one random SAE-Lens StandardSAE per paper hook
(19 hooks), in one run on one machine:

  ours      LayerwiseAnalyzer.run_seed (no CE-loss evaluation): batches of windows, one
            forward pass that stops at the deepest hook, chunked encode, float64 sums;
  baseline  the loop of the paper's published script (leonardbereska/superposition-measurement,
            experiments/layerwise): one document at a time, a forward pass through the whole
            model with every hook cached, one SAE encode per hook, |z| summed into float32
            per-feature totals;
  roofline  bare matmuls of every shape the measurement needs, timed in this run by the faster
            of torch.matmul and (float32, CPU) oneDNN: the tokens/s of a measurement that did
            nothing but those matmuls.

Correctness: ours must give the F of SAE-Lens's plain dense encode on the same tokens; the
report prints the largest relative difference over the hooks.

Speed: the three take turns, round after round, in one process, so a machine shared with
other work slows them alike. Memory: ours runs alone at each --memory-tokens count, and the
baseline once, each in a fresh forked process so no run's peak hides another's. Run it as
a script (a process of its own): forking relies on this process never running a torch kernel.

    python -m experiments.benchmarks.layerwise_speed --quick    # a smoke run, < 30 s
    python -m experiments.benchmarks.layerwise_speed --tokens 5080 --baseline-tokens 2032 --memory-tokens 1016 10160
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import platform
import resource
import shlex
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pandas as pd
import torch
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata
from transformer_lens import HookedTransformer, HookedTransformerConfig

from lm_superposition.activations import blocks_needed
from lm_superposition.analyze import DUPLICATE_COSINE, LayerwiseAnalyzer
from lm_superposition.codes import CodeReader
from lm_superposition.data import TokenWindows
from lm_superposition.metric import effective_features
from lm_superposition.models import paper_hooks
from lm_superposition.report import markdown_table as markdown

# Run as a script (python experiments/benchmarks/layerwise_speed.py) or as a module.
try:
    from matmul_kernels import matmul_kernels
except ImportError:
    from experiments.benchmarks.matmul_kernels import matmul_kernels

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_NAME = "pythia-70m-deduped"
# Pythia-70M's public shape (shared/design.md); random weights cost exactly what trained ones do.
PYTHIA_70M_SHAPE = dict(
    n_layers=6,
    d_model=512,
    n_heads=8,
    d_head=64,
    d_mlp=2048,
    rotary_dim=16,
    parallel_attn_mlp=True,
    normalization_type="LN",
    act_fn="gelu",
    d_vocab=50304,
    positional_embedding_type="rotary",
    n_ctx=2048,
)
BOS = 0  # Pythia's <|endoftext|>


@dataclass(frozen=True)
class Setup:
    """What every phase builds alike: the model, the SAEs, the windows and the batching."""

    device: str
    dtype: str
    d_sae: int
    batch_size: int
    context: int
    threads: int | None  # torch CPU threads; None keeps torch's default (one per core)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def measured_per_window(self) -> int:
        return self.context - 1  # every window starts with BOS, which is not measured

    @property
    def measured_per_batch(self) -> int:
        return self.batch_size * self.measured_per_window


# ---- what is measured ---------------------------------------------------------------------


def pythia_shaped_model(setup: Setup) -> HookedTransformer:
    if setup.threads:  # set here, in the phase's own process: the parent must not start OpenMP
        torch.set_num_threads(setup.threads)
    config = HookedTransformerConfig(**PYTHIA_70M_SHAPE, seed=0, device=setup.device, dtype=setup.torch_dtype)
    return HookedTransformer(config).eval()


def random_windows(n_tokens: int, setup: Setup) -> TokenWindows:
    """Enough windows of random tokens for `n_tokens` measured tokens; one document per window."""
    n_windows = math.ceil(n_tokens / setup.measured_per_window)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, PYTHIA_70M_SHAPE["d_vocab"], (n_windows, setup.context), generator=generator)
    tokens[:, 0] = BOS
    doc_ids = torch.arange(n_windows).unsqueeze(1).expand(n_windows, setup.context).clone()
    return TokenWindows(tokens, doc_ids, BOS, BOS)


@torch.inference_mode()
def random_saes(model: HookedTransformer, setup: Setup) -> dict[str, StandardSAE]:
    """One random StandardSAE per paper hook, its codes about as sparse as trained SAEs'."""
    torch.manual_seed(0)
    hooks = paper_hooks(model)
    sample = random_windows(setup.measured_per_window, setup).tokens.to(setup.device)
    _, cache = model.run_with_cache(sample, names_filter=[hook.name for hook in hooks])
    saes = {}
    for hook in hooks:
        config = StandardSAEConfig(
            d_in=hook.width,
            d_sae=setup.d_sae,
            dtype=setup.dtype,
            device=setup.device,
            metadata=SAEMetadata(hook_name=hook.name, model_name=MODEL_NAME),
        )
        sae = StandardSAE(config)
        # Pre-activations ~ N(0, 1) on this hook's activations and a bias of -2.5 keep about
        # 0.6% of the features on (L0 ~ 200 of 32,768), the sparsity of trained SAEs.
        typical_norm = cache[hook.name][0, 1:].float().norm(dim=-1).mean().item()
        sae.W_enc.normal_(0, 1 / typical_norm)
        sae.b_enc.fill_(-2.5)
        saes[hook.name] = sae.eval()
    return saes


@torch.no_grad()
def paper_loop(
    model: HookedTransformer, saes: dict[str, StandardSAE], windows: TokenWindows
) -> dict[str, torch.Tensor]:
    """The paper's measurement loop, written against TransformerLens and SAE-Lens.

    Per document: run the whole model (nnsight's trace, which the paper used, runs it to the
    logits) keeping every hook, encode each hook's activations with its SAE, and add the
    summed |z| to a float32 total. A document is a window without its BOS token: the paper
    tokenized each text on its own, with no BOS.
    """
    names = list(saes)
    totals = {name: torch.zeros(sae.cfg.d_sae, device=sae.device) for name, sae in saes.items()}
    for window in windows.tokens:
        document = window[1:].unsqueeze(0).to(model.cfg.device)
        _, cache = model.run_with_cache(document, names_filter=names)
        for name, sae in saes.items():
            totals[name] += sae.encode(cache[name]).abs().sum(dim=(0, 1)).float()
        del cache
    return totals


@torch.no_grad()
def f_difference(analyzer: LayerwiseAnalyzer, model, saes, windows: TokenWindows) -> float:
    """Largest relative difference of F over the hooks between ours and the plain formula on the
    same tokens (SAE-Lens's dense `sae.encode` of run_with_cache activations, |z| summed in
    float64): the fast path (in-place encode, sparse codes) must give the same number."""
    ours = analyzer.run_seed(windows, seed=0, progress=False)
    _, cache = model.run_with_cache(windows.tokens.to(model.cfg.device), names_filter=list(saes))
    differences = []
    for hook, sae in saes.items():
        # BOS left out, as ours does; each latent's |z| in decoder-norm units, duplicates grouped, as ours does
        codes = sae.encode(cache[hook][:, 1:]).abs().sum(dim=(0, 1), dtype=torch.float64).cpu()
        reader = CodeReader(sae, duplicate_cosine=DUPLICATE_COSINE)  # the analyzer's defaults
        budget = codes * reader.norms.cpu()
        if reader.groups is not None:
            budget = torch.zeros_like(budget).index_add_(0, reader.groups, budget)
        differences.append(abs(ours.budgets[hook].effective_features() / effective_features(budget) - 1))
    return max(differences)


def matmul_shapes(model: HookedTransformer, setup: Setup) -> list[dict]:
    """Every matmul one batch of the measurement does: operand shapes and how many per batch.

    The forward pass runs the blocks up to the deepest hook (no unembedding); attention's
    q, k, v and output projections are [rows, d_model] x [d_model, d_model] each. The encode
    covers one batch's measured tokens, which the analyzer encodes as one chunk. `for_psi`
    is False for the decode: F does not need it, only the reconstruction-quality statistics.
    """
    cfg, hooks = model.cfg, paper_hooks(model)
    layers = blocks_needed(hooks)
    rows, heads = setup.batch_size * setup.context, setup.batch_size * cfg.n_heads
    shapes = [
        ("attention q, k, v, o", (rows, cfg.d_model), (cfg.d_model, cfg.n_heads * cfg.d_head), 4 * layers, True),
        ("attention scores", (heads, setup.context, cfg.d_head), (heads, cfg.d_head, setup.context), layers, True),
        ("attention mix", (heads, setup.context, setup.context), (heads, setup.context, cfg.d_head), layers, True),
        ("mlp in", (rows, cfg.d_model), (cfg.d_model, cfg.d_mlp), layers, True),
        ("mlp out", (rows, cfg.d_mlp), (cfg.d_mlp, cfg.d_model), layers, True),
    ]
    for width in sorted({hook.width for hook in hooks}):
        n_hooks = sum(hook.width == width for hook in hooks)
        shapes.append(
            (f"sae encode (N={width})", (setup.measured_per_batch, width), (width, setup.d_sae), n_hooks, True)
        )
        shapes.append(
            (f"sae decode (N={width})", (setup.measured_per_batch, setup.d_sae), (setup.d_sae, width), n_hooks, False)
        )
    return [dict(zip(("matmul", "a", "b", "per_batch", "for_psi"), shape)) for shape in shapes]


# ---- timing and memory ----------------------------------------------------------------------


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(function, device: str) -> tuple[object, float]:
    synchronize(device)
    start = time.perf_counter()
    result = function()
    synchronize(device)
    return result, time.perf_counter() - start


def matmul_seconds(shape: dict, setup: Setup) -> float:
    """Time of one matmul of these shapes by the fastest kernel (`matmul_kernels`: torch.matmul,
    and oneDNN for float32 on a CPU), each after a warm-up call."""
    a = torch.randn(shape["a"], device=setup.device, dtype=setup.torch_dtype)
    b = torch.randn(shape["b"], device=setup.device, dtype=setup.torch_dtype)
    seconds = []
    for call in matmul_kernels(a, b).values():
        call()
        seconds.append(timed(call, setup.device)[1])
    return min(seconds)


def peak_memory_mib(device: str) -> float:
    """Peak GPU memory allocated by torch, or on CPU the process's peak resident set size."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    cpu_models = [
        line.split(":", 1)[1].strip()
        for line in Path("/proc/cpuinfo").read_text().splitlines()
        if line.startswith("model name")
    ]
    cpu = cpu_models[0] if cpu_models else platform.processor()
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


# ---- the phases, each run in a fresh process --------------------------------------------------


def measure_speed(setup: Setup, ours_tokens: int, baseline_tokens: int, rounds: int) -> dict:
    """Ours, the baseline and the roofline in turn, `rounds` times over fresh windows.

    Interleaving makes the three share whatever else the machine is doing, so their ratios
    hold on a machine shared with other work. Round 0 is a warm-up and is not kept.
    """
    model = pythia_shaped_model(setup)
    saes = random_saes(model, setup)
    analyzer = LayerwiseAnalyzer(model, saes, model_name=MODEL_NAME, batch_size=setup.batch_size)
    ours_windows = setup.batch_size * math.ceil(ours_tokens / rounds / setup.measured_per_batch)
    baseline_windows = math.ceil(baseline_tokens / rounds / setup.measured_per_window)
    per_round = ours_windows + baseline_windows
    windows = random_windows((rounds + 1) * per_round * setup.measured_per_window, setup)
    shapes = matmul_shapes(model, setup)
    rounds_table, matmul_times = [], []
    for round_index in range(rounds + 1):
        start = round_index * per_round
        ours_slice, baseline_slice = (
            windows[start : start + ours_windows],
            windows[start + ours_windows : start + per_round],
        )
        state, ours_seconds = timed(partial(analyzer.run_seed, ours_slice, seed=0, progress=False), setup.device)
        _, baseline_seconds = timed(partial(paper_loop, model, saes, baseline_slice), setup.device)
        seconds = [matmul_seconds(shape, setup) for shape in shapes]
        if round_index == 0:
            continue
        matmul_times.append(seconds)
        batch_seconds = {
            psi_only: sum(
                s * shape["per_batch"] for s, shape in zip(seconds, shapes) if shape["for_psi"] or not psi_only
            )
            for psi_only in (True, False)
        }
        rounds_table.append(
            {
                "round": round_index,
                "ours_tokens": state.tokens,
                "ours_seconds": ours_seconds,
                "baseline_tokens": baseline_slice.n_tokens,
                "baseline_seconds": baseline_seconds,
                "roofline_tokens_per_s": setup.measured_per_batch / batch_seconds[True],
                "roofline_with_decode_tokens_per_s": setup.measured_per_batch / batch_seconds[False],
                "load_1min": os.getloadavg()[0],
            }
        )
    roofline = pd.DataFrame(shapes).assign(seconds=pd.DataFrame(matmul_times).median().to_numpy())
    return {
        "rounds": rounds_table,
        "roofline": roofline.to_dict("records"),
        "device_name": device_name(setup.device),
        "mean_l0": statistics.mean(budget.mean_l0 for budget in state.budgets.values()),
        "f_difference": f_difference(analyzer, model, saes, random_windows(setup.measured_per_batch, setup)),
    }


def measure_memory(setup: Setup, loop: str, n_tokens: int) -> dict:
    """Peak memory of ours ("ours") or the paper's loop ("baseline") on `n_tokens` tokens."""
    model = pythia_shaped_model(setup)
    saes = random_saes(model, setup)
    windows = random_windows(n_tokens, setup)
    analyzer = LayerwiseAnalyzer(model, saes, model_name=MODEL_NAME, batch_size=setup.batch_size)
    memory_before = peak_memory_mib(setup.device)
    if loop == "ours":
        _, seconds = timed(
            lambda: analyzer.run_seed(windows, seed=0, token_budget=n_tokens, progress=False), setup.device
        )
    else:
        _, seconds = timed(lambda: paper_loop(model, saes, windows), setup.device)
    return {
        "measurement": loop,
        "tokens": min(n_tokens, windows.n_tokens),
        "seconds": seconds,
        "peak_memory_before_mib": memory_before,
        "peak_memory_mib": peak_memory_mib(setup.device),
    }


def in_fresh_process(function, *args):
    """Run function(*args) in a forked child, so its peak memory is its own.

    Fork rather than spawn: a fresh interpreter would re-import torch and TransformerLens for
    every phase (~10 s each here). Safe because this process never runs a torch kernel (no
    OpenMP pool) nor touches CUDA before forking.
    """
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("fork")) as pool:
        return pool.submit(function, *args).result()


# ---- the report --------------------------------------------------------------------------------


def speed_table(rounds: pd.DataFrame, memory: pd.DataFrame) -> pd.DataFrame:
    """Totals over the rounds. The roofline's tokens/s is the one that would have measured the
    same tokens in the time its matmuls took round by round."""

    def roofline_speed(column: str) -> float:
        return rounds.ours_tokens.sum() / (rounds.ours_tokens / rounds[column]).sum()

    def peak(loop: str) -> float:
        return memory.peak_memory_mib[memory.measurement == loop].max() if len(memory) else math.nan

    table = pd.DataFrame(
        [
            {
                "measurement": "ours: LayerwiseAnalyzer.run_seed",
                "tokens": rounds.ours_tokens.sum(),
                "seconds": rounds.ours_seconds.sum(),
                "peak_memory_mib": peak("ours"),
            },
            {
                "measurement": "baseline: the paper's loop, one document at a time",
                "tokens": rounds.baseline_tokens.sum(),
                "seconds": rounds.baseline_seconds.sum(),
                "peak_memory_mib": peak("baseline"),
            },
            {
                "measurement": "roofline: matmuls of forward + encode",
                "tokens_per_s": roofline_speed("roofline_tokens_per_s"),
            },
            {
                "measurement": "roofline incl. the decode for quality stats",
                "tokens_per_s": roofline_speed("roofline_with_decode_tokens_per_s"),
            },
        ]
    )
    table.loc[:1, "tokens_per_s"] = table.tokens / table.seconds
    table["of_roofline"] = table.tokens_per_s / table.tokens_per_s[2]
    table["vs_baseline"] = table.tokens_per_s / table.tokens_per_s[1]
    return table[["measurement", "tokens", "seconds", "tokens_per_s", "of_roofline", "vs_baseline", "peak_memory_mib"]]


def memory_table(runs: list[dict]) -> pd.DataFrame:
    """Peak memory of each run; for ours, relative to ours on the fewest tokens."""
    table = pd.DataFrame(
        runs, columns=["measurement", "tokens", "seconds", "peak_memory_before_mib", "peak_memory_mib"]
    )
    table = table.sort_values(["measurement", "tokens"], ascending=[False, True], ignore_index=True)
    ours = table.measurement == "ours"
    if ours.any():
        table.loc[ours, "peak_change_vs_fewest_tokens"] = (
            table.peak_memory_mib[ours] / table.peak_memory_mib[ours].iloc[0] - 1
        )
    return table


def report(args, command: str, speed_run: dict, tables: dict[str, pd.DataFrame], load: tuple) -> str:
    memory_kind = (
        "torch.cuda.max_memory_allocated" if args.device == "cuda" else "peak RSS of the run's process (ru_maxrss)"
    )
    load_line = "; ".join(
        f"{when} {', '.join(f'{x:.2f}' for x in values)}" for when, values in zip(("before", "after"), load)
    )
    roofline = tables["roofline"]
    return "\n\n".join(
        [
            "# Layer-wise measurement speed",
            f"Command: `{command}`  \n"
            f"Machine: {speed_run['device_name']}; torch {torch.__version__}; device {args.device}, {args.dtype}  \n"
            f"Setup: Pythia-70M-shaped random model, 19 paper hooks, StandardSAE d_sae={args.d_sae} "
            f"(mean L0 {speed_run['mean_l0']:.0f}), windows of {args.context} tokens, "
            f"ours {args.batch_size} windows per batch  \n"
            f"F check: ours against SAE-Lens's dense encode on the same {args.batch_size} windows, "
            "largest relative difference "
            f"of F over the hooks {speed_run['f_difference']:.1e}  \n"
            f"Load average (1, 5, 15 min): {load_line}  \n"
            f"Memory: {memory_kind}, MiB",
            markdown(tables["speed"]),
            f"Each of the {args.rounds} rounds (after a warm-up round) ran ours, then the baseline, "
            "then each roofline matmul once:",
            markdown(tables["rounds"]),
            "Peak memory, each run in a fresh process "
            "(`peak_memory_before_mib`: once the model, SAEs and windows are built):",
            markdown(tables["memory"])
            if len(tables["memory"])
            else "(not measured: --memory-tokens was given no token counts)",
            "Roofline matmuls (median time over the rounds):",
            markdown(roofline.assign(a=roofline.a.map(str), b=roofline.b.map(str))),
        ]
    )


# ---- main ---------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--tokens", type=int, default=10_000, help="tokens ours measures for its speed, over all rounds (default 10^4)"
    )
    parser.add_argument(
        "--baseline-tokens",
        type=int,
        default=2_540,
        help="tokens the baseline measures over all rounds (default 20 documents)",
    )
    parser.add_argument(
        "--rounds", type=int, default=5, help="how many times ours, the baseline and the roofline take turns"
    )
    parser.add_argument(
        "--memory-tokens",
        type=int,
        nargs="*",
        default=[10_000, 1_000_000],
        help="token counts at which ours runs alone to compare peak memory (default 10^4 10^6; none: skip)",
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default="float32", help="model and SAE weights (sums stay float64)"
    )
    parser.add_argument("--d-sae", type=int, default=32_768, help="features per SAE (the paper's dictionaries: 32,768)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (ours)")
    parser.add_argument(
        "--context", type=int, default=128, help="tokens per window, BOS included; a baseline document is a window"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's, one per core)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run in < 30 s: 512-feature SAEs, 4 windows of 32 tokens per batch, 1 thread",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO_ROOT / "results" / "benchmarks",
        help="folder for layerwise_speed.{md,csv} (layerwise_speed_quick.* with --quick)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        # One thread: on a busy machine, tiny ops on two OpenMP threads wait milliseconds each
        # for a descheduled thread, which made this smoke run 50x slower.
        args.d_sae, args.context, args.batch_size, args.rounds, args.threads = 512, 32, 4, 2, 1
        args.tokens, args.baseline_tokens, args.memory_tokens = (
            248,
            62,
            [124, 248],
        )  # a batch per round, a document per round
    for name in (
        "tokens",
        "baseline_tokens",
        "rounds",
        "d_sae",
        "batch_size",
        *(("threads",) if args.threads is not None else ()),
    ):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if any(n < 1 for n in args.memory_tokens):
        parser.error(f"--memory-tokens must be positive token counts, got {args.memory_tokens}")
    if not 2 <= args.context <= PYTHIA_70M_SHAPE["n_ctx"]:
        parser.error(
            "--context must be between 2 (BOS and one measured token) and "
            f"{PYTHIA_70M_SHAPE['n_ctx']}, got {args.context}"
        )
    if args.device == "cuda":
        # Ask NVML, not the CUDA runtime: a CUDA context here would break the forked phases.
        os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
        if not torch.cuda.is_available():
            parser.error("--device cuda, but torch sees no CUDA device here; use --device cpu")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    setup = Setup(args.device, args.dtype, args.d_sae, args.batch_size, args.context, args.threads)
    load_before = os.getloadavg()
    speed_run = in_fresh_process(measure_speed, setup, args.tokens, args.baseline_tokens, args.rounds)
    memory_runs = [in_fresh_process(measure_memory, setup, "ours", n) for n in args.memory_tokens]
    if args.memory_tokens:  # the baseline holds one document at a time: one round's documents show its peak
        memory_runs.append(
            in_fresh_process(measure_memory, setup, "baseline", math.ceil(args.baseline_tokens / args.rounds))
        )
    load = (load_before, os.getloadavg())

    rounds = pd.DataFrame(speed_run["rounds"])
    memory = memory_table(memory_runs)
    roofline = pd.DataFrame(speed_run["roofline"])
    roofline["gflop_per_s"] = [
        2 * math.prod(a) * b[-1] / s / 1e9 for a, b, s in zip(roofline.a, roofline.b, roofline.seconds)
    ]
    tables = {"speed": speed_table(rounds, memory), "rounds": rounds, "memory": memory, "roofline": roofline}
    command = "python " + " ".join(
        shlex.quote(arg) for arg in [os.path.relpath(__file__, REPO_ROOT), *(sys.argv[1:] if argv is None else argv)]
    )
    text = report(args, command, speed_run, tables, load)
    print(text)

    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / ("layerwise_speed_quick" if args.quick else "layerwise_speed")
    stem.with_suffix(".md").write_text(text + "\n")
    pd.concat([table.assign(table=name) for name, table in tables.items() if name != "roofline"]).to_csv(
        stem.with_suffix(".csv"), index=False
    )
    print(f"\nwrote {stem}.md and {stem}.csv")


if __name__ == "__main__":
    main()
