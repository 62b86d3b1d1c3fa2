"""Training TopK SAEs on several hooks from one activation stream: ours against EleutherAI's eai-sparsify.

Issue 16, item 4. In one run, on the same model, hooks and tokens, with TopK SAEs of the same
width and k, the same tokens per optimiser step and the same number of steps:

  ours         `lm_superposition.train_saes` fed by `stream_activations` (one forward pass per
               batch of windows, stopping after the deepest hook, serves every SAE): the training
               itself, what sparsify's `Trainer.fit` does; started as sparsify starts where the
               two recipes share a knob (decoder rows of norm 1, no auxiliary loss on dead
               latents: --decoder-init-norm, --aux-loss-coefficient);
  ours, whole  `train_saes_for_model`, what `lm-superposition train-sae` runs: the same training,
               plus saving each SAE and its quality check (evaluate_sae) on the held-out windows;
  sparsify     `sparsify.Trainer(cfg, dataset, model).fit()` on the Hugging Face model, as its CLI
               sets it up for the fvu loss (`AutoModel`, no LM head): forward hooks on the
               hookpoints' modules, one SAE step per hook per batch, its default optimiser
               (signum, schedule-free) and learning rate, checkpoint saved at the end.

Each stack is timed on its whole call, model forward passes included; training tokens/s counts the
tokens the SAEs were trained on (BOS left out by both). They take turns round after round (the
first of each round rotates), each round training fresh SAEs from its own seed (round r: SAE seed
r - 1 on both sides), so the spread of a hook's variance explained over rounds is its SAE-seed
spread, against which a gap between the stacks is judged, alone and together with the held-out
windows' sampling spread (a paired bootstrap over the windows: a gap of 0.001 can turn on which 32
windows were held out); the whole call and each stack's
forward passes alone (what the training time is made of) run in the first round only. Reported:
wall tokens/s and CPU seconds (this process, all threads) per 1k tokens, their ratios to
sparsify's over the same rounds, and the medians of the paired per-round ratios: on the shared
2-core machine wall time swings with other jobs, CPU time much less. \
Held-out variance explained, 1 - sum |x - x_hat|^2 / sum |x - mean x|^2
over the held-out windows' tokens (SAE-Lens's ExplainedVarianceCalculator, as the project's
quality check), is computed the same way for both, each SAE on its own stack's activations; the
report also gives how far the two stacks' activations are apart (they should agree to float noise).

Precision (--precision, one contender of ours per value): float32, the validated default; bfloat16,
the model's forward passes and the SAE training steps under bfloat16 autocast
(`SAETrainingConfig(autocast_lm=True, autocast=True)`: weights and Adam stay float32);
bfloat16-forward, the forward passes alone under it (`autocast_lm=True`), the SAE steps in
float32, whose matmuls run on the CPU's faster kernel (`kernels.linear`: oneDNN on AMD). Sparsify
runs as its CLI does on a CPU: the model in the checkpoint's dtype (float32 here), float32 SAEs
(its CLI picks bfloat16 only on a GPU that supports it); --sparsify-bf16 adds a contender with
the model loaded in bfloat16, as its CLI does on such GPUs.

Hooks: --hooks resid (default): resid_post of --layers; --hooks paper: the paper's hook set of
the whole model (`paper_hooks`: the embedding, then attn_out, mlp_out, resid_post of every block;
55 hooks on Gemma 3 270M, the full-depth run), sparsify on the HF modules that output the same
activations (checked: the activation difference below).

Models: --model gemma (default): the offline Gemma 3 270M (`lm_superposition.load_model()`;
sparsify gets `AutoModel.from_pretrained` of the same cached folder), resid_post of layers 3/9/15,
the offline corpus. --model pythia: a random-init GPTNeoX of Pythia-70M's real config, resid_post
of layers 1/3/5, random tokens. --smoke: a tiny GPTNeoX of the same architecture, a few steps;
exits 1 unless variance explained is computed for both and the activations agree.

    python experiments/benchmarks/vs_sparsify.py --smoke
    python experiments/benchmarks/vs_sparsify.py                    # Gemma 3 270M, 3 hooks, 2 rounds (~15 min idle)
    python experiments/benchmarks/vs_sparsify.py --model pythia --rounds 2
    python experiments/benchmarks/vs_sparsify.py --threads 1 --precision float32 bfloat16 --no-split
    python experiments/benchmarks/vs_sparsify.py --threads 1 --hooks paper --windows 96 --rounds 1 \
        --precision float32 bfloat16 --no-split                    # all 55 hooks of Gemma 3 270M
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars of the loaders and trainers (read when tqdm is imported)

import argparse
import contextlib
import dataclasses
import functools
import io
import json
import math
import shlex
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import pandas as pd
import torch
from sae_lens.evals import ExplainedVarianceCalculator

from lm_superposition import SAETrainingConfig, load_model, load_texts, paper_hooks, token_windows, train_saes
from lm_superposition.activations import stream_activations
from lm_superposition.data import TokenWindows
from lm_superposition.metric import bayesian_bootstrap_weights
from lm_superposition.models import offline_cache_dir
from lm_superposition.saes import train_saes_for_model  # what `lm-superposition train-sae` runs (not a top-level name)

# Run as a script (python experiments/benchmarks/vs_sparsify.py) or as a module
# (python -m experiments.benchmarks.vs_sparsify).
try:
    from vs_paper_stack import PYTHIA_70M_CONFIG, SMOKE_CONFIG, load_line, machine_line, markdown, save_random_model
except ImportError:
    from experiments.benchmarks.vs_paper_stack import (
        PYTHIA_70M_CONFIG,
        SMOKE_CONFIG,
        load_line,
        machine_line,
        markdown,
        save_random_model,
    )

REPO_ROOT = Path(__file__).resolve().parents[2]
ACTIVATION_TOLERANCE = 1e-4  # relative: the two stacks must hand their SAEs the same activations
WINDOW_RESAMPLES = 1000  # bootstrap draws of the held-out windows, for the gaps' standard errors
OURS = {"float32": "ours", "bfloat16": "ours_bf16", "bfloat16-forward": "ours_bf16_forward"}  # per --precision


# ---- the setup: model on both stacks, windows, hooks ----------------------------------------------


class Setup:
    """TL model (ours), HF base model (sparsify), the hooks on each, and the windows."""

    def __init__(self, args, tmp: Path):
        from transformers import AutoModel

        if args.model == "gemma":
            self.model = load_model()  # the offline default, cached dequantized in ~/.cache/lm_superposition
            hf_folder = offline_cache_dir()
            layers = args.layers or [3, 9, 15]
            texts = load_texts("offline")
            budget = (args.windows + args.eval_windows + 8) * (args.context - 1)
            windows = token_windows(texts, self.model.tokenizer, context_size=args.context, token_budget=budget)
        else:
            hf_folder = tmp / "model"
            config = SMOKE_CONFIG if args.smoke else PYTHIA_70M_CONFIG
            save_random_model(config, hf_folder)
            self.model = load_model(str(hf_folder))
            layers = args.layers or ([0, 1] if args.smoke else [1, 3, 5])
            n = args.windows + args.eval_windows
            tokens = torch.randint(
                1, config["vocab_size"], (n, args.context), generator=torch.Generator().manual_seed(0)
            )
            tokens[:, 0] = config["bos_token_id"]
            windows = TokenWindows(
                tokens, torch.arange(n).unsqueeze(1).expand(n, args.context).contiguous(), config["bos_token_id"], None
            )
        self.hf_model = AutoModel.from_pretrained(hf_folder, dtype=torch.float32).eval()
        self.hf_name = str(hf_folder)

        # Whole windows only (no padding), so a window is context - 1 trained tokens on both sides.
        full = windows[(windows.doc_ids >= 0).all(1)]
        if len(full) < args.windows + args.eval_windows:
            raise SystemExit(f"the corpus gave {len(full)} full windows, fewer than --windows + --eval-windows")
        self.train = full[: args.windows]
        self.eval = full[args.windows : args.windows + args.eval_windows]
        self.all = full[: args.windows + args.eval_windows]
        self.bos = windows.bos_token_id
        if args.hooks == "paper":
            modules = GEMMA_MODULES if args.model == "gemma" else GPT_NEOX_MODULES
            self.hooks = {point.name: hf_module(point.name, modules) for point in paper_hooks(self.model)}
        else:
            self.hooks = {f"blocks.{layer}.hook_resid_post": f"layers.{layer}" for layer in layers}  # TL -> HF module
        self.d_in = self.model.cfg.d_model
        self.layers = layers
        self.hf_bf16 = AutoModel.from_pretrained(hf_folder, dtype=torch.bfloat16).eval() if args.sparsify_bf16 else None


# The HF module whose output is each TransformerLens hook (for sparsify's hookpoints).
GEMMA_MODULES = {
    "hook_resid_pre": "embed_tokens",  # blocks.0 only: Gemma's scaled embedding
    "hook_attn_out": "layers.{layer}.post_attention_layernorm",  # Gemma 3 normalises each branch's output
    "hook_mlp_out": "layers.{layer}.post_feedforward_layernorm",
    "hook_resid_post": "layers.{layer}",
}
GPT_NEOX_MODULES = {
    "hook_resid_pre": "embed_in",
    "hook_attn_out": "layers.{layer}.attention",
    "hook_mlp_out": "layers.{layer}.mlp",
    "hook_resid_post": "layers.{layer}",
}


def hf_module(hook: str, modules: dict[str, str]) -> str:
    _, layer, kind = hook.split(".")
    return modules[kind].format(layer=layer)


# ---- the three calls ------------------------------------------------------------------------------


def our_config(args, setup: Setup, precision: str = "float32", seed: int = 0) -> SAETrainingConfig:
    return SAETrainingConfig(
        autocast_lm=precision.startswith("bfloat16"),
        autocast=precision == "bfloat16",
        architecture="topk",
        k=args.k,
        d_sae=args.width,
        lr=args.lr,
        aux_loss_coefficient=args.aux_loss_coefficient,
        decoder_init_norm=args.decoder_init_norm,
        batch_size_tokens=args.windows_per_step * (args.context - 1),
        training_tokens=setup.train.n_tokens,
        seed=seed,
        model_name=setup.model.cfg.model_name,
    )


def train_ours(args, setup: Setup, precision: str = "float32", seed: int = 0) -> dict:
    config = our_config(args, setup, precision, seed)
    stream = stream_activations(
        setup.model,
        setup.train,
        list(setup.hooks),
        batch_size=args.forward_batch,
        progress=False,
        autocast_dtype=torch.bfloat16 if config.autocast_lm else None,
    )
    saes = train_saes(
        (batch.activations for batch in stream),
        {hook: setup.d_in for hook in setup.hooks},
        config,
        progress=False,
    )
    return {"saes": saes, "tokens": next(iter(saes.values())).cfg.metadata.training_tokens}


def train_ours_whole(args, setup: Setup, out: Path, precision: str, seed: int = 0) -> dict:
    """train_saes_for_model on the training windows plus the first --whole-eval-windows held-out
    windows, which it holds out for its own quality check (variance explained of every SAE from
    one forward pass per batch; no CE loss, which train_saes_for_model measures only where asked)."""
    windows = setup.all[: args.windows + args.whole_eval_windows]
    folders = train_saes_for_model(
        setup.model,
        list(setup.hooks),
        windows,
        our_config(args, setup, precision, seed),
        out,
        batch_size=args.forward_batch,
        n_eval_windows=args.whole_eval_windows,
        progress=False,
        ce_recovered=False,
    )
    quality = {hook: json.loads((folder / "quality.json").read_text()) for hook, folder in folders.items()}
    return {"quality": quality, "tokens": next(iter(quality.values()))["training_tokens"]}


def train_sparsify(args, setup: Setup, out: Path, hf_model=None, seed: int = 0) -> dict:
    from datasets import Dataset
    from sparsify import SaeConfig, TrainConfig, Trainer

    dataset = Dataset.from_dict({"input_ids": setup.train.tokens.tolist()}).with_format("torch")
    config = TrainConfig(
        SaeConfig(num_latents=args.width, k=args.k),
        batch_size=args.windows_per_step,
        hookpoints=list(setup.hooks.values()),
        init_seeds=[seed],
        exclude_tokens=[setup.bos],
        log_to_wandb=False,
        save_dir=str(out),
        save_every=10**9,
    )
    precision = torch.get_float32_matmul_precision()  # fit() sets "high"; ours must not run under it
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints its setup; its progress bar is off below
            trainer = Trainer(config, dataset, hf_model or setup.hf_model)
            trainer.fit()
    finally:
        torch.set_float32_matmul_precision(precision)
    used = (
        len(dataset) // args.windows_per_step
    ) * args.windows_per_step  # whole batches, as its DataLoader gives them
    tokens = int(
        (setup.train.tokens[:used] != setup.bos).sum()
    )  # exclude_tokens=[BOS] drops every BOS, also mid-window ones
    return {"saes": {hook: trainer.saes[module] for hook, module in setup.hooks.items()}, "tokens": tokens}


@torch.no_grad()
def forward_ours(args, setup: Setup) -> dict:
    """Only the forward passes train_ours makes: the activation stream, consumed and dropped."""
    tokens = sum(
        batch.n_tokens
        for batch in stream_activations(
            setup.model, setup.train, list(setup.hooks), batch_size=args.forward_batch, progress=False
        )
    )
    return {"tokens": tokens}


@torch.no_grad()
def forward_sparsify(args, setup: Setup) -> dict:
    """Only the forward passes sparsify's fit makes: the base model on each batch of windows."""
    used = (len(setup.train) // args.windows_per_step) * args.windows_per_step
    for start in range(0, used, args.windows_per_step):
        setup.hf_model(setup.train.tokens[start : start + args.windows_per_step])
    return {"tokens": int((setup.train.tokens[:used] != setup.bos).sum())}


# ---- held-out quality, the same formula for both ---------------------------------------------------


@torch.no_grad()
def parse_with(own: argparse.ArgumentParser, argv) -> tuple[argparse.Namespace, argparse.Namespace, tuple]:
    """A training comparison's start (sparsify_lr_sweep.py's, sparsify_optimizer_probe.py's): its
    `own` options out of `argv`, this script's setup options (--hooks, --windows, --threads, --lr,
    --out, ...) from the rest, torch's threads set; returns both and the load average before."""
    own_args, rest = own.parse_known_args(argv)
    args = parse_args(rest)
    if args.threads:
        torch.set_num_threads(args.threads)
    return own_args, args, os.getloadavg()


def prepared(args, folder: Path) -> tuple[Setup, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The setup every training comparison starts from (this script's, sparsify_lr_sweep.py's,
    sparsify_optimizer_probe.py's): `Setup` in `folder`, --width defaulted to 2 d_in, and the
    held-out activations of both stacks (`held_out_activations`)."""
    setup = Setup(args, folder)
    args.width = args.width or 2 * setup.d_in
    return setup, *held_out_activations(setup)


def held_out_activations(setup: Setup) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """({hook: [tokens, d]} from TL, the same from the HF model), held-out windows, BOS left out."""
    ours = {hook: [] for hook in setup.hooks}
    for batch in stream_activations(setup.model, setup.eval, list(setup.hooks), batch_size=8, progress=False):
        for hook, acts in batch.activations.items():
            ours[hook].append(acts)
    theirs, captured = {hook: [] for hook in setup.hooks}, {}
    modules = {setup.hf_model.get_submodule(module): hook for hook, module in setup.hooks.items()}
    handles = [
        m.register_forward_hook(lambda m, i, o: captured.__setitem__(modules[m], o[0] if isinstance(o, tuple) else o))
        for m in modules
    ]
    keep = setup.eval.measured_mask
    try:
        for start in range(0, len(setup.eval), 8):
            setup.hf_model(setup.eval.tokens[start : start + 8])
            for hook in setup.hooks:
                theirs[hook].append(captured[hook][keep[start : start + 8]])
    finally:
        for handle in handles:
            handle.remove()
    return {h: torch.cat(a) for h, a in ours.items()}, {h: torch.cat(a) for h, a in theirs.items()}


@torch.no_grad()
def quality(reconstruct, acts: torch.Tensor, d_sae: int, window_sizes: list[int] | None = None) -> dict:
    """Variance explained (SAE-Lens's calculator), L0 and alive latents of one SAE on held-out activations.

    With `window_sizes` (the tokens of each held-out window, in the order of `acts`), also
    "window_sums": each window's sums that variance explained is made of (`WindowSums`), so a
    bootstrap over the windows can say how much the held-out sample moves it."""
    calculator = ExplainedVarianceCalculator()
    fired = torch.zeros(d_sae, dtype=torch.bool)
    l0 = 0
    sums = None
    if window_sizes is not None:
        window_of_token = torch.repeat_interleave(torch.tensor(window_sizes))
        if len(window_of_token) != len(acts):
            raise ValueError(f"the windows hold {len(window_of_token)} tokens, the activations {len(acts)}")
        sums = WindowSums.empty(len(window_sizes), acts.shape[1])
    for start, chunk in zip(range(0, len(acts), 1024), acts.split(1024)):
        x_hat, codes_idx, n_active = reconstruct(chunk)
        calculator.add_batch(x_hat, chunk)
        if sums is not None:
            sums.add(chunk, x_hat, window_of_token[start : start + len(chunk)])
        fired[codes_idx] = True
        l0 += n_active
    result = {
        "variance_explained": calculator.compute(),
        "mean_l0": l0 / len(acts),
        "alive_fraction": fired.float().mean().item(),
    }
    return result if sums is None else result | {"window_sums": sums}


@dataclasses.dataclass
class WindowSums:
    """Per held-out window, the float64 sums that SAE-Lens's ExplainedVarianceCalculator keeps for
    the whole set, so variance explained can be recomputed for any weighting of the windows
    (`variance_explained`)."""

    tokens: torch.Tensor  # [windows]
    sum_x: torch.Tensor  # [windows, d]
    squared_norm: torch.Tensor  # [windows]: sum of |x|^2
    squared_residual: torch.Tensor  # [windows]: sum of |x - x_hat|^2

    @classmethod
    def empty(cls, windows: int, d: int) -> WindowSums:
        zeros = functools.partial(torch.zeros, dtype=torch.float64)
        return cls(zeros(windows), zeros(windows, d), zeros(windows), zeros(windows))

    def add(self, x: torch.Tensor, x_hat: torch.Tensor, windows: torch.Tensor) -> None:
        x, x_hat = x.double(), x_hat.double()
        self.tokens.index_add_(0, windows, torch.ones(len(x), dtype=torch.float64))
        self.sum_x.index_add_(0, windows, x)
        self.squared_norm.index_add_(0, windows, x.pow(2).sum(1))
        self.squared_residual.index_add_(0, windows, (x - x_hat).pow(2).sum(1))

    def variance_explained(self, weights: torch.Tensor) -> torch.Tensor:
        """[resamples] variance explained under each row of `weights` ([resamples, windows]; all
        ones: the calculator's own value), by its formula: 1 - mean |x - x_hat|^2 / (mean |x|^2 - |mean x|^2)."""
        tokens = weights @ self.tokens
        mean_x = (weights @ self.sum_x) / tokens[:, None]
        total_variance = (weights @ self.squared_norm) / tokens - mean_x.pow(2).sum(1)
        return 1 - (weights @ self.squared_residual) / tokens / total_variance


def ours_reconstruct(sae):
    def run(x):
        codes = sae.encode(x)
        nonzero = codes != 0
        return sae.decode(codes), nonzero.any(0).nonzero().flatten(), int(nonzero.sum())

    return run


def sparsify_reconstruct(sae):
    def run(x):
        out = sae(x)
        active = out.latent_indices[out.latent_acts != 0]
        return out.sae_out, active.unique(), int((out.latent_acts != 0).sum())

    return run


# ---- the run ---------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["gemma", "pythia"], default="gemma")
    parser.add_argument(
        "--layers", type=int, nargs="*", default=None, help="resid_post of these layers (gemma: 3 9 15; pythia: 1 3 5)"
    )
    parser.add_argument(
        "--windows", type=int, default=None, help="training windows (default 512: ~65k tokens, 256 steps)"
    )
    parser.add_argument(
        "--eval-windows", type=int, default=32, help="held-out windows for variance explained (default 32)"
    )
    parser.add_argument("--context", type=int, default=128, help="tokens per window, BOS included (default 128)")
    parser.add_argument(
        "--windows-per-step",
        type=int,
        default=2,
        help="windows per optimiser step on both sides (default 2: 254 tokens, the demo's 256-token batches)",
    )
    parser.add_argument(
        "--forward-batch",
        type=int,
        default=8,
        help="windows per forward pass for ours (train_saes_for_model's default)",
    )
    parser.add_argument(
        "--width", type=int, default=None, help="latents per SAE (default 2 x d_model: 1280 on Gemma 3 270M)"
    )
    parser.add_argument("--k", type=int, default=32, help="active latents per token (default 32)")
    parser.add_argument(
        "--lr",
        type=float,
        default=5e-3,
        help="our learning rate (default 5e-3: the best held-out variance explained of 2e-3, 5e-3 and 1e-2 on the "
        "55-hook run, sparsify_lr_sweep.py); sparsify keeps its own default",
    )
    parser.add_argument(
        "--aux-loss-coefficient",
        type=float,
        default=0.0,
        help="our TopK auxiliary loss on dead latents (default 0: as sparsify's default auxk_alpha; the "
        "package's default, SAE-Lens's, is 1)",
    )
    parser.add_argument(
        "--decoder-init-norm",
        type=float,
        default=1.0,
        help="norm of our decoder rows at initialisation (default 1: as sparsify, whose decoder rows start "
        "at unit norm; the package's default, SAE-Lens's, is 0.1)",
    )
    parser.add_argument(
        "--rounds", type=int, default=2, help="times each of the three trains, taking turns (default 2)"
    )
    parser.add_argument(
        "--hooks",
        choices=["resid", "paper"],
        default="resid",
        help="resid: resid_post of --layers (default); paper: the paper's hook set of every block (55 on Gemma)",
    )
    parser.add_argument(
        "--precision",
        nargs="+",
        choices=list(OURS),
        default=["float32"],
        help="one contender of ours per precision (bfloat16: forward passes and SAE steps under autocast; "
        "bfloat16-forward: the forward passes only)",
    )
    parser.add_argument(
        "--sparsify-bf16",
        action="store_true",
        help="also run sparsify with the model loaded in bfloat16 (its CLI's choice on bf16-capable GPUs)",
    )
    parser.add_argument(
        "--no-whole",
        action="store_true",
        help="skip the train_saes_for_model row (run at the last --precision)",
    )
    parser.add_argument("--no-split", action="store_true", help="skip timing each stack's forward passes alone")
    parser.add_argument(
        "--whole-eval-windows",
        type=int,
        default=1,
        help="windows train_saes_for_model holds out for its own quality check "
        "(default 1; --smoke: all held-out windows)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's, one per core)")
    parser.add_argument("--smoke", action="store_true", help="tiny GPTNeoX, 16 windows of 32 tokens, 1 round, 1 thread")
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO_ROOT / "results" / "benchmarks" / "peers",
        help="folder for vs_sparsify_<model>{,_smoke}.{md,csv}",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.windows, args.eval_windows, args.context, args.k, args.rounds, args.threads = (
            "pythia",
            16,
            4,
            32,
            8,
            1,
            1,
        )
        args.whole_eval_windows = args.eval_windows  # so its quality.json and this script evaluate the same tokens
    args.windows = args.windows or 512
    if args.whole_eval_windows > args.eval_windows:
        parser.error("--whole-eval-windows must be at most --eval-windows")
    for name in (
        "windows",
        "eval_windows",
        "whole_eval_windows",
        "context",
        "windows_per_step",
        "forward_batch",
        "k",
        "rounds",
    ):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="vs_sparsify-") as tmp:
        tmp = Path(tmp)
        setup, acts_ours, acts_hf = prepared(args, tmp)
        activation_diff = max(((acts_ours[h] - acts_hf[h]).norm() / acts_hf[h].norm()).item() for h in setup.hooks)

        calls = {
            OURS[precision]: (lambda i, precision=precision: train_ours(args, setup, precision, seed=i - 1))
            for precision in args.precision
        }
        calls["sparsify"] = lambda i: train_sparsify(args, setup, tmp / f"sparsify{i}", seed=i - 1)
        if args.sparsify_bf16:
            calls["sparsify_bf16"] = lambda i: train_sparsify(
                args, setup, tmp / f"sparsify_bf16_{i}", setup.hf_bf16, seed=i - 1
            )
        once = {}  # run in the first round only: what the training's time is made of, and the whole call
        if not args.no_whole:
            once["ours_whole"] = lambda i: train_ours_whole(
                args, setup, tmp / f"ours{i}", args.precision[-1], seed=i - 1
            )
        if not args.no_split:
            once["ours_forward"] = lambda i: forward_ours(args, setup)
            once["sparsify_forward"] = lambda i: forward_sparsify(args, setup)
        names = list(calls) + list(once)
        rounds, qualities = [], []
        window_sizes = setup.eval.measured_mask.sum(1).tolist()  # held-out tokens per window, BOS left out
        window_sums = {}  # (hook, stack): [WindowSums of each round]
        for index in range(1, args.rounds + 1):
            present = list(calls) + (list(once) if index == 1 else [])
            order = (
                present[(index - 1) % len(present) :] + present[: (index - 1) % len(present)]
            )  # rotate who goes first
            row = {"round": index, "order": " > ".join(order)}
            calls_now = calls | once
            results = {}
            for name in order:
                wall, cpu = time.perf_counter(), time.process_time()
                results[name] = calls_now[name](index)
                row[f"{name}_seconds"] = time.perf_counter() - wall
                row[f"{name}_cpu_seconds"] = time.process_time() - cpu  # this process, all its threads
                row[f"{name}_tokens"] = results[name]["tokens"]
            row["load_1min"] = os.getloadavg()[0]
            rounds.append(row)
            trained = [(name, ours_reconstruct, acts_ours) for name in calls if name.startswith("ours")] + [
                (name, sparsify_reconstruct, acts_hf) for name in calls if name.startswith("sparsify")
            ]
            for hook in setup.hooks:
                for name, reconstruct, acts in trained:
                    q = quality(reconstruct(results[name]["saes"][hook]), acts[hook], args.width, window_sizes)
                    window_sums.setdefault((hook, name), []).append(q.pop("window_sums"))
                    qualities.append({"round": index, "hook": hook, "stack": name, **q})
                if "ours_whole" in results:
                    own = results["ours_whole"]["quality"][hook]
                    qualities.append(
                        {
                            "round": index,
                            "hook": hook,
                            "stack": f"ours_whole (its quality.json, {args.whole_eval_windows} windows)",
                            "variance_explained": own["variance_explained"],
                            "mean_l0": own["mean_l0"],
                            "alive_fraction": 1 - own["dead_fraction"],
                        }
                    )
    load_after = os.getloadavg()

    rounds = pd.DataFrame(rounds)
    qualities = pd.DataFrame(qualities)
    labels = {
        "ours": "ours: train_saes over stream_activations (training), float32",
        "ours_bf16": "ours, bfloat16 autocast (forward + SAE steps): train_saes over stream_activations",
        "ours_bf16_forward": "ours, bfloat16 autocast (forward only; SAE steps float32): train_saes over "
        "stream_activations",
        "sparsify": "sparsify: Trainer(cfg, dataset, AutoModel).fit(), float32",
        "sparsify_bf16": "sparsify, model loaded in bfloat16: Trainer(...).fit()",
        "ours_whole": f"ours, whole: train_saes_for_model (training + save + quality check, {args.precision[-1]}), "
        "round 1",
        "ours_forward": "ours' forward passes alone (stream_activations, no SAE), round 1",
        "sparsify_forward": "sparsify's forward passes alone (AutoModel, no hooks), round 1",
    }
    for name in names:  # paired per-round ratios of tokens/s (wall) and of tokens per CPU second
        for kind, column in (("", "seconds"), ("_cpu", "cpu_seconds")):
            rounds[f"{name}_vs_sparsify{kind}"] = (
                rounds[f"sparsify_{column}"]
                / rounds[f"{name}_{column}"]
                * rounds[f"{name}_tokens"]
                / rounds["sparsify_tokens"]
            )
    speed = []
    for name in names:
        ran = rounds[f"{name}_seconds"].notna()
        tokens, seconds, cpu = (rounds[f"{name}_{c}"][ran].sum() for c in ("tokens", "seconds", "cpu_seconds"))
        # against sparsify over the same rounds
        sparsify_tokens, sparsify_seconds, sparsify_cpu = (
            rounds[f"sparsify_{c}"][ran].sum() for c in ("tokens", "seconds", "cpu_seconds")
        )
        speed.append(
            {
                "training": labels[name],
                "tokens": int(tokens),
                "seconds": seconds,
                "tokens_per_s": tokens / seconds,
                "cpu_s_per_1k_tokens": 1000 * cpu / tokens,
                "vs_sparsify": tokens / seconds / (sparsify_tokens / sparsify_seconds),
                "vs_sparsify_cpu": tokens / cpu / (sparsify_tokens / sparsify_cpu),
                "median_round_vs_sparsify": rounds[f"{name}_vs_sparsify"][ran].median(),
                "median_round_vs_sparsify_cpu": rounds[f"{name}_vs_sparsify_cpu"][ran].median(),
            }
        )
    speed = pd.DataFrame(speed)
    by_hook = dict(index="hook", columns="stack", values="variance_explained", sort=False, dropna=False)
    ve = qualities.pivot_table(**by_hook, aggfunc="mean")
    # each round trains from its own SAE seed: the spread over rounds is the SAE-seed spread
    seed_sd = qualities.pivot_table(**by_hook, aggfunc="std")
    seeds = qualities.groupby("stack")["round"].nunique()
    ours_names = [OURS[precision] for precision in args.precision]
    ve_ok = qualities.variance_explained.map(math.isfinite).all() and {*ours_names, "sparsify"} <= set(
        qualities["stack"]
    )

    # A Bayesian bootstrap over the held-out windows (as the package's over documents), the same
    # draws for every hook, stack and seed: paired, so the spread of the gap over the draws is what
    # the choice of held-out windows does to it, the SAEs held fixed.
    weights = bayesian_bootstrap_weights(WINDOW_RESAMPLES, len(window_sizes))

    def windows_sd(name: str) -> pd.Series:
        """Per hook: the standard deviation of (`name`'s VE - sparsify's), means over seeds, over the
        bootstrap's draws of held-out windows."""

        def resampled(hook, stack):
            return torch.stack([sums.variance_explained(weights) for sums in window_sums[(hook, stack)]]).mean(0)

        return pd.Series(
            {hook: float((resampled(hook, name) - resampled(hook, "sparsify")).std()) for hook in ve.index}
        )

    def gap_in_standard_errors(name: str, with_windows: bool = False) -> pd.Series:
        """Per hook: (mean VE of `name` - sparsify's) / the standard error of that difference of seed
        means: over the SAE seeds, and `with_windows` over the held-out windows too (`windows_sd`; the
        two independent variances added); NaN where either side has fewer than 2 seeds."""
        variance = seed_sd[name] ** 2 / seeds[name] + seed_sd["sparsify"] ** 2 / seeds["sparsify"]
        if with_windows:
            variance = variance + windows_sd(name) ** 2
        return (ve[name] - ve["sparsify"]) / variance.pow(0.5)

    def hooks_below(name: str, with_windows: bool = False) -> float:
        """Hooks where `name` is below sparsify by over 2 standard errors (`gap_in_standard_errors`)."""
        if min(seeds[name], seeds["sparsify"]) < 2:
            return math.nan
        return int((gap_in_standard_errors(name, with_windows) < -2).sum())

    equal_or_better = {name: bool((ve[name] >= ve["sparsify"]).all()) for name in ours_names}
    ve_summary = pd.DataFrame(
        [
            {
                "stack": name,
                "seeds": seeds[name],
                "mean_over_hooks": ve[name].mean(),
                "min_over_hooks": ve[name].min(),
                "hooks_at_or_above_sparsify": int((ve[name] >= ve["sparsify"]).sum()),
                "hooks_below_by_over_2_se": hooks_below(name),
                "hooks_below_by_over_2_se_seeds_and_windows": hooks_below(name, with_windows=True),
                "hooks": len(ve),
            }
            for name in ve.columns
        ]
    )
    per_hook = pd.DataFrame(index=ve.index)
    for name in ve.columns:
        per_hook[f"{name}_mean"], per_hook[f"{name}_seed_sd"] = ve[name], seed_sd[name]
        if name in ours_names:
            per_hook[f"{name}_gap_in_se"] = gap_in_standard_errors(name)
            per_hook[f"{name}_gap_in_se_seeds_and_windows"] = gap_in_standard_errors(name, with_windows=True)

    command = "python " + " ".join(
        shlex.quote(a) for a in [os.path.relpath(__file__, REPO_ROOT), *(sys.argv[1:] if argv is None else argv)]
    )
    model_line = (
        "Gemma 3 270M (offline default: dequantized Q4_K_M, fp32), the offline corpus"
        if args.model == "gemma"
        else f"random-init GPTNeoX ({'tiny smoke shape' if args.smoke else 'Pythia-70M config'}), random tokens"
    )
    packages = ("torch", "transformers", "eai-sparsify", "transformer-lens", "sae-lens", "lm-superposition")
    versions = ", ".join(f"{p} {version(p)}" for p in packages)
    held_out_tokens = len(next(iter(acts_ours.values())))
    steps_ours = setup.train.n_tokens // (args.windows_per_step * (args.context - 1))
    text = "\n\n".join(
        [
            "# Training TopK SAEs on several hooks: ours vs eai-sparsify",
            f"Command: `{command}`  \n"
            f"Machine: {machine_line()}  \n"
            f"Versions: {versions}  \n"
            f"Model: {model_line}; hooks {', '.join(f'{h} (sparsify: {m})' for h, m in setup.hooks.items())}  \n"
            f"SAEs: TopK k={args.k}, {args.width} latents, d_in {setup.d_in}; "
            f"{args.windows} training windows of {args.context} tokens "
            f"({setup.train.n_tokens:,} tokens without BOS); a step: {args.windows_per_step} windows for sparsify "
            f"({args.windows // args.windows_per_step} steps), "
            f"{args.windows_per_step * (args.context - 1)} tokens for ours "
            f"({steps_ours} steps); ours lr {args.lr:g} (Adam, SAE-Lens), auxiliary loss "
            f"{args.aux_loss_coefficient:g}, decoder rows started at norm {args.decoder_init_norm:g}, "
            f"forward passes of {args.forward_batch} windows; "
            "sparsify's defaults otherwise (signum, schedule-free, lr 5e-3 / sqrt(latents / 2^14), auxk_alpha 0, "
            "unit-norm decoder rows)  \n"
            f"Held out: {args.eval_windows} windows ({held_out_tokens:,} tokens); "
            f"the stacks' activations there differ by "
            f"{activation_diff:.1e} (largest relative Frobenius difference over the hooks)  \n"
            f"Load average (1, 5, 15 min): {load_line(load_before, load_after)}",
            markdown(speed),
            "Held-out variance explained per hook: mean and standard deviation over the rounds' SAE seeds; "
            "gap_in_se: (ours' mean - sparsify's) / the standard error of that difference over the SAE seeds; "
            f"gap_in_se_seeds_and_windows: the same with the held-out windows' sampling variance added (a paired "
            f"Bayesian bootstrap of the {len(window_sizes)} windows, {WINDOW_RESAMPLES} draws)",
            markdown(per_hook.reset_index()),
            "Held-out variance explained over the hooks:",
            markdown(ve_summary),
            "Ours at equal or better variance explained than sparsify on every hook (means over seeds): "
            + ", ".join(f"{name} **{'yes' if ok else 'no'}**" for name, ok in equal_or_better.items())
            + "; hooks_below_by_over_2_se above counts the hooks where ours is below by more than the seeds' spread "
            "allows (2 standard errors), hooks_below_by_over_2_se_seeds_and_windows by more than the seeds' and the "
            "held-out windows' spread together allow",
            "Per round (the first to run rotates):",
            markdown(rounds),
            "Held-out quality per round:",
            markdown(qualities),
        ]
    )
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / (f"vs_sparsify_{args.model}" + ("_smoke" if args.smoke else ""))
    stem.with_suffix(".md").write_text(text + "\n")
    pd.concat([speed.assign(table="speed"), rounds.assign(table="rounds"), qualities.assign(table="quality")]).to_csv(
        stem.with_suffix(".csv"), index=False
    )
    print(f"\nwrote {stem}.md and {stem}.csv")
    failures = []
    if not ve_ok:
        failures.append("variance explained was not computed for both stacks")
    if not activation_diff <= ACTIVATION_TOLERANCE:
        failures.append(f"the stacks' activations differ by {activation_diff:.2e} > {ACTIVATION_TOLERANCE:g}")
    for failure in failures:
        print(f"FAIL: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
