"""Shared fixtures: a random Pythia-70M-shaped model and the real offline Gemma 3 270M.

Tests never use the network: the hub is switched off before anything imports
huggingface_hub, so a missing file fails at once instead of after minutes of retries.
"""

import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformer_lens import HookedTransformer, HookedTransformerConfig  # noqa: E402

from lm_superposition.data import PAD_DOC_ID, TokenWindows  # noqa: E402
from lm_superposition.models import load_model  # noqa: E402

# Pythia-70M's public shape (design.md); random weights exercise every Pythia code path.
PYTHIA_70M_SHAPE = dict(
    n_layers=6,
    d_model=512,
    n_heads=8,
    d_head=64,
    d_mlp=2048,
    rotary_dim=16,
    parallel_attn_mlp=True,
    normalization_type="LN",
    act_fn="gelu",
    d_vocab=50304,
    positional_embedding_type="rotary",
    n_ctx=2048,
)
PYTHIA_BOS = 0  # <|endoftext|> is Pythia's BOS, EOS and padding token


@pytest.fixture(scope="session")
def pythia_shaped_model() -> HookedTransformer:
    """A seeded random-init HookedTransformer with Pythia-70M's exact config."""
    model = HookedTransformer(HookedTransformerConfig(**PYTHIA_70M_SHAPE, seed=0, device="cpu"))
    return model.eval()


@pytest.fixture(scope="session")
def gemma_model():
    """The offline default Gemma 3 270M on the default backend (TransformerBridge), loaded once per session."""
    return load_model()


@pytest.fixture(scope="session")
def make_windows():
    """Factory of TokenWindows of random tokens (see `random_windows`)."""
    return random_windows


def random_windows(
    n_windows: int,
    context: int,
    vocab: int,
    *,
    bos: int | None = PYTHIA_BOS,
    pad: int | None = PYTHIA_BOS,
    n_pad_last: int = 0,
    seed: int = 0,
) -> TokenWindows:
    """Windows of random tokens that each start with `bos`, one document per window; the last
    window ends in `n_pad_last` padding tokens (document id -1)."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, vocab, (n_windows, context), generator=generator)
    doc_ids = torch.arange(n_windows).unsqueeze(1).expand(n_windows, context).clone()
    if bos is not None:
        tokens[:, 0] = bos
    if n_pad_last:
        tokens[-1, -n_pad_last:] = pad
        doc_ids[-1, -n_pad_last:] = PAD_DOC_ID
    return TokenWindows(tokens, doc_ids, bos, pad)


# Each reason QualityGate.verdict can give a network without a language model (no CE reason).
_GATE_REASON = re.compile(
    r"variance explained (nan|-?[\d.]+) < [\d.]+"
    r"|dead fraction [\d.]+ > [\d.]+"
    r"|no latent fires \(F undefined\)"
    r"|dictionary too narrow to tell \(F/d_sae [\d.]+ > [\d.]+\)"
    r"|convergence unknown \(too few documents\)"
    r"|not converged \(F \+\d+% over the last doubling of tokens\)"
)


def _check_gate_verdicts(verdicts, variance_explained=None, effective_features=None, d_sae=None) -> None:
    """Every verdict is the quality gate's: "ok" or its reasons joined by "; ", with no CE reason (the
    studies' networks are not language models); where the measurements are given, the variance and
    width reasons appear exactly when the default gate's thresholds are crossed."""
    verdicts = list(verdicts)
    assert verdicts, "no verdicts"
    for index, verdict in enumerate(verdicts):
        assert isinstance(verdict, str) and verdict, verdict
        assert verdict == "ok" or all(_GATE_REASON.fullmatch(part) for part in verdict.split("; ")), verdict
        if variance_explained is not None:
            assert (list(variance_explained)[index] < 0.9) == ("variance explained" in verdict), verdict
        if effective_features is not None and d_sae is not None:
            f, width = list(effective_features)[index], list(d_sae)[index]
            assert (f / width > 0.5) == ("dictionary too narrow" in verdict), (f, width, verdict)


@pytest.fixture
def check_gate_verdicts():
    """The checker of a study's `quality` column (see _check_gate_verdicts)."""
    return _check_gate_verdicts
