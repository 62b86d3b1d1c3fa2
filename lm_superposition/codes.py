"""SAE codes as the measure reads them: encode, keep only the nonzeros, decode.

Everything after the encode (the |z| sums of `metric.FeatureBudget`, the decode for variance
explained) reads a [tokens, d_sae] CSR matrix of the nonzero codes: SAE codes are ~99% zeros,
and passes over the dense matrix cost more than the encode itself (results/benchmarks/).
"""

from __future__ import annotations

import functools
import warnings

import torch


def sparse_codes(codes: torch.Tensor) -> torch.Tensor:
    """A [tokens, d_sae] batch of SAE codes as a sparse CSR tensor (returned as is if it is one).

    Built from `nonzero`, which lists entries row by row, the order CSR stores them in
    (`Tensor.to_sparse_csr` was slower here).
    """
    if codes.layout == torch.sparse_csr:
        return codes
    if codes.layout == torch.sparse_coo:  # e.g. SAE-Lens TopK SAEs with use_sparse_activations
        return codes.coalesce().to_sparse_csr()
    if codes.ndim != 2:
        raise ValueError(f"codes must be a [tokens, d_sae] matrix here, got shape {tuple(codes.shape)}")
    rows, features = codes.nonzero(as_tuple=True)
    row_starts = torch.zeros(codes.shape[0] + 1, dtype=torch.int64, device=codes.device)
    torch.cumsum(torch.bincount(rows, minlength=codes.shape[0]), 0, out=row_starts[1:])
    with warnings.catch_warnings():  # torch flags all of its CSR support as "beta"
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(row_starts, features, codes[rows, features], codes.shape, check_invariants=False)


def csr_entries(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row, column, value) of every stored entry of a CSR matrix."""
    row_starts = codes.crow_indices()
    rows = torch.repeat_interleave(torch.arange(codes.shape[0], device=row_starts.device), row_starts.diff())
    return rows, codes.col_indices(), codes.values()


def encodes_in_place(sae) -> bool:
    """True for a StandardSAE with nothing hooked to its encoder: its codes are
    relu(process_sae_in(x) @ W_enc + b_enc), which `encode` can compute into a given buffer."""
    from sae_lens import StandardSAE

    return (
        type(sae) is StandardSAE
        and isinstance(sae.activation_fn, torch.nn.ReLU)
        and not (sae.hook_sae_acts_pre.fwd_hooks or sae.hook_sae_acts_post.fwd_hooks)
    )


def encode(sae, activations: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """sae.encode(activations); where `encodes_in_place(sae)` and `out` ([>= tokens, d_sae]) is given,
    the same codes written into `out` by one addmm and an in-place ReLU.

    SAE-Lens's encode allocates three [tokens, d_sae] tensors and passes over them twice after
    the matmul; at 32,768 features each is 127 MiB per 1,024 tokens, mapped and page-faulted
    afresh on every call (results/benchmarks/README.md).
    """
    if out is None or not encodes_in_place(sae):
        return sae.encode(activations)
    return torch.addmm(sae.b_enc, sae.process_sae_in(activations), sae.W_enc, out=out[: activations.shape[0]]).relu_()


@functools.cache
def _matmul_decoders() -> frozenset:
    """SAE-Lens classes whose decode is `feature_acts @ W_dec + b_dec` (then hooks and output
    norm), which a sparse CSR feature_acts goes through unchanged."""
    from sae_lens import GatedSAE, JumpReLUSAE, StandardSAE, TopKSAE, TopKTrainingSAE, TrainingSAE

    return frozenset(cls.decode for cls in (StandardSAE, TopKSAE, JumpReLUSAE, GatedSAE, TrainingSAE, TopKTrainingSAE))


def decode(sae, codes: torch.Tensor) -> torch.Tensor:
    """sae.decode(codes), as a sparse matmul when `codes` is a CSR matrix and the SAE allows it.

    A sparse decode costs nonzeros x d_in multiply-adds instead of tokens x d_sae x d_in.
    Falls back to the dense decode where it cannot: other SAE classes, TopK's rescale by
    decoder norm, and half precision (torch has no CPU kernel for it; on GPUs it is untested
    here, so it is not risked).
    """
    sparse_ok = (
        type(sae).decode in _matmul_decoders()
        and not getattr(sae.cfg, "rescale_acts_by_decoder_norm", False)
        and codes.dtype in (torch.float32, torch.float64)
    )
    if codes.layout != torch.strided and not sparse_ok:
        codes = codes.to_dense()
    return sae.decode(codes)
