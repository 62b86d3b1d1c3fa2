"""Open SAEs as SAE-Lens `SAE`s: the registry, SAE-Lens folders, dictionary_learning `ae.pt`.

Also the check that an SAE fits the hook it is used on (`check_sae_fits`), and saving.
"""

from __future__ import annotations

import difflib
import functools
import json
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import LocalEntryNotFoundError
from sae_lens import SAE
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME
from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory
from safetensors import SafetensorError

from ..atomic import atomic_folder
from ..models import hook_order

# --- saving and loading -------------------------------------------------------------------


def save_sae(sae: SAE, folder: str | Path, extra_files: dict[str, str] | None = None) -> Path:
    """Write `sae` as an SAE-Lens folder (cfg.json + sae_weights.safetensors, and `extra_files`:
    {name: text}); the folder appears whole or not at all. Returns the folder."""
    folder = Path(folder)
    with atomic_folder(folder) as partial:
        sae.save_model(partial)
        for name, text in (extra_files or {}).items():
            (partial / name).write_text(text)
    return folder


def load_sae_from_disk(folder: str | Path, device: str = "cpu") -> SAE:
    """Open an SAE-Lens folder (cfg.json + sae_weights.safetensors), with errors that say what is wrong."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"no SAE folder at {folder}; an SAE-Lens folder holds {SAE_CFG_FILENAME} and {SAE_WEIGHTS_FILENAME}"
        )
    missing = [name for name in (SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME) if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"SAE folder {folder} lacks {missing}; "
            f"an SAE-Lens folder holds {SAE_CFG_FILENAME} and {SAE_WEIGHTS_FILENAME}"
        )
    cfg_path = folder / SAE_CFG_FILENAME
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"{cfg_path} is not valid JSON ({err}); it should be the config SAE-Lens's save_model writes"
        ) from err
    absent = [key for key in ("d_in", "d_sae") if not isinstance(cfg, dict) or key not in cfg]
    if absent:
        raise ValueError(
            f"{cfg_path} lacks the field(s) {absent}; an SAE-Lens cfg.json needs at least d_in, d_sae and architecture"
        )
    try:
        return SAE.load_from_disk(folder, device=device)
    except (KeyError, RuntimeError, SafetensorError) as err:
        raise ValueError(
            f"cannot load the SAE in {folder}: its {SAE_CFG_FILENAME} and {SAE_WEIGHTS_FILENAME} do not match ({err})"
        ) from err


def load_sae(release: str, sae_id: str, device: str = "cpu") -> SAE:
    """One SAE of the SAE-Lens registry, e.g. load_sae("pythia-70m-deduped-mlp-sm", "blocks.0.hook_mlp_out").

    Goes through `SAE.from_pretrained`, i.e. the Hugging Face hub or its local cache.
    """
    _registry_entry(release)
    try:
        return SAE.from_pretrained(release, sae_id, device=device)
    except LocalEntryNotFoundError as err:
        raise FileNotFoundError(
            f"SAE {sae_id!r} of release {release!r} is not in the Hugging Face cache ({hf_constants.HF_HUB_CACHE}) "
            f"and the hub cannot be reached (offline: {hf_constants.HF_HUB_OFFLINE}): {err}"
        ) from err


def load_release(release: str, device: str = "cpu", sae_ids: Iterable[str] | None = None) -> dict[str, SAE]:
    """Every SAE of a registry release (or the listed `sae_ids`), keyed by hook name in forward-pass order.

    E.g. "pythia-70m-deduped-res-sm" gives its 7 residual-stream SAEs, from blocks.0.hook_resid_pre
    to blocks.5.hook_resid_post.
    """
    entry = _registry_entry(release)
    ids = list(entry.saes_map) if sae_ids is None else list(sae_ids)
    unknown = [sae_id for sae_id in ids if sae_id not in entry.saes_map]
    if unknown:
        raise ValueError(f"release {release!r} has no SAE(s) {unknown}; its ids are {list(entry.saes_map)}")
    by_hook: dict[str, SAE] = {}
    id_of_hook: dict[str, str] = {}
    for sae_id in ids:
        sae = load_sae(release, sae_id, device=device)
        hook = sae.cfg.metadata.hook_name or sae_id
        if hook in by_hook:
            raise ValueError(
                f"release {release!r} has several SAEs for {hook} ({id_of_hook[hook]!r} and {sae_id!r}); "
                "choose one per hook with sae_ids=[...]"
            )
        by_hook[hook], id_of_hook[hook] = sae, sae_id
    return dict(sorted(by_hook.items(), key=lambda item: hook_order(item[0])))


def _registry_entry(release: str):
    directory = get_pretrained_saes_directory()
    if release not in directory:
        close = difflib.get_close_matches(release, list(directory), n=5, cutoff=0.5)
        raise ValueError(f"{release!r} is not an SAE-Lens registry release; close names: {close or 'none'}")
    return directory[release]


# dictionary_learning (the library the paper's Pythia-70M dictionaries were first published
# with) stores an `AutoEncoder` as ae.pt with codes f = relu((x - bias) @ encoder.weight.T +
# encoder.bias) and reconstruction f @ decoder.weight.T + bias. That is SAE-Lens's standard SAE
# with apply_b_dec_to_input. SAE-Lens's own dictionary_learning loader reads from the hub
# only, so this disk converter does the same key mapping for a local file.
_DICTIONARY_LEARNING_KEYS = ("encoder.weight", "encoder.bias", "decoder.weight", "bias")


def load_dictionary_learning_sae(
    path: str | Path, hook_name: str, model_name: str | None = None, device: str = "cpu"
) -> SAE:
    """A dictionary_learning `ae.pt` (or a folder holding one) as an SAE-Lens `StandardSAE` with the same codes.

    ae.pt records neither the hook nor the model it was trained on, so `hook_name` is required.
    """
    path = Path(path)
    file = path / "ae.pt" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(
            f"no dictionary_learning file at {file}; expected an ae.pt with keys {list(_DICTIONARY_LEARNING_KEYS)}"
        )
    converter = functools.partial(_dictionary_learning_converter, file=file, hook_name=hook_name, model_name=model_name)
    return SAE.load_from_disk(file.parent, device=device, converter=converter)


def _dictionary_learning_converter(
    path, device: str, cfg_overrides: dict | None = None, *, file: Path, hook_name: str, model_name: str | None
) -> tuple[dict, dict[str, torch.Tensor]]:
    """SAE-Lens disk-loader protocol: (folder, device, overrides) -> (cfg dict, state dict)."""
    try:
        weights = torch.load(file, map_location=device, weights_only=True)
    except Exception as err:  # torch raises several unrelated types for a bad file
        raise ValueError(f"cannot read {file} as a dictionary_learning ae.pt ({err})") from err
    missing = [key for key in _DICTIONARY_LEARNING_KEYS if not isinstance(weights, dict) or key not in weights]
    if missing:
        found = sorted(weights) if isinstance(weights, dict) else type(weights).__name__
        raise ValueError(
            f"{file} lacks {missing}; "
            f"a dictionary_learning AutoEncoder has {list(_DICTIONARY_LEARNING_KEYS)}, found {found}"
        )
    d_sae, d_in = weights["encoder.weight"].shape
    expected = {"encoder.bias": (d_sae,), "decoder.weight": (d_in, d_sae), "bias": (d_in,)}
    wrong = {key: tuple(weights[key].shape) for key, shape in expected.items() if tuple(weights[key].shape) != shape}
    if wrong:
        raise ValueError(f"{file}: encoder.weight is [{d_sae}, {d_in}], so expected shapes {expected}, got {wrong}")
    cfg = {
        "architecture": "standard",
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": "float32",
        "device": device,
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "hook_name": hook_name,
        "model_name": model_name,
        **(cfg_overrides or {}),
    }
    state_dict = {
        "W_enc": weights["encoder.weight"].T.contiguous().float(),
        "b_enc": weights["encoder.bias"].float(),
        "W_dec": weights["decoder.weight"].T.contiguous().float(),
        "b_dec": weights["bias"].float(),
    }
    return cfg, state_dict


# --- checks before use ------------------------------------------------------------------------


def check_sae_fits(sae: SAE, hook, model_name: str, allow_hook_mismatch: bool = False) -> None:
    """Refuse an SAE that cannot read `hook` (a models.HookPoint: name, width); warn if trained on another model.

    - input width != hook width: ValueError naming both;
    - the SAE was trained on another hook: ValueError unless `allow_hook_mismatch`;
    - the SAE was trained on another model: a warning naming both (fine-tunes and checkpoints
      of one model family may legitimately share SAEs).
    """
    if sae.cfg.d_in != hook.width:
        raise ValueError(f"the SAE reads vectors of width {sae.cfg.d_in}, but hook {hook.name} has width {hook.width}")
    sae_hook = sae.cfg.metadata.hook_name
    if sae_hook is not None and sae_hook != hook.name and not allow_hook_mismatch:
        raise ValueError(
            f"the SAE was trained on hook {sae_hook}, not {hook.name}; pass allow_hook_mismatch=True to use it anyway"
        )
    sae_model = sae.cfg.metadata.model_name
    if sae_model is not None and _short_model_name(sae_model) != _short_model_name(model_name):
        warnings.warn(f"the SAE was trained on model {sae_model}, but is used on {model_name}", stacklevel=2)


def _short_model_name(name: str) -> str:
    """'EleutherAI/pythia-70m-deduped' and 'pythia-70m-deduped' name the same model."""
    return name.split("/")[-1].lower()
