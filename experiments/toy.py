"""Toy models of superposition (Elhage et al. 2022) with a known ground truth, the paper's
tied-weight L1 SAE, and F measured through an SAE on the toy model's hidden layer.

A toy model squeezes n sparse features through m < n hidden dimensions and back:

    x_i ~ Uniform[0, 1] with probability 1 - S, else 0      (S: feature sparsity)
    h   = W x                                               (W: [m, n]; the layer an SAE reads)
    x'  = ReLU(W^T h + b)
    loss = mean over the batch of sum_i I_i (x_i - x'_i)^2,  I_i = importance_decay ** i

Importance decays geometrically, 0.9 ** i by default (Elhage et al. use 0.7 ** i for n = 20;
0.9 keeps the 20th feature at 12% of the first so that sweeps up to n = 80 still have tens
of features worth storing). Dense features (S = 0) get the m most important ones stored
orthogonally; as S grows the model packs more of the less important ones into the same m
dimensions, in superposition. That is the knob a measure of superposition must follow.

Ground truth, the number of features the model represents (`represented_features`):
- "norm" (default; the issue's definition and Elhage's convention): ||W_i|| > 0.5, i.e.
  feature i has an embedding in the hidden layer, where the SAE looks, at least half as long
  as a fully stored one. Trained toy models are bimodal (||W_i|| near 1 or near 0.01), so
  the threshold rarely matters.
- "recovery": the model's output explains more than half of the feature's variance,
  R^2_i = 1 - E[(x_i - x'_i)^2] / Var(x_i) > 0.5. This is the behavioural meaning of
  "represented" for an autoencoder (the feature survives the bottleneck) and catches what
  the norm cannot: a long embedding drowned in interference. Variance, not raw energy, in
  the denominator, because the constant x' = E[x_i] already "recovers" 75% of a dense
  feature's energy while carrying no information about it.
On trained models the two counts agree to within a feature or two.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from lm_superposition.metric import FeatureBudget
from lm_superposition.saes.quality import variance_explained
from lm_superposition.validation import check_positive_int

# ---- data --------------------------------------------------------------------------


def sample_features(
    batch_size: int,
    n_features: int,
    sparsity: float | torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A batch [batch_size, n_features] of toy features: Uniform[0, 1], each zero with probability `sparsity`.

    `sparsity` is one S for every feature or a vector of one S per feature.
    (Hand-written: SAE-Lens's `synthetic.ActivationGenerator` draws magnitudes from a
    rectified normal and from the global RNG; toy models need Uniform[0, 1] and a private seed.)
    """
    check_positive_int("batch_size", batch_size)
    check_positive_int("n_features", n_features)
    sparsity = torch.as_tensor(sparsity, dtype=torch.float32)
    if sparsity.ndim > 1 or (sparsity.ndim == 1 and sparsity.shape[0] != n_features):
        raise ValueError(
            f"sparsity must be a number or a vector of {n_features} per-feature values, "
            f"got shape {tuple(sparsity.shape)}"
        )
    if not ((sparsity >= 0) & (sparsity < 1)).all():
        raise ValueError(
            f"sparsity must lie in [0, 1) (the probability that a feature is zero), got {sparsity.tolist()}"
        )
    values = torch.rand(batch_size, n_features, generator=generator)
    active = torch.rand(batch_size, n_features, generator=generator) >= sparsity
    return values * active


class FeatureSampler:
    """An endless, seeded source of toy feature batches (same seed, same batches)."""

    def __init__(self, n_features: int, sparsity: float | torch.Tensor, seed: int = 0):
        sample_features(1, n_features, sparsity)  # reject bad arguments now, not at the first batch
        self.n_features, self.sparsity = n_features, sparsity
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self, batch_size: int) -> torch.Tensor:
        return sample_features(batch_size, self.n_features, self.sparsity, self.generator)


def _check_positive(name: str, value) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {value!r}")


# ---- the toy model -----------------------------------------------------------------


@dataclass(frozen=True)
class ToyConfig:
    """One toy model of superposition and how to train it (Adam on fresh batches)."""

    n_features: int = 20
    n_hidden: int = 5
    sparsity: float = 0.9
    importance_decay: float = 0.9
    steps: int = 4000
    batch_size: int = 1024
    lr: float = 1e-3
    seed: int = 0

    def __post_init__(self):
        for name in ("n_features", "n_hidden", "steps", "batch_size"):
            check_positive_int(name, getattr(self, name))
        if not 0 <= self.sparsity < 1:
            raise ValueError(f"sparsity must lie in [0, 1), got {self.sparsity}")
        if not 0 < self.importance_decay <= 1:
            raise ValueError(f"importance_decay must lie in (0, 1], got {self.importance_decay}")
        _check_positive("lr", self.lr)

    @property
    def importance(self) -> torch.Tensor:
        return self.importance_decay ** torch.arange(self.n_features, dtype=torch.float32)

    def sampler(self, seed: int) -> FeatureSampler:
        return FeatureSampler(self.n_features, self.sparsity, seed)


class ToyModel(nn.Module):
    """x -> h = W x -> ReLU(W^T h + b). `hidden` is the m-dim layer an SAE reads."""

    def __init__(self, config: ToyConfig):
        super().__init__()
        self.config = config
        generator = torch.Generator().manual_seed(config.seed)
        self.W = nn.Parameter(
            nn.init.xavier_normal_(torch.empty(config.n_hidden, config.n_features), generator=generator)
        )
        self.b = nn.Parameter(torch.zeros(config.n_features))

    def hidden(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.W.T

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.hidden(features) @ self.W + self.b)

    def loss(self, features: torch.Tensor) -> torch.Tensor:
        """Importance-weighted squared error, summed over features, averaged over the batch."""
        error = (features - self(features)) ** 2
        return (error * self.config.importance).sum(-1).mean()

    @property
    def feature_norms(self) -> torch.Tensor:
        """||W_i||: each feature's embedding length in the hidden layer, [n_features]."""
        return self.W.detach().norm(dim=0)


def train_toy_model(config: ToyConfig, progress: bool = False) -> ToyModel:
    """Train a toy model on fresh batches of its feature distribution (seeded by config.seed)."""
    model = ToyModel(config)
    sampler = config.sampler(config.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    for _ in tqdm(range(config.steps), desc="toy model", disable=not progress, leave=False):
        loss = model.loss(sampler.sample(config.batch_size))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


@torch.no_grad()
def hidden_activations(model: ToyModel, n_samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh features [n_samples, n] (from `seed`) and the model's hidden activations [n_samples, m]."""
    features = model.config.sampler(seed).sample(n_samples)
    return features, model.hidden(features)


# ---- ground truth ------------------------------------------------------------------

GROUND_TRUTH_METHODS = ("norm", "recovery")


@torch.no_grad()
def feature_recovery(model: ToyModel, n_samples: int = 100_000, seed: int = 12345) -> torch.Tensor:
    """R^2_i = 1 - E[(x_i - x'_i)^2] / Var(x_i) per feature on fresh samples, [n_features]."""
    features = model.config.sampler(seed).sample(n_samples)
    squared_error = ((features - model(features)) ** 2).mean(0)
    return 1 - squared_error / features.var(0).clamp_min(1e-12)


def represented_features(model: ToyModel, method: str = "norm", threshold: float = 0.5) -> int:
    """How many features the toy model represents: the ground truth F is checked against.

    "norm":     ||W_i|| > threshold (Elhage et al.'s convention, the default).
    "recovery": R^2_i > threshold, the output explains that share of the feature's
                variance (see the module docstring for when the two differ).
    """
    if method == "norm":
        return int((model.feature_norms > threshold).sum())
    if method == "recovery":
        return int((feature_recovery(model) > threshold).sum())
    raise ValueError(f"unknown ground-truth method {method!r}; valid: {GROUND_TRUTH_METHODS}")


@torch.no_grad()
def oracle_effective_features(model: ToyModel, features: torch.Tensor) -> float:
    """F that a perfect SAE would report: codes z_i = ||W_i|| x_i, each feature's share of the hidden layer.

    Separates what the measure does from what the SAE gets wrong: F(SAE) far from this
    means the SAE missed or split features; this far from the ground-truth count means
    the count and the budget disagree (e.g. half-stored features).
    """
    budget = FeatureBudget(model.config.n_features, model.config.n_hidden)
    budget.update(features * model.feature_norms)
    return budget.effective_features()


# ---- SAEs on the hidden layer --------------------------------------------------------

SAE_KINDS = ("tied", "sae_lens")


@dataclass(frozen=True)
class ToySAEConfig:
    """An L1 SAE for a toy model's hidden layer, and how to train it.

    kind "tied":     the paper's tied-weight SAE (`TiedSAE`, hand-written below).
    kind "sae_lens": SAE-Lens's standard ReLU + L1 SAE via `dictionaries.train_sae`, with
                     the same width, L1 coefficient, batches and learning rate (plus that
                     recipe's L1 warm-up and final lr decay); inputs are not rescaled, so
                     both penalties are in the same units.
    decoder_bias:    tied only. Off by default: a toy hidden layer has no offset (h = W x),
                     and a learned decoder bias lets L1 centre each dense feature and split
                     it into a positive and a negative latent (measured, n = 20, S = 0:
                     F = 22.5 for 10 stored features with the bias, 9.4 without).
    """

    kind: str = "tied"
    d_sae: int = 40
    l1_coefficient: float = 0.1
    steps: int = 3000
    batch_size: int = 1024
    lr: float = 3e-3
    decoder_bias: bool = False
    seed: int = 0

    def __post_init__(self):
        if self.kind not in SAE_KINDS:
            raise ValueError(f"unknown SAE kind {self.kind!r}; valid: {SAE_KINDS}")
        for name in ("d_sae", "steps", "batch_size"):
            check_positive_int(name, getattr(self, name))
        if not self.l1_coefficient >= 0:
            raise ValueError(f"l1_coefficient must be >= 0, got {self.l1_coefficient!r}")
        _check_positive("lr", self.lr)


class TiedSAE(nn.Module):
    """Sparse autoencoder whose encoder is its decoder transposed (Sharkey et al. 2022; the paper's toy SAE).

        z  = ReLU(W_dec (h - b_dec) + b_enc)        W_dec: [d_sae, d_in], rows of unit norm
        h' = z W_dec + b_dec
        loss = sum_j (h_j - h'_j)^2 + l1 * sum_i |z_i|,  averaged over the batch (as SAE-Lens)

    Hand-written because SAE-Lens 6 has no tied-weight training SAE: every training class
    (standard, gated, jumprelu, topk, batchtopk, matryoshka) has its own encoder, matching
    pursuit is tied but encodes greedily instead of by ReLU + L1, and the one `tied_weights`
    option belongs to the inference-only TemporalSAE. Unit-norm decoder rows keep |z_i| in
    the hidden layer's units and stop L1 from being dodged by rescaling. Tying matters for
    F: two latents sharing a direction double its reconstruction, so a tied SAE cannot
    split a feature into duplicates the way an untied one can at no cost.
    """

    def __init__(self, d_in: int, d_sae: int, decoder_bias: bool = False, seed: int = 0):
        super().__init__()
        check_positive_int("d_in", d_in)
        check_positive_int("d_sae", d_sae)
        generator = torch.Generator().manual_seed(seed)
        self.W_dec = nn.Parameter(torch.randn(d_sae, d_in, generator=generator))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in), requires_grad=decoder_bias)
        self.normalize_decoder()

    @property
    def d_sae(self) -> int:
        return self.W_dec.shape[0]

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def encode(self, activations: torch.Tensor) -> torch.Tensor:
        return torch.relu((activations - self.b_dec) @ self.W_dec.T + self.b_enc)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return codes @ self.W_dec + self.b_dec

    def forward(self, activations: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(activations))

    def loss(self, activations: torch.Tensor, l1_coefficient: float) -> torch.Tensor:
        codes = self.encode(activations)
        squared_error = ((self.decode(codes) - activations) ** 2).sum(-1)
        return (squared_error + l1_coefficient * codes.abs().sum(-1)).mean()


def _check_activations(activations: torch.Tensor) -> None:
    if activations.ndim != 2 or activations.shape[0] == 0 or activations.shape[1] == 0:
        raise ValueError(
            f"activations must be a non-empty [samples, d_in] matrix, got shape {tuple(activations.shape)}"
        )
    if not torch.isfinite(activations).all():
        raise ValueError("activations contain NaN or Inf")


def train_tied_sae(activations: torch.Tensor, config: ToySAEConfig, progress: bool = False) -> TiedSAE:
    """Train a `TiedSAE` on [samples, d_in] activations: Adam on random minibatches, decoder renormalised each step."""
    _check_activations(activations)
    sae = TiedSAE(activations.shape[1], config.d_sae, decoder_bias=config.decoder_bias, seed=config.seed)
    if config.decoder_bias:
        with torch.no_grad():
            sae.b_dec.copy_(activations.mean(0))  # right on average from the first step
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.Adam([p for p in sae.parameters() if p.requires_grad], lr=config.lr)
    for _ in tqdm(range(config.steps), desc="tied SAE", disable=not progress, leave=False):
        batch = activations[torch.randint(activations.shape[0], (config.batch_size,), generator=generator)]
        loss = sae.loss(batch, config.l1_coefficient)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sae.normalize_decoder()
    return sae.eval()


class PaperTiedSAE(nn.Module):
    """The tied SAE exactly as the paper's code writes it, kept as a reference: a linear encoder
    (Xavier-uniform weights, zero bias) whose weight is also the decoder, no decoder bias, no
    normalisation of the decoder rows, trained on the mean squared error plus l1 * mean |z|.

        z = ReLU(W h + b)      h' = z W      W: [d_sae, d_in]
    """

    def __init__(self, d_in: int, d_sae: int, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        bound = (6 / (d_in + d_sae)) ** 0.5
        self.W_dec = nn.Parameter((torch.rand(d_sae, d_in, generator=generator) * 2 - 1) * bound)
        self.b_enc = nn.Parameter(torch.zeros(d_sae))

    def encode(self, activations: torch.Tensor) -> torch.Tensor:
        return torch.relu(activations @ self.W_dec.T + self.b_enc)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return codes @ self.W_dec

    def loss(self, activations: torch.Tensor, l1_coefficient: float) -> torch.Tensor:
        codes = self.encode(activations)
        return ((self.decode(codes) - activations) ** 2).mean() + l1_coefficient * codes.abs().mean()


def train_paper_tied_sae(activations: torch.Tensor, config: ToySAEConfig) -> PaperTiedSAE:
    """Train a `PaperTiedSAE`: Adam on random minibatches, nothing renormalised."""
    _check_activations(activations)
    sae = PaperTiedSAE(activations.shape[1], config.d_sae, seed=config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.Adam(sae.parameters(), lr=config.lr)
    for _ in range(config.steps):
        batch = activations[torch.randint(activations.shape[0], (config.batch_size,), generator=generator)]
        loss = sae.loss(batch, config.l1_coefficient)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return sae.eval()


def train_toy_sae(activations: torch.Tensor, config: ToySAEConfig, progress: bool = False) -> nn.Module:
    """Train the SAE `config.kind` names; the result has `encode` and `decode` either way."""
    if config.kind == "tied":
        return train_tied_sae(activations, config, progress=progress)
    _check_activations(activations)
    from lm_superposition.saes.training import SAETrainingConfig, train_sae

    sae_lens_config = SAETrainingConfig(
        architecture="standard",
        d_sae=config.d_sae,
        l1_coefficient=config.l1_coefficient,
        lr=config.lr,
        batch_size_tokens=config.batch_size,
        training_tokens=config.steps * config.batch_size,
        normalize_activations=False,
        seed=config.seed,
    )
    return train_sae(activations, sae_lens_config, progress=progress)


# ---- measuring ---------------------------------------------------------------------


@torch.no_grad()
def measure_sae(sae: nn.Module, activations: torch.Tensor, width: int | None = None, n_blocks: int = 64) -> dict:
    """F, its bootstrap interval, psi, L0 (FeatureBudget.summary) and variance explained of an SAE on activations.

    Every sample is its own document: toy samples are independent, so the bootstrap
    resamples `n_blocks` blocks of samples. `width` (N for psi) defaults to d_in.
    """
    _check_activations(activations)
    codes = sae.encode(activations)
    budget = FeatureBudget(codes.shape[-1], width or activations.shape[1], n_blocks=n_blocks)
    budget.update(codes, doc_ids=torch.arange(activations.shape[0]))
    return {**budget.summary(), "variance_explained": variance_explained(activations, sae.decode(codes))}
