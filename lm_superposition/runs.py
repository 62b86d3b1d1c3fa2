"""Scripted probing runs: a checked config in, a run folder out, never lost and never mixed.

Every combination of model x checkpoint x corpus in the config is one sweep item; each is
measured for every seed (`LayerwiseAnalyzer.measure`, the pipeline `measure_layers` runs too)
and all rows go into one table. The run folder holds:

    manifest.json            config, its fingerprint, package versions, git commit, device, timings
    layerwise.csv / .json    one row per sweep item x hook x seed
    convergence.csv          F at log-spaced token counts
    compression_curve.png/svg, convergence.png/svg
    checkpoints/             accumulator state per sweep item and seed (resume)
    saes/                    SAEs trained on the spot, if any

The order is: check the whole config (config.py) and the corpus sources, then touch the disk,
then load models. `--overwrite` deletes only a folder this tool made; `--resume` continues
only a run whose fingerprint (everything that changes results) matches; every file is written
atomically (atomic.py); SIGINT/SIGTERM finish the batch, save the checkpoint and stop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import math
import platform
import shutil
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
from .config import RESUMABLE_CHANGES, RunConfig
from .data import check_text_source, load_texts, token_windows
from .distributed import barrier, world_size_and_rank
from .models import load_model
from .saes.loading import load_release, load_sae_from_disk
from .saes.training import QUALITY_FILENAME, text_tokens_for_training, train_saes_for_model

MANIFEST = "manifest.json"
# What a run writes into its folder; --overwrite deletes a folder only if it holds nothing else.
RUN_FILES = {
    MANIFEST, "layerwise.csv", "layerwise.json", "convergence.csv", "compression_curve.png", "compression_curve.svg",
    "convergence.png", "convergence.svg", "checkpoints", "saes",
}
# Packages whose version is part of a run's fingerprint: a new version may change the numbers.
FINGERPRINT_PACKAGES = ("lm-superposition", "torch", "transformer-lens", "sae-lens", "transformers")


class RunInterrupted(Exception):
    """The run was stopped by SIGINT or SIGTERM after saving its checkpoint."""


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

    Raises RunInterrupted (after saving the checkpoint) on SIGINT or SIGTERM. Under torchrun
    every process runs this; windows are shared out (see LayerwiseAnalyzer.run_seed), and only
    rank 0 trains SAEs and writes the folder's files.
    """
    config = RunConfig.from_dict(config.to_dict())  # a config built in code is checked like a file
    for source in config.corpus.sources:
        check_text_source(source)
    output = Path(config.run.output)
    manifest = _manifest(config)
    created = False
    if _rank() == 0:
        created = prepare_output(output, manifest, resume=resume, overwrite=overwrite)
        atomic.write_text(output / MANIFEST, json.dumps(manifest, indent=1))
    barrier()
    try:
        with _interrupts() as interrupts:
            return _run_sweep(config, output, manifest, progress, interrupts)
    except Exception as error:
        if created and not isinstance(error, RunInterrupted):
            _remove_if_only_manifest(output)  # a run that failed before measuring anything leaves no folder
        raise


def _run_sweep(config: RunConfig, output: Path, manifest: dict, progress: bool, interrupts: _Interrupts) -> pd.DataFrame:
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


# ---------------------------------------------------------------- the run folder


def prepare_output(output: Path, manifest: dict, *, resume: bool, overwrite: bool) -> bool:
    """Make `output` ready for this run; True if it was created (or emptied) now.

    Refuses (FileExistsError, naming what is there) to overwrite a folder this tool did not
    make, to resume a run made by a different config, and to write into an existing run
    without --resume or --overwrite.
    """
    if resume and overwrite:
        raise ValueError("give --resume or --overwrite, not both")
    if not output.exists() or not any(output.iterdir()):
        if resume:
            raise FileNotFoundError(f"nothing to resume: {output} holds no run; drop --resume to start one")
        output.mkdir(parents=True, exist_ok=True)
        return True
    if not output.is_dir():
        raise FileExistsError(f"output {output} is a file, not a folder")
    if not (output / MANIFEST).is_file():
        raise FileExistsError(
            f"{output} is not a run folder of this tool (no {MANIFEST}); it holds {_listing(output)}. "
            "Nothing was deleted: choose another [run] output (or --output)"
        )
    if overwrite:
        foreign = sorted(p.name for p in output.iterdir() if p.name not in RUN_FILES and not p.name.startswith("."))
        if foreign or _holds_working_directory(output):
            what = f"files this tool did not write: {foreign}" if foreign else "the current working directory"
            raise FileExistsError(f"--overwrite refused: {output} holds {what}. Nothing was deleted")
        shutil.rmtree(output)
        output.mkdir(parents=True)
        return True
    if not resume:
        raise FileExistsError(f"output folder {output} already holds a run; pass --resume to continue it or --overwrite to replace it")
    _check_same_run(output, manifest)
    return False


def _check_same_run(output: Path, manifest: dict) -> None:
    """Refuse to resume a run whose results would differ from this config's."""
    try:
        previous = json.loads((output / MANIFEST).read_text())
        before = previous["fingerprint"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"cannot resume {output}: its {MANIFEST} is unreadable or from an older version ({err!r})") from None
    now = manifest["fingerprint"]
    differences = _differences(before, now)
    if differences:
        listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in differences[:10])
        raise ValueError(
            f"--resume refused: {output} was made by a different config, so the tables would mix two runs. "
            f"Differences: {listed}. Only [run] {', '.join(RESUMABLE_CHANGES)} may change on resume; "
            "use another output folder, or --overwrite to start over"
        )


def _differences(before, now, prefix: str = "") -> list[tuple[str, object, object]]:
    if isinstance(before, dict) and isinstance(now, dict):
        return [d for key in sorted(set(before) | set(now))
                for d in _differences(before.get(key), now.get(key), f"{prefix}.{key}".strip("."))]
    return [] if before == now else [(prefix, before, now)]


def _listing(folder: Path, limit: int = 8) -> str:
    names = sorted(p.name for p in folder.iterdir())
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _holds_working_directory(folder: Path) -> bool:
    here = Path.cwd().resolve()
    return folder.resolve() == here or folder.resolve() in here.parents or folder.resolve() == Path.home().resolve()


def _remove_if_only_manifest(output: Path) -> None:
    leftovers = [p for p in output.rglob("*") if p.is_file() and p.name != MANIFEST]
    if not leftovers:
        shutil.rmtree(output, ignore_errors=True)


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
    model = load_model(item.model, device=settings.device, dtype=getattr(torch, config.model.dtype), checkpoint=item.checkpoint)
    texts_for = lambda seed: load_texts(  # noqa: E731
        item.corpus, config=config.corpus.config, split=config.corpus.split, text_column=config.corpus.text_column, seed=seed
    )
    saes, sae_names, known_ce = _saes_for(config, item, model, texts_for, output, progress)
    analyzer = LayerwiseAnalyzer(
        model, saes, model_name=item.model, batch_size=settings.batch_size, n_blocks=settings.n_blocks,
        allow_hook_mismatch=config.saes.allow_hook_mismatch,
    )
    # Each seed reads its own shuffle of the corpus, exactly token_budget tokens of it.
    with interrupts.deferred():
        table = analyzer.measure(
            lambda seed: token_windows(
                texts_for(seed), model.tokenizer, context_size=settings.context_size, token_budget=settings.token_budget, seed=seed
            ),
            seeds=settings.seeds, token_budget=settings.token_budget, ce_windows=settings.ce_windows,
            additivity_pairs=settings.additivity_pairs, target_relative_interval=settings.target_relative_interval,
            checkpoint_dir=output / "checkpoints", checkpoint_name=item.slug, checkpoint_every=settings.checkpoint_every,
            known_ce=known_ce, sae_names=sae_names, progress=progress, stop=interrupts.requested,
        )
    table.insert(1, "checkpoint", item.checkpoint)
    table.insert(2, "corpus", item.corpus)
    convergence = table.attrs.pop("convergence")
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
            _train_or_reuse(config, model, texts_for, output / "saes" / item.slug, item.model, progress)
        barrier()
        for hook in config.saes.train.hooks:
            folder = output / "saes" / item.slug / hook
            saes[hook], names[hook] = load_sae_from_disk(folder, device=config.run.device), f"trained: {folder}"
            ce = json.loads((folder / QUALITY_FILENAME).read_text())["ce_loss_recovered"]
            known_ce[hook] = math.nan if ce is None else ce
    return saes, names, known_ce


def _train_or_reuse(config: RunConfig, model, texts_for, folder: Path, model_name: str, progress: bool) -> None:
    """Train SAEs for the item's hooks once; a resumed run reuses the ones already saved,
    so its accumulators keep reading through the same dictionaries. An SAE counts as saved
    only with its quality.json, written last inside a folder that appears whole (atomic.py)."""
    train = config.saes.train
    if all((folder / hook / QUALITY_FILENAME).is_file() for hook in train.hooks):
        return
    # Training text comes from a seed no measurement uses, so SAEs are not scored on their
    # training tokens; a few windows more are held out to judge them.
    training_seed = max(config.run.seeds) + 1000
    eval_windows = max(1, config.run.ce_windows)
    budget = text_tokens_for_training(train, eval_windows, config.run.context_size)
    windows = token_windows(texts_for(training_seed), model.tokenizer, context_size=config.run.context_size, token_budget=budget, seed=training_seed)
    sae_config = dataclasses.replace(train.training_config(), device=config.run.device, model_name=model_name)
    train_saes_for_model(
        model, train.hooks, windows, sae_config, folder, batch_size=config.run.batch_size, n_eval_windows=eval_windows, progress=progress
    )


def train_only(config: RunConfig, out_dir: str | Path, progress: bool = True) -> dict[str, Path]:
    """Train the SAEs of `config`'s [saes.train] table for its first model and corpus, as a run
    would, into OUT_DIR/<hook name>/ (SAE-Lens folders with quality.json); no measurement.
    What `lm-superposition train-sae` runs."""
    config = RunConfig.from_dict(config.to_dict())
    if config.saes.train is None:
        raise ValueError("the config has no [saes.train] table: nothing to train")
    check_text_source(config.corpus.sources[0])
    item = SweepItem(config.model.names[0], None, config.corpus.sources[0])
    model = load_model(item.model, device=config.run.device, dtype=getattr(torch, config.model.dtype))
    texts_for = lambda seed: load_texts(  # noqa: E731
        item.corpus, config=config.corpus.config, split=config.corpus.split, text_column=config.corpus.text_column, seed=seed
    )
    _train_or_reuse(config, model, texts_for, Path(out_dir), item.model, progress)
    return {hook: Path(out_dir) / hook for hook in config.saes.train.hooks}


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
