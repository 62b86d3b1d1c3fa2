"""Scripted probing runs: a checked config in, a run folder out, never lost and never mixed.

Every combination of model x checkpoint x corpus in the config is one sweep item; each is
measured for every seed (`LayerwiseAnalyzer.measure`, the pipeline `measure_layers` runs too)
and all rows go into one table. The run folder holds:

    manifest.json            config, its fingerprint, package versions, git commit, device, timings
    layerwise.csv / .json    one row per sweep item x hook x seed
    convergence.csv          F against tokens seen (the sample-size curves)
    compression_curve.png/svg, convergence.png/svg
    checkpoints/             accumulator state per sweep item and seed (resume)
    saes/                    SAEs trained on the spot, if any

The order is: check the whole config (config.py) and the corpus sources, then touch the disk,
then load models. `--overwrite` deletes only a folder this tool made and `--resume` continues
only a run whose fingerprint (everything that changes results) matches (run_folder.py); every
file is written atomically (atomic.py); SIGINT/SIGTERM finish the batch, save the checkpoint
and stop.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import importlib.metadata
import json
import math
import platform
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from . import atomic, report
from .analyze import LayerwiseAnalyzer, MeasurementStopped
from .config import ConfigError, RunConfig
from .data import check_text_source, load_texts, token_windows
from .distributed import barrier, world_size_and_rank
from .models import hook_point, load_model
from .run_folder import MANIFEST, prepare_output
from .saes.loading import load_release, load_sae_from_disk
from .saes.training import QUALITY_FILENAME, text_tokens_for_training, train_saes_for_model, trained_sae_folder

# Packages whose version is part of a run's fingerprint: a new version may change the numbers.
FINGERPRINT_PACKAGES = ("lm-superposition", "torch", "transformer-lens", "sae-lens", "transformers")


class RunInterrupted(KeyboardInterrupt):
    """The run was stopped by SIGINT or SIGTERM (after saving its checkpoint, if it was measuring).

    A KeyboardInterrupt, so that no `except Exception` on the way out swallows it. `resumable`
    is True when the run folder holds the run (`--resume` continues it), False when the run
    stopped before writing anything and left the disk as it found it (run it again as it was).
    """

    resumable = True


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


def run(config: RunConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True) -> pd.DataFrame:
    """Carry out a probing run; returns the combined table (also written to the run folder).

    Order: check the config and every corpus source, then prepare the folder, then load models.
    A run that fails or is interrupted before writing anything but its manifest leaves the disk
    as it found it (a folder it created is removed, a run that --overwrite moved aside is put
    back). Raises RunInterrupted (after saving the checkpoint) on SIGINT or SIGTERM.

    Under torchrun every process runs this; windows are shared out (see
    LayerwiseAnalyzer.run_seed), and only rank 0 trains SAEs and writes the folder's files.
    """
    config = RunConfig.from_dict(config.to_dict())  # a config built in code is checked like a file
    output = Path(config.run.output).expanduser()
    prepared = None
    with _interrupts() as interrupts:
        try:
            for source in config.corpus.sources:
                _check_source(source, config)
            manifest = _manifest(config)
            if _rank() == 0:
                prepared = prepare_output(output, manifest, resume=resume, overwrite=overwrite)
                atomic.write_text(output / MANIFEST, json.dumps(manifest, indent=1))
            barrier()
            table = _run_sweep(config, output, manifest, progress, interrupts)
        except (
            Exception,
            KeyboardInterrupt,
        ) as error:  # not a kill: that runs no code, and resume handles what it leaves
            undone = prepared.settle(finished=False) if prepared is not None else True  # None: the disk was not touched
            if isinstance(error, RunInterrupted):
                error.resumable = not undone
            raise
        if prepared is not None:
            prepared.settle(finished=True)
        return table


def _check_source(source: str, config: RunConfig) -> None:
    """check_text_source, its error naming the config key."""
    corpus = config.corpus
    try:
        check_text_source(source, config=corpus.config, split=corpus.split, text_column=corpus.text_column)
    except (OSError, ValueError, TypeError) as error:
        message = f"[corpus] sources: {error}"
        try:
            renamed = type(error)(message)
        except Exception:  # an exception type that takes other arguments
            renamed = ConfigError(message)
        raise renamed from error


def _run_sweep(
    config: RunConfig, output: Path, manifest: dict, progress: bool, interrupts: _Interrupts
) -> pd.DataFrame:
    started = time.time()
    tables, convergences = [], []
    for item in sweep_items(config):
        item_started = time.time()
        table, convergence = _run_item(config, item, output, progress, interrupts)
        tables.append(table)
        convergences.append(convergence)
        manifest["timings_s"][item.slug] = round(time.time() - item_started, 1)
    combined = pd.concat(tables, ignore_index=True)
    if _rank() != 0:
        return combined
    report.write_tables(combined, output, "layerwise")
    convergence = pd.concat(convergences, ignore_index=True)
    with atomic.atomic_file(output / "convergence.csv") as path:
        convergence.to_csv(path, index=False)
    report.plot_compression_curve(combined, output / "compression_curve")
    report.plot_convergence(convergence, output / "convergence")
    manifest["timings_s"]["total"] = round(time.time() - started, 1)
    atomic.write_text(output / MANIFEST, json.dumps(manifest, indent=1))
    return combined


# ---------------------------------------------------------------- interrupts


class _Interrupts:
    """SIGINT/SIGTERM during a run. Inside `deferred()` (the measurement's batch loop, which
    calls `requested` after every batch and then saves its checkpoint and stops) a signal only
    sets a flag; anywhere else (model loading, SAE training), or a second signal, stops at once."""

    def __init__(self):
        self.received: str | None = None
        self.deferring = False

    def handle(self, signum, frame) -> None:
        first = self.received is None
        self.received = signal.Signals(signum).name
        if not (self.deferring and first):
            raise RunInterrupted(f"stopped by {self.received}")

    def requested(self) -> bool:
        return self.received is not None

    @contextlib.contextmanager
    def deferred(self):
        self.deferring = True
        try:
            yield
        except MeasurementStopped:
            raise RunInterrupted(f"stopped by {self.received}; the checkpoint was saved") from None
        finally:
            self.deferring = False
        if self.received:
            raise RunInterrupted(f"stopped by {self.received}")


@contextlib.contextmanager
def _interrupts():
    interrupts = _Interrupts()
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield interrupts
        return
    previous = {sig: signal.signal(sig, interrupts.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield interrupts
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------- one sweep item


def _run_item(config: RunConfig, item: SweepItem, output: Path, progress: bool, interrupts: _Interrupts):
    settings = config.run
    model = load_model(
        item.model,
        device=settings.device,
        dtype=getattr(torch, config.model.dtype),
        checkpoint=item.checkpoint,
        backend=config.model.backend,
    )
    _check_hooks(config, model)
    texts_for = _texts_for(config, item.corpus)
    saes, sae_names, known_ce = _saes_for(config, item, model, texts_for, output, progress)
    analyzer = LayerwiseAnalyzer(
        model,
        saes,
        model_name=item.model,
        batch_size=settings.batch_size,
        n_blocks=settings.n_blocks,
        allow_hook_mismatch=config.saes.allow_hook_mismatch,
        merge_duplicates=settings.merge_duplicates,
        duplicate_cosine=settings.duplicate_cosine,
        encode_dtype=settings.encode_dtype,
        gate=config.gate,
    )
    # Each seed reads its own shuffle of the corpus, exactly token_budget tokens of it.
    with interrupts.deferred():
        table = analyzer.measure(
            lambda seed: token_windows(
                texts_for(seed),
                model.tokenizer,
                context_size=settings.context_size,
                token_budget=settings.token_budget,
                seed=seed,
            ),
            seeds=settings.seeds,
            token_budget=settings.token_budget,
            ce_windows=settings.ce_windows,
            additivity_pairs=settings.additivity_pairs,
            target_relative_interval=settings.target_relative_interval,
            checkpoint_dir=output / "checkpoints",
            checkpoint_name=item.slug,
            checkpoint_every=settings.checkpoint_every,
            known_ce=known_ce,
            sae_names=sae_names,
            progress=progress,
            stop=interrupts.requested,
        )
    table.insert(1, "checkpoint", item.checkpoint)
    table.insert(2, "corpus", item.corpus)
    table.insert(table.columns.get_loc("sae") + 1, "recipe", table["hook"].map(_recipes(config)))
    convergence = table.attrs.pop("convergence")
    convergence.insert(0, "model", item.model)
    convergence.insert(1, "corpus", item.corpus)
    return table, convergence


def _texts_for(config: RunConfig, source: str):
    """seed -> that seed's shuffle of the documents of `source`, read with the [corpus] settings."""
    corpus = config.corpus

    def texts_for(seed: int):
        return load_texts(source, config=corpus.config, split=corpus.split, text_column=corpus.text_column, seed=seed)

    return texts_for


def _recipes(config: RunConfig) -> dict[str, str]:
    """{hook: whether the SAEs reading it were made with the recipe validated on the toys}."""
    recipes = collections.defaultdict(lambda: "not validated (loaded: its recipe was not run on the toy validation)")
    for hook in config.saes.train.hooks if config.saes.train is not None else []:
        recipes[hook] = config.saes.train.recipe_verdict()
    return recipes


def _check_hooks(config: RunConfig, model) -> None:
    """The hooks to train SAEs for, against the model's catalogue, before any text is read."""
    for hook in config.saes.train.hooks if config.saes.train is not None else []:
        try:
            hook_point(model, hook)
        except ValueError as error:
            raise ConfigError(f"[saes.train] hooks: {error}") from None


def _saes_for(config: RunConfig, item: SweepItem, model, texts_for, output: Path, progress: bool):
    """{hook: SAE or {sae_seed: SAE}}, {slot: where it came from} and {slot: (CE loss recovered,
    tokens)} already measured, from releases, folders or training on the spot (whose held-out
    evaluation gives the CE)."""
    saes, names, known_ce = {}, {}, {}
    for release in config.saes.releases:
        for hook, sae in load_release(release, device=config.run.device).items():
            saes[hook], names[hook] = sae, release
    for folder in config.saes.folders:
        sae = load_sae_from_disk(folder, device=config.run.device)
        saes[sae.cfg.metadata.hook_name], names[sae.cfg.metadata.hook_name] = sae, str(folder)
    if config.saes.train is not None:
        if _rank() == 0:
            _train_or_reuse(config, model, texts_for, output / "saes" / item.slug, item.model, progress)
        barrier()
        train = config.saes.train
        several = len(train.sae_seeds) > 1
        for hook in train.hooks:
            for seed in train.sae_seeds:
                folder = trained_sae_folder(output / "saes" / item.slug, hook, seed if several else None)
                sae = load_sae_from_disk(folder, device=config.run.device)
                key = f"{hook}#{seed}" if several else hook
                if several:
                    saes.setdefault(hook, {})[seed] = sae
                else:
                    saes[hook] = sae
                names[key] = f"trained: {folder}"
                quality = json.loads((folder / QUALITY_FILENAME).read_text())
                ce = quality["ce_loss_recovered"]
                known_ce[key] = (math.nan if ce is None else ce, quality["n_tokens"])
    return saes, names, known_ce


def _train_or_reuse(config: RunConfig, model, texts_for, folder: Path, model_name: str, progress: bool) -> None:
    """Train SAEs for the item's hooks once; a resumed run reuses the ones already saved,
    so its accumulators keep reading through the same dictionaries. An SAE counts as saved
    only with its quality.json, written last inside a folder that appears whole (atomic.py)."""
    train = config.saes.train
    several = len(train.sae_seeds) > 1
    folders = [
        trained_sae_folder(folder, hook, seed if several else None) for hook in train.hooks for seed in train.sae_seeds
    ]
    if all((sae_folder / QUALITY_FILENAME).is_file() for sae_folder in folders):
        return
    # Training text comes from a seed no measurement uses, so SAEs are not scored on their
    # training tokens; a few windows more are held out to judge them.
    training_seed = max(config.run.seeds) + 1000
    eval_windows = max(1, config.run.ce_windows)
    budget = text_tokens_for_training(train, eval_windows, config.run.context_size)
    windows = token_windows(
        texts_for(training_seed),
        model.tokenizer,
        context_size=config.run.context_size,
        token_budget=budget,
        seed=training_seed,
    )
    sae_config = dataclasses.replace(train.training_config(), device=config.run.device, model_name=model_name)
    train_saes_for_model(
        model,
        train.hooks,
        windows,
        sae_config,
        folder,
        batch_size=config.run.batch_size,
        n_eval_windows=eval_windows,
        progress=progress,
        sae_seeds=train.sae_seeds if several else None,
    )


def train_only(config: RunConfig, out_dir: str | Path, progress: bool = True) -> dict[str, Path]:
    """Train the SAEs of `config`'s [saes.train] table for its first model and corpus, as a run
    would, into OUT_DIR/<hook name>/ (SAE-Lens folders with quality.json); no measurement.
    What `lm-superposition train-sae` runs."""
    config = RunConfig.from_dict(config.to_dict())
    if config.saes.train is None:
        raise ValueError("the config has no [saes.train] table: nothing to train")
    _check_source(config.corpus.sources[0], config)
    item = SweepItem(config.model.names[0], None, config.corpus.sources[0])
    model = load_model(
        item.model, device=config.run.device, dtype=getattr(torch, config.model.dtype), backend=config.model.backend
    )
    texts_for = _texts_for(config, item.corpus)
    _train_or_reuse(config, model, texts_for, Path(out_dir), item.model, progress)
    train = config.saes.train
    several = len(train.sae_seeds) > 1
    return {
        f"{hook}#{seed}" if several else hook: trained_sae_folder(out_dir, hook, seed if several else None)
        for hook in train.hooks
        for seed in train.sae_seeds
    }


def _rank() -> int:
    return world_size_and_rank()[1]


# ---------------------------------------------------------------- manifest


def _manifest(config: RunConfig) -> dict:
    versions = {}
    for package in (*FINGERPRINT_PACKAGES, "datasets", "numpy", "pandas"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "config": config.to_dict(),
        "fingerprint": config.fingerprint() | {"versions": {p: versions[p] for p in FINGERPRINT_PACKAGES}},
        "versions": versions,
        "python": platform.python_version(),
        "git_commit": _git_commit(),
        "device": config.run.device,
        "device_name": torch.cuda.get_device_name()
        if config.run.device.startswith("cuda")
        else platform.processor() or platform.machine(),
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
