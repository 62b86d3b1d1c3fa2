"""The generated tasks of the adversarial study: sparse toy features, as vectors (MLP) or as images (CNN).

`SparseFeatureTask`: an input is n_features toy features (Uniform[0, 1], each zero with
probability `sparsity`, lm_superposition.toy.sample_features); its label is the argmax of
n_classes fixed random linear scores of them. More classes carve the input space into more
regions: a harder task.

`SparseFeatureImages`: the same features and labels, drawn as single-channel images. Each
feature owns a fixed stamp, a small random pattern (Gaussian, unit L2 norm) at a fixed
location (distinct locations, the stamp wholly inside the image), and an image is the sum
of the stamps weighted by the feature values. Why this rendering: it is linear and (with
at least as many pixels as features) invertible, so the label is the same function of the
same features as for the MLP and the class count controls difficulty in the same way;
what changes is that the features reach the network as local patterns, which is what
convolutions are built to detect. No data set is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from experiments.toy import sample_features


@dataclass(frozen=True)
class SparseFeatureTask:
    """Label = argmax over n_classes of fixed random linear scores (from `seed`) of sparse toy features."""

    n_features: int = 32
    n_classes: int = 2
    sparsity: float = 0.75
    seed: int = 0

    def __post_init__(self):
        if self.n_features <= 0 or self.n_classes < 2:
            raise ValueError(f"need n_features > 0 and n_classes >= 2, got {self.n_features}, {self.n_classes}")

    @property
    def class_scores(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed)
        return torch.randn(self.n_classes, self.n_features, generator=generator)

    def sample(self, n_samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        features = sample_features(n_samples, self.n_features, self.sparsity, generator)
        # Centred features in the scores, so that the all-zero corner is not one class's home.
        labels = ((features - features.mean(0)) @ self.class_scores.T).argmax(-1)
        return features, labels


@dataclass(frozen=True)
class SparseFeatureImages:
    """`task`'s features drawn as [1, image_size, image_size] images: one fixed stamp per feature (from `seed`)."""

    task: SparseFeatureTask
    image_size: int = 8
    stamp_size: int = 3
    seed: int = 0

    def __post_init__(self):
        if not 0 < self.stamp_size <= self.image_size:
            raise ValueError(
                f"need 0 < stamp_size <= image_size, got stamp_size={self.stamp_size}, image_size={self.image_size}"
            )
        if self.task.n_features > self.locations:
            raise ValueError(
                f"{self.task.n_features} features need as many distinct stamp locations, "
                f"but a {self.image_size}x{self.image_size} image has only {self.locations} "
                f"for {self.stamp_size}x{self.stamp_size} stamps: use a larger image_size"
            )

    @property
    def locations(self) -> int:
        return (self.image_size - self.stamp_size + 1) ** 2

    @property
    def stamps(self) -> torch.Tensor:
        """[n_features, image_size, image_size]: feature i's image at value 1."""
        generator = torch.Generator().manual_seed(self.seed)
        n, side = self.task.n_features, self.image_size - self.stamp_size + 1
        patterns = torch.randint(2, (n, self.stamp_size, self.stamp_size), generator=generator) * 2.0 - 1
        corners = torch.randperm(self.locations, generator=generator)[:n]
        stamps = torch.zeros(n, self.image_size, self.image_size)
        for stamp, pattern, corner in zip(stamps, patterns, corners.tolist()):
            row, column = divmod(corner, side)
            stamp[row : row + self.stamp_size, column : column + self.stamp_size] = pattern
        return stamps

    def render(self, features: torch.Tensor) -> torch.Tensor:
        """[n, n_features] features -> [n, 1, image_size, image_size] images (sum of stamps weighted by the
        features)."""
        return torch.einsum("nf,fhw->nhw", features, self.stamps).unsqueeze(1)

    def sample(self, n_samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, labels): the task's samples for `seed`, rendered."""
        features, labels = self.task.sample(n_samples, seed)
        return self.render(features), labels
