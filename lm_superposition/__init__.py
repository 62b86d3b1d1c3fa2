"""lm_superposition: superposition as lossy compression, measured layer by layer.

Each module is one stage of the data flow (see README): data -> models/activations ->
dictionaries (SAEs) -> metric -> analyze -> report, with runs/cli on top.
"""

__version__ = "0.1.0"
