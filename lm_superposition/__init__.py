"""lm_superposition: superposition as lossy compression, measured layer by layer.

Each module is one stage of the data flow (see README): data -> models/activations ->
dictionaries (SAEs) -> metric -> analyze -> report, with runs and cli on top. The names a
notebook needs are importable from here.
"""

from .analyze import LayerwiseAnalyzer, measure_layers
from .data import load_texts, token_windows
from .dictionaries import SAETrainingConfig, evaluate_sae, load_release, load_sae, load_sae_from_disk, train_saes
from .metric import FeatureBudget, effective_features, superposition_ratio
from .models import OFFLINE_DEFAULT_MODEL, hook_catalogue, load_model, paper_hooks

__version__ = "0.1.0"

__all__ = [
    "OFFLINE_DEFAULT_MODEL",
    "FeatureBudget",
    "LayerwiseAnalyzer",
    "SAETrainingConfig",
    "effective_features",
    "evaluate_sae",
    "hook_catalogue",
    "load_model",
    "load_release",
    "load_sae",
    "load_sae_from_disk",
    "load_texts",
    "measure_layers",
    "paper_hooks",
    "superposition_ratio",
    "token_windows",
    "train_saes",
]
