"""Two parts of the TopK training step, each against the way it was computed before (issue 16).

At the 55-hook peer benchmark's shape (254 tokens a step, d_in 640, 1,280 latents, k 32), side by
side in one run, alternating, median of --repeats calls:

  top-k      the latents of each token's k largest pre-activations: torch.topk (sorted=False)
             over all latents, the search of sessions 7 to 10 (torch.topk over the few candidates
             that reach the k-th largest of the 32-latent chunk maxima, written out again here),
             and `saes.training._top_k_latents` (numpy's argpartition, row by row);
  W_enc grad the encoder's W gradient for an output gradient with each token's k latents and,
             as the auxiliary loss adds, --dead latents dense: the dense x.T @ grad by
             `kernels.linear` (what `_CentredLinear` runs: oneDNN on an AMD CPU, MKL on Intel's),
             against summing over the nonzeros latent by latent (embedding_bag; a matmul for
             latents used by more than 1/8 of the tokens) and copying the [d_sae, d_in] sums into
             W's [d_in, d_sae] layout, as the step did until session 7 (its
             `_LinearWithSparseGrad`, written out again here);
  aux decode the auxiliary loss's decode of --dead latents, [tokens, dead] @ [dead, d_in], with
             both gradients: `kernels.linear` (oneDNN on AMD; on Intel's CPUs the same MKL as the
             other side) against torch's matmul (MKL in float32).

    python experiments/benchmarks/training_step_parts.py --threads 1
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import pandas as pd
import torch

from lm_superposition.kernels import linear, uses_onednn
from lm_superposition.saes.training import _top_k_latents, _weighted_row_sums

try:
    from vs_paper_stack import alternating_medians, load_line, parse_micro_benchmark, write_report
except ImportError:
    from experiments.benchmarks.vs_paper_stack import (
        alternating_medians,
        load_line,
        parse_micro_benchmark,
        write_report,
    )


def sparse_sums_w_grad(x: torch.Tensor, grad: torch.Tensor, max_density: float = 1 / 8) -> torch.Tensor:
    """W's gradient as the step took it before session 7: sums over the nonzeros of grad, latent by
    latent, a matmul for the latents more than max_density of the tokens use, then W's layout."""
    latents, rows = grad.T.nonzero(as_tuple=True)
    dense = torch.bincount(latents, minlength=grad.shape[1]) > max_density * len(grad)
    columns = dense.nonzero().squeeze(1)
    keep = ~dense[latents]
    latents, rows = latents[keep], rows[keep]
    sums = _weighted_row_sums(x, rows, latents, grad.shape[1], grad[rows, latents])
    if len(columns):
        sums[columns] = linear(grad[:, columns].T, x)
    return sums.T.contiguous()  # the layout of W [d_in, d_sae], which autograd's accumulation makes


def candidates_top_k(hidden_pre: torch.Tensor, k: int, chunk: int = 32) -> torch.Tensor:
    """The top-k latents as the step found them in sessions 7 to 10: the k-th largest of the
    maxima of each row's chunks of `chunk` latents is reached by at least k entries, so every
    entry of the top k is >= it; torch.topk then runs over those few candidates only."""
    tokens = len(hidden_pre)
    chunk_maxima = hidden_pre.reshape(tokens, -1, chunk).amax(-1)
    threshold = chunk_maxima.topk(k, dim=-1, sorted=False).values.amin(-1, keepdim=True)
    flat = torch.from_numpy(np.flatnonzero((hidden_pre >= threshold).numpy()))
    rows, latents = flat // hidden_pre.shape[1], flat % hidden_pre.shape[1]
    per_row = torch.bincount(rows, minlength=tokens)
    slot = torch.arange(len(rows)) - (per_row.cumsum(0) - per_row)[rows]  # place in its row
    candidates = hidden_pre.new_full((tokens, int(per_row.max())), float("-inf"))
    candidates[rows, slot] = hidden_pre[rows, latents]
    candidate_latents = torch.zeros_like(candidates, dtype=torch.long)
    candidate_latents[rows, slot] = latents
    return candidate_latents.gather(-1, candidates.topk(k, dim=-1, sorted=False).indices)


def decode_with_gradients(matmul, codes: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor):
    with torch.enable_grad():
        codes, rows = codes.detach().requires_grad_(), rows.detach().requires_grad_()
        torch.autograd.backward(matmul(codes, rows), grad)
    return codes.grad, rows.grad


def output_gradient(tokens: int, d_sae: int, k: int, dead: int, generator: torch.Generator) -> torch.Tensor:
    grad = torch.zeros(tokens, d_sae)
    latents = torch.rand(tokens, d_sae, generator=generator).topk(k, dim=-1).indices
    grad.scatter_(-1, latents, torch.randn(tokens, k, generator=generator))
    dead_latents = torch.randperm(d_sae, generator=generator)[:dead]
    grad[:, dead_latents] = torch.randn(tokens, dead, generator=generator)
    return grad


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-in", type=int, default=640)
    parser.add_argument("--d-sae", type=int, default=1280)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=254)
    parser.add_argument(
        "--dead", type=int, nargs="+", default=[0, 200, 500], help="dense (dead) latents in the gradient"
    )
    args, load_before = parse_micro_benchmark(parser, argv, repeats=50)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.tokens, args.d_in, generator=generator)
    W = torch.randn(args.d_in, args.d_sae, generator=generator) / args.d_in**0.5
    hidden_pre = x @ W + 0.5 * torch.randn(args.d_sae, generator=generator)

    kernel = "oneDNN" if uses_onednn(W) else "torch.matmul"  # what kernels.linear runs on this CPU
    contenders = {
        "top-k: torch.topk over all latents": lambda: hidden_pre.topk(args.k, dim=-1, sorted=False).indices,
        "top-k: candidates first (sessions 7 to 10)": lambda: candidates_top_k(hidden_pre, args.k),
        "top-k: _top_k_latents (numpy argpartition)": lambda: _top_k_latents(hidden_pre, args.k),
    }
    for dead in args.dead:
        grad = output_gradient(args.tokens, args.d_sae, args.k, dead, generator)
        dense = linear(x.T, grad)
        sparse = sparse_sums_w_grad(x, grad)
        if not torch.allclose(dense, sparse, rtol=1e-4, atol=1e-4):
            raise SystemExit(f"the two W gradients differ at {dead} dead latents")
        contenders[f"W_enc grad, {dead} dead: dense matmul ({kernel})"] = lambda x=x, grad=grad: linear(x.T, grad)
        contenders[f"W_enc grad, {dead} dead: sparse sums + layout copy"] = lambda x=x, grad=grad: sparse_sums_w_grad(
            x, grad
        )
        if dead:
            codes = torch.randn(args.tokens, dead, generator=generator).relu()
            rows = torch.randn(dead, args.d_in, generator=generator)
            out_grad = torch.randn(args.tokens, args.d_in, generator=generator)
            for name, matmul in ((f"kernels.linear ({kernel})", linear), ("torch.matmul", torch.matmul)):
                contenders[f"aux decode + its gradients, {dead} dead: {name}"] = (
                    lambda matmul=matmul, codes=codes, rows=rows, out_grad=out_grad: decode_with_gradients(
                        matmul, codes, rows, out_grad
                    )
                )
    with torch.no_grad():
        tops = [latents().sort(-1).values for name, latents in contenders.items() if name.startswith("top-k")]
        if not all(torch.equal(top, tops[0]) for top in tops):
            raise SystemExit("the top-k contenders give different latents")
        seconds = alternating_medians(contenders, args.repeats)
    load_after = os.getloadavg()
    table = pd.DataFrame([{"part": name, "ms": 1000 * s} for name, s in seconds.items()])
    facts = [
        f"Shape: {args.tokens} tokens, d_in {args.d_in}, {args.d_sae} latents, k {args.k}; median of "
        f"{args.repeats} calls each, alternating; both W gradients agree to 1e-4, every top-k gives the same latents",
        f"Load average (1, 5, 15 min): {load_line(load_before, load_after)}",
    ]
    title = "Two parts of the TopK training step: now and before"
    write_report(args.out / "training_step_parts.md", title, __file__, argv, facts, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
