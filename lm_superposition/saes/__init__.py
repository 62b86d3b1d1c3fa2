"""Sparse autoencoders for the measure, as SAE-Lens `SAE`s: load them, train them, judge them.

- `loading`: the SAE-Lens registry, SAE-Lens folders, dictionary_learning `ae.pt`; fit checks;
- `training`: SAEs for several hooks from one pass over a model's activations;
- `quality`: variance explained, L0, dead features, CE recovered, and the quality verdict.

One module per job, as SAE-Lens splits `loading/`, `training/` and `evals.py`.
"""

from .loading import check_sae_fits, load_dictionary_learning_sae, load_release, load_sae, load_sae_from_disk, save_sae
from .quality import SAEQuality, VarianceExplained, evaluate_sae, variance_explained
from .training import SAETrainingConfig, train_sae, train_saes, train_saes_for_model, trained_sae_folder

__all__ = [
    "SAEQuality",
    "SAETrainingConfig",
    "VarianceExplained",
    "check_sae_fits",
    "evaluate_sae",
    "load_dictionary_learning_sae",
    "load_release",
    "load_sae",
    "load_sae_from_disk",
    "save_sae",
    "train_sae",
    "train_saes",
    "train_saes_for_model",
    "trained_sae_folder",
    "variance_explained",
]
