"""Token windows -> activations of several hooks, one forward pass per batch of windows.

Each batch runs the model once (`forward_activations`) caching only the requested hooks, and
stops after the deepest requested block, so later blocks and the unembedding never run; the
same on both backends of models.load_model.
Only one batch's activations exist at a time, whatever the number of windows. BOS and
padding positions are dropped by default, as SAE-Lens evaluations do: BOS activations are
outliers that no SAE is trained to reconstruct, and padding is not text.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .data import TokenWindows
from .kernels import model_linears_on_onednn
from .models import HookPoint, Model, backend_of, hook_point


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
    model: Model,
    windows: TokenWindows,
    hook_names: Sequence[str],
    batch_size: int = 8,
    exclude_special: bool = True,
    progress: bool = True,
    autocast_dtype: torch.dtype | None = None,
) -> Iterator[ActivationBatch]:
    """Yield the activations of `hook_names` over `windows`, `batch_size` windows at a time.

    With `exclude_special`, BOS and padding tokens are left out (`windows.measured_mask`).
    Activations are on the model's device, doc_ids where the windows are.

    autocast_dtype: run each forward pass under torch.autocast to this dtype (bfloat16: the
    model's matmuls at reduced precision, weights kept as they are; ~3x faster on CPUs with
    AVX512-BF16, activations off by ~2% relative on Gemma 3 270M, results/benchmarks/); the
    activations come back in the model's dtype. Only the forward pass: whatever consumes the
    batches runs outside the autocast region.
    """
    hooks = [hook_point(model, name) for name in dict.fromkeys(hook_names)]
    if not hooks:
        raise ValueError("no hook names given; see models.hook_catalogue(model) for the measurable hooks")
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive number of windows, got {batch_size}")
    if windows.context_size > model.cfg.n_ctx:
        raise ValueError(
            f"windows of {windows.context_size} tokens are longer than the model's context "
            f"of {model.cfg.n_ctx} tokens; make windows of at most {model.cfg.n_ctx}"
        )
    # Validated above, generated below: bad input fails at the call, not at the first next().
    return _stream(model, windows, hooks, batch_size, exclude_special, progress, autocast_dtype)


@torch.inference_mode()
def forward_activations(
    model: Model,
    tokens: torch.Tensor,
    names: Sequence[str],
    stop_at_layer: int | None = None,
    require_all: bool = True,
) -> dict[str, torch.Tensor]:
    """{hook: [batch, pos, N]} of one forward pass over `tokens`, running only the first
    `stop_at_layer` blocks (None: all, and the unembedding). Inference tensors, on the model's
    device. A hook that did not fire is an error, or with `require_all=False` left out.

    One call for both backends. HookedTransformer's `stop_at_layer=n_layers` stops before the
    final norm; TransformerBridge only stops at the start of a block, and past the last one
    would go on through the unembedding (for Gemma 3, a 262k-wide matmul per token), so
    there the final norm's input stops it.

    On CPUs where oneDNN beats MKL (AMD's), the model's float32 linear layers run on oneDNN
    (`kernels.model_linears_on_onednn`).
    """
    names = list(names)
    if (
        stop_at_layer is not None
        and stop_at_layer >= model.cfg.n_layers
        and backend_of(model) == "bridge"
        and "ln_final.hook_in" in model.hook_dict
    ):
        from transformer_lens.model_bridge.exceptions import StopAtLayerException

        def stop(tensor, hook):
            raise StopAtLayerException(tensor)  # the bridge's own way out of its forward pass

        with model.hooks(fwd_hooks=[("ln_final.hook_in", stop)]), model_linears_on_onednn():
            _, cache = model.run_with_cache(tokens, names_filter=names)
    else:
        with model_linears_on_onednn():
            _, cache = model.run_with_cache(tokens, names_filter=names, stop_at_layer=stop_at_layer)
    missing = [name for name in names if name not in cache]
    if missing and require_all:
        raise RuntimeError(
            f"hooks {missing} did not fire in a forward pass of {model.cfg.model_name} "
            f"on backend {backend_of(model)!r} (stop_at_layer={stop_at_layer})"
        )
    return {name: cache[name] for name in names if name in cache}


def blocks_needed(hooks: Sequence[HookPoint]) -> int:
    """How many blocks the forward pass must run for every hook in `hooks` to fire."""
    return max(0 if hook.kind == "embed" else hook.layer + 1 for hook in hooks)


def _stream(model, windows, hooks, batch_size, exclude_special, progress, autocast_dtype) -> Iterator[ActivationBatch]:
    names = [hook.name for hook in hooks]
    stop_at_layer = blocks_needed(hooks)
    model_dtype = next(model.parameters()).dtype
    keep = windows.measured_mask if exclude_special else torch.ones_like(windows.tokens, dtype=torch.bool)
    with tqdm(
        total=int(keep.sum()),
        unit="tok",
        unit_scale=True,
        disable=not progress,
        desc=f"activations of {len(names)} hooks",
    ) as bar:
        for start in range(0, len(windows), batch_size):
            window_slice = slice(start, min(start + batch_size, len(windows)))
            tokens = windows.tokens[window_slice].to(model.cfg.device)
            # The autocast region closes before the yield, so the consumer's own work (SAE steps) never runs in it.
            with torch.autocast(
                tokens.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=bool(autocast_dtype)
            ):
                cache = forward_activations(model, tokens, names, stop_at_layer)
            if autocast_dtype is not None:
                cache = {name: acts.to(model_dtype) for name, acts in cache.items()}
            batch_keep = keep[window_slice].flatten()
            # Indexing outside inference mode makes ordinary tensors, so callers may train on them.
            activations = {name: cache[name].flatten(0, 1)[batch_keep.to(cache[name].device)] for name in names}
            del cache
            bar.update(int(batch_keep.sum()))
            yield ActivationBatch(activations, windows.doc_ids[window_slice].flatten()[batch_keep], window_slice)
