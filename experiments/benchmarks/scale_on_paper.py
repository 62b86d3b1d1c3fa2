"""Scale on paper: the expected wall time of the paper's full run and of the full-depth Gemma run,
from the rates the peer benchmarks measured (issue 16, item 5).

Reads the committed results of
  vs_paper_stack.py   (measurement on a Pythia-70M-shaped model, 19 hooks, 32,768-latent SAEs:
                       ours in float32, with the bfloat16 encode and, where the run has it, with
                       float32's codes from a bfloat16 screen; the paper's stack, rooflines)
  vs_sparsify.py --hooks paper   (training TopK SAEs on all 55 hooks of Gemma 3 270M: ours in
                       float32 and in bfloat16, eai-sparsify)
and turns CPU seconds per token into hours. CPU seconds, not wall seconds: the benchmarks ran on a
shared machine whose load moved the wall clock; on an idle core a 1-thread run's wall time is its
CPU time. Three columns:

  this CPU       measured: the benchmark's CPU seconds per token (1 thread) x the run's tokens;
  torchrun x2    estimate: the same split over 2 processes of 1 thread (the 2 cores here), perfect
                 scaling assumed (the measurement is sharded by window, with no communication but
                 one all-reduce of the sums per seed; tests/test_distributed.py checks F, not speed);
  1 H200 GPU     estimate from the roofline, no GPU lent to this project yet: the run's matmul
                 FLOPs at half the spec-sheet dense peak (989 TFLOP/s bfloat16, 67 TFLOP/s float32),
                 divided by the fraction of its matmul roofline (of the same precision) that the
                 stack reached on this CPU. A lower bound:
                 per-batch overheads (kernel launches, the nonzero scan's synchronisation) are not in it.

    python experiments/benchmarks/scale_on_paper.py
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import pandas as pd

try:
    from vs_paper_stack import PYTHIA_70M_CONFIG, markdown
except ImportError:
    from experiments.benchmarks.vs_paper_stack import PYTHIA_70M_CONFIG, markdown

REPO_ROOT = Path(__file__).resolve().parents[2]
PEERS = REPO_ROOT / "results" / "benchmarks" / "peers"
H200_PEAK_FLOPS = {"bfloat16": 989e12, "float32": 67e12}  # dense, spec sheet (same compute as H100 SXM)
GPU_EFFICIENCY = 0.5
GEMMA = dict(d_model=640, d_mlp=2048, n_layers=18, n_heads=4, d_head=256, n_kv_heads=1)


def speed_rows(path: Path, label_column: str) -> pd.DataFrame:
    table = pd.read_csv(path)
    return table[table["table"] == "speed"].set_index(label_column)


def machine_of(csv_path: Path) -> str:
    """The CPU named in the "Machine:" line of the benchmark report beside `csv_path` (same name, .md)."""
    for line in csv_path.with_suffix(".md").read_text().splitlines():
        if line.startswith("Machine: "):
            return line.removeprefix("Machine: ").split(",")[0].strip()
    raise SystemExit(f"{csv_path.with_suffix('.md')} has no 'Machine:' line: which CPU measured it is unknown")


def pick(rows: pd.DataFrame, prefix: str) -> pd.Series:
    matches = rows[rows.index.str.startswith(prefix)]
    if len(matches) != 1:
        raise SystemExit(f"expected one row starting {prefix!r} in the benchmark table, found {len(matches)}")
    return matches.iloc[0]


def pythia_flops_per_token(d_sae: int, hooks: int) -> float:
    """Matmul FLOPs per token of the measurement: the forward pass (6 blocks: q, k, v, out, mlp in, mlp out)
    and one encode per hook."""
    d, mlp, layers = PYTHIA_70M_CONFIG["hidden_size"], PYTHIA_70M_CONFIG["intermediate_size"], 6
    return 2 * layers * (4 * d * d + 2 * d * mlp) + hooks * 2 * d * d_sae


def gemma_training_flops_per_token(d_sae: int, hooks: int) -> float:
    """Forward pass of Gemma 3 270M's 18 blocks (q, k, v, o; gated MLP's three matmuls) and, per SAE,
    encode + decode and their backward (3x the forward)."""
    g = GEMMA
    attention = 2 * g["d_model"] * g["d_head"] * (2 * g["n_heads"] + 2 * g["n_kv_heads"])
    forward = g["n_layers"] * (attention + 2 * 3 * g["d_model"] * g["d_mlp"])
    return forward + hooks * 3 * 2 * 2 * g["d_model"] * d_sae


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paper-stack", type=Path, default=PEERS / "vs_paper_stack.csv", help="float32 rows")
    parser.add_argument("--paper-stack-bf16", type=Path, default=PEERS / "vs_paper_stack.csv", help="bfloat16 rows")
    parser.add_argument("--training", type=Path, default=PEERS / "gemma55_dense_grad" / "vs_sparsify_gemma.csv")
    parser.add_argument("--documents", type=int, default=20_000, help="documents per seed (the paper's 20,000)")
    parser.add_argument("--document-tokens", type=int, default=128, help="tokens per document (the benchmark's)")
    parser.add_argument("--seeds", type=int, default=3, help="data seeds (the paper's 3)")
    parser.add_argument("--training-tokens", type=int, default=1_000_000, help="SAE training tokens, full-depth run")
    parser.add_argument("--sae-seeds", type=int, default=2, help="SAE seeds of the full-depth run (issue 14: 2)")
    parser.add_argument("--d-sae", type=int, default=1280, help="latents per SAE in the training benchmark")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "results" / "benchmarks" / "scale_on_paper.md")
    args = parser.parse_args(argv)
    for name in ("paper_stack", "paper_stack_bf16", "training"):  # named relative to the repository below
        setattr(args, name, getattr(args, name).resolve())

    measure = speed_rows(args.paper_stack, "measurement")
    measure_bf16 = speed_rows(args.paper_stack_bf16, "measurement")
    train = speed_rows(args.training, "training")
    paper_tokens = args.documents * args.document_tokens * args.seeds
    paper_flops = paper_tokens * pythia_flops_per_token(32_768, 19)
    rows = []

    def add(run, who, precision, tokens, cpu_s_per_1k, flops, of_roofline):
        cpu_hours = tokens * cpu_s_per_1k / 1000 / 3600
        gpu_seconds = flops / (GPU_EFFICIENCY * H200_PEAK_FLOPS[precision]) / of_roofline
        rows.append(
            {
                "run": run,
                "stack": who,
                "precision": precision,
                "tokens": tokens,
                "this_cpu_hours (measured rate)": cpu_hours,
                "torchrun_2_processes_hours (estimate)": cpu_hours / 2,
                "1_H200_minutes (estimate, lower bound)": gpu_seconds / 60,
            }
        )

    paper_run = f"paper's Pythia-70M run: 19 hooks x {args.documents:,} documents x {args.seeds} seeds"
    screened = "ours, float32 codes from a bfloat16 screen, measurement only"
    for table, prefix, who, precision in (
        (measure, "paper:", "paper's stack (nnsight + dictionary_learning)", "float32"),
        (measure, "ours, measurement only", "ours (run_seed: per-token rate of a long run)", "float32"),
        (measure_bf16, "ours, bfloat16 encode, measurement only", "ours, bfloat16 encode (run_seed)", "bfloat16"),
        # float32's codes; its matmuls are bfloat16's (the GPU estimate's peak)
        (measure, screened, "ours, float32 codes from a bfloat16 screen (run_seed)", "bfloat16"),
    ):
        if prefix == screened and not table.index.str.startswith(prefix).any():
            continue  # runs from before the screened encode (session 13) have no such row
        row = pick(table, prefix)
        roofline = pick(table, f"roofline: {precision}").cpu_s_per_1k_tokens
        add(
            paper_run,
            who,
            precision,
            paper_tokens,
            row.cpu_s_per_1k_tokens,
            paper_flops,
            roofline / row.cpu_s_per_1k_tokens,
        )
    training_tokens = args.training_tokens * args.sae_seeds  # each SAE seed trains from its own pass here
    training_flops = training_tokens * gemma_training_flops_per_token(args.d_sae, 55)
    training_run = (
        f"full-depth Gemma 3 270M, SAE training: 55 hooks x {args.sae_seeds} SAE seeds x "
        f"{args.training_tokens:,} tokens (TopK, {args.d_sae} latents)"
    )
    for prefix, who, precision in (
        ("sparsify:", "eai-sparsify", "float32"),
        ("ours:", "ours (train_saes)", "float32"),
        ("ours, bfloat16 autocast (forward + SAE steps)", "ours, bfloat16 autocast (train_saes)", "bfloat16"),
    ):
        row = pick(train, prefix)
        # no roofline measured for training: the GPU column assumes the matmuls are the whole cost
        add(training_run, who, precision, training_tokens, row.cpu_s_per_1k_tokens, training_flops, 1.0)

    table = pd.DataFrame(rows)
    command = "python " + " ".join(
        shlex.quote(a) for a in [str(Path(__file__).relative_to(REPO_ROOT)), *(sys.argv[1:] if argv is None else argv)]
    )
    text = "\n\n".join(
        [
            "# Scale on paper: expected wall time of the full runs",
            f"Command: `{command}`  \n"
            f"From: `{args.paper_stack.relative_to(REPO_ROOT)}`, `{args.paper_stack_bf16.relative_to(REPO_ROOT)}` "
            f"and `{args.training.relative_to(REPO_ROOT)}` "
            "(their own commands, machine load and versions are in their .md files)  \n"
            f"Paper's run: {args.documents:,} documents of {args.document_tokens} tokens per seed (the benchmark's "
            f"document length; the paper's Pile documents vary), {paper_tokens:,} tokens; matmul FLOPs per token "
            f"{pythia_flops_per_token(32_768, 19) / 1e6:.0f} M (forward + 19 encodes into 32,768 latents)  \n"
            f"Full-depth training: matmul FLOPs per token {gemma_training_flops_per_token(args.d_sae, 55) / 1e6:.0f} M "
            f"(forward + 55 SAEs' encode, decode and backward); the measurement of that run is not included (it is "
            "the Pythia row's kind of work, at 55 hooks and the run's own width)  \n"
            f"This CPU: {machine_of(args.paper_stack)} (the measurement), {machine_of(args.training)} (the "
            "training); 1 thread per process. The torchrun and GPU columns are estimates "
            f"(see the script's docstring): GPU at {GPU_EFFICIENCY:.0%} of the H200's dense peak, no GPU has run "
            "this code yet.",
            markdown(table),
        ]
    )
    print(text)
    args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
