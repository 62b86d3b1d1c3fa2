"""The studies behind README's findings, and the code only they need (toy models, tasks).

Run each from the repository root as a module, e.g. `python -m experiments.toy_validation`;
their tests import them as `experiments.*` (pytest puts the root on the path). The installed
package `lm_superposition` holds only what a layer-wise measurement needs.
"""

from __future__ import annotations

import contextlib
import shlex

import torch


@contextlib.contextmanager
def torch_threads(n_threads: int | None):
    """Run the block with `n_threads` torch CPU threads (None: as they are), and restore the count after."""
    before = torch.get_num_threads()
    if n_threads is not None:
        torch.set_num_threads(n_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def study_command(module: str, argv: list[str]) -> str:
    """The command line that re-runs a study, for the README it writes beside its results."""
    return shlex.join(["python", "-m", module, *argv])
