"""Algorithmic tasks and the small networks trained on them, for the paper's findings studies.

- Multi-task sparse parity (Michaud et al. 2023, "quanta"): an input is a one-hot task prefix
  followed by `n_bits` random bits; the label is the parity of the `k` bits that task reads.
  Every task has its own fixed subset of bits, chosen from a seed.
- Modular addition: all p^2 pairs (a, b) with label (a + b) mod p, split into train and test.
- `MLPClassifier`: ReLU MLP with dropout after every hidden layer; its hidden layers are what
  the studies measure. `CNNClassifier`: a small ReLU CNN on single- or multi-channel images,
  its conv layers' feature maps measured the same way. `train_classifier` trains either
  (AdamW, minibatches, cross-entropy).
- `train_grokking`: a one-layer TransformerLens `HookedTransformer` on modular addition
  (inputs "a b =", the answer read at "="), full-batch AdamW with strong weight decay, with
  checkpoints (weights, train and test accuracy) every few steps: the set-up in which Power et
  al. 2022 and Nanda et al. 2023 saw test accuracy jump long after train accuracy.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer, HookedTransformerConfig

from experiments.toy import ToySAEConfig, measure_sae, train_toy_sae
from lm_superposition.metric import FeatureBudget
from lm_superposition.validation import check_positive_int


def _check_fraction(name: str, value: float, low_open: bool = True) -> None:
    ok = (0 < value < 1) if low_open else (0 <= value < 1)
    if not ok:
        interval = "(0, 1)" if low_open else "[0, 1)"
        raise ValueError(f"{name} must lie in {interval}, got {value!r}")


# ---- multi-task sparse parity ---------------------------------------------------------


@dataclass(frozen=True)
class SparseParityTask:
    """n_tasks parity subtasks over n_bits bits, each reading its own k bits (chosen from `seed`).

    Input: [one-hot task (n_tasks) | bits (n_bits)] as floats in {0, 1}; label: the parity of
    the task's k bits. Tasks are drawn uniformly.
    """

    n_tasks: int = 8
    n_bits: int = 16
    k: int = 3
    seed: int = 0

    def __post_init__(self):
        for name in ("n_tasks", "n_bits", "k"):
            check_positive_int(name, getattr(self, name))
        if self.k > self.n_bits:
            raise ValueError(f"k (bits each task reads) must be <= n_bits, got k={self.k}, n_bits={self.n_bits}")

    @property
    def input_width(self) -> int:
        return self.n_tasks + self.n_bits

    @property
    def subsets(self) -> torch.Tensor:
        """[n_tasks, k] long: the bit indices each task's parity reads (sorted, distinct within a task)."""
        generator = torch.Generator().manual_seed(self.seed)
        rows = [torch.randperm(self.n_bits, generator=generator)[: self.k].sort().values for _ in range(self.n_tasks)]
        return torch.stack(rows)

    def sample(self, n_samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(inputs [n, n_tasks + n_bits] float, labels [n] long in {0, 1}, task ids [n] long), seeded."""
        check_positive_int("n_samples", n_samples)
        generator = torch.Generator().manual_seed(seed)
        task_ids = torch.randint(self.n_tasks, (n_samples,), generator=generator)
        bits = torch.randint(2, (n_samples, self.n_bits), generator=generator)
        read = bits.gather(1, self.subsets[task_ids])
        labels = read.sum(1) % 2
        inputs = torch.cat([F.one_hot(task_ids, self.n_tasks), bits], dim=1).float()
        return inputs, labels, task_ids


# ---- the paper's multi-task sparse parity (dictionary scaling and dropout) --------------


@dataclass(frozen=True)
class DisjointParityTask:
    """The paper's interventions set-up: n_tasks parity tasks, task t reading its own block of
    bits_per_task bits (bits t*b .. t*b + b - 1); input [one-hot task | all n_tasks * b bits].

    The data set is every (task, bit pattern): n_tasks * 2^(n_tasks * b) inputs (12,288 for 3 x 4),
    split per (task, label) stratum into train and test (`split`).
    """

    n_tasks: int = 3
    bits_per_task: int = 4

    def __post_init__(self):
        check_positive_int("n_tasks", self.n_tasks)
        check_positive_int("bits_per_task", self.bits_per_task)
        if self.n_tasks * self.bits_per_task > 20:
            raise ValueError("n_tasks * bits_per_task must be <= 20: every bit pattern is enumerated")

    @property
    def input_width(self) -> int:
        return self.n_tasks * (1 + self.bits_per_task)

    def all_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(inputs [n, input_width] float, labels [n] long, task ids [n] long) for every (task, pattern)."""
        n_bits = self.n_tasks * self.bits_per_task
        patterns = (torch.arange(2**n_bits).unsqueeze(1) >> torch.arange(n_bits - 1, -1, -1)) & 1
        task_ids = torch.arange(self.n_tasks).repeat_interleave(len(patterns))
        bits = patterns.repeat(self.n_tasks, 1)
        blocks = bits.view(len(bits), self.n_tasks, self.bits_per_task)
        labels = blocks[torch.arange(len(bits)), task_ids].sum(1) % 2
        inputs = torch.cat([F.one_hot(task_ids, self.n_tasks), bits], dim=1).float()
        return inputs, labels, task_ids

    def split(self, seed: int, test_fraction: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
        """Seeded (train indices, test indices), the same share of every (task, label) stratum in the test set."""
        _check_fraction("test_fraction", test_fraction)
        _, labels, task_ids = self.all_inputs()
        generator = torch.Generator().manual_seed(seed)
        train, test = [], []
        for stratum in (task_ids * 2 + labels).unique():
            members = torch.nonzero(task_ids * 2 + labels == stratum).squeeze(1)
            members = members[torch.randperm(len(members), generator=generator)]
            n_train = int(len(members) * (1 - test_fraction))
            train.append(members[:n_train])
            test.append(members[n_train:])
        return torch.cat(train), torch.cat(test)


class PreActivationMLP(nn.Module):
    """The paper's interventions network: Linear -> Dropout -> ReLU -> Linear to one logit.

    Dropout acts on the pre-activation, before the ReLU, as in the paper's code, and the layer
    the paper measures is that pre-activation (`pre_activation`, dropout off in eval mode).
    """

    def __init__(self, input_width: int, hidden_width: int, dropout: float = 0.0, seed: int = 0):
        super().__init__()
        check_positive_int("input_width", input_width)
        check_positive_int("hidden_width", hidden_width)
        _check_fraction("dropout", dropout, low_open=False)
        self.dropout = dropout
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.hidden = nn.Linear(input_width, hidden_width)
            self.readout = nn.Linear(hidden_width, 1)

    def pre_activation(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.hidden(inputs)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = F.dropout(self.hidden(inputs), p=self.dropout, training=self.training)
        return self.readout(F.relu(hidden)).squeeze(-1)


def train_binary(
    model: PreActivationMLP,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    epochs: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
) -> PreActivationMLP:
    """The paper's training of the interventions network: Adam, BCE on one logit, shuffled epochs."""
    check_positive_int("epochs", epochs)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    targets = labels.float()
    model.train()
    with torch.random.fork_rng(devices=[]):  # dropout masks from the seed, not the caller's RNG
        torch.manual_seed(seed)
        for _ in range(epochs):
            for rows in torch.randperm(len(inputs), generator=generator).split(batch_size):
                loss = F.binary_cross_entropy_with_logits(model(inputs[rows]), targets[rows])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    return model.eval()


@torch.no_grad()
def binary_accuracy(model: PreActivationMLP, inputs: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    return float(((model(inputs) > 0).long() == labels).float().mean())


# ---- modular addition -----------------------------------------------------------------


def modular_addition_pairs(p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All p^2 pairs: (pairs [p^2, 2] long with rows (a, b), labels [p^2] = (a + b) mod p)."""
    check_positive_int("p", p)
    if p < 2:
        raise ValueError(f"p must be at least 2, got {p}")
    a, b = torch.cartesian_prod(torch.arange(p), torch.arange(p)).unbind(1)
    return torch.stack([a, b], dim=1), (a + b) % p


def train_test_split(n: int, train_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random split of range(n) into (train indices, test indices)."""
    _check_fraction("train_fraction", train_fraction)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_train = max(1, min(n - 1, round(train_fraction * n)))
    return order[:n_train], order[n_train:]


def one_hot_pairs(pairs: torch.Tensor, p: int) -> torch.Tensor:
    """MLP inputs for modular addition: [one-hot a | one-hot b], [n, 2p] float."""
    return torch.cat([F.one_hot(pairs[:, 0], p), F.one_hot(pairs[:, 1], p)], dim=1).float()


# ---- MLP classifiers ------------------------------------------------------------------


class MLPClassifier(nn.Module):
    """Linear -> ReLU -> Dropout for each hidden width, then a linear readout to n_classes logits."""

    def __init__(self, input_width: int, hidden_widths: list[int], n_classes: int, dropout: float = 0.0, seed: int = 0):
        super().__init__()
        for width in [input_width, *hidden_widths, n_classes]:
            check_positive_int("every layer width", width)
        _check_fraction("dropout", dropout, low_open=False)
        widths = [input_width, *hidden_widths]
        # nn.Linear initialises from the global RNG: seed it without disturbing the caller's.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.hidden = nn.ModuleList(
                nn.Sequential(nn.Linear(w_in, w_out), nn.ReLU(), nn.Dropout(dropout))
                for w_in, w_out in zip(widths, widths[1:])
            )
            self.readout = nn.Linear(widths[-1], n_classes)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.readout(self.hidden_activations(inputs)[-1] if self.hidden else inputs)

    def hidden_activations(self, inputs: torch.Tensor) -> list[torch.Tensor]:
        """Post-ReLU activations of every hidden layer (after dropout, which is off in eval mode)."""
        activations, x = [], inputs
        for layer in self.hidden:
            x = layer(x)
            activations.append(x)
        return activations


class CNNClassifier(nn.Module):
    """Conv(3x3) -> ReLU per channel count, then a linear readout of the last feature map, flattened.

    The first convolution keeps the image size, every later one halves it (stride 2, as a
    pooling layer would, at less cost). Inputs are [batch, in_channels, image_size, image_size].
    `hidden_activations` gives each conv layer's post-ReLU map [batch, channels, height, width].
    """

    def __init__(self, image_size: int, channels: list[int], n_classes: int, in_channels: int = 1, seed: int = 0):
        super().__init__()
        for name, value in [("image_size", image_size), ("n_classes", n_classes), ("in_channels", in_channels)]:
            check_positive_int(name, value)
        if not channels:
            raise ValueError("channels must list at least one conv layer's channel count, got an empty list")
        for count in channels:
            check_positive_int("every channel count", count)
        self.image_size, self.in_channels = image_size, in_channels
        strides = [1] + [2] * (len(channels) - 1)
        size = image_size
        for stride in strides:
            size = (size - 1) // stride + 1  # kernel 3, padding 1
        # nn.Conv2d / nn.Linear initialise from the global RNG: seed it without disturbing the caller's.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.hidden = nn.ModuleList(
                nn.Sequential(nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1), nn.ReLU())
                for c_in, c_out, stride in zip([in_channels, *channels], channels, strides)
            )
            self.readout = nn.Linear(channels[-1] * size * size, n_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.readout(self.hidden_activations(images)[-1].flatten(1))

    def hidden_activations(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Post-ReLU feature maps [batch, channels, height, width] of every conv layer."""
        expected = (self.in_channels, self.image_size, self.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"images must have shape [batch, {', '.join(map(str, expected))}], got {tuple(images.shape)}"
            )
        activations, x = [], images
        for layer in self.hidden:
            x = layer(x)
            activations.append(x)
        return activations


@dataclass(frozen=True)
class ClassifierTraining:
    """AdamW on random minibatches of a fixed training set."""

    steps: int = 3000
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size"):
            check_positive_int(name, getattr(self, name))
        if not (self.lr > 0 and self.weight_decay >= 0):
            raise ValueError(
                f"lr must be > 0 and weight_decay >= 0, got lr={self.lr}, weight_decay={self.weight_decay}"
            )


def train_classifier(
    model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, training: ClassifierTraining, progress: bool = False
) -> nn.Module:
    """Train `model` with cross-entropy on (inputs, labels); returns it in eval mode."""
    if inputs.shape[0] != labels.shape[0] or inputs.shape[0] == 0:
        raise ValueError(
            f"inputs ({inputs.shape[0]} rows) and labels ({labels.shape[0]}) must be equally long and non-empty"
        )
    generator = torch.Generator().manual_seed(training.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=training.lr, weight_decay=training.weight_decay)
    model.train()
    for _ in tqdm(range(training.steps), desc="classifier", disable=not progress, leave=False):
        rows = torch.randint(inputs.shape[0], (training.batch_size,), generator=generator)
        loss = F.cross_entropy(model(inputs[rows]), labels[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of rows whose argmax logit is the label (model in eval mode)."""
    model.eval()
    return float((model(inputs).argmax(-1) == labels).float().mean())


# ---- grokking: a one-layer transformer on modular addition ------------------------------


@dataclass(frozen=True)
class GrokkingConfig:
    """Modular addition mod p with a one-layer transformer (Nanda et al. 2023's recipe, smaller).

    Nanda et al. used p = 113, d_model 128, lr 1e-3 and 30% of pairs; this default (p = 43,
    d_model 64, lr 3e-3, 50%) groks in ~1,300 steps, about a minute on one CPU thread.

    Full-batch AdamW (betas 0.9, 0.98) with weight decay 1 on a `train_fraction` of all p^2
    pairs; a checkpoint every `checkpoint_every` steps and at the last step.
    """

    p: int = 43
    train_fraction: float = 0.5
    d_model: int = 64
    n_heads: int = 4
    d_mlp: int = 256
    steps: int = 2500
    checkpoint_every: int = 125
    lr: float = 3e-3
    weight_decay: float = 1.0
    seed: int = 0

    def __post_init__(self):
        for name in ("p", "d_model", "n_heads", "d_mlp", "steps", "checkpoint_every"):
            check_positive_int(name, getattr(self, name))
        if self.p < 2:
            raise ValueError(f"p must be at least 2, got {self.p}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        _check_fraction("train_fraction", self.train_fraction)
        if not (self.lr > 0 and self.weight_decay >= 0):
            raise ValueError(
                f"lr must be > 0 and weight_decay >= 0, got lr={self.lr}, weight_decay={self.weight_decay}"
            )

    @property
    def equals_token(self) -> int:
        return self.p  # tokens 0..p-1 are numbers, p is "="

    def transformer_config(self) -> HookedTransformerConfig:
        return HookedTransformerConfig(
            n_layers=1,
            d_model=self.d_model,
            n_heads=self.n_heads,
            d_head=self.d_model // self.n_heads,
            d_mlp=self.d_mlp,
            d_vocab=self.p + 1,
            d_vocab_out=self.p,
            n_ctx=3,
            act_fn="relu",
            normalization_type=None,  # as Nanda et al.: no LayerNorm, so the algorithm sits in the weights
            seed=self.seed,
        )


def grokking_tokens(config: GrokkingConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """All p^2 inputs as token rows [a, b, =] ([p^2, 3] long) and their labels (a + b) mod p."""
    pairs, labels = modular_addition_pairs(config.p)
    equals = torch.full((pairs.shape[0], 1), config.equals_token)
    return torch.cat([pairs, equals], dim=1), labels


@dataclass
class Checkpoint:
    step: int
    train_loss: float
    train_accuracy: float
    test_accuracy: float
    state_dict: dict


@dataclass
class GrokkingRun:
    config: GrokkingConfig
    train_indices: torch.Tensor
    test_indices: torch.Tensor
    checkpoints: list[Checkpoint]

    def model_at(self, checkpoint: Checkpoint) -> HookedTransformer:
        model = HookedTransformer(self.config.transformer_config())
        model.load_state_dict(checkpoint.state_dict)
        return model.eval()


def answer_logits(model: HookedTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """Logits at the "=" position, [n, p]."""
    return model(tokens)[:, -1, :]


def train_grokking(config: GrokkingConfig, progress: bool = False) -> GrokkingRun:
    """Train the one-layer transformer, keeping a checkpoint every `checkpoint_every` steps and at the end."""
    tokens, labels = grokking_tokens(config)
    train_indices, test_indices = train_test_split(len(labels), config.train_fraction, config.seed)
    model = HookedTransformer(config.transformer_config())
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.98))
    checkpoints = []
    for step in tqdm(range(1, config.steps + 1), desc="grokking", disable=not progress, leave=False):
        model.train()
        loss = F.cross_entropy(answer_logits(model, tokens[train_indices]), labels[train_indices])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % config.checkpoint_every == 0 or step == config.steps:
            checkpoints.append(_checkpoint(model, step, loss.item(), tokens, labels, train_indices, test_indices))
    return GrokkingRun(config, train_indices, test_indices, checkpoints)


@torch.no_grad()
def _checkpoint(model, step, train_loss, tokens, labels, train_indices, test_indices) -> Checkpoint:
    model.eval()
    correct = answer_logits(model, tokens).argmax(-1) == labels
    return Checkpoint(
        step=step,
        train_loss=train_loss,
        train_accuracy=float(correct[train_indices].float().mean()),
        test_accuracy=float(correct[test_indices].float().mean()),
        state_dict=copy.deepcopy(model.state_dict()),
    )


def first_step_reaching(checkpoints: list[Checkpoint], metric: str, threshold: float) -> int | None:
    """The first checkpoint step whose `metric` ("train_accuracy"/"test_accuracy") is >= threshold; None if never."""
    for checkpoint in checkpoints:
        if getattr(checkpoint, metric) >= threshold:
            return checkpoint.step
    return None


# ---- measuring a small network's layer ------------------------------------------------


def scaled_to_unit_rms(activations: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
    """activations scaled so that `reference` (default: themselves) has mean squared norm = width.

    The tied SAE's squared error grows with the square of the activations' scale and its L1
    term linearly, so one L1 coefficient means the same trade-off on every layer and model
    only at a common scale (SAE-Lens normalises its inputs the same way).
    """
    reference = activations if reference is None else reference
    mean_square = reference.pow(2).sum(-1).mean()
    if not mean_square > 0:
        raise ValueError("the activations are all zero; the layer is dead and F is undefined")
    return activations * (reference.shape[-1] / mean_square).sqrt()


def tied_sae_measure(
    train_activations: torch.Tensor,
    test_activations: torch.Tensor,
    sae_config: ToySAEConfig,
) -> dict:
    """Train the paper's tied SAE on train_activations and measure F, psi (N = width), L0, variance explained on test.

    Both sets are scaled by the training set's RMS (`scaled_to_unit_rms`) first.
    """
    train_scaled = scaled_to_unit_rms(train_activations)
    test_scaled = scaled_to_unit_rms(test_activations, reference=train_activations)
    sae = train_toy_sae(train_scaled, sae_config)
    with torch.no_grad():
        return measure_sae(sae, test_scaled)


def neuron_basis_measure(activations: torch.Tensor) -> dict:
    """F and psi with the neurons themselves as the code (|activation| per neuron): no SAE involved."""
    budget = FeatureBudget(activations.shape[-1], activations.shape[-1])
    budget.update(activations, doc_ids=torch.arange(activations.shape[0]))
    return budget.summary()


__all__ = [
    "SparseParityTask",
    "DisjointParityTask",
    "PreActivationMLP",
    "train_binary",
    "binary_accuracy",
    "modular_addition_pairs",
    "train_test_split",
    "one_hot_pairs",
    "MLPClassifier",
    "CNNClassifier",
    "ClassifierTraining",
    "train_classifier",
    "accuracy",
    "GrokkingConfig",
    "grokking_tokens",
    "Checkpoint",
    "GrokkingRun",
    "answer_logits",
    "train_grokking",
    "first_step_reaching",
    "scaled_to_unit_rms",
    "tied_sae_measure",
    "neuron_basis_measure",
]
