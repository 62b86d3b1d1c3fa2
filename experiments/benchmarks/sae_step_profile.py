"""Where an SAE training step's time goes: is the per-SAE SAE-Lens trainer loop worth batching?

Issue 16, item 4 asks to batch the SAEs of equal width (stacked weights, one batched matmul for
all hooks) where the per-SAE SAE-Lens trainer loop is the bottleneck. This measures, for the
shape the peer benchmark trains (TopK, k 32, 1,280 latents on a 640-wide hook, 254 tokens a
step), side by side in one run, alternating:

  sae_lens_step    one `SAETrainer.step` of the project's trainer (`saes.training._new_trainer`:
                   SAE-Lens's loss, Adam, schedules, gradient clipping, dead-latent tracking),
                   float32, and under SAE-Lens's bfloat16 autocast (`autocast`); with SAE-Lens's
                   own TopKTrainingSAE (dense codes, decode and W_enc gradient) and with the
                   project's SparseTopKTrainingSAE (codes kept sparse, sparse decode, top-k over
                   a few candidates a token, no input gradient, float32 matmuls on the CPU's
                   faster kernel (`kernels.linear`: oneDNN on AMD), fused Adam);
  bare_matmuls     the matmuls of that step alone: encode and decode forward, their backward
                   (4 more matmuls of the same sizes), no top-k, no optimiser, in float32 and
                   in bfloat16;
  stacked_bmm      the same matmuls for `--hooks` SAEs at once through torch.bmm on stacked
                   weights (what batching the SAEs would run), per SAE.

If sae_lens_step is close to bare_matmuls, the loop's overhead (Python, optimiser, bookkeeping)
is small and batching cannot buy much: the step's cost is its arithmetic. If stacked_bmm per SAE
is well below bare_matmuls, batching would pay through better matmul shapes.

    python experiments/benchmarks/sae_step_profile.py --threads 1
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")

import argparse
import contextlib
import io
import sys
from unittest import mock

import pandas as pd
import torch
from sae_lens import TopKTrainingSAE

from lm_superposition.config import SAETrainingConfig
from lm_superposition.saes import training
from lm_superposition.saes.training import SparseTopKTrainingSAE, _initialise_from_data, _new_trainer

try:
    from vs_paper_stack import alternating_medians, load_line, parse_micro_benchmark, write_report
except ImportError:
    from experiments.benchmarks.vs_paper_stack import (
        alternating_medians,
        load_line,
        parse_micro_benchmark,
        write_report,
    )


def trainer_step(
    d_in: int, d_sae: int, k: int, tokens: int, autocast: bool, sae_class: type[TopKTrainingSAE] = SparseTopKTrainingSAE
):
    """A function running one SAE-Lens training step of a fresh trainer on random inputs.

    sae_class: the TopK training SAE the trainer gets in place of the project's SparseTopKTrainingSAE."""
    config = SAETrainingConfig(
        architecture="topk",
        k=k,
        d_sae=d_sae,
        lr=2e-3,
        batch_size_tokens=tokens,
        training_tokens=1000 * tokens,
        autocast=autocast,
    )
    with mock.patch.object(training, "SparseTopKTrainingSAE", sae_class):
        trainer = _new_trainer("hook", d_in, config)
    inputs = [torch.randn(tokens, d_in, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    with contextlib.redirect_stderr(io.StringIO()):  # its norm-estimation progress bar
        _initialise_from_data(trainer, inputs, config)
    count = [0]

    def step():
        trainer.maybe_reset_sparsity()
        trainer.step(inputs[count[0] % len(inputs)])
        trainer.n_training_steps += 1
        count[0] += 1

    return step


def bare_matmuls(d_in: int, d_sae: int, tokens: int, dtype: torch.dtype, n_saes: int = 1):
    """The six matmuls of one step (encode, decode, and the gradients of both) for n_saes SAEs at once."""
    x = torch.randn(n_saes, tokens, d_in, dtype=dtype)
    w_enc = torch.randn(n_saes, d_in, d_sae, dtype=dtype)
    w_dec = torch.randn(n_saes, d_sae, d_in, dtype=dtype)

    def step():
        codes = torch.bmm(x, w_enc)  # encode
        out = torch.bmm(codes, w_dec)  # decode
        grad_codes = torch.bmm(out, w_dec.transpose(1, 2))  # d loss / d codes
        torch.bmm(codes.transpose(1, 2), out)  # d loss / d W_dec
        torch.bmm(x.transpose(1, 2), grad_codes)  # d loss / d W_enc
        torch.bmm(grad_codes, w_enc.transpose(1, 2))  # d loss / d input (SAE-Lens does not need it; kept: upper bound)

    return step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-in", type=int, default=640)
    parser.add_argument("--d-sae", type=int, default=1280)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=254, help="tokens per step (the peer benchmark's 2 windows)")
    parser.add_argument("--hooks", type=int, default=55, help="SAEs stacked for the batched matmul (55: full depth)")
    args, load_before = parse_micro_benchmark(parser, argv, repeats=30)
    shape = (args.d_in, args.d_sae)
    step_variants = {
        "SAE-Lens's dense TopK": TopKTrainingSAE,
        "SparseTopKTrainingSAE": SparseTopKTrainingSAE,
    }
    contenders = {
        f"sae_lens_step {precision}, {variant}": (
            trainer_step(*shape, args.k, args.tokens, autocast=autocast, sae_class=sae_class),
            1,
        )
        for variant, sae_class in step_variants.items()
        for precision, autocast in (("float32", False), ("bfloat16 autocast", True))
    }
    contenders |= {
        "bare_matmuls float32": (bare_matmuls(*shape, args.tokens, torch.float32), 1),
        "bare_matmuls bfloat16": (bare_matmuls(*shape, args.tokens, torch.bfloat16), 1),
        f"stacked_bmm float32, {args.hooks} SAEs": (
            bare_matmuls(*shape, args.tokens, torch.float32, args.hooks),
            args.hooks,
        ),
        f"stacked_bmm bfloat16, {args.hooks} SAEs": (
            bare_matmuls(*shape, args.tokens, torch.bfloat16, args.hooks),
            args.hooks,
        ),
    }
    seconds = alternating_medians({name: call for name, (call, _) in contenders.items()}, args.repeats)
    load_after = os.getloadavg()
    reference = seconds["sae_lens_step float32, SAE-Lens's dense TopK"]
    table = pd.DataFrame(
        [
            {
                "contender": name,
                "ms_per_sae_step": 1000 * seconds[name] / per,
                "vs_sae_lens_float32": reference / (seconds[name] / per),
            }
            for name, (_, per) in contenders.items()
        ]
    )
    facts = [
        f"Shape: TopK k={args.k}, {args.d_sae} latents, d_in {args.d_in}, {args.tokens} tokens a step; "
        f"median of {args.repeats} calls each, alternating",
        f"Load average (1, 5, 15 min): {load_line(load_before, load_after)}",
    ]
    title = "One SAE training step: SAE-Lens's trainer vs its bare matmuls vs stacked SAEs"
    write_report(args.out / "sae_step_profile.md", title, __file__, argv, facts, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
