"""The screened encode's parts (`encode_dtype="float32_screened"`), each against the way session 13
computed it (issue 16).

One synthetic 512 x 32,768 float32 StandardSAE shaped like the peer benchmark's dictionaries
(encoder rows ~ N(0, 1 / the inputs' typical norm), one bias chosen so that ~0.7% of the codes are
on), --tokens activations encoded --chunk at a time; side by side in one run, alternating, median
of --repeats calls:

  dots    the float32 dot products of one chunk's candidates (the entries its screen cannot rule
          out): torch.sparse.sampled_addmm over the token-major pattern (session 13, written out
          again here) against `codes._sampled_dots` (latent by latent, its ordering included);
  keep    which of them are codes (> 0 or NaN), as a CSR matrix: boolean masks (session 13)
          against the ReLU's scan and index_select (`codes._relu_at`);
  norms   of the encoder, for the screen's bound: the rounding ||w - w'|| through a new float32
          copy of each slab's rounding (session 13) against `codes._rounding_norms` (one reused
          buffer); ||w'|| as a float32 norm of the bfloat16 copy (session 13), which the bound
          now takes as ||w|| + ||w - w'|| (the triangle inequality, from norms it has anyway);
  whole   a `ScreenedSAE(sae)` build and its `sparse_codes` over --tokens (today's code only).

    python experiments/benchmarks/screened_encode_parts.py --threads 1
"""

from __future__ import annotations

import argparse
import os
import sys

import pandas as pd
import torch
from sae_lens import StandardSAE, StandardSAEConfig

from lm_superposition.codes import ScreenedSAE, _csr, _relu_at, _rounding_norms, _sampled_dots, relu_nonzero_entries

try:
    import vs_paper_stack as shared
except ImportError:
    from experiments.benchmarks import vs_paper_stack as shared

ACTIVE_FRACTION = 0.007  # ~230 of 32,768 latents, the peer benchmark's dictionaries' L0


def synthetic_sae(d_in: int, d_sae: int, activations: torch.Tensor) -> StandardSAE:
    """A StandardSAE whose codes on `activations` are as sparse as a trained dictionary's."""
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae))
    with torch.no_grad():
        sae.b_dec.copy_(activations.mean(0))
        centred = activations - sae.b_dec
        sae.W_enc.normal_(0, 1 / centred.norm(dim=1).mean().item())
        products = (centred[:512] @ sae.W_enc).flatten()
        on = int(ACTIVE_FRACTION * products.numel())
        sae.b_enc.fill_(-products.kthvalue(products.numel() - on).values.item())
    return sae


def token_major_dots(positions: torch.Tensor, inputs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Session 13's dot products: sampled_addmm over the candidates' token-major pattern."""
    candidates = _csr(positions, inputs.new_zeros(len(positions)), torch.Size((len(inputs), len(rows))))
    return torch.sparse.sampled_addmm(candidates, inputs, rows.T, beta=0.0).values()


def masked_codes(positions: torch.Tensor, pre_activations: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Session 13's codes from the candidates' pre-activations: boolean masks."""
    kept = ~(pre_activations <= 0)
    return _csr(positions[kept], pre_activations[kept], shape)


def copied_rounding_norms(exact: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:
    """Session 13's rounding norms: a new float32 copy of each 4,096-row slab's rounding."""
    return torch.cat(
        [
            torch.linalg.vector_norm(part - low.float(), dim=1)
            for part, low in zip(exact.split(4096), rounded.split(4096))
        ]
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-in", type=int, default=512)
    parser.add_argument("--d-sae", type=int, default=32_768)
    parser.add_argument("--tokens", type=int, default=4096, help="activations encoded by the whole row")
    parser.add_argument("--chunk", type=int, default=1024, help="tokens per encode (the analyzer's at 32,768 latents)")
    args, load_before = shared.parse_micro_benchmark(parser, argv, repeats=9)
    torch.manual_seed(0)
    activations = torch.randn(args.tokens, args.d_in) + 0.5 * torch.randn(args.d_in)
    sae = synthetic_sae(args.d_in, args.d_sae, activations)
    with torch.inference_mode():
        screen = ScreenedSAE(sae)
        sae_in = sae.process_sae_in(activations[: args.chunk])
        shape = torch.Size((len(sae_in), args.d_sae))
        # one chunk's candidates, as sparse_codes finds them
        screen_out = torch.empty(len(sae_in), args.d_sae, dtype=screen.dtype)
        screen.sparse_codes(activations[: args.chunk], screen_out)
        positions = relu_nonzero_entries(screen_out)[0]
        tokens, latents = positions // args.d_sae, positions % args.d_sae
        pre_activations = _sampled_dots(tokens, latents, sae_in, screen.W_enc_T) + screen.b_enc[latents]
        weights = screen.W_enc_T
        rounded = weights.to(torch.bfloat16)
        checks = {
            "dots": torch.equal(
                token_major_dots(positions, sae_in, weights), _sampled_dots(tokens, latents, sae_in, weights)
            ),
            "keep": all(
                torch.equal(getattr(a, part)(), getattr(b, part)())
                for a, b in [
                    (masked_codes(positions, pre_activations, shape), _relu_at(positions, pre_activations, shape))
                ]
                for part in ("crow_indices", "col_indices", "values")
            ),
            "norms": torch.equal(copied_rounding_norms(weights, rounded), _rounding_norms(weights, rounded)),
        }
        calls = {
            "dots: token by token (session 13)": lambda: token_major_dots(positions, sae_in, weights),
            "dots: latent by latent (_sampled_dots)": lambda: _sampled_dots(tokens, latents, sae_in, weights),
            "keep: boolean masks (session 13)": lambda: masked_codes(positions, pre_activations, shape),
            "keep: the ReLU's scan (_relu_at)": lambda: _relu_at(positions, pre_activations, shape),
            "norms: rounding, a copy per slab (session 13)": lambda: copied_rounding_norms(weights, rounded),
            "norms: rounding, one buffer (_rounding_norms)": lambda: _rounding_norms(weights, rounded),
            "norms: ||w'|| from the bfloat16 copy (session 13)": lambda: torch.linalg.vector_norm(
                rounded, dim=1, dtype=torch.float32
            ),
            "whole: ScreenedSAE(sae), the build": lambda: ScreenedSAE(sae),
            f"whole: sparse_codes over {args.tokens} tokens": lambda: [
                screen.sparse_codes(part, screen_out) for part in activations.split(args.chunk)
            ],
        }
        medians = shared.alternating_medians(calls, args.repeats)
    table = pd.DataFrame({"part": list(medians), "ms": [1e3 * seconds for seconds in medians.values()]})
    per_token = len(positions) / len(sae_in), int((pre_activations > 0).sum()) / len(sae_in)
    facts = [
        f"SAE: synthetic StandardSAE {args.d_in} x {args.d_sae}, float32; {per_token[0]:.0f} candidates per token "
        f"in a chunk of {args.chunk}, {per_token[1]:.0f} of them on",
        f"Same results, each pair: {', '.join(f'{name} {same}' for name, same in checks.items())}",
        f"Median of {args.repeats} alternating calls; load average (1, 5, 15 min): "
        + shared.load_line(load_before, os.getloadavg()),
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "screened_encode_parts.csv", index=False)
    shared.write_report(
        args.out / "screened_encode_parts.md",
        "The screened encode's parts, today's against session 13's",
        __file__,
        argv,
        facts,
        table,
    )
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
