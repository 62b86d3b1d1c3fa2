"""SAE codes as the measure reads them: sparse form, in-place encode, sparse decode."""

import pytest
import torch
from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig

from lm_superposition.codes import decode, encode, encodes_in_place, sparse_codes


def test_sparse_codes_keep_exactly_the_nonzeros():
    codes = torch.relu(torch.randn(7, 40, generator=torch.Generator().manual_seed(0)) - 1)
    codes[3] = 0  # a token with no active feature
    csr = sparse_codes(codes)
    assert csr.layout == torch.sparse_csr
    assert csr.values().numel() == int((codes != 0).sum())
    assert torch.equal(csr.to_dense(), codes)
    assert sparse_codes(csr) is csr
    assert torch.equal(sparse_codes(codes.to_sparse()).to_dense(), codes)  # COO, as SAE-Lens TopK can return


@pytest.mark.parametrize(
    "sae_class, config_class, extra",
    [(StandardSAE, StandardSAEConfig, {}), (TopKSAE, TopKSAEConfig, dict(k=5)), (JumpReLUSAE, JumpReLUSAEConfig, {}),
     (TopKSAE, TopKSAEConfig, dict(k=5, rescale_acts_by_decoder_norm=True))],
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


def test_in_place_encode_equals_sae_lens_encode():
    torch.manual_seed(0)
    sae = StandardSAE(StandardSAEConfig(d_in=16, d_sae=64, apply_b_dec_to_input=True))
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.normal_(0, 0.5)
        activations = torch.randn(10, 16)
        buffer = torch.full((32, 64), float("nan"))  # larger than the batch; stale contents must not leak
        assert encodes_in_place(sae)
        codes = encode(sae, activations, out=buffer)
        assert codes.data_ptr() == buffer.data_ptr() and codes.shape == (10, 64)
        assert torch.allclose(codes, sae.encode(activations), atol=1e-6)
        assert torch.equal(codes != 0, sae.encode(activations) != 0)

        # Anything that changes SAE-Lens's encode goes through SAE-Lens's encode.
        sae.hook_sae_acts_post.add_hook(lambda acts, hook: acts * 2)
        assert not encodes_in_place(sae)
        assert torch.allclose(encode(sae, activations, out=buffer), 2 * codes, atol=1e-6)
        topk = TopKSAE(TopKSAEConfig(d_in=16, d_sae=64, k=3))
        assert not encodes_in_place(topk)
        assert torch.equal(encode(topk, activations, out=buffer), topk.encode(activations))
