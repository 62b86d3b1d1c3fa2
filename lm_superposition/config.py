"""Every setting of a run, as dataclasses: one place for defaults, help text, types and ranges.

A TOML run config is four tables, one dataclass each; `RunConfig.from_toml` checks every key,
type and range and names the file, the key, the value and what is valid when one is wrong. The
command line is generated from the same fields (cli.py), so a default cannot differ between
the API, the TOML files and the CLI. Nothing here imports torch, SAE-Lens or a model.

    [run]      RunSettings         output folder, seeds, token budget, batching, checks
    [model]    ModelSettings       model names (several = a sweep), Pythia checkpoints, dtype
    [saes]     SAESettings         registry releases, folders, or [saes.train] (SAETrainSettings)
    [corpus]   CorpusSettings      text sources (several = a sweep)
    [gate]     gate.QualityGate    when a measured F counts as "ok"
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .gate import QualityGate
from .validation import check_positive_int

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

OFFLINE_DEFAULT_MODEL = "google/gemma-3-270m-it"
ARCHITECTURES = ("standard", "topk")
DTYPES = ("float32", "float64", "bfloat16", "float16")
BACKENDS = ("bridge", "hooked")  # models.BACKENDS, repeated: this module imports no torch
# "float32": each SAE's own precision; "bfloat16" and "float16" run the encode matmul at reduced
# precision (codes.LowPrecisionSAE); "float32_screened" gives float32's codes from a bfloat16
# screen (codes.ScreenedSAE; analyze.SCREENED_ENCODE). The budget is summed in float64 each way.
ENCODE_DTYPES = ("float32", "bfloat16", "float16", "float32_screened")


class ConfigError(ValueError):
    """A setting that is missing, of the wrong type or out of range; the message says which and what is valid."""


def option(default=dataclasses.MISSING, help: str = "", flag: str | None = None, **kwargs):
    """A dataclass field with the help text (and, if not --field-name, the flag) the CLI shows."""
    metadata = {"help": help} | ({"flag": flag} if flag else {})
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


def _check_finite_number(name: str, value, *, positive: bool) -> None:
    """A finite int or float, > 0 if `positive`, else >= 0."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and (value > 0 if positive else value >= 0)):
        raise ValueError(f"{name} must be a {'positive' if positive else 'non-negative'} number, got {value!r}")


def _check_non_negative_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


# What the toy validation validated (results/toy_validation/): the rest of SAETrainingConfig sets
# the budget (width, tokens, batch, lr), which each run must size and the quality gate judges.
VALIDATED_RECIPE = {
    "architecture": "standard",
    "l1_coefficient": 1.0,
    "normalize_activations": True,
    "decoder_init_norm": 0.1,
    "autocast": False,
}


@dataclass
class SAETrainingConfig:
    """How to train SAEs. `d_sae`, when given, overrides `expansion_factor` (d_sae = factor * d_in).

    The defaults are the recipe validated on toy models with a known number of features
    (experiments/toy_validation.py, results/toy_validation/): SAE-Lens's standard ReLU SAE with
    inputs scaled to mean norm sqrt(d_in), an L1 penalty of 1 on |z_i| * ||W_dec,i|| in those
    units, L1 warm-up over the first 5% of steps and a linear learning-rate decay over the last
    20%, b_dec started at the data mean and learned. lr=None scales the learning rate with the
    dictionary, 2e-4 * sqrt(16384 / d_sae) (3.6e-4 for 8 x 640 latents, 4e-3 for 40). TopK
    reconstructs better on short CPU budgets but fixes features per token instead of measuring
    it; on the toys it does not count the features (see the validation table).
    """

    architecture: str = option("standard", f"SAE architecture, one of {ARCHITECTURES}: ReLU + L1, or k active features")
    expansion_factor: int = option(8, "d_sae = expansion_factor x the hook's width (unless d_sae is given)")
    d_sae: int | None = option(None, "number of SAE features (overrides expansion_factor)")
    l1_coefficient: float = option(1.0, "L1 penalty on |z| * ||W_dec|| in normalised units (standard only)")
    k: int = option(32, "active features per token (topk only)")
    aux_loss_coefficient: float = option(
        1.0,
        "topk only: weight of SAE-Lens's auxiliary loss that trains dead latents on the residual "
        "(SAE-Lens's default 1; eai-sparsify's default is 0, none)",
    )
    decoder_init_norm: float = option(
        0.1,
        "norm of every decoder row at initialisation, the encoder starting as the decoder's transpose "
        "(SAE-Lens's default 0.1; eai-sparsify starts its decoder rows at norm 1)",
    )
    lr: float | None = option(None, "learning rate; left out: 2e-4 * sqrt(16384 / d_sae)")
    batch_size_tokens: int = option(4096, "tokens per SAE training step")
    training_tokens: int = option(2_000_000, "tokens of SAE training, repeats over epochs included")
    shuffle_buffer_batches: int = option(8, "tokens are shuffled within a buffer of this many batches")
    epochs: int = option(1, "passes over one stream of activations (> 1 keeps one pass in memory and replays it)")
    normalize_activations: bool = option(
        True, "scale inputs to mean norm sqrt(d_in) while training, folded back afterwards"
    )
    seed: int = option(0, "seed of the SAE's initialisation and shuffling")
    autocast: bool = option(
        False,
        "SAE training steps under bfloat16 autocast (SAE-Lens's: matmuls in bfloat16, weights and Adam in float32); "
        "off in the validated recipe",
    )
    autocast_lm: bool = option(
        False,
        "the model's forward passes under bfloat16 autocast (~3x faster on CPUs with AVX512-BF16 and on GPUs; "
        "activations off by ~2%% relative on Gemma 3 270M)",
    )
    device: str = option("cpu", "torch device to train on")
    model_name: str | None = option(None, "model name recorded in each SAE's metadata")

    def __post_init__(self) -> None:
        _check_choice("architecture", self.architecture, ARCHITECTURES)
        for name in (
            "expansion_factor",
            "k",
            "batch_size_tokens",
            "training_tokens",
            "shuffle_buffer_batches",
            "epochs",
        ):
            check_positive_int(name, getattr(self, name))
        if self.d_sae is not None:
            check_positive_int("d_sae", self.d_sae)
        if self.lr is not None:
            _check_finite_number("lr", self.lr, positive=True)
        _check_finite_number("decoder_init_norm", self.decoder_init_norm, positive=True)
        for name in ("l1_coefficient", "aux_loss_coefficient"):
            _check_finite_number(name, getattr(self, name), positive=False)

    def width_for(self, d_in: int) -> int:
        """Number of SAE features for an input of width d_in."""
        d_sae = self.d_sae if self.d_sae is not None else self.expansion_factor * d_in
        if self.architecture == "topk" and self.k > d_sae:
            raise ValueError(f"topk needs k <= d_sae, got k={self.k} and d_sae={d_sae}")
        return d_sae

    def recipe_verdict(self) -> str:
        """'validated' if these settings are the recipe experiments/toy_validation.py validated
        (the architecture, the L1 penalty and the input scaling; the budget may differ), else
        'not validated' and what differs."""
        differences = [
            f"{name} = {getattr(self, name)!r}"
            for name, validated in VALIDATED_RECIPE.items()
            if getattr(self, name) != validated
        ]
        return "validated" if not differences else "not validated (" + ", ".join(differences) + ")"

    def learning_rate(self, d_sae: int) -> float:
        """`lr`, or where it is left out the rate scaled to the dictionary: 2e-4 * sqrt(16384 / d_sae)
        (Anthropic's scaling of the learning rate with the number of latents)."""
        return self.lr if self.lr is not None else 2e-4 * math.sqrt(16384 / d_sae)

    @property
    def distinct_tokens(self) -> int:
        """Tokens of text needed: training_tokens spread over `epochs` passes."""
        return -(-self.training_tokens // self.epochs)

    @property
    def total_steps(self) -> int:
        return max(1, self.training_tokens // self.batch_size_tokens)


@dataclass
class RunSettings:
    output: str = option("runs/latest", "run folder")
    seeds: list[int] = option([0], "data seeds: each measures its own sample of the corpus")
    token_budget: int = option(20_000, "tokens measured per seed")
    batch_size: int = option(8, "windows per forward pass")
    context_size: int = option(128, "tokens per window")
    device: str = option("cpu", "torch device: cpu, cuda, cuda:N, mps")
    checkpoint_every: int = option(20, "batches between checkpoints of the accumulators")
    ce_windows: int = option(
        80, "windows for CE loss recovered, drawn from every seed (0 skips it; the gate asks for 10,000 tokens)"
    )
    additivity_pairs: int = option(0, "text-segment pairs for the linear-additivity column (0 skips it)")
    n_blocks: int = option(
        64, "document blocks the sums are kept in, for the bootstrap interval and the sample-size curve"
    )
    merge_duplicates: bool = option(
        True, "count latents whose decoder directions have cosine >= duplicate_cosine as one feature"
    )
    duplicate_cosine: float = option(0.9, "decoder cosine at which two latents are duplicates of one feature")
    target_relative_interval: float | None = option(
        None, "stop a seed early once every hook's 95%% interval of F is narrower than this fraction of F"
    )
    encode_dtype: str = option(
        "float32",
        f"precision of the SAE encode, one of {ENCODE_DTYPES}: bfloat16 runs it 2-4x faster on CPUs with "
        "AVX512-BF16 and on GPUs, F changing in its last digits (results/benchmarks/); float32_screened "
        "gives float32's codes, finding the active latents with a bfloat16 screen; sums stay float64",
    )

    def __post_init__(self) -> None:
        _check_choice("encode_dtype", self.encode_dtype, ENCODE_DTYPES)
        if not self.output.strip():
            raise ValueError(f"output must name a folder, got {self.output!r}")
        if not self.seeds:
            raise ValueError("seeds = [] must hold at least one seed, e.g. seeds = [0]")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, got {self.seeds}")
        for seed in self.seeds:
            _check_non_negative_int("every seed", seed)
        for name in ("token_budget", "batch_size", "context_size", "checkpoint_every", "n_blocks"):
            check_positive_int(name, getattr(self, name))
        for name in ("ce_windows", "additivity_pairs"):
            _check_non_negative_int(name, getattr(self, name))
        if self.context_size < 2:
            raise ValueError(f"context_size must be at least 2 (a BOS and one token of text), got {self.context_size}")
        if self.target_relative_interval is not None and not 0 < self.target_relative_interval:
            raise ValueError(
                f"target_relative_interval must be a positive fraction or absent, got {self.target_relative_interval!r}"
            )
        if not (isinstance(self.duplicate_cosine, (int, float)) and 0 < self.duplicate_cosine <= 1):
            raise ValueError(f"duplicate_cosine must lie in (0, 1], got {self.duplicate_cosine!r}")
        if not (self.device in ("cpu", "cuda", "mps") or self.device.startswith("cuda:")):
            raise ValueError(f"device must be cpu, cuda, cuda:N or mps, got {self.device!r}")


@dataclass
class ModelSettings:
    names: list[str] = option(
        [OFFLINE_DEFAULT_MODEL], "TransformerLens model names or local HF folders (several = a sweep)", flag="--model"
    )
    checkpoints: list[int] = option([], "Pythia training steps; empty: the final weights", flag="--checkpoint")
    dtype: str = option("float32", f"model dtype, one of {DTYPES}")
    backend: str = option(
        "bridge",
        f"TransformerLens backend, one of {BACKENDS}: TransformerBridge over the HF model, "
        "or HookedTransformer (deprecated in TL 3)",
    )

    def __post_init__(self) -> None:
        _check_choice("backend", self.backend, BACKENDS)
        if not self.names:
            raise ValueError("names must hold at least one model name")
        for step in self.checkpoints:
            _check_non_negative_int("every checkpoint", step)
        _check_choice("dtype", self.dtype, DTYPES)


@dataclass
class SAETrainSettings(SAETrainingConfig):
    """[saes.train]: the hooks to train SAEs for, and any SAETrainingConfig field."""

    hooks: list[str] = option([], "hook names to train an SAE for (see `lm-superposition hooks`)")
    sae_seeds: list[int] = option(
        [0], "train one SAE per hook for each of these seeds (several: the interval covers SAE variance)"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.hooks:
            raise ValueError("hooks must name at least one hook (see `lm-superposition hooks --model NAME`)")
        if not self.sae_seeds or len(set(self.sae_seeds)) != len(self.sae_seeds):
            raise ValueError(f"sae_seeds must be one or more distinct seeds, got {self.sae_seeds}")

    def training_config(self) -> SAETrainingConfig:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(SAETrainingConfig)}
        return SAETrainingConfig(**fields)


@dataclass
class SAESettings:
    releases: list[str] = option([], "SAE-Lens registry releases, all of each one's SAEs", flag="--release")
    folders: list[str] = option([], "SAE-Lens folders on disk", flag="--sae-folder")
    train: SAETrainSettings | None = option(None, "train SAEs on the spot ([saes.train] table)")
    allow_hook_mismatch: bool = option(False, "use an SAE on a hook other than the one it was trained on")


@dataclass
class CorpusSettings:
    sources: list[str] = option(
        ["offline"],
        "HF dataset names, local .txt/.jsonl/.parquet paths, or 'offline' (several = a sweep)",
        flag="--dataset",
    )
    config: str | None = option(None, "HF dataset config", flag="--dataset-config")
    split: str = option("train", "HF dataset split")
    text_column: str = option("text", "column holding the text")

    def __post_init__(self) -> None:
        if not self.sources:
            raise ValueError("sources must hold at least one text source, e.g. ['offline']")


@dataclass
class RunConfig:
    run: RunSettings = field(default_factory=RunSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    saes: SAESettings = field(default_factory=SAESettings)
    corpus: CorpusSettings = field(default_factory=CorpusSettings)
    gate: QualityGate = field(default_factory=QualityGate)

    def __post_init__(self) -> None:
        if not (self.saes.releases or self.saes.folders or self.saes.train):
            raise ConfigError(
                "the config names no SAEs: give [saes] releases = [...], folders = [...], or a [saes.train] table"
            )

    @classmethod
    def from_toml(cls, path: str | Path) -> RunConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            with path.open("rb") as f:
                raw = tomllib.load(f)
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: not valid TOML: {err}") from None
        try:
            return cls.from_dict(raw)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None

    @classmethod
    def from_dict(cls, raw: dict) -> RunConfig:
        return _build(cls, raw, "")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self) -> dict:
        """The settings that change results: everything but where the run is written and how
        often it checkpoints (those may change on --resume)."""
        settings = self.to_dict()
        for key in RESUMABLE_CHANGES:
            settings["run"].pop(key)
        return settings


# [run] keys a resumed run may change: they do not change any number it produces.
RESUMABLE_CHANGES = ("output", "checkpoint_every")


def setting_default(path: str, kind: type | None = None):
    """The default of the setting at a dotted fingerprint `path` (e.g. "saes.train.k"), or
    dataclasses.MISSING where the path names no setting or the setting has no default."""
    kind = kind or RunConfig
    head, _, rest = path.partition(".")
    found = {f.name: f for f in dataclasses.fields(kind)}.get(head)
    if found is None:
        return dataclasses.MISSING
    if rest:
        nested = _nested_dataclass(typing.get_type_hints(kind)[head])
        return setting_default(rest, nested) if nested else dataclasses.MISSING
    if found.default_factory is not dataclasses.MISSING:
        return found.default_factory()
    return found.default


def fingerprint_digest(fingerprint: dict) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def _build(kind, raw, where: str):
    """A dataclass from a TOML table: unknown keys, wrong types and values out of range are a
    ConfigError naming the table, the key, the value and what is valid."""
    place = f"[{where}]" if where else "the top level"
    if not isinstance(raw, dict):
        raise ConfigError(f"{place} must be a table, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(kind)}
    hints = typing.get_type_hints(kind)
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} in {place}; valid keys: {', '.join(fields)}")
    values = {}
    for name, value in raw.items():
        hint = hints[name]
        nested = _nested_dataclass(hint)
        if nested and not (value is None and _matches(None, hint)):
            values[name] = _build(nested, value, f"{where}.{name}".strip("."))
        else:
            values[name] = _typed(value, hint, place, name, fields[name].metadata.get("help", ""))
    try:
        return kind(**values)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{place} {err}") from None


def _nested_dataclass(hint):
    """The dataclass a field's type hint names (a table of its own, maybe optional), or None."""
    return next((t for t in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(t)), None)


def _typed(value, hint, place: str, name: str, help: str = ""):
    """`value` if it has the type `hint` (ints are accepted for floats), else a ConfigError
    naming the key, the value, the type it needs, what it is for and, where one is evident,
    the value meant (`token_budget = 1000` for "1000", `seeds = [0]` for 0)."""
    if _matches(value, hint):
        return float(value) if hint is float else value
    about = f" ({help.replace('%%', '%')})" if help else ""
    meant = _meant(value, hint)
    hint_text = f"; did you mean {name} = {meant}?" if meant is not None else ""
    raise ConfigError(f"{place} {name} = {value!r} must be {_describe(hint)}{about}{hint_text}")


def _meant(value, hint) -> str | None:
    """The TOML text `value` was probably meant as for type `hint`, or None."""
    args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        hint = args[0]
    if typing.get_origin(hint) is list:
        item = typing.get_args(hint)[0]
        inner = value if _matches(value, item) else _coerced(value, item)
        return None if inner is None else f"[{json.dumps(inner)}]"
    coerced = _coerced(value, hint)
    return None if coerced is None else json.dumps(coerced)


def _coerced(value, hint):
    """A string holding a number or a boolean, as that number or boolean; else None."""
    if not isinstance(value, str):
        return None
    text = value.strip()
    if hint is bool and text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        if hint is kind:
            try:
                return kind(text)
            except ValueError:
                return None
    return None


def _matches(value, hint) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if origin is list:
        return isinstance(value, list) and all(_matches(item, args[0]) for item in value)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in args if arg is not type(None)) + " (or left out)"
    if origin is list:
        return "a list of " + {int: "integers", float: "numbers", str: "strings", bool: "true/false values"}.get(
            args[0], str(args[0])
        )
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(hint, str(hint))


def demo_config(
    output: str | None = None, token_budget: int | None = None, training_tokens: int | None = None
) -> RunConfig:
    """The demo's run: the packaged lm_superposition/configs/demo.toml, with only these overrides."""
    config = RunConfig.from_toml(resources.files("lm_superposition") / "configs" / "demo.toml")
    if output is not None:
        config.run.output = output
    if token_budget is not None:
        config.run.token_budget = token_budget
    if training_tokens is not None:
        config.saes.train.training_tokens = training_tokens
    return RunConfig.from_dict(config.to_dict())  # checked again with the overrides
