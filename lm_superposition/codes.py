"""SAE codes as the measure reads them: encode, keep only the nonzeros, decode.

Everything after the encode (the |z| sums of `metric.FeatureBudget`, the decode for variance
explained) reads a [tokens, d_sae] CSR matrix of the nonzero codes: SAE codes are ~99% zeros,
and passes over the dense matrix cost more than the encode itself (results/benchmarks/).
"""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np
import torch

from .kernels import fast_bfloat16, linear, uses_onednn


def sparse_codes(codes: torch.Tensor) -> torch.Tensor:
    """A [tokens, d_sae] batch of SAE codes as a sparse CSR tensor (returned as is if it is one).

    Built from the nonzeros' row-major flat positions (`nonzero_entries`), the order CSR stores
    entries in (`Tensor.to_sparse_csr` was slower here).
    """
    if codes.layout == torch.sparse_csr:
        return codes
    if codes.layout == torch.sparse_coo:  # e.g. SAE-Lens TopK SAEs with use_sparse_activations
        return codes.coalesce().to_sparse_csr()
    if codes.ndim != 2:
        raise ValueError(f"codes must be a [tokens, d_sae] matrix here, got shape {tuple(codes.shape)}")
    return _csr(*nonzero_entries(codes), codes.shape)


def _csr(positions: torch.Tensor, values: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The [tokens, d_sae] CSR matrix of entries given by row-major flat position (ascending) and value."""
    tokens, d_sae = shape
    # positions are sorted, so each row's first entry is a binary search away
    row_starts = torch.searchsorted(positions, torch.arange(tokens + 1, device=positions.device) * d_sae)
    with warnings.catch_warnings():  # torch flags all of its CSR support as "beta"
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(row_starts, positions % d_sae, values, shape, check_invariants=False)


def nonzero_entries(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat position, value) of every entry of `codes` that is != 0, positions ascending
    (row-major), exactly the entries of `codes.nonzero()`.

    Read as 64-bit words, the codes' memory is tested in half (bfloat16: a quarter) as many
    steps; only the words with a nonzero bit, ~1-3% of them, are then looked at value by value
    (which also drops -0.0 and keeps NaN, as `!= 0` does). Both steps run in numpy, whose nonzero
    of a boolean mask and whose gather are vectorised, where torch's CPU nonzero and index_select
    go one element at a time. For 1,024 x 32,768 float32 codes with 1.8% nonzeros on the Intel
    Xeon of session 9: torch's nonzero 80 ms, over words with torch 57 ms, with numpy 53 ms
    (on the AMD of earlier sessions torch's nonzero was 4.7x cheaper; the words halved it there).
    """
    flat = codes.reshape(-1)
    per_word = 8 // codes.element_size()
    in_words = (  # codes that tile whole 64-bit words of their storage, on the CPU (GPUs: untested here)
        per_word > 1
        and codes.device.type == "cpu"
        and codes.is_contiguous()
        and flat.numel() % per_word == 0
        and codes.storage_offset() % per_word == 0
    )
    if not in_words:
        positions = flat.nonzero().squeeze(1)
        return positions, flat.index_select(0, positions)
    words = flat.detach().view(torch.int64).numpy()
    nonzero_words = np.flatnonzero(words != 0)
    # the values of those words, as integers of the codes' width (numpy has no bfloat16)
    candidates = words[nonzero_words].view(_SIGNED_INTEGER_OF_WIDTH[codes.element_size()])
    kept = np.flatnonzero((torch.from_numpy(candidates).view(codes.dtype) != 0).numpy())
    positions = nonzero_words[kept // per_word] * per_word + kept % per_word
    return torch.from_numpy(positions), torch.from_numpy(candidates[kept]).view(codes.dtype)


_SIGNED_INTEGER_OF_WIDTH = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}


def relu_nonzero_entries(pre_activations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`nonzero_entries(pre_activations.relu())` without the ReLU's pass: (flat position, value)
    of every entry that is > 0 or NaN (torch's ReLU keeps NaN, so a broken SAE still shows),
    positions ascending. Values are the pre-activations' own (a NaN keeps its sign).

    The ReLU passes over the whole [tokens, d_sae] matrix once more, reading and writing it,
    before the scan reads it again. Read as signed integers of their width, floats keep their
    order among positives, the negative NaNs are the 2^mantissa - 1 integers just below zero,
    and every other negative float lies further down. So one integer comparison finds the
    candidates, and among them (~2%) only the exact zeros (+0.0, the integer 0) are dropped.
    On the Intel Xeon of session 10, ReLU + `nonzero_entries` against this for 1,016 x 32,768
    codes with 1.8% positive, medians: bfloat16 63 -> 46 ms, float32 70 -> 57 ms. Inside the
    analyzer's run_seed (Pythia-70M shape, 19 hooks, 1 thread) the encode plus scan took 2-4% less.

    The comparison's mask is found a slab of SCAN_SLAB_ELEMENTS at a time, so that the mask is
    still in the core's cache when its nonzeros are listed: for 1,024 x 32,768 codes on the Xeon of
    session 12, bfloat16 31 -> 24 ms, float32 39 -> 33 ms against one mask of the whole matrix.
    """
    flat = pre_activations.reshape(-1)
    mantissa_bits = _MANTISSA_BITS.get(pre_activations.dtype)
    if mantissa_bits is None or flat.device.type != "cpu":
        return nonzero_entries(pre_activations.relu())
    # as bytes first: numpy has no bfloat16
    integers = flat.detach().view(torch.uint8).numpy().view(_SIGNED_INTEGER_OF_WIDTH[flat.element_size()])
    lowest_kept = -(2**mantissa_bits - 1)
    candidates = np.concatenate(
        [
            np.flatnonzero(integers[start : start + SCAN_SLAB_ELEMENTS] >= lowest_kept) + start
            for start in range(0, max(len(integers), 1), SCAN_SLAB_ELEMENTS)  # one empty slab for no codes
        ]
    )
    values = integers[candidates]
    kept = values != 0
    return torch.from_numpy(candidates[kept]), torch.from_numpy(values[kept]).view(pre_activations.dtype)


_MANTISSA_BITS = {torch.float64: 52, torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}
# 2^20 codes: 2 MiB of bfloat16 (4 MiB float32) and a 1 MiB mask, about one core's L2 cache
SCAN_SLAB_ELEMENTS = 2**20


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


def encodes_fused(sae) -> bool:
    """True where `encode` computes a plain StandardSAE's codes (`encodes_in_place`) as one oneDNN
    linear with the bias and ReLU fused into it (`kernels.uses_onednn`: float32 on a CPU where
    oneDNN is the chosen kernel, AMD's by default)."""
    return encodes_in_place(sae) and uses_onednn(sae.W_enc)


def encode(
    sae,
    activations: torch.Tensor,
    out: torch.Tensor | None = None,
    weights: LowPrecisionSAE | ScreenedSAE | None = None,
) -> torch.Tensor:
    """sae.encode(activations), computed the fastest way the SAE allows.

    - `encodes_fused(sae)` (float32 on an AMD CPU), outside autograd: oneDNN's linear with the bias
      and ReLU fused (`kernels.linear`; 1.8x torch's default float32 matmul on the project's AMD).
    - otherwise, where `encodes_in_place(sae)` and `out` ([>= tokens, d_sae]) is given: the codes
      written into `out` by one addmm and an in-place ReLU. SAE-Lens's encode allocates three
      [tokens, d_sae] tensors and passes over them twice after the matmul; at 32,768 features each
      is 127 MiB per 1,024 tokens, mapped and page-faulted afresh on every call.

    weights: a reduced-precision copy of the encoder (`LowPrecisionSAE`): the matmul runs in
    its dtype (into `out`, which must be of that dtype, for an in-place SAE; under torch.autocast
    for any other SAE). The codes come back in that dtype. Or a `ScreenedSAE`: float32's codes
    (`out`, bfloat16, holds its screen).
    """
    if isinstance(weights, ScreenedSAE):
        return weights.sparse_codes(activations, out).to_dense()
    if _computes_pre_activations(sae, out, weights):
        return _pre_activations(sae, activations, out, weights).relu_()
    if weights is not None:  # an SAE class of its own: its encode, its matmuls cast by autocast
        with torch.autocast(activations.device.type, dtype=weights.dtype):
            return sae.encode(activations)
    if encodes_fused(sae) and not torch.is_grad_enabled():
        return linear(sae.process_sae_in(activations), sae.W_enc, sae.b_enc, relu=True)
    return sae.encode(activations)


def sparse_encode(
    sae,
    activations: torch.Tensor,
    out: torch.Tensor | None = None,
    weights: LowPrecisionSAE | ScreenedSAE | None = None,
) -> torch.Tensor:
    """sparse_codes(encode(sae, activations, out, weights)): the codes as a CSR matrix of their nonzeros.

    weights may also be a `ScreenedSAE` of `sae`: float32's codes, found by its bfloat16 screen
    (`out`, [>= tokens, d_sae] bfloat16, then holds the screen).

    Where `encode` computes the pre-activations itself, the ReLU is left to the scan for
    nonzeros (`relu_nonzero_entries`), which saves a pass over the [tokens, d_sae] matrix; `out`
    then holds the pre-activations, not the codes.
    """
    if isinstance(weights, ScreenedSAE):
        return weights.sparse_codes(activations, out)
    if _computes_pre_activations(sae, out, weights):
        pre_activations = _pre_activations(sae, activations, out, weights)
        return _csr(*relu_nonzero_entries(pre_activations), pre_activations.shape)
    return sparse_codes(encode(sae, activations, out, weights))


def _computes_pre_activations(sae, out: torch.Tensor | None, weights: LowPrecisionSAE | None) -> bool:
    """True where `encode` computes process_sae_in(x) @ W_enc + b_enc itself and applies the ReLU
    after: an in-place SAE with a reduced-precision encoder, or with a buffer `out` unless
    oneDNN's fused linear encodes it."""
    if weights is not None:
        return weights.in_place
    return out is not None and encodes_in_place(sae) and (torch.is_grad_enabled() or not encodes_fused(sae))


def _pre_activations(
    sae, activations: torch.Tensor, out: torch.Tensor | None, weights: LowPrecisionSAE | None
) -> torch.Tensor:
    target = None if out is None else out[: activations.shape[0]]
    if weights is not None:
        return weights.pre_activations(activations, target)
    return torch.addmm(sae.b_enc, sae.process_sae_in(activations), sae.W_enc, out=target)


class LowPrecisionSAE:
    """An SAE's encoder in bfloat16 (or float16), the measure's one large matmul at reduced
    precision, and its decoder rows alike for the decode of variance explained.

    The encode is nearly all of a measurement's arithmetic (tokens x d_in x d_sae multiply-adds
    per hook), and CPUs with AVX512-BF16 or AMX, like GPUs, run bfloat16 matmuls 2-4x faster than
    float32 (results/benchmarks/). Inputs and weights are rounded to 8 significant bits, products
    are accumulated in float32 by the matmul kernels, and the |z| * ||W_dec|| budget is summed in
    float64 as at full precision. The price is in F's last digits (the benchmark reports it).

    For a plain StandardSAE (`encodes_in_place`) the rounded W_enc and b_enc (`_rounded_encoder`) are kept
    once, so the weights are not cast again on every call; any other SAE class runs its own
    `encode` under torch.autocast (see `encode`), which casts its matmuls' inputs on the fly and
    adds the bias in float32.

    A StandardSAE that decodes by rows (`_decodes_by_rows`) also keeps W_dec rounded, for `decode`:
    its speed is that of gathering each token's active decoder rows, and rows of half the bytes
    took 23 ms instead of 38 for 1,024 tokens x 233 active latents x 512 (the Intel Xeon of session
    12). The reconstruction is rounded to 8 bits too, which moves variance explained in its 5th or
    6th digit (the benchmark reports it). Other SAEs decode the codes in their own dtype.
    """

    def __init__(self, sae, dtype: torch.dtype):
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"a reduced-precision encode is bfloat16 or float16, got {dtype}")
        self.sae, self.dtype = sae, dtype
        self.in_place = encodes_in_place(sae)
        if self.in_place:
            self.W_enc = _rounded_encoder(sae, dtype)

    @functools.cached_property
    def W_dec(self) -> torch.Tensor | None:
        """The rounded decoder rows `decode` reads, made at the first decode (a measurement without
        variance explained, e.g. `analyze.sae_budget`, never pays for the copy); None where the SAE
        does not decode by rows."""
        return self.sae.W_dec.detach().to(self.dtype) if _decodes_by_rows(self.sae) else None

    def pre_activations(self, activations: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """process_sae_in(activations) @ W_enc + b_enc of an in-place SAE, in self.dtype (into `out`
        if given: [tokens, d_sae] of that dtype)."""
        sae_in = self.sae.process_sae_in(activations).to(self.dtype)
        ones = sae_in.new_ones(len(sae_in))
        return torch.mm(_with_columns(sae_in, ones, ones), self.W_enc, out=out)  # ones: the bias rows


def _bias_parts(bias: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """b_enc as two `dtype` parts, its rounding and the rest, for two more rows of a rounded W_enc.

    Against two columns of ones, the bias is then accumulated in float32 with the products, so
    only the output is rounded. A bias rounded to bfloat16 shifts every code of a latent by the
    same amount, which does not average out over tokens: near the ReLU threshold it moved F by
    1.7e-3 on the peer benchmark (results/benchmarks/peers/)."""
    high = bias.to(dtype)
    return high, (bias - high.to(bias.dtype)).to(dtype)


def _rounded_encoder(sae, dtype: torch.dtype) -> torch.Tensor:
    """W_enc rounded to `dtype`, with b_enc below it as two more rows (`_bias_parts`)."""
    high, low = _bias_parts(sae.b_enc.detach(), dtype)
    return torch.cat([sae.W_enc.detach().to(dtype), high[None], low[None]])


# The least that a bfloat16 screen's error bound adds, whatever the numbers: covers flushed subnormals
# (ScreenedSAE, duplicate_groups).
SCREEN_SLACK = 1e-20


def _accumulation_error(terms: int) -> float:
    """A bound on the relative error of float32 accumulation over `terms` products (with the
    pairwise sums of bfloat16 dot-product instructions counted twice): 2 terms 2^-24."""
    return 2 * terms * 2.0**-24


def _rounded_up(values: torch.Tensor, accumulation: float, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """values (>= 0) times 1 + 4 accumulation, in `dtype` rounded up: >= the true value, whatever the
    roundings of the float32 arithmetic that computed `values`."""
    values = values * (1 + 4 * accumulation)
    rounded = values.to(dtype)
    above = torch.nextafter(rounded, rounded.new_tensor(float("inf")))
    return torch.where(rounded.float() < values, above, rounded)


def _rounding_norms(exact: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:
    """||exact - rounded|| of every row, [n] float32: what rounding to `rounded.dtype` moved each
    row by. The differences go a slab of rows at a time through one reused float32 buffer (each
    is exact in float32: a float32 minus its own rounding), so no float32 copy of a whole rounded
    encoder is made: 29 ms per 32,768 x 512 on the Xeon of session 14, 68 ms with a new float32
    copy of each slab's rounding (experiments/benchmarks/screened_encode_parts.py)."""
    norms = exact.new_empty(len(exact), dtype=torch.float32)
    buffer = exact.new_empty(min(len(exact), 512), exact.shape[1], dtype=torch.float32)
    for start in range(0, len(exact), len(buffer)):
        stop = min(start + len(buffer), len(exact))
        difference = torch.sub(exact[start:stop], rounded[start:stop], out=buffer[: stop - start])
        torch.linalg.vector_norm(difference, dim=1, out=norms[start:stop])
    return norms


def _with_columns(rounded: torch.Tensor, *columns: torch.Tensor) -> torch.Tensor:
    """[n, d] `rounded` with `columns` ([n] each, cast to its dtype) appended: a reduced-precision
    matmul's inputs with the columns that meet its extra weight rows (bias parts, error bounds)."""
    return torch.cat([rounded, *(column[:, None].to(rounded.dtype) for column in columns)], dim=1)


class ScreenedSAE:
    """A plain float32 StandardSAE's codes, equal to float32's up to float32 rounding, for little
    more than a bfloat16 encode: a bfloat16 matmul rules out the latents that cannot be active,
    and only the others are computed in float32.

    Of 32,768 latents ~200 are active per token, so the float32 encode's tokens x d_in x d_sae
    multiply-adds go almost all to codes the ReLU then zeroes. Here the matmul runs on inputs and
    weights rounded to bfloat16 (2-8x faster on CPUs with AVX512-BF16 or AMX and on GPUs; slower
    than float32 on CPUs without them), with a bound on its error folded in (below). Every entry
    that the bound cannot rule out is recomputed from the float32 inputs and weights as one dot
    product (`_sampled_dots`) and kept where it is > 0 (or NaN, as the ReLU keeps it):
    the active ones and a few near the threshold, 274 per token for 223 active in a synthetic
    1,024 x 32,768 chunk shaped like the peer benchmark's. So the codes are float32's, from the
    same float32 numbers summed in another order: F moved by <= 7.8e-9 relative on the peer
    benchmark, where the bfloat16 encode (`LowPrecisionSAE`) moves it by 4e-5.

    The bound. With s = process_sae_in(x), w_j and b_j latent j's float32 weights and bias, and
    s', w'_j their bfloat16 roundings, the screen computes in float32 arithmetic
    S_j = s'.w'_j + b_j (the bias as its two bfloat16 parts, `_bias_parts`) plus
        m_j = ||s - s'|| ||w_j|| + ||s'|| (||w_j - w'_j|| + g ||w'_j||) + g |b_j's parts| + |b_j's rest|,
    by Cauchy-Schwarz a bound on |(s.w_j + b_j) - S_j| with g a bound on float32 accumulation's
    relative error over d_in + 5 terms (2 (d_in + 5) 2^-24); ||s'|| and ||w'_j|| enter as their
    bounds ||s|| + ||s - s'|| and ||w_j|| + ||w_j - w'_j|| (triangle inequality), which spares a
    float32 pass over the bfloat16 copies (51 ms per 32,768 x 512 encoder). m_j enters the matmul
    as three more columns of s and rows of W_enc, each rounded up and scaled by 1 + 4g, and the
    output keeps its sign when rounded to bfloat16. So where the screen is <= 0, s.w_j + b_j <= 0:
    the latent is off. The inputs' and the weights' rounding are measured, not assumed, so the bound holds for
    any activations and weights (a small absolute slack, 1e-20, covers flushed subnormals).

    Costs a contiguous float32 copy of W_enc's transpose (the dot products read each latent's
    weights in a row) and the bfloat16 screen weights: 1.5x the encoder's memory once more.
    """

    dtype = torch.bfloat16  # of the screen, the `out` buffer of `sparse_encode`

    def __init__(self, sae):
        if not self.applies(sae):
            raise ValueError(
                f"a screened encode needs a float32 StandardSAE with a ReLU and no encoder hooks, "
                f"got {type(sae).__name__} in {sae.W_enc.dtype}"
            )
        self.sae = sae
        # Everything is built latent by latent (rows of W_enc's transpose): norms over W_enc's
        # columns took 60 ms per 512 x 32,768 encoder here, over the transpose's rows 6 ms.
        weights = sae.W_enc.detach().T.contiguous()
        bias = sae.b_enc.detach()
        d_sae, d_in = weights.shape
        self.accumulation = _accumulation_error(d_in + 5)  # g above
        screen = torch.empty(d_sae, d_in + 5, dtype=self.dtype, device=weights.device)
        screen[:, :d_in] = weights
        high, low = _bias_parts(bias, self.dtype)
        screen[:, d_in], screen[:, d_in + 1] = high, low
        norms, rounding = torch.linalg.vector_norm(weights, dim=1), _rounding_norms(weights, screen[:, :d_in])
        margins = (
            norms,
            rounding + self.accumulation * (norms + rounding),
            self.accumulation * (high.float().abs() + low.float().abs())
            + (bias - high.float() - low.float()).abs()
            + SCREEN_SLACK,
        )
        for column, margin in enumerate(margins, start=d_in + 2):
            screen[:, column] = _rounded_up(margin, self.accumulation)
        self.W_screen = screen.T  # [d_in + 5, d_sae]; the matmul reads this layout as fast as its transpose
        self.W_enc_T = weights
        self.b_enc = bias

    @staticmethod
    def applies(sae) -> bool:
        """True for an SAE whose codes the screen can find: `encodes_in_place`, in float32."""
        return encodes_in_place(sae) and sae.W_enc.dtype == torch.float32

    def sparse_codes(self, activations: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The codes of `activations`, [tokens, d_sae] float32 CSR (see the class); `out`: the
        screen's [>= tokens, d_sae] bfloat16 buffer."""
        sae_in = self.sae.process_sae_in(activations)
        rounded = sae_in.to(self.dtype)
        ones = rounded.new_ones(len(rounded))
        rounding = _rounding_norms(sae_in, rounded)
        screen_in = _with_columns(
            rounded,
            ones,  # the bias rows
            ones,
            _rounded_up(rounding, self.accumulation),
            _rounded_up(torch.linalg.vector_norm(sae_in, dim=1) + rounding, self.accumulation),
            ones,
        )
        target = None if out is None else out[: len(sae_in)]
        screen = torch.mm(screen_in, self.W_screen, out=target)
        positions = relu_nonzero_entries(screen)[0].to(sae_in.device)
        tokens, latents = positions // screen.shape[1], positions % screen.shape[1]
        pre_activations = _sampled_dots(tokens, latents, sae_in, self.W_enc_T) + self.b_enc.index_select(0, latents)
        return _relu_at(positions, pre_activations, screen.shape)


def _relu_at(positions: torch.Tensor, pre_activations: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The codes of the pre-activations at the given row-major flat positions (ascending), as a
    CSR matrix of `shape`: those > 0 or NaN (as the ReLU keeps them), found by the ReLU's scan
    (`relu_nonzero_entries`) and taken by index_select: 4.6 ms per 1,024-token chunk against 8.9
    with boolean masks (experiments/benchmarks/screened_encode_parts.py)."""
    kept, values = relu_nonzero_entries(pre_activations)
    return _csr(positions.index_select(0, kept.to(positions.device)), values.to(positions.device), shape)


def _sampled_dots(
    tokens: torch.Tensor, latents: torch.Tensor, inputs: torch.Tensor, rows: torch.Tensor
) -> torch.Tensor:
    """inputs[tokens[i]] . rows[latents[i]] for each i, in `inputs`' dtype; (tokens, latents)
    ordered by token (row-major, as `relu_nonzero_entries` lists them).

    torch.sparse.sampled_addmm computes them, latent by latent: over the transposed pattern each
    of `rows` is read from memory once per call, where token by token it is read again for every
    token that needs it. For 1,024 tokens x 283 candidates of 32,768 x 512 float32 on the Xeon of
    session 14: 46 ms, the ordering included, against 88 ms token by token
    (experiments/benchmarks/screened_encode_parts.py).
    """
    n_rows = len(rows)
    order = _stable_order(latents, n_rows)  # the pattern latent by latent, tokens ascending in each
    row_starts = torch.zeros(n_rows + 1, dtype=torch.int64, device=latents.device)
    torch.cumsum(torch.bincount(latents, minlength=n_rows), 0, out=row_starts[1:])
    with warnings.catch_warnings():  # torch flags all of its CSR support as "beta"
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        pattern = torch.sparse_csr_tensor(
            row_starts,
            tokens.index_select(0, order),  # index_select: 1 ms where tokens[order] took 3 (270,000 entries)
            inputs.new_zeros(len(order)),
            (n_rows, len(inputs)),
            check_invariants=False,
        )
    dots = torch.sparse.sampled_addmm(pattern, rows, inputs.T, beta=0.0).values()
    return torch.empty_like(dots).scatter_(0, order, dots)


def _stable_order(keys: torch.Tensor, bound: int) -> torch.Tensor:
    """argsort of integer `keys` in [0, bound), stable. On the CPU with bound <= 2^16 through
    numpy, which sorts 16-bit integers by radix sort (in linear time; 4 ms for 270,000 keys here,
    32 ms for the same keys as int64)."""
    if keys.device.type == "cpu" and bound <= 2**16:
        return torch.from_numpy(np.argsort(keys.numpy().astype(np.uint16), kind="stable"))
    return torch.sort(keys, stable=True).indices


@functools.cache
def _matmul_decoders() -> frozenset:
    """SAE-Lens classes whose decode is `feature_acts @ W_dec + b_dec` (then hooks and output
    norm), which a sparse CSR feature_acts goes through unchanged."""
    from sae_lens import GatedSAE, JumpReLUSAE, StandardSAE, TopKSAE, TopKTrainingSAE, TrainingSAE

    return frozenset(cls.decode for cls in (StandardSAE, TopKSAE, JumpReLUSAE, GatedSAE, TrainingSAE, TopKTrainingSAE))


def decode(sae, codes: torch.Tensor, weights: LowPrecisionSAE | None = None) -> torch.Tensor:
    """sae.decode(codes), as a sparse matmul when `codes` is a CSR matrix and the SAE allows it.

    A sparse decode costs nonzeros x d_in multiply-adds instead of tokens x d_sae x d_in.
    Falls back to the dense decode where it cannot: other SAE classes, TopK's rescale by
    decoder norm, and an SAE held in half precision (its sparse decode is untested here, so it
    is not risked).

    weights: the reduced-precision copy whose encode gave `codes` (`LowPrecisionSAE`). Codes of
    its dtype are decoded with its rounded decoder rows where it keeps them, and otherwise cast to
    the SAE's dtype first. The reconstruction comes back in the SAE's dtype either way.
    """
    csr = codes.layout == torch.sparse_csr
    by_rows = csr and _decodes_by_rows(sae)  # asked every call: a hook may have been added since `weights`
    reduced_rows = by_rows and weights is not None and weights.W_dec is not None and codes.dtype == weights.dtype
    rows = weights.W_dec if reduced_rows else sae.W_dec
    if csr and not reduced_rows and codes.dtype != rows.dtype:
        codes = with_values(codes, codes.values().to(rows.dtype))
    sparse_ok = reduced_rows or (
        type(sae).decode in _matmul_decoders()
        and not getattr(getattr(sae, "cfg", None), "rescale_acts_by_decoder_norm", False)
        and codes.dtype in (torch.float32, torch.float64)
    )
    if by_rows and sparse_ok:
        # codes @ W_dec as a weighted sum of each token's decoder rows: embedding_bag ran 2.3x
        # faster than torch's CSR @ dense here (results/benchmarks/peers/)
        row_starts = codes.crow_indices()[:-1]
        summed = torch.nn.functional.embedding_bag(
            codes.col_indices(), rows, row_starts, mode="sum", per_sample_weights=codes.values()
        )
        return summed.to(sae.W_dec.dtype) + sae.b_dec
    if not sparse_ok and codes.layout != torch.strided:
        codes = codes.to_dense()
    return sae.decode(codes)


def _decodes_by_rows(sae) -> bool:
    """True for a plain StandardSAE whose decode is exactly codes @ W_dec + b_dec: nothing hooked
    to its reconstruction, no output normalisation, no reshaping to attention heads."""
    from sae_lens import StandardSAE

    return (
        type(sae) is StandardSAE
        and not sae.hook_sae_recons.fwd_hooks
        and sae.cfg.normalize_activations == "none"
        and not getattr(sae, "hook_z_reshaping_mode", False)
    )


# ---------------------------------------------------------------- what a code is worth
#
# A code z_i alone is in arbitrary units: SAE-Lens trains its standard SAE with an L1 penalty
# on |z_i| * ||W_dec,i|| and never normalises decoder rows, so the same function can be written
# with z_i twice as large and W_dec,i half as long. What does not depend on how the SAE is
# written is latent i's contribution to the reconstruction, z_i * W_dec,i, whose size is
# |z_i| * ||W_dec,i||. The budget sums that, so F is the same for every re-expression of one
# SAE (tests/test_codes.py checks each class).


def decoder_rows(sae) -> torch.Tensor:
    """The vector each latent adds to the reconstruction per unit of code, [d_sae, d_in].

    W_dec for SAE-Lens SAEs, dictionary_learning converts and the toy SAEs; W_dec's rows
    scaled to unit norm where the SAE rescales codes by the decoder norm (SAE-Lens TopK with
    rescale_acts_by_decoder_norm: its decode divides each code by ||W_dec,i||)."""
    weights = getattr(sae, "W_dec", None)
    if weights is None or weights.ndim != 2:
        raise TypeError(f"{type(sae).__name__} has no [d_sae, d_in] decoder matrix W_dec; the measure needs one")
    weights = weights.detach()
    cfg = getattr(sae, "cfg", None)
    if getattr(cfg, "rescale_acts_by_decoder_norm", False):
        weights = weights / weights.norm(dim=1, keepdim=True)
    return weights


def decoder_norms(sae) -> torch.Tensor:
    """||effective decoder row|| of every latent, float64 [d_sae], on the SAE's device.

    A few hundred rows at a time, widened to float64 inside the norm (vector_norm's dtype=): a
    float64 copy of a whole 32k x 512 decoder (128 MiB, fresh pages each call) took 1.1 s of a
    4,096-token round of 19 such SAEs. Timed alone on the Intel Xeon of session 12, per such SAE:
    slices with their own float64 copies ~95 ms, without the copies 20-40 ms. The same bits each way."""
    rows = decoder_rows(sae)
    return torch.cat([torch.linalg.vector_norm(part, dim=1, dtype=torch.float64) for part in rows.split(512)])


def duplicate_groups(
    directions: torch.Tensor, min_cosine: float, block_rows: int = 2048, screen: bool | None = None
) -> torch.Tensor:
    """For each latent, the lowest index of its group: latents joined by any chain of decoder
    directions with cosine >= min_cosine form one group (connected components). [d_sae] int64.

    Two latents that write the same direction describe one feature; an SAE that splits a
    feature over duplicates would otherwise count it several times. Cosines are computed a
    block of rows at a time, so a 32k-latent dictionary never needs its whole Gram matrix.

    screen: find the pairs with bfloat16 Gram blocks and a bound on their error, then check the
    few candidates in float32 (`_cosine_screen`): the same pairs, to float32 rounding. None: where
    bfloat16 matmuls are fast (`kernels.fast_bfloat16`). The Gram blocks are the cost (d_sae^2 x
    d_in multiply-adds, ~0.5 TFLOP for the upper half at 32k latents of width 512).
    """
    unit = torch.nn.functional.normalize(directions.float(), dim=1)
    n = unit.shape[0]
    if screen is None:
        screen = fast_bfloat16(unit.device)
    operands = _cosine_screen(unit, min_cosine) if screen else None
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for start in range(0, n, block_rows):
        rows, cols = _aligned_pairs(unit, start, min(start + block_rows, n), min_cosine, operands)
        for i, j in zip(rows.tolist(), cols.tolist()):
            if i < j:
                a, b = root(i), root(j)
                if a != b:
                    parent[max(a, b)] = min(a, b)
    return torch.tensor([root(i) for i in range(n)], dtype=torch.int64)


def _aligned_pairs(
    unit: torch.Tensor, start: int, stop: int, min_cosine: float, screen: tuple[torch.Tensor, torch.Tensor] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(i, j) of every pair with i in [start, stop), j >= start (half the Gram matrix) and cosine
    >= min_cosine; `screen`: the operands of `_cosine_screen`, or None for a float32 Gram block."""
    if screen is None:
        # cosine - (the float32 just below min_cosine) > 0 is cosine >= min_cosine, and one fast
        # scan (`relu_nonzero_entries`) finds it: 88 ms against torch's >= and nonzero 291 ms per
        # 2,048 x 32,768 block alone on the Xeon of session 13
        below = torch.nextafter(torch.tensor(min_cosine, dtype=torch.float32), torch.tensor(-math.inf))
        positions, values = relu_nonzero_entries((unit[start:stop] @ unit[start:].T).sub_(below))
        positions = positions[values > 0]  # not NaN
    else:
        left, right = screen
        positions, _ = relu_nonzero_entries(left[start:stop] @ right[start:].T)
    width = len(unit) - start
    rows, cols = positions.to(unit.device) // width + start, positions.to(unit.device) % width + start
    if screen is not None:  # the candidates, in float32
        kept = (unit[rows] * unit[cols]).sum(1) >= min_cosine
        rows, cols = rows[kept], cols[kept]
    return rows, cols


def _cosine_screen(unit: torch.Tensor, min_cosine: float) -> tuple[torch.Tensor, torch.Tensor]:
    """bfloat16 operands (left, right), [n, d + 5] each, such that left[i] . right[j] > 0 wherever
    the cosine of unit rows i and j can be >= min_cosine, as `ScreenedSAE` bounds its encode:
    with u' the rows rounded to bfloat16, |u_i.u_j - u'_i.u'_j| <= ||u_i - u'_i|| ||u_j|| + ||u'_i||
    ||u_j - u'_j||, plus g ||u'_i|| ||u'_j|| for float32 accumulation, plus g min_cosine and a slack;
    each margin rounded up, min_cosine rounded down. Where the product is <= 0 the pair is apart."""
    accumulation = _accumulation_error(unit.shape[1] + 5)
    rounded = unit.to(torch.bfloat16)
    residual = _rounding_norms(unit, rounded)
    norms = torch.linalg.vector_norm(unit, dim=1)
    rounded_norms = norms + residual  # a bound on ||u'||, as ScreenedSAE bounds it
    threshold = torch.tensor(min_cosine, dtype=torch.bfloat16)
    if threshold.float() > min_cosine:
        threshold = torch.nextafter(threshold, threshold.new_tensor(-math.inf))
    ones = torch.ones_like(norms)
    left = _with_columns(
        rounded,
        _rounded_up(residual, accumulation),
        _rounded_up(rounded_norms, accumulation),
        _rounded_up(accumulation * rounded_norms, accumulation),
        ones,
        ones,
    )
    right = _with_columns(
        rounded,
        _rounded_up(norms, accumulation),
        _rounded_up(residual, accumulation),
        _rounded_up(rounded_norms, accumulation),
        _rounded_up(ones * (accumulation * min_cosine + SCREEN_SLACK), accumulation),
        -threshold * ones,
    )
    return left, right


class CodeReader:
    """How the measure reads one SAE: its codes, each weighted by its decoder norm, and the
    groups of duplicate latents whose budgets are added before the entropy.

    merge_duplicates: latents whose decoder directions have cosine >= duplicate_cosine count
        as one feature (see `duplicate_groups`); False keeps every latent apart.
    """

    def __init__(self, sae, merge_duplicates: bool = True, duplicate_cosine: float = 0.9):
        if not 0 < duplicate_cosine <= 1:
            raise ValueError(f"duplicate_cosine must lie in (0, 1], got {duplicate_cosine!r}")
        self.sae = sae
        self.norms = decoder_norms(sae)
        self.groups = duplicate_groups(decoder_rows(sae), duplicate_cosine) if merge_duplicates else None

    @property
    def merged_latents(self) -> int:
        """How many latents were folded into another one's group."""
        return 0 if self.groups is None else int((self.groups != torch.arange(len(self.groups))).sum())

    def weighted(self, codes: torch.Tensor) -> torch.Tensor:
        """CSR codes (see `sparse_codes`) with each value multiplied by its latent's decoder norm, float64."""
        return with_values(codes, codes.values().double() * self.norms[codes.col_indices()])


def with_values(codes: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A CSR matrix with the sparsity pattern of `codes` and new stored `values` (e.g. another dtype)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(
            codes.crow_indices(), codes.col_indices(), values, codes.shape, check_invariants=False
        )
