"""L-inf attacks (FGSM, PGD) and adversarial training for small classifiers.

Hand-written rather than taken from torchattacks / advertorch / ART: those are not dependencies
of this project, FGSM and PGD are a few lines each, and the studies need them on arbitrary
tensors (no [0, 1] image-domain clamp, which those libraries assume).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from experiments.tasks import ClassifierTraining

ATTACKS = ("fgsm", "pgd")


def _check_epsilon(epsilon: float) -> None:
    if not epsilon >= 0:
        raise ValueError(f"epsilon (the L-inf radius) must be >= 0, got {epsilon!r}")


def _input_gradient(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    inputs = inputs.detach().requires_grad_(True)
    loss = F.cross_entropy(model(inputs), labels)
    (gradient,) = torch.autograd.grad(loss, inputs)
    return gradient


def fgsm(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Goodfellow et al. 2015: one step of size epsilon along the sign of the loss gradient."""
    _check_epsilon(epsilon)
    return (inputs + epsilon * _input_gradient(model, inputs, labels).sign()).detach()


def pgd(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    epsilon: float,
    steps: int = 5,
    step_size: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Madry et al. 2018: a random start in the L-inf ball, then `steps` signed-gradient steps, each projected back
    onto it."""
    _check_epsilon(epsilon)
    if not isinstance(steps, int) or steps <= 0:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    step_size = 2.5 * epsilon / steps if step_size is None else step_size
    start = (torch.rand(inputs.shape, generator=generator) * 2 - 1) * epsilon
    adversarial = inputs + start
    for _ in range(steps):
        adversarial = adversarial + step_size * _input_gradient(model, adversarial, labels).sign()
        adversarial = inputs + (adversarial - inputs).clamp(-epsilon, epsilon)  # projection onto the ball
    return adversarial.detach()


def attack(model, inputs, labels, kind: str, epsilon: float, pgd_steps: int = 5, generator=None) -> torch.Tensor:
    """Adversarial inputs by `kind` ("fgsm" or "pgd"); the inputs themselves at epsilon 0."""
    if kind not in ATTACKS:
        raise ValueError(f"unknown attack {kind!r}; valid: {ATTACKS}")
    if epsilon == 0:
        return inputs
    if kind == "fgsm":
        return fgsm(model, inputs, labels, epsilon)
    return pgd(model, inputs, labels, epsilon, steps=pgd_steps, generator=generator)


def train_adversarially(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    training: ClassifierTraining,
    kind: str,
    epsilon: float,
    pgd_steps: int = 5,
) -> nn.Module:
    """Madry-style adversarial training: every minibatch is replaced by its attacked version; returns the model in
    eval mode.

    epsilon 0 is plain training on the same minibatches (same seed), the baseline.
    """
    if inputs.shape[0] != labels.shape[0] or inputs.shape[0] == 0:
        raise ValueError(
            f"inputs ({inputs.shape[0]} rows) and labels ({labels.shape[0]}) must be equally long and non-empty"
        )
    generator = torch.Generator().manual_seed(training.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=training.lr, weight_decay=training.weight_decay)
    for _ in range(training.steps):
        rows = torch.randint(inputs.shape[0], (training.batch_size,), generator=generator)
        model.eval()  # attack the deterministic network (no dropout noise in the gradient)
        batch = attack(model, inputs[rows], labels[rows], kind, epsilon, pgd_steps, generator)
        model.train()
        loss = F.cross_entropy(model(batch), labels[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()
