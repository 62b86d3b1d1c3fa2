"""lm_superposition: superposition as lossy compression, measured layer by layer.

Each module is one stage of the data flow (see README): data -> models -> activations ->
saes (load, train, judge) -> codes -> metric -> analyze -> report, with runs and cli on top.
The names a notebook needs are importable from here. They load on first use, so that
`import lm_superposition` stays fast and pulls in neither SAE-Lens nor matplotlib.
"""

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {
    "LayerwiseAnalyzer": "analyze",
    "measure_layers": "analyze",
    "load_texts": "data",
    "token_windows": "data",
    "FeatureBudget": "metric",
    "effective_features": "metric",
    "superposition_ratio": "metric",
    "OFFLINE_DEFAULT_MODEL": "models",
    "hook_catalogue": "models",
    "load_model": "models",
    "paper_hooks": "models",
    "SAETrainingConfig": "saes",
    "evaluate_sae": "saes",
    "load_release": "saes",
    "load_sae": "saes",
    "load_sae_from_disk": "saes",
    "train_saes": "saes",
    "RunConfig": "runs",
    "run": "runs",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'lm_superposition' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
