"""Scripted probing runs: a TOML config in, a run folder out.

    [run]      output, seeds, token_budget, batch_size, context_size, device, ...
    [model]    names (TransformerLens names, local folders or the offline default), checkpoints
    [saes]     releases (SAE-Lens registry), folders (SAE-Lens folders on disk), or [saes.train]
    [corpus]   sources (HF dataset names, local paths, "offline"), config, split, text_column

Every combination of model x checkpoint x corpus is one sweep item; each is measured for
every seed and all rows go into one table. The run folder holds:

    manifest.json            config, package versions, git commit, device, timings
    layerwise.csv / .json    one row per sweep item x hook x seed
    convergence.csv          F at log-spaced token counts
    compression_curve.png/svg, convergence.png/svg
    checkpoints/             accumulator state per sweep item and seed (resume)
    saes/                    SAEs trained on the spot, if any

A run killed at any point resumes from its last checkpoint (`resume=True`): the windows a
checkpoint already covers are skipped, so no token is lost or counted twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import math
import platform
import shutil
import subprocess
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from . import report
from .analyze import LayerwiseAnalyzer, SeedMeasurement, convergence_table, world_size_and_rank
from .data import load_texts, token_windows
from .dictionaries import QUALITY_FILENAME, SAETrainingConfig, load_release, load_sae_from_disk, text_tokens_for_training, train_saes_for_model
from .models import OFFLINE_DEFAULT_MODEL, load_model

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


@dataclass
class RunSettings:
    output: str = "runs/latest"
    seeds: list[int] = field(default_factory=lambda: [0])
    token_budget: int = 20_000
    batch_size: int = 8
    context_size: int = 128
    device: str = "cpu"
    checkpoint_every: int = 20
    ce_windows: int = 4
    additivity_pairs: int = 0  # segment pairs for the linear-additivity column; 0 skips it
    n_blocks: int = 64
    target_relative_interval: float | None = None


@dataclass
class ModelSettings:
    names: list[str] = field(default_factory=lambda: [OFFLINE_DEFAULT_MODEL])
    # Pythia training checkpoints (steps); empty means the final weights.
    checkpoints: list[int] = field(default_factory=list)
    dtype: str = "float32"


@dataclass
class SAETrainSettings(SAETrainingConfig):
    """[saes.train]: the hooks to train SAEs for, and any SAETrainingConfig field."""

    hooks: list[str] = field(default_factory=list)


@dataclass
class SAESettings:
    releases: list[str] = field(default_factory=list)
    folders: list[str] = field(default_factory=list)
    train: SAETrainSettings | None = None
    # Use an SAE on a hook other than the one it was trained on (normally an error).
    allow_hook_mismatch: bool = False


@dataclass
class CorpusSettings:
    sources: list[str] = field(default_factory=lambda: ["offline"])
    config: str | None = None
    split: str = "train"
    text_column: str = "text"


@dataclass
class RunConfig:
    run: RunSettings = field(default_factory=RunSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    saes: SAESettings = field(default_factory=SAESettings)
    corpus: CorpusSettings = field(default_factory=CorpusSettings)

    @classmethod
    def from_toml(cls, path: str | Path) -> "RunConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        with path.open("rb") as f:
            return cls.from_dict(tomllib.load(f))

    @classmethod
    def from_dict(cls, raw: dict) -> "RunConfig":
        return _build(cls, raw, "")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _build(kind, raw: dict, where: str):
    """A dataclass from a TOML table; an unknown key names itself and lists the valid ones."""
    if not isinstance(raw, dict):
        raise ValueError(f"config [{where}] must be a table, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(kind)}
    types = typing.get_type_hints(kind)
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        place = f"[{where}]" if where else "the top level"
        raise ValueError(f"unknown config key {unknown[0]!r} in {place}; valid keys: {', '.join(fields)}")
    values = {}
    for name, value in raw.items():
        nested = next((t for t in (types[name], *typing.get_args(types[name])) if dataclasses.is_dataclass(t)), None)
        values[name] = _build(nested, value, f"{where}.{name}".strip(".")) if nested else value
    return kind(**values)


@dataclass(frozen=True)
class SweepItem:
    model: str
    checkpoint: int | None
    corpus: str

    @property
    def slug(self) -> str:
        name = Path(self.model).name.replace("/", "_")
        step = f"-step{self.checkpoint}" if self.checkpoint is not None else ""
        return f"{name}{step}__{Path(self.corpus).name.replace('/', '_')}"


def sweep_items(config: RunConfig) -> list[SweepItem]:
    checkpoints = config.model.checkpoints or [None]
    return [SweepItem(m, c, s) for m in config.model.names for c in checkpoints for s in config.corpus.sources]


def prepare_output(output: Path, resume: bool, overwrite: bool) -> None:
    if output.exists() and any(output.iterdir()):
        if overwrite:
            shutil.rmtree(output)
        elif not resume:
            raise FileExistsError(f"output folder {output} already exists; pass --resume to continue that run or --overwrite to replace it")
    output.mkdir(parents=True, exist_ok=True)


def run(config: RunConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True) -> pd.DataFrame:
    """Carry out a probing run; returns the combined table (also written to the run folder).

    Under torchrun every process runs this; windows are shared out (see
    LayerwiseAnalyzer.run_seed), and only rank 0 trains SAEs and writes the folder's files.
    """
    output = Path(config.run.output)
    if _rank() == 0:
        prepare_output(output, resume, overwrite)
    _barrier()
    started = time.time()
    manifest = _manifest(config)
    tables, convergences = [], []
    for item in sweep_items(config):
        item_started = time.time()
        table, convergence = _run_item(config, item, output, progress)
        tables.append(table)
        convergences.append(convergence)
        manifest["timings_s"][item.slug] = round(time.time() - item_started, 1)
    combined = pd.concat(tables, ignore_index=True)
    if _rank() != 0:
        return combined
    report.write_tables(combined, output, "layerwise")
    convergence = pd.concat(convergences, ignore_index=True)
    convergence.to_csv(output / "convergence.csv", index=False)
    report.plot_compression_curve(combined, output / "compression_curve")
    report.plot_convergence(convergence, output / "convergence")
    manifest["timings_s"]["total"] = round(time.time() - started, 1)
    (output / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return combined


def _run_item(config: RunConfig, item: SweepItem, output: Path, progress: bool):
    settings = config.run
    model = load_model(item.model, device=settings.device, dtype=getattr(torch, config.model.dtype), checkpoint=item.checkpoint)
    texts_for = lambda seed: load_texts(  # noqa: E731
        item.corpus, config=config.corpus.config, split=config.corpus.split, text_column=config.corpus.text_column, seed=seed
    )
    saes, sae_names, known_ce = _saes_for(config, item, model, texts_for, output, progress)
    analyzer = LayerwiseAnalyzer(
        model, saes, model_name=item.model, batch_size=settings.batch_size, n_blocks=settings.n_blocks,
        allow_hook_mismatch=config.saes.allow_hook_mismatch,
    )
    states = []
    for seed in settings.seeds:
        # Each seed reads its own shuffle of the corpus, exactly token_budget tokens of it.
        windows = token_windows(texts_for(seed), model.tokenizer, context_size=settings.context_size, token_budget=settings.token_budget, seed=seed)
        world_size, rank = world_size_and_rank()
        shard = f"__rank{rank}" if world_size > 1 else ""
        path = output / "checkpoints" / f"{item.slug}__seed{seed}{shard}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        state = SeedMeasurement.load(path) if path.exists() else None
        states.append(
            analyzer.run_seed(
                windows, seed, settings.token_budget, resume_from=state, checkpoint=lambda s, p=path: s.save(p),
                checkpoint_every=settings.checkpoint_every, target_relative_interval=settings.target_relative_interval,
                progress=progress,
            )
        )
    ce = dict(known_ce)
    if settings.ce_windows:
        ce |= analyzer.ce_recovered(windows[: settings.ce_windows], [hook for hook in saes if hook not in known_ce])
    additivity = analyzer.additivity(windows, settings.additivity_pairs) if settings.additivity_pairs else None
    table = analyzer.table(states, ce_recovered=ce, sae_names=sae_names, additivity=additivity)
    table.insert(1, "checkpoint", item.checkpoint)
    table.insert(2, "corpus", item.corpus)
    convergence = convergence_table(states)
    convergence.insert(0, "model", item.model)
    convergence.insert(1, "corpus", item.corpus)
    return table, convergence


def _saes_for(config: RunConfig, item: SweepItem, model, texts_for, output: Path, progress: bool):
    """{hook: SAE}, {hook: where it came from} and {hook: CE loss recovered already measured},
    from releases, folders or training on the spot (whose held-out evaluation gives the CE)."""
    saes, names, known_ce = {}, {}, {}
    for release in config.saes.releases:
        for hook, sae in load_release(release, device=config.run.device).items():
            saes[hook], names[hook] = sae, release
    for folder in config.saes.folders:
        sae = load_sae_from_disk(folder, device=config.run.device)
        saes[sae.cfg.metadata.hook_name], names[sae.cfg.metadata.hook_name] = sae, str(folder)
    if config.saes.train is not None:
        if _rank() == 0:
            _train_or_reuse(config, item, model, texts_for, output, progress)
        _barrier()
        trained = {hook: output / "saes" / item.slug / hook for hook in config.saes.train.hooks}
        for hook, folder in trained.items():
            saes[hook], names[hook] = load_sae_from_disk(folder, device=config.run.device), f"trained: {folder}"
            ce = json.loads((folder / QUALITY_FILENAME).read_text())["ce_loss_recovered"]
            known_ce[hook] = math.nan if ce is None else ce
    if not saes:
        raise ValueError("the config names no SAEs: give [saes] releases, folders, or a [saes.train] table")
    return saes, names, known_ce


def _train_or_reuse(config, item, model, texts_for, output: Path, progress: bool) -> dict[str, Path]:
    """Train SAEs for the item's hooks once; a resumed run reuses the ones already saved,
    so its accumulators keep reading through the same dictionaries."""
    train = config.saes.train
    if not train.hooks:
        raise ValueError("[saes.train] needs hooks = [...] (see `lm-superposition hooks --model NAME`)")
    folder = output / "saes" / item.slug
    done = {hook: folder / hook for hook in train.hooks if (folder / hook / "cfg.json").exists()}
    if len(done) == len(train.hooks):
        return done
    # Training text comes from a seed no measurement uses, so SAEs are not scored on their
    # training tokens; a few windows more are held out to judge them.
    training_seed = max(config.run.seeds) + 1000
    eval_windows = max(1, config.run.ce_windows)
    budget = text_tokens_for_training(train, eval_windows, config.run.context_size)
    windows = token_windows(texts_for(training_seed), model.tokenizer, context_size=config.run.context_size, token_budget=budget, seed=training_seed)
    sae_config = dataclasses.replace(train, device=config.run.device, model_name=item.model)
    return train_saes_for_model(
        model, train.hooks, windows, sae_config, folder, batch_size=config.run.batch_size, n_eval_windows=eval_windows, progress=progress
    )


def _rank() -> int:
    return world_size_and_rank()[1]


def _barrier() -> None:
    if world_size_and_rank()[0] > 1:
        torch.distributed.barrier()


def _manifest(config: RunConfig) -> dict:
    versions = {}
    for package in ("lm-superposition", "torch", "transformer-lens", "sae-lens", "transformers", "datasets", "numpy", "pandas"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "config": config.to_dict(),
        "versions": versions,
        "python": platform.python_version(),
        "git_commit": _git_commit(),
        "device": config.run.device,
        "device_name": torch.cuda.get_device_name() if config.run.device.startswith("cuda") else platform.processor() or platform.machine(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "timings_s": {},
    }


def _git_commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


# The demo: Gemma 3 270M (18 layers, d_model 640) on the offline corpus, with TopK SAEs
# trained on the spot for the embedding and the attention, MLP and residual outputs of three
# layers, sized to finish within 10 minutes on 2 CPU cores. TopK because on a CPU budget of
# tens of thousands of tokens it reaches variance explained 0.8-0.95 where L1 SAEs do not
# (results/gemma3_270m_saes/). experiments/gemma3_270m_offline.toml is the same run as a file.
DEMO_LAYERS = (3, 9, 15)


def demo_config(output: str = "runs/demo", token_budget: int | None = None, training_tokens: int | None = None) -> RunConfig:
    hooks = ["blocks.0.hook_resid_pre"] + [
        f"blocks.{layer}.hook_{kind}" for layer in DEMO_LAYERS for kind in ("attn_out", "mlp_out", "resid_post")
    ]
    return RunConfig(
        run=RunSettings(output=output, seeds=[0, 1], token_budget=token_budget or 4_000, batch_size=8, context_size=128, ce_windows=1,
                        additivity_pairs=8),
        model=ModelSettings(names=[OFFLINE_DEFAULT_MODEL]),
        saes=SAESettings(
            train=SAETrainSettings(
                hooks=hooks, architecture="topk", k=32, expansion_factor=2, lr=2e-3, batch_size_tokens=256,
                training_tokens=training_tokens or 36_000, epochs=3,
            )
        ),
        corpus=CorpusSettings(sources=["offline"]),
    )


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
