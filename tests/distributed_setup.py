"""The small, seeded model, SAEs and windows that test_distributed.py and its torchrun worker share."""

import torch
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata
from transformer_lens import HookedTransformer, HookedTransformerConfig

from lm_superposition.data import TokenWindows

HOOKS = ["blocks.0.hook_resid_pre", "blocks.1.hook_mlp_out"]


def small_model() -> HookedTransformer:
    config = HookedTransformerConfig(
        n_layers=2, d_model=32, n_heads=2, d_head=16, d_mlp=64, d_vocab=200, n_ctx=64, act_fn="gelu", seed=0
    )
    return HookedTransformer(config).eval()


def small_saes() -> dict:
    saes = {}
    for i, hook in enumerate(HOOKS):
        torch.manual_seed(i)
        sae = StandardSAE(
            StandardSAEConfig(d_in=32, d_sae=96, metadata=SAEMetadata(hook_name=hook, model_name="small"))
        )
        with torch.no_grad():
            sae.W_enc.normal_(0, 0.3)
            sae.b_enc.fill_(-0.2)
        saes[hook] = sae.eval()
    return saes


def small_windows() -> TokenWindows:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 200, (40, 24), generator=generator)
    tokens[:, 0] = 0
    doc_ids = (torch.arange(40) // 2).unsqueeze(1).expand(40, 24).clone()  # two windows per document
    return TokenWindows(tokens, doc_ids, bos_token_id=0, pad_token_id=0)
