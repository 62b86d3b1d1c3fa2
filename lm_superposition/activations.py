"""Token windows -> activations of several hooks, one forward pass per batch of windows.

Each batch runs the model once with `run_with_cache` filtered to the requested hooks, and
stops after the deepest requested block, so later blocks and the unembedding never run.
Only one batch's activations exist at a time, whatever the number of windows. BOS and
padding positions are dropped by default, as SAE-Lens evaluations do: BOS activations are
outliers that no SAE is trained to reconstruct, and padding is not text.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from .data import TokenWindows
from .models import HookPoint, hook_point


@dataclass
class ActivationBatch:
    """Activations of one batch of windows, one row per kept token."""

    activations: dict[str, torch.Tensor]  # hook name -> [tokens, N]
    doc_ids: torch.Tensor  # long [tokens]: the document of each row
    window_slice: slice  # which windows of the input this batch covered

    @property
    def n_tokens(self) -> int:
        return len(self.doc_ids)


def stream_activations(
    model: HookedTransformer,
    windows: TokenWindows,
    hook_names: Sequence[str],
    batch_size: int = 8,
    exclude_special: bool = True,
    progress: bool = True,
) -> Iterator[ActivationBatch]:
    """Yield the activations of `hook_names` over `windows`, `batch_size` windows at a time.

    With `exclude_special`, BOS and padding tokens are left out (`windows.measured_mask`).
    Activations are on the model's device, doc_ids where the windows are.
    """
    hooks = [hook_point(model, name) for name in dict.fromkeys(hook_names)]
    if not hooks:
        raise ValueError("no hook names given; see models.hook_catalogue(model) for the measurable hooks")
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive number of windows, got {batch_size}")
    if windows.context_size > model.cfg.n_ctx:
        raise ValueError(f"windows of {windows.context_size} tokens are longer than the model's context "
                         f"of {model.cfg.n_ctx} tokens; make windows of at most {model.cfg.n_ctx}")
    # Validated above, generated below: bad input fails at the call, not at the first next().
    return _stream(model, windows, hooks, batch_size, exclude_special, progress)


def blocks_needed(hooks: Sequence[HookPoint]) -> int:
    """How many blocks the forward pass must run for every hook in `hooks` to fire."""
    return max(0 if hook.kind == "embed" else hook.layer + 1 for hook in hooks)


def _stream(model, windows, hooks, batch_size, exclude_special, progress) -> Iterator[ActivationBatch]:
    names = [hook.name for hook in hooks]
    stop_at_layer = blocks_needed(hooks)
    keep = windows.measured_mask if exclude_special else torch.ones_like(windows.tokens, dtype=torch.bool)
    with tqdm(total=int(keep.sum()), unit="tok", unit_scale=True, disable=not progress,
              desc=f"activations of {len(names)} hooks") as bar:
        for start in range(0, len(windows), batch_size):
            window_slice = slice(start, min(start + batch_size, len(windows)))
            tokens = windows.tokens[window_slice].to(model.cfg.device)
            with torch.inference_mode():
                _, cache = model.run_with_cache(tokens, names_filter=names, stop_at_layer=stop_at_layer)
            batch_keep = keep[window_slice].flatten()
            # Indexing outside inference mode makes ordinary tensors, so callers may train on them.
            activations = {name: cache[name].flatten(0, 1)[batch_keep.to(cache[name].device)] for name in names}
            del cache
            bar.update(int(batch_keep.sum()))
            yield ActivationBatch(activations, windows.doc_ids[window_slice].flatten()[batch_keep], window_slice)
