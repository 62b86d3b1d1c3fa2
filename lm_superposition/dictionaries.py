"""Sparse autoencoders (SAE-Lens SAEs) for the measure: train, save, load, check, judge.

psi is a property of a layer seen through an SAE, so this module hands every later stage
an SAE-Lens `SAE` whose `encode` gives the codes z(x):

- train: SAEs for several hooks from ONE pass over streamed activations (`train_saes`),
  or from one tensor (`train_sae`), with SAE-Lens's training SAEs and `SAETrainer` steps;
- load: the SAE-Lens registry (`load_sae`, `load_release`), SAE-Lens folders
  (`load_sae_from_disk`) and dictionary_learning `ae.pt` files (`load_dictionary_learning_sae`);
- check an SAE fits the hook and model it is used on (`check_sae_fits`);
- judge it: variance explained, L0, dead features, CE loss recovered (`evaluate_sae`,
  `ReconstructionStats`), flagged below a threshold (`quality_flag`), never hidden;
- `train_saes_for_model`: what `lm-superposition train-sae` runs.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import re
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from itertools import chain, islice
from pathlib import Path

import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors import SafetensorError
from sae_lens import (
    SAE,
    GatedSAE,
    JumpReLUSAE,
    StandardSAE,
    StandardTrainingSAE,
    StandardTrainingSAEConfig,
    TopKSAE,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
    TrainingSAE,
)
from sae_lens.config import LoggingConfig, SAETrainerConfig
from sae_lens.evals import ExplainedVarianceCalculator, get_recons_loss
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME
from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory
from sae_lens.saes.sae import SAEMetadata
from sae_lens.training.activation_scaler import ActivationScaler
from sae_lens.training.sae_trainer import SAETrainer
from sae_lens.util import extract_stop_at_layer_from_tlens_hook_name, get_special_token_ids
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from .activations import stream_activations
from .metric import sparse_codes
from .models import hook_point

ARCHITECTURES = ("standard", "topk")


@dataclass
class SAETrainingConfig:
    """How to train SAEs. `d_sae`, when given, overrides `expansion_factor` (d_sae = factor * d_in).

    The defaults follow Anthropic's April 2024 recipe as SAE-Lens implements it: inputs scaled to
    mean norm sqrt(d_in), L1 penalty weighted by decoder norms, L1 warm-up over the first 5% of
    steps and a linear learning-rate decay over the last 20%. They suit budgets of millions of
    tokens. For short CPU runs use smaller batches and a higher lr, and prefer "topk": on Gemma 3
    270M residual streams with 60k tokens, topk k=64 reached variance explained 0.79-0.95 and
    l1_coefficient=2 reached 0.66-0.85 at L0 54-75 (results/gemma3_270m_saes/).
    """

    architecture: str = "standard"  # "standard": ReLU + L1 (as in the paper); "topk": k active features
    expansion_factor: int = 8
    d_sae: int | None = None
    l1_coefficient: float = 5.0  # standard only
    k: int = 32  # topk only
    lr: float = 4e-4
    batch_size_tokens: int = 4096
    training_tokens: int = 2_000_000
    shuffle_buffer_batches: int = 8  # tokens are shuffled within a buffer of this many batches
    # Passes over a model's activations in train_saes_for_model: > 1 keeps one pass in memory
    # and replays it, so a CPU run spends its time on SAE steps rather than forward passes.
    epochs: int = 1
    normalize_activations: bool = True  # scale inputs to mean norm sqrt(d_in), folded back afterwards
    seed: int = 0
    device: str = "cpu"
    model_name: str | None = None  # recorded in each SAE's metadata

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        for name in ("expansion_factor", "k", "batch_size_tokens", "training_tokens", "shuffle_buffer_batches", "epochs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.d_sae is not None and (not isinstance(self.d_sae, int) or self.d_sae <= 0):
            raise ValueError(f"d_sae must be a positive integer or None, got {self.d_sae!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not (self.l1_coefficient >= 0 and math.isfinite(self.l1_coefficient)):
            raise ValueError(f"l1_coefficient must be a non-negative number, got {self.l1_coefficient!r}")

    def width_for(self, d_in: int) -> int:
        """Number of SAE features for an input of width d_in."""
        d_sae = self.d_sae if self.d_sae is not None else self.expansion_factor * d_in
        if self.architecture == "topk" and self.k > d_sae:
            raise ValueError(f"topk needs k <= d_sae, got k={self.k} and d_sae={d_sae}")
        return d_sae

    @property
    def distinct_tokens(self) -> int:
        """Tokens of text needed: training_tokens spread over `epochs` passes."""
        return -(-self.training_tokens // self.epochs)

    @property
    def total_steps(self) -> int:
        return max(1, self.training_tokens // self.batch_size_tokens)


# --- training ---------------------------------------------------------------------------
#
# SAE-Lens's `SAETrainer.fit` (and `MultiSAETrainer.fit`) pull exactly `total_training_samples`
# from their data provider and cannot stop cleanly when a one-pass stream runs out first; the
# multi-SAE one also throws away its norm-estimation batches, which a single pass cannot spare.
# So we drive the trainers' public `step` seam ourselves, one `SAETrainer` per hook: SAE-Lens
# still owns the loss (`training_forward_pass`), optimiser, schedules, gradient clipping and
# dead-feature tracking; this loop only routes each batch of tokens to every SAE.


def train_saes(
    batches: Iterable[dict[str, torch.Tensor]],
    widths: dict[str, int],
    config: SAETrainingConfig,
    progress: bool = True,
) -> dict[str, SAE]:
    """Train one SAE per hook in `widths` ({hook_name: d_in}) from one pass over `batches`.

    Each batch is {hook_name: [tokens, d_in]} (the same tokens for every hook) and feeds every
    SAE. Training stops after `config.training_tokens` tokens or when the stream ends (with a
    warning). Returns inference SAEs (SAE-Lens `StandardSAE` / `TopKSAE`) with
    `cfg.metadata.hook_name`, `model_name` and `training_tokens` set.
    """
    if not widths:
        raise ValueError("widths is empty: give {hook_name: d_in} for at least one hook")
    with torch.random.fork_rng(devices=[]):  # seeded init without resetting the caller's RNG
        torch.manual_seed(config.seed)
        trainers = {hook: _new_trainer(hook, d_in, config) for hook, d_in in widths.items()}
    shuffle = torch.Generator().manual_seed(config.seed)
    stream = _fixed_size_batches(batches, widths, config.batch_size_tokens, config.shuffle_buffer_batches, shuffle)

    first_batches = list(islice(stream, config.shuffle_buffer_batches))
    if not first_batches:
        raise ValueError(
            f"the activations hold fewer than batch_size_tokens={config.batch_size_tokens} tokens; "
            "give more tokens or a smaller batch_size_tokens"
        )
    for hook, trainer in trainers.items():
        _initialise_from_data(trainer, [batch[hook] for batch in first_batches], config)

    n_tokens = 0
    bar = tqdm(total=config.training_tokens, unit="tok", desc=f"training {len(trainers)} SAE(s)", disable=not progress)
    for batch in chain(first_batches, stream):
        mse = {}
        for hook, trainer in trainers.items():
            trainer.maybe_reset_sparsity()
            output = trainer.step(batch[hook])
            trainer.n_training_steps += 1
            mse[hook] = output.losses["mse_loss"].item()
        n_tokens += config.batch_size_tokens
        bar.update(config.batch_size_tokens)
        bar.set_postfix(mean_mse=f"{sum(mse.values()) / len(mse):.4g}")
        if n_tokens >= config.training_tokens:
            break
    bar.close()
    if n_tokens + config.batch_size_tokens <= config.training_tokens:  # short by a whole batch or more
        warnings.warn(
            f"the activation stream ended after {n_tokens} tokens, before training_tokens={config.training_tokens}; "
            "the SAEs are trained on what there was",
            stacklevel=2,
        )
    return {hook: _to_inference_sae(trainer, n_tokens) for hook, trainer in trainers.items()}


def train_sae(
    activations: torch.Tensor,
    config: SAETrainingConfig,
    hook_name: str = "toy",
    progress: bool = False,
) -> SAE:
    """Train one SAE on a [tokens, d_in] tensor, cycling over it (reshuffled) until the token budget."""
    if activations.ndim != 2:
        raise ValueError(f"activations must be [tokens, d_in], got shape {tuple(activations.shape)}")
    epochs = _epochs(activations, hook_name, torch.Generator().manual_seed(config.seed))
    return train_saes(epochs, {hook_name: activations.shape[1]}, config, progress=progress)[hook_name]


def _epochs(activations: torch.Tensor, hook_name: str, generator: torch.Generator) -> Iterator[dict[str, torch.Tensor]]:
    while True:
        yield {hook_name: activations[torch.randperm(len(activations), generator=generator)]}


def _new_trainer(hook_name: str, d_in: int, config: SAETrainingConfig) -> SAETrainer:
    common = dict(
        d_in=d_in,
        d_sae=config.width_for(d_in),
        device=config.device,
        normalize_activations="expected_average_only_in" if config.normalize_activations else "none",
        metadata=SAEMetadata(hook_name=hook_name, model_name=config.model_name),
    )
    steps = config.total_steps
    sae: TrainingSAE
    if config.architecture == "standard":
        sae = StandardTrainingSAE(
            StandardTrainingSAEConfig(
                l1_coefficient=config.l1_coefficient, l1_warm_up_steps=steps // 20, **common
            )
        )
    else:
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(k=config.k, **common))
    trainer_config = SAETrainerConfig(
        total_training_samples=config.training_tokens,
        train_batch_size_samples=config.batch_size_tokens,
        lr=config.lr,
        lr_end=config.lr,  # the decay runs from lr to 0
        lr_decay_steps=steps // 5,
        device=config.device,
        # SAE-Lens's 1000-step windows assume millions of tokens; short runs need shorter ones
        # for the dead-feature count (and topk's auxiliary loss on dead features) to mean anything.
        dead_feature_window=max(1, min(1000, steps // 10)),
        feature_sampling_window=max(1, min(2000, steps // 5)),
        logger=LoggingConfig(log_to_wandb=False),
    )
    return SAETrainer(cfg=trainer_config, sae=sae, data_provider=iter(()))


@torch.no_grad()
def _initialise_from_data(trainer: SAETrainer, first_batches: list[torch.Tensor], config: SAETrainingConfig) -> None:
    """Estimate the input scaling (SAE-Lens) and start b_dec at the data mean.

    SAE-Lens 6 dropped its b_dec initialisers; starting at the mean spares the features from
    having to learn the (large, in residual streams) constant offset first.
    """
    if config.normalize_activations:
        trainer.activation_scaler.estimate_scaling_factor(
            d_in=trainer.sae.cfg.d_in, data_provider=iter(first_batches), n_batches_for_norm_estimate=len(first_batches)
        )
    scaled = trainer.activation_scaler(torch.cat(first_batches).to(trainer.sae.device, trainer.sae.dtype))
    trainer.sae.b_dec.copy_(scaled.mean(dim=0))


@torch.no_grad()
def _to_inference_sae(trainer: SAETrainer, n_tokens: int) -> SAE:
    """Fold the input scaling into the weights and convert to SAE-Lens's inference class.

    Does in memory what `TrainingSAE.save_inference_model` + `SAE.load_from_disk` do on disk.
    """
    training_sae = trainer.sae
    if trainer.activation_scaler.scaling_factor is not None:
        training_sae.fold_activation_norm_scaling_factor(trainer.activation_scaler.scaling_factor)
        trainer.activation_scaler.scaling_factor = None
    trainer.set_final_sae_metadata()  # records l0 and num_dead_features of the last window
    training_sae.cfg.metadata.training_tokens = n_tokens
    state_dict = training_sae.state_dict()
    training_sae.process_state_dict_for_saving_inference(state_dict)
    sae = SAE.from_dict(training_sae.cfg.get_inference_sae_cfg_dict())
    sae.load_state_dict(state_dict)
    return sae.eval()


def _fixed_size_batches(
    batches: Iterable[dict[str, torch.Tensor]],
    widths: dict[str, int],
    batch_size: int,
    buffer_batches: int,
    generator: torch.Generator,
) -> Iterator[dict[str, torch.Tensor]]:
    """Re-cut a stream of {hook: [tokens, d_in]} into shuffled batches of exactly `batch_size` tokens.

    Tokens are shuffled within a buffer of `buffer_batches` batches (the same permutation for
    every hook); a last remainder smaller than one batch is dropped.
    """
    pending: dict[str, list[torch.Tensor]] = {hook: [] for hook in widths}
    n_pending = 0
    for batch in batches:
        n_pending += _check_batch(batch, widths)
        for hook in widths:
            pending[hook].append(batch[hook].detach())
        if n_pending >= batch_size * buffer_batches:
            buffer = {hook: torch.cat(parts) for hook, parts in pending.items()}
            order = torch.randperm(n_pending, generator=generator)
            n_full = n_pending - n_pending % batch_size
            for start in range(0, n_full, batch_size):
                rows = order[start : start + batch_size]
                yield {hook: acts[rows] for hook, acts in buffer.items()}
            pending = {hook: [acts[order[n_full:]]] for hook, acts in buffer.items()}
            n_pending -= n_full
    if n_pending >= batch_size:
        buffer = {hook: torch.cat(parts) for hook, parts in pending.items()}
        order = torch.randperm(n_pending, generator=generator)
        for start in range(0, n_pending - batch_size + 1, batch_size):
            rows = order[start : start + batch_size]
            yield {hook: acts[rows] for hook, acts in buffer.items()}


def _check_batch(batch: dict[str, torch.Tensor], widths: dict[str, int]) -> int:
    """Number of tokens in a batch, after checking it has every hook at the right width."""
    missing = [hook for hook in widths if hook not in batch]
    if missing:
        raise ValueError(f"activation batch lacks hooks {missing}; it has {sorted(batch)}")
    n_tokens = {}
    for hook, d_in in widths.items():
        acts = batch[hook]
        if acts.ndim != 2 or acts.shape[1] != d_in:
            raise ValueError(f"activations for {hook} must be [tokens, {d_in}], got shape {tuple(acts.shape)}")
        n_tokens[hook] = acts.shape[0]
    if len(set(n_tokens.values())) > 1:
        raise ValueError(f"every hook must hold the same tokens in a batch, got token counts {n_tokens}")
    return next(iter(n_tokens.values()))


# --- saving and loading -------------------------------------------------------------------


def save_sae(sae: SAE, folder: str | Path) -> Path:
    """Write `sae` as an SAE-Lens folder (cfg.json + sae_weights.safetensors); returns the folder."""
    folder = Path(folder)
    sae.save_model(folder)
    return folder


def load_sae_from_disk(folder: str | Path, device: str = "cpu") -> SAE:
    """Open an SAE-Lens folder (cfg.json + sae_weights.safetensors), with errors that say what is wrong."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no SAE folder at {folder}; an SAE-Lens folder holds {SAE_CFG_FILENAME} and {SAE_WEIGHTS_FILENAME}")
    missing = [name for name in (SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME) if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"SAE folder {folder} lacks {missing}; an SAE-Lens folder holds {SAE_CFG_FILENAME} and {SAE_WEIGHTS_FILENAME}")
    cfg_path = folder / SAE_CFG_FILENAME
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{cfg_path} is not valid JSON ({err}); it should be the config SAE-Lens's save_model writes") from err
    absent = [key for key in ("d_in", "d_sae") if not isinstance(cfg, dict) or key not in cfg]
    if absent:
        raise ValueError(f"{cfg_path} lacks the field(s) {absent}; an SAE-Lens cfg.json needs at least d_in, d_sae and architecture")
    try:
        return SAE.load_from_disk(folder, device=device)
    except (KeyError, RuntimeError, SafetensorError) as err:
        raise ValueError(f"cannot load the SAE in {folder}: its {SAE_CFG_FILENAME} and {SAE_WEIGHTS_FILENAME} do not match ({err})") from err


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


# TransformerLens's order of hooks inside one block.
_ORDER_IN_BLOCK = ["hook_resid_pre", "attn.hook_z", "hook_attn_out", "hook_resid_mid", "mlp.hook_post", "hook_mlp_out", "hook_resid_post"]


def hook_order(hook_name: str) -> tuple[int, int, str]:
    """Sort key putting TransformerLens hook names in forward-pass order (embeddings first)."""
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", hook_name)
    if match is None:
        return (-1, 0, hook_name)
    suffix = match.group(2)
    position = _ORDER_IN_BLOCK.index(suffix) if suffix in _ORDER_IN_BLOCK else len(_ORDER_IN_BLOCK)
    return (int(match.group(1)), position, hook_name)


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
        raise FileNotFoundError(f"no dictionary_learning file at {file}; expected an ae.pt with keys {list(_DICTIONARY_LEARNING_KEYS)}")
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
        raise ValueError(f"{file} lacks {missing}; a dictionary_learning AutoEncoder has {list(_DICTIONARY_LEARNING_KEYS)}, found {found}")
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


# --- quality -----------------------------------------------------------------------------------

# psi counts the features an SAE uses to describe a layer; that only describes the layer if
# the SAE reconstructs it. Below 70% variance explained, more than 30% of the activation
# variance sits in the SAE's error term, so the codes describe a visibly different vector and
# psi would count the features of that one: flag it. (0.7 is a floor, not a target: the
# pretrained SAEs this tool is meant for usually explain 80-95%.) The same reading for the
# model's loss: an SAE whose reconstruction recovers less than 70% of the loss gap to
# zero-ablation has lost much of what the model uses the layer for. Dead features do not bias
# psi (they carry no budget), but past half the dictionary they cap F well below d_sae.
QUALITY_THRESHOLD = 0.7  # minimum variance explained
MIN_CE_LOSS_RECOVERED = 0.7
MAX_DEAD_FRACTION = 0.5


@dataclass
class SAEQuality:
    """How well an SAE describes one hook, on `n_tokens` tokens. CE fields are NaN when not measured."""

    variance_explained: float  # 1 - sum |x - x_hat|^2 / sum |x - mean x|^2
    mean_l0: float  # features active per token
    dead_fraction: float  # features that never fired on these tokens (depends on how many there were)
    n_tokens: int
    ce_loss_clean: float = math.nan
    ce_loss_reconstructed: float = math.nan  # hook replaced by the SAE's reconstruction
    ce_loss_zero_ablated: float = math.nan  # hook replaced by zeros
    ce_loss_recovered: float = math.nan  # (zero - reconstructed) / (zero - clean)

    def to_dict(self) -> dict:
        """Fields plus the flag, NaN as None (strict JSON has no NaN)."""
        fields = {key: None if isinstance(value, float) and math.isnan(value) else value for key, value in asdict(self).items()}
        return fields | {"flag": quality_flag(self)}


def quality_flag(quality: SAEQuality) -> str:
    """'ok', or the problems that make psi through this SAE doubtful, separated by '; '."""
    problems = []
    if not quality.variance_explained >= QUALITY_THRESHOLD:
        problems.append(f"low variance explained ({quality.variance_explained:.3f} < {QUALITY_THRESHOLD})")
    if not math.isnan(quality.ce_loss_recovered) and quality.ce_loss_recovered < MIN_CE_LOSS_RECOVERED:
        problems.append(f"low CE loss recovered ({quality.ce_loss_recovered:.3f} < {MIN_CE_LOSS_RECOVERED})")
    if quality.dead_fraction > MAX_DEAD_FRACTION:
        problems.append(f"mostly dead features ({quality.dead_fraction:.3f} > {MAX_DEAD_FRACTION})")
    return "; ".join(problems) or "ok"


def encodes_in_place(sae: SAE) -> bool:
    """True for a StandardSAE with nothing hooked to its encoder: its codes are
    relu(process_sae_in(x) @ W_enc + b_enc), which `encode` can compute into a given buffer."""
    return (
        type(sae) is StandardSAE
        and isinstance(sae.activation_fn, torch.nn.ReLU)
        and not (sae.hook_sae_acts_pre.fwd_hooks or sae.hook_sae_acts_post.fwd_hooks)
    )


def encode(sae: SAE, activations: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """sae.encode(activations); where `encodes_in_place(sae)` and `out` ([>= tokens, d_sae]) is given,
    the same codes written into `out` by one addmm and an in-place ReLU.

    SAE-Lens's encode allocates three [tokens, d_sae] tensors and passes over them twice after
    the matmul; at 32,768 features each is 127 MiB per 1,024 tokens, mapped and page-faulted
    afresh on every call (results/benchmarks/README.md).
    """
    if out is None or not encodes_in_place(sae):
        return sae.encode(activations)
    return torch.addmm(sae.b_enc, sae.process_sae_in(activations), sae.W_enc, out=out[: activations.shape[0]]).relu_()


# SAE classes whose decode is `feature_acts @ W_dec + b_dec` (then hooks and output norm),
# which a sparse CSR feature_acts goes through unchanged.
_MATMUL_DECODERS = {cls.decode for cls in (StandardSAE, TopKSAE, JumpReLUSAE, GatedSAE, TrainingSAE, TopKTrainingSAE)}


def decode(sae: SAE, codes: torch.Tensor) -> torch.Tensor:
    """sae.decode(codes), as a sparse matmul when `codes` is a CSR matrix and the SAE allows it.

    A sparse decode costs nonzeros x d_in multiply-adds instead of tokens x d_sae x d_in.
    Falls back to the dense decode where it cannot: other SAE classes, TopK's rescale by
    decoder norm, and half precision (torch has no CPU kernel for it; on GPUs it is untested
    here, so it is not risked).
    """
    sparse_ok = (
        type(sae).decode in _MATMUL_DECODERS
        and not getattr(sae.cfg, "rescale_acts_by_decoder_norm", False)
        and codes.dtype in (torch.float32, torch.float64)
    )
    if codes.layout != torch.strided and not sparse_ok:
        codes = codes.to_dense()
    return sae.decode(codes)


class ReconstructionStats:
    """Streaming variance explained, mean L0 and dead features of one SAE over batches of tokens.

    Variance explained uses SAE-Lens's `ExplainedVarianceCalculator` (float64 sums, no
    cancellation trouble with large residual-stream means).
    """

    def __init__(self, d_sae: int):
        self.variance = ExplainedVarianceCalculator()
        self.n_tokens = 0
        self.sum_l0 = 0.0
        self.fired = torch.zeros(d_sae, dtype=torch.bool)

    @torch.no_grad()
    def update(self, activations: torch.Tensor, codes: torch.Tensor, reconstruction: torch.Tensor) -> None:
        """activations, reconstruction: [tokens, d_in]; codes: [tokens, d_sae], dense or sparse."""
        if codes.shape[-1] != self.fired.numel():
            raise ValueError(f"codes have {codes.shape[-1]} features, these stats were made for {self.fired.numel()}")
        self.variance.add_batch(reconstruction, activations)
        codes = sparse_codes(codes)
        active = codes.values() != 0
        self.n_tokens += codes.shape[0]
        self.sum_l0 += active.sum().item()
        self.fired[codes.col_indices()[active].cpu()] = True

    def quality(self) -> SAEQuality:
        if self.n_tokens == 0:
            raise ValueError("no tokens were added; call update() with at least one batch first")
        return SAEQuality(
            variance_explained=self.variance.compute(),
            mean_l0=self.sum_l0 / self.n_tokens,
            dead_fraction=1.0 - self.fired.float().mean().item(),
            n_tokens=self.n_tokens,
        )


@torch.no_grad()
def evaluate_sae(
    model: HookedTransformer,
    sae: SAE,
    hook_name: str,
    tokens,
    batch_size: int = 8,
    progress: bool = False,
) -> SAEQuality:
    """Quality of `sae` at `hook_name` of `model` on `tokens` (data.TokenWindows or a LongTensor [n, context]).

    BOS and padding positions are left out of the statistics and left untouched when the
    reconstruction replaces the hook (as SAE-Lens's evals do); CE losses average over the
    positions whose next token is text. CE losses come from SAE-Lens's `get_recons_loss`; the
    rest from `ReconstructionStats`, since SAE-Lens's sparsity/variance eval needs its own
    ActivationsStore rather than a given token tensor.
    """
    token_ids, keep, special_ids = _tokens_and_mask(model, tokens)
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive number of windows, got {batch_size}")
    stats = ReconstructionStats(sae.cfg.d_sae)
    loss_sums = {"clean": 0.0, "reconstructed": 0.0, "zero_ablated": 0.0}
    n_predictions = 0
    stop_at_layer = extract_stop_at_layer_from_tlens_hook_name(hook_name)
    for start in tqdm(range(0, len(token_ids), batch_size), desc=f"evaluating SAE at {hook_name}", disable=not progress):
        batch = token_ids[start : start + batch_size].to(model.cfg.device)
        batch_keep = keep[start : start + batch_size].to(model.cfg.device)
        _, cache = model.run_with_cache(batch, names_filter=[hook_name], stop_at_layer=stop_at_layer)
        activations = cache[hook_name][batch_keep].to(sae.device)
        codes = sparse_codes(sae.encode(activations))
        stats.update(activations, codes, decode(sae, codes))

        losses = get_recons_loss(
            sae, model, ActivationScaler(), batch, compute_kl=False, compute_ce_loss=True,
            ignore_tokens=special_ids, hook_name=hook_name,
        )
        predicts_text = batch_keep[:, 1:].to(losses["ce_loss_without_sae"].device)
        for name, key in (("clean", "ce_loss_without_sae"), ("reconstructed", "ce_loss_with_sae"), ("zero_ablated", "ce_loss_with_ablation")):
            loss_sums[name] += losses[key][predicts_text].sum().item()
        n_predictions += int(predicts_text.sum())
    quality = stats.quality()
    if n_predictions:
        clean, reconstructed, zero = (loss_sums[name] / n_predictions for name in ("clean", "reconstructed", "zero_ablated"))
        quality.ce_loss_clean, quality.ce_loss_reconstructed, quality.ce_loss_zero_ablated = clean, reconstructed, zero
        quality.ce_loss_recovered = (zero - reconstructed) / (zero - clean) if zero != clean else math.nan
    return quality


def _tokens_and_mask(model: HookedTransformer, tokens) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Token ids [n, context], the mask of text positions, and the special token ids left alone."""
    if hasattr(tokens, "measured_mask"):  # data.TokenWindows
        special = [i for i in (tokens.bos_token_id, tokens.pad_token_id) if i is not None]
        return tokens.tokens, tokens.measured_mask, special
    tokens = torch.as_tensor(tokens)
    if tokens.ndim != 2 or tokens.dtype not in (torch.long, torch.int):
        raise ValueError(f"tokens must be TokenWindows or an integer tensor [n_windows, context], got {tokens.dtype} {tuple(tokens.shape)}")
    special = get_special_token_ids(model.tokenizer) if model.tokenizer is not None else []
    keep = ~torch.isin(tokens, torch.tensor(special, dtype=tokens.dtype)) if special else torch.ones_like(tokens, dtype=torch.bool)
    return tokens, keep, special


# --- training SAEs for a model (what `lm-superposition train-sae` runs) ------------------------

QUALITY_FILENAME = "quality.json"


def text_tokens_for_training(config: SAETrainingConfig, n_eval_windows: int, context_size: int) -> int:
    """The token budget of windows to give train_saes_for_model: one pass of training text,
    one batch of slack (a remainder under one batch is dropped), and the held-out windows."""
    return config.distinct_tokens + config.batch_size_tokens + n_eval_windows * context_size


def train_saes_for_model(
    model: HookedTransformer,
    hooks: Iterable,
    windows,
    config: SAETrainingConfig,
    out_dir: str | Path,
    batch_size: int = 8,
    n_eval_windows: int = 32,
    progress: bool = True,
) -> dict[str, Path]:
    """Train an SAE for each hook from one activation stream over `windows`, save and judge each.

    `hooks`: hook names or models.HookPoint. The last `n_eval_windows` windows (data.TokenWindows)
    are held out: each SAE is evaluated on them (`evaluate_sae`) and the result written next to
    it as quality.json (with its flag). Returns {hook_name: out_dir/<hook_name>}, each folder an
    SAE-Lens folder that `load_sae_from_disk` and `sae_lens.SAE.load_from_disk` open.
    """
    points = [hook if hasattr(hook, "width") else hook_point(model, hook) for hook in hooks]
    if not points:
        raise ValueError("no hooks given; see models.hook_catalogue(model) for the hooks of this model")
    if not 0 < n_eval_windows < len(windows):
        raise ValueError(f"n_eval_windows must be between 1 and len(windows) - 1 = {len(windows) - 1}, got {n_eval_windows}")
    if config.model_name is None:
        config = dataclasses.replace(config, model_name=model.cfg.model_name)
    train_windows, eval_windows = windows[: len(windows) - n_eval_windows], windows[len(windows) - n_eval_windows :]

    stream = stream_activations(model, train_windows, [p.name for p in points], batch_size=batch_size, progress=False)
    batches = (batch.activations for batch in stream)
    if config.epochs > 1:
        one_pass = list(batches)
        batches = (batch for _ in range(config.epochs) for batch in one_pass)
    saes = train_saes(batches, {p.name: p.width for p in points}, config, progress=progress)

    folders = {}
    for name, sae in saes.items():
        folder = save_sae(sae, Path(out_dir) / name)
        quality = evaluate_sae(model, sae, name, eval_windows, batch_size=batch_size, progress=progress)
        summary = {"hook_name": name, "training_tokens": sae.cfg.metadata.training_tokens, **quality.to_dict()}
        (folder / QUALITY_FILENAME).write_text(json.dumps(summary, indent=2) + "\n")
        folders[name] = folder
    return folders
