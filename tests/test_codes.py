"""SAE codes as the measure reads them: sparse form, in-place encode, sparse decode."""

import copy
import math

import pytest
import torch
from sae_lens import (
    GatedSAE,
    GatedSAEConfig,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
)

from experiments.toy import TiedSAE
from lm_superposition import codes as codes_module
from lm_superposition.analyze import sae_budget
from lm_superposition.codes import (
    LowPrecisionSAE,
    decode,
    decoder_norms,
    duplicate_groups,
    encode,
    encodes_fused,
    encodes_in_place,
    nonzero_entries,
    relu_nonzero_entries,
    sparse_codes,
    sparse_encode,
)
from lm_superposition.kernels import float32_kernel
from lm_superposition.metric import FeatureBudget
from lm_superposition.saes import load_dictionary_learning_sae


def test_sparse_codes_keep_exactly_the_nonzeros():
    codes = torch.relu(torch.randn(7, 40, generator=torch.Generator().manual_seed(0)) - 1)
    codes[3] = 0  # a token with no active feature
    csr = sparse_codes(codes)
    assert csr.layout == torch.sparse_csr
    assert csr.values().numel() == int((codes != 0).sum())
    assert torch.equal(csr.to_dense(), codes)
    assert sparse_codes(csr) is csr
    assert torch.equal(sparse_codes(codes.to_sparse()).to_dense(), codes)  # COO, as SAE-Lens TopK can return


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape, offset", [((9, 64), 0), ((9, 63), 0), ((5, 64), 3), ((1, 3), 1)])
def test_nonzero_entries_are_those_of_torch_nonzero(dtype, shape, offset):
    """Read as 64-bit words or not (odd sizes, storage offsets, float64): the same entries, in
    the same order, as torch's nonzero; -0.0 is a zero and NaN is not, as for `!= 0`."""
    storage = torch.relu(torch.randn(offset + math.prod(shape), generator=torch.Generator().manual_seed(1)) - 1.5)
    codes = storage.to(dtype)[offset:].view(shape)
    codes.view(-1)[:4] = torch.tensor([-0.0, math.nan, 0.0, 2.0], dtype=dtype)[: codes.numel()]
    codes.view(-1)[-1] = -0.0
    positions, values = nonzero_entries(codes)
    expected = codes.reshape(-1).nonzero().squeeze(1)
    assert torch.equal(positions, expected)
    assert torch.allclose(values.double(), codes.reshape(-1)[expected].double(), equal_nan=True, rtol=0, atol=0)
    assert math.isnan(values[0])  # the NaN kept


def test_decoder_norms_are_float64_norms_of_the_decoder_rows():
    sae = StandardSAE(StandardSAEConfig(d_in=8, d_sae=1500))
    with torch.no_grad():
        sae.W_dec.normal_()
    norms = decoder_norms(sae)
    assert norms.dtype == torch.float64 and norms.shape == (1500,)  # more rows than one slice
    assert torch.equal(norms, sae.W_dec.detach().double().norm(dim=1))


@pytest.mark.parametrize(
    "sae_class, config_class, extra",
    [
        (StandardSAE, StandardSAEConfig, {}),
        (TopKSAE, TopKSAEConfig, dict(k=5)),
        (JumpReLUSAE, JumpReLUSAEConfig, {}),
        (TopKSAE, TopKSAEConfig, dict(k=5, rescale_acts_by_decoder_norm=True)),
    ],
)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sparse_decode_equals_the_dense_decode(sae_class, config_class, extra, dtype):
    torch.manual_seed(0)
    sae = sae_class(config_class(d_in=16, d_sae=64, dtype=dtype, **extra))
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.normal_(0, 0.5)
        activations = torch.randn(10, 16).to(getattr(torch, dtype))
        codes = sae.encode(activations)
        assert 0 < int((codes != 0).sum()) < codes.numel()  # really sparse, really something to decode
        sparse, dense = decode(sae, sparse_codes(codes)), sae.decode(codes)
    assert sparse.layout == torch.strided and sparse.dtype == dense.dtype
    assert torch.allclose(sparse.float(), dense.float(), atol=1e-5 if dtype == "float32" else 0)


@pytest.mark.parametrize("slab", [None, 7])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_relu_nonzero_entries_are_those_of_the_relu(dtype, slab, monkeypatch):
    """The ReLU folded into the scan: the entries of relu(x).nonzero(), at every special value
    (NaN of either sign is kept, as torch's ReLU keeps it; +-0.0 and -inf are zeros), whether the
    matrix is scanned in one slab or in slabs of 7 codes that cut across its rows."""
    if slab:
        monkeypatch.setattr(codes_module, "SCAN_SLAB_ELEMENTS", slab)
    pre = torch.randn(6, 50, generator=torch.Generator().manual_seed(2)).to(dtype)
    special = [math.nan, 0.0, 0.0, -0.0, math.inf, -math.inf, 1e-30, -1e-30, 0.0, 0.0]
    pre.view(-1)[: len(special)] = torch.tensor(special, dtype=dtype)
    pre.view(-1)[-3:] = torch.tensor([torch.finfo(dtype).tiny, -torch.finfo(dtype).max, torch.finfo(dtype).max])
    # negative NaNs, by their bits (-math.nan does not keep its sign through every cast): all ones,
    # the one next to -inf, and -inf itself, read as signed integers of the float's width
    mantissa_bits = {torch.float64: 52, torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}[dtype]
    as_integers = pre.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]).view(-1)
    as_integers[1], as_integers[8], as_integers[9] = -1, -(2**mantissa_bits - 1), -(2**mantissa_bits)
    assert pre.view(-1)[[1, 8]].isnan().all() and pre.view(-1)[9] == -math.inf
    positions, values = relu_nonzero_entries(pre)
    expected_positions, expected_values = nonzero_entries(pre.relu())
    assert torch.equal(positions, expected_positions)
    assert torch.equal(values.isnan(), expected_values.isnan())
    assert torch.equal(values[~values.isnan()], expected_values[~expected_values.isnan()])
    assert {0, 1, 8} <= set(positions.tolist()) and 9 not in positions  # the NaNs, not -inf
    empty_positions, empty_values = relu_nonzero_entries(pre[:0])
    assert empty_positions.numel() == 0 and empty_values.dtype == dtype


@pytest.mark.parametrize("encoder", ["addmm", "bfloat16"])
def test_sparse_encode_equals_the_sparse_codes_of_encode(encoder):
    """With the ReLU left to the scan, the same CSR codes as encoding and then scanning."""
    torch.manual_seed(0)
    sae = StandardSAE(StandardSAEConfig(d_in=16, d_sae=64, apply_b_dec_to_input=True))
    with torch.no_grad(), float32_kernel("torch"):
        for parameter in sae.parameters():
            parameter.normal_(0, 0.5)
        sae.b_enc.sub_(1.0)  # sparse codes, as trained SAEs have
        activations = torch.randn(10, 16)
        weights = LowPrecisionSAE(sae, torch.bfloat16) if encoder == "bfloat16" else None
        buffer = torch.full((32, 64), math.nan, dtype=torch.bfloat16 if weights else torch.float32)
        expected = sparse_codes(encode(sae, activations, out=buffer.clone(), weights=weights))
        got = sparse_encode(sae, activations, out=buffer, weights=weights)
        assert 0 < got.values().numel() < 10 * 64 / 2
        for part in ("crow_indices", "col_indices", "values"):
            assert torch.equal(getattr(got, part)(), getattr(expected, part)()), part
        # an SAE whose pre-activations encode does not compute: its codes, scanned as they are
        topk = TopKSAE(TopKSAEConfig(d_in=16, d_sae=64, k=3))
        assert torch.equal(sparse_encode(topk, activations, out=buffer).to_dense(), topk.encode(activations))


@pytest.mark.parametrize("onednn", [True, False])
def test_in_place_encode_equals_sae_lens_encode(onednn):
    """Both fast encodes of a plain StandardSAE, oneDNN's fused linear (float32 CPU) and the addmm
    into a reused buffer (oneDNN off), give SAE-Lens's codes."""
    torch.manual_seed(0)
    sae = StandardSAE(StandardSAEConfig(d_in=16, d_sae=64, apply_b_dec_to_input=True))
    with torch.no_grad(), float32_kernel("onednn" if onednn else "torch"):
        for parameter in sae.parameters():
            parameter.normal_(0, 0.5)
        activations = torch.randn(10, 16)
        buffer = torch.full((32, 64), float("nan"))  # larger than the batch; stale contents must not leak
        assert encodes_in_place(sae) and encodes_fused(sae) == onednn
        codes = encode(sae, activations, out=buffer)
        assert (codes.data_ptr() == buffer.data_ptr()) != onednn and codes.shape == (10, 64)
        assert torch.allclose(codes, sae.encode(activations), atol=1e-6)
        assert torch.equal(codes != 0, sae.encode(activations) != 0)

        # Anything that changes SAE-Lens's encode goes through SAE-Lens's encode.
        sae.hook_sae_acts_post.add_hook(lambda acts, hook: acts * 2)
        assert not encodes_in_place(sae) and not encodes_fused(sae)
        assert torch.allclose(encode(sae, activations, out=buffer), 2 * codes, atol=1e-6)
        topk = TopKSAE(TopKSAEConfig(d_in=16, d_sae=64, k=3))
        assert not encodes_in_place(topk)
        assert torch.equal(encode(topk, activations, out=buffer), topk.encode(activations))
    plain = StandardSAE(StandardSAEConfig(d_in=16, d_sae=64))
    encode(plain, activations).sum().backward()  # with autograd on: an encode that has a backward
    assert plain.W_enc.grad is not None


# --- the budget does not depend on how an SAE is written (issue: psi through any SAE) ----------

D_IN, D_SAE = 12, 48


def _random_sae(cls, config_cls, **extra):
    torch.manual_seed(0)
    sae = cls(config_cls(d_in=D_IN, d_sae=D_SAE, dtype="float64", **extra))
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.normal_(0, 0.5)
        sae.W_dec.mul_(torch.rand(D_SAE, 1, dtype=torch.float64) * 3 + 0.2)  # decoder rows of very different norms
        if hasattr(sae, "threshold"):
            sae.threshold.copy_(torch.rand(D_SAE, dtype=torch.float64) * 0.3)
    return sae


def _rescaled(sae, scale: torch.Tensor):
    """The same function with latent i's code multiplied by scale[i] and its decoder row divided by it."""
    other = copy.deepcopy(sae)
    with torch.no_grad():
        other.W_dec.div_(scale[:, None])
        if isinstance(sae, GatedSAE):  # magnitudes come from W_enc * exp(r_mag) + b_mag; the gate is unchanged
            other.r_mag.add_(scale.log())
            other.b_mag.mul_(scale)
        else:
            other.W_enc.mul_(scale[None, :])
            other.b_enc.mul_(scale)
        if hasattr(other, "threshold"):
            other.threshold.mul_(scale)
    return other


ACTIVATIONS = torch.randn(400, D_IN, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

RESCALABLE = {
    "standard": (StandardSAE, StandardSAEConfig, {}),
    "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig, {}),
    "gated": (GatedSAE, GatedSAEConfig, {}),
    "topk, rescale_acts_by_decoder_norm": (TopKSAE, TopKSAEConfig, dict(k=6, rescale_acts_by_decoder_norm=True)),
    "topk, k = d_sae": (TopKSAE, TopKSAEConfig, dict(k=D_SAE)),
}


@pytest.mark.parametrize("name", list(RESCALABLE))
@pytest.mark.parametrize("merge", [True, False])
def test_re_expressing_an_sae_leaves_f_unchanged(name, merge):
    cls, config_cls, extra = RESCALABLE[name]
    sae = _random_sae(cls, config_cls, **extra)
    unit_norm = _rescaled(sae, sae.W_dec.detach().norm(dim=1))  # unit-norm decoder rows, codes rescaled to match
    arbitrary = _rescaled(
        sae, torch.rand(D_SAE, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 5 + 0.1
    )
    for other in (unit_norm, arbitrary):
        assert torch.allclose(
            other.decode(other.encode(ACTIVATIONS)), sae.decode(sae.encode(ACTIVATIONS))
        )  # the same function
    f = sae_budget(sae, ACTIVATIONS, merge_duplicates=merge).effective_features()
    assert 1 < f < D_SAE
    for other in (unit_norm, arbitrary):
        assert sae_budget(other, ACTIVATIONS, merge_duplicates=merge).effective_features() == pytest.approx(f, rel=1e-9)
    if name == "standard":  # raw |z| sums (the old measure) do move
        raw = FeatureBudget(D_SAE, D_IN)
        raw.update(arbitrary.encode(ACTIVATIONS))
        assert abs(raw.effective_features() / f - 1) > 0.01


def test_dictionary_learning_ae_pt_is_read_in_decoder_norm_units(tmp_path):
    sae = _random_sae(StandardSAE, StandardSAEConfig, apply_b_dec_to_input=True)
    torch.save(
        {
            "encoder.weight": sae.W_enc.T.float(),
            "encoder.bias": sae.b_enc.float(),
            "decoder.weight": sae.W_dec.T.float(),
            "bias": sae.b_dec.float(),
        },
        tmp_path / "ae.pt",
    )
    loaded = load_dictionary_learning_sae(tmp_path / "ae.pt", hook_name="h")
    f_loaded = sae_budget(loaded, ACTIVATIONS.float()).effective_features()
    f_original = sae_budget(sae, ACTIVATIONS).effective_features()
    assert f_loaded == pytest.approx(f_original, rel=1e-5)  # float32 file against the float64 original


def test_a_toy_tied_sae_is_read_like_an_sae_lens_sae_with_its_weights():
    toy = TiedSAE(D_IN, D_SAE, seed=3).double()
    with torch.no_grad():
        toy.b_enc.normal_(0, 0.3)
    same = StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, dtype="float64", apply_b_dec_to_input=True))
    with torch.no_grad():
        same.W_enc.copy_(toy.W_dec.T)
        same.W_dec.copy_(toy.W_dec)
        same.b_enc.copy_(toy.b_enc)
        same.b_dec.zero_()
    assert sae_budget(toy, ACTIVATIONS).effective_features() == pytest.approx(
        sae_budget(same, ACTIVATIONS).effective_features(), rel=1e-12
    )


def _with_duplicates(sae, copies: list[int]):
    """The same function with latents `copies` duplicated: same encoder column and bias, each copy's decoder row
    halved."""
    d_sae = sae.cfg.d_sae + len(copies)
    bigger = StandardSAE(
        StandardSAEConfig(
            d_in=sae.cfg.d_in,
            d_sae=d_sae,
            dtype=str(sae.dtype).removeprefix("torch."),
            apply_b_dec_to_input=sae.cfg.apply_b_dec_to_input,
        )
    )
    with torch.no_grad():
        bigger.W_enc.copy_(torch.cat([sae.W_enc, sae.W_enc[:, copies]], dim=1))
        bigger.b_enc.copy_(torch.cat([sae.b_enc, sae.b_enc[copies]]))
        W_dec = torch.cat([sae.W_dec, sae.W_dec[copies]])
        W_dec[copies] /= 2
        W_dec[sae.cfg.d_sae :] /= 2
        bigger.W_dec.copy_(W_dec)
        bigger.b_dec.copy_(sae.b_dec)
    return bigger


def test_duplicated_latents_count_once():
    sae = _random_sae(StandardSAE, StandardSAEConfig)
    duplicated = _with_duplicates(sae, [0, 5, 7, 11])
    assert torch.allclose(duplicated.decode(duplicated.encode(ACTIVATIONS)), sae.decode(sae.encode(ACTIVATIONS)))
    f = sae_budget(sae, ACTIVATIONS).effective_features()
    merged = sae_budget(duplicated, ACTIVATIONS)
    assert merged.merged_latents == 4
    assert merged.effective_features() == pytest.approx(f, rel=1e-9)
    assert (
        sae_budget(duplicated, ACTIVATIONS, merge_duplicates=False).effective_features() > f * 1.01
    )  # the raw measure splits them


@pytest.mark.parametrize("screen", [False, True])
def test_duplicate_groups_are_connected_components(screen):
    directions = torch.tensor([[1.0, 0.0], [0.99, 0.141], [0.96, 0.28], [0.0, 1.0], [-1.0, 0.0]])
    # 0-1 and 1-2 are above 0.98, 0-2 is not: one chain, one group; 3 and 4 stand alone (opposite is not a duplicate)
    assert duplicate_groups(directions, 0.98, screen=screen).tolist() == [0, 0, 0, 3, 4]
    assert duplicate_groups(directions, 0.999, screen=screen).tolist() == [0, 1, 2, 3, 4]
    assert duplicate_groups(directions, 0.98, block_rows=2, screen=screen).tolist() == [0, 0, 0, 3, 4]


@pytest.mark.parametrize("screen", [False, True])
def test_duplicate_groups_at_the_threshold_are_float64s(screen):
    """Pairs of directions whose cosine is within 1e-4 to 4e-3 of the threshold, on either side:
    closer than bfloat16's rounding, so the screen's bound must hold for the groups to come out
    right; one direction is NaN and joins no group."""
    torch.manual_seed(0)
    threshold, d = 0.875, 64  # exact in bfloat16: no slack from rounding the threshold
    base = torch.nn.functional.normalize(torch.randn(200, d, dtype=torch.float64), dim=1)
    other = torch.randn(200, d, dtype=torch.float64)
    other -= (other * base).sum(1, keepdim=True) * base  # orthogonal to its base direction
    other = torch.nn.functional.normalize(other, dim=1)
    offsets = torch.empty(200, dtype=torch.float64).uniform_(1e-4, 4e-3) * (torch.arange(200) % 2 * 2 - 1)
    cosines = threshold + offsets
    partners = cosines[:, None] * base + (1 - cosines[:, None] ** 2).sqrt() * other
    directions = torch.stack([base, partners], dim=1).reshape(400, d) * torch.rand(400, 1, dtype=torch.float64)
    directions[7] = math.nan
    expected = torch.arange(400)
    expected[1::2] = torch.where(cosines >= threshold, torch.arange(0, 400, 2), torch.arange(1, 400, 2))
    expected[7] = 7  # NaN: apart from its partner
    rounded = torch.nn.functional.normalize(partners.float(), dim=1).bfloat16().float()
    bfloat16_cosines = (torch.nn.functional.normalize(base.float(), dim=1).bfloat16().float() * rounded).sum(1)
    assert ((bfloat16_cosines >= threshold) != (cosines >= threshold)).any()  # bfloat16 alone errs here
    groups = duplicate_groups(directions.float(), threshold, block_rows=64, screen=screen)
    assert torch.equal(groups, expected)
