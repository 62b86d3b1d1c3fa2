"""A run folder: what is ours, replaced only if it is ours, resumed only by the same run.

`prepare_output` makes a folder ready for a run: an empty or new folder as it is; with
--overwrite only a folder holding this tool's manifest and nothing but what a run writes (the
old run is moved aside and put back if the new one stops before writing a result); with
--resume only a folder whose manifest's fingerprint matches this run's.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .atomic import is_partial
from .config import RESUMABLE_CHANGES, setting_default

MANIFEST = "manifest.json"
# What a run writes into its folder; --overwrite deletes a folder only if it holds nothing else.
RUN_FILES = {
    MANIFEST,
    "layerwise.csv",
    "layerwise.json",
    "convergence.csv",
    "compression_curve.png",
    "compression_curve.svg",
    "convergence.png",
    "convergence.svg",
    "checkpoints",
    "saes",
}
RUN_FOLDERS = {"checkpoints", "saes"}


@dataclass
class PreparedOutput:
    """What `prepare_output` did to the disk, so that a run which stops before writing any
    result can undo it (`settle`)."""

    output: Path
    created: Path | None = None  # the topmost folder created for the run (the output or a parent)
    emptied: bool = False  # an existing folder with nothing in it (or only a killed run's temporaries)
    replaced: Path | None = None  # --overwrite: the old run, moved aside until the new one has results

    def settle(self, finished: bool) -> bool:
        """After the run: drop the replaced run once the new one holds results; if it holds
        none (it stopped before training or measuring anything), undo what was done. True if
        undone (the disk is as the run found it), False if the folder holds the run."""
        if finished or _holds_results(self.output):
            if self.replaced is not None:
                shutil.rmtree(self.replaced, ignore_errors=True)
            return False
        if self.created is None and not self.emptied and self.replaced is None:
            return False  # a resumed run: its folder stays as it was, manifest and all
        if self.replaced is not None:
            shutil.rmtree(self.output, ignore_errors=True)
            os.replace(self.replaced / self.output.name, self.output)
            shutil.rmtree(self.replaced, ignore_errors=True)
        elif self.created is not None:
            shutil.rmtree(self.created, ignore_errors=True)
        elif self.emptied:
            _empty(self.output)
        return True


def prepare_output(output: Path, manifest: dict, *, resume: bool, overwrite: bool) -> PreparedOutput:
    """Make `output` ready for this run, and say what was done (see PreparedOutput).

    - missing: created (with --resume: refused, there is nothing to resume);
    - empty, or holding only the temporaries of a run killed before its manifest: used as is
      (with --resume too: that run had not begun, so resuming it is starting it);
    - a folder without this tool's manifest.json: refused, whatever the flags, naming what is there;
    - a run folder: refused without a flag; --resume continues it if its fingerprint matches
      (else refused, listing the differences); --overwrite replaces it if it holds nothing but
      what this tool writes and not the working directory.
    Every refusal is a FileExistsError/FileNotFoundError/ValueError that changes nothing on disk.
    """
    if resume and overwrite:
        raise ValueError("give --resume or --overwrite, not both")
    if output.exists() and not output.is_dir():
        raise FileExistsError(
            f"output {output} is a file, not a folder; choose another [run] output. Nothing was changed"
        )
    if not output.exists():
        if resume:
            raise FileNotFoundError(f"nothing to resume: {output} does not exist; drop --resume to start a run there")
        created = next(folder for folder in (output, *output.parents) if folder.parent.exists())
        output.mkdir(parents=True)
        return PreparedOutput(output, created=created)
    if not any(not is_partial(p.name) for p in output.iterdir()):
        _empty(output)
        return PreparedOutput(output, emptied=True)
    if not (output / MANIFEST).is_file():
        raise FileExistsError(
            f"{output} is not a run folder of this tool (no {MANIFEST}); it holds {_listing(output)}. "
            "Nothing was deleted: choose another [run] output (or --output)"
        )
    if overwrite:
        foreign = _foreign_files(output)
        if foreign or _holds_working_directory(output):
            what = f"files this tool did not write: {foreign[:10]}" if foreign else "the current working directory"
            where = output if output.is_absolute() else f"{output} ({output.resolve()})"
            raise FileExistsError(f"--overwrite refused: {where} holds {what}. Nothing was deleted")
        # Moved aside, not deleted: if the new run stops before writing a result, it is put back.
        aside = Path(tempfile.mkdtemp(prefix=f".{output.name}.replaced-", dir=output.parent))
        os.replace(output, aside / output.name)
        output.mkdir()
        return PreparedOutput(output, replaced=aside)
    if not resume:
        raise FileExistsError(
            f"output folder {output} already holds a run; pass --resume to continue it or --overwrite to replace it"
        )
    _check_same_run(output, manifest)
    return PreparedOutput(output)


def _check_same_run(output: Path, manifest: dict) -> None:
    """Refuse to resume a run whose results would differ from this config's."""
    try:
        previous = json.loads((output / MANIFEST).read_text())
        before = previous["fingerprint"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(
            f"cannot resume {output}: its {MANIFEST} is unreadable or from an older version ({err!r})"
        ) from None
    now = manifest["fingerprint"]
    # A setting added to the package since that run, at its default, reproduces what the run did
    differences = [
        (key, old, new)
        for key, old, new in _differences(before, now)
        if not (_lacks(before, key) and new == setting_default(key))
    ]
    if differences:
        listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in differences[:10])
        raise ValueError(
            f"--resume refused: {output} was made by a different config, so the tables would mix two runs. "
            f"Differences: {listed}. Only [run] {', '.join(RESUMABLE_CHANGES)} may change on resume; "
            "use another output folder, or --overwrite to start over"
        )


def _differences(before, now, prefix: str = "") -> list[tuple[str, object, object]]:
    if isinstance(before, dict) and isinstance(now, dict):
        return [
            d
            for key in sorted(set(before) | set(now))
            for d in _differences(before.get(key), now.get(key), f"{prefix}.{key}".strip("."))
        ]
    return [] if before == now else [(prefix, before, now)]


def _lacks(fingerprint: dict, path: str) -> bool:
    """True where the dotted `path` is absent from the fingerprint (its table is there, the key not)."""
    *tables, key = path.split(".")
    for table in tables:
        fingerprint = fingerprint.get(table) if isinstance(fingerprint, dict) else None
    return isinstance(fingerprint, dict) and key not in fingerprint


def _listing(folder: Path, limit: int = 8) -> str:
    names = sorted(p.name for p in folder.iterdir())
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _holds_working_directory(folder: Path) -> bool:
    here = Path.cwd().resolve()
    return folder.resolve() == here or folder.resolve() in here.parents or folder.resolve() == Path.home().resolve()


def _holds_results(output: Path) -> bool:
    """True if `output` holds a file a run wrote besides its manifest (an SAE, a checkpoint, a table)."""
    return any(
        path.is_file()
        and path.relative_to(output) != Path(MANIFEST)
        and not any(is_partial(part) for part in path.relative_to(output).parts)
        for path in output.rglob("*")
    )


def _empty(folder: Path) -> None:
    """Remove everything inside `folder` (only ever called on what a run wrote there)."""
    for path in folder.iterdir():
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _foreign_files(output: Path) -> list[str]:
    """Paths under a run folder that a run does not write (the topmost of each), for --overwrite.

    A run writes RUN_FILES at the top, checkpoints/*.pt, saes/<item>/<hook>/ SAE-Lens folders,
    and, if killed mid-write, hidden temporaries (atomic.py)."""
    foreign = []

    def visit(folder: Path, depth: tuple[str, ...]) -> None:
        for path in sorted(folder.iterdir()):
            relative = (*depth, path.name)
            if is_partial(path.name):
                continue
            is_folder = path.is_dir() and not path.is_symlink()
            if len(relative) == 1:
                ours = path.name in RUN_FILES and is_folder == (path.name in RUN_FOLDERS)
            elif relative[0] == "checkpoints":
                ours = len(relative) == 2 and not is_folder and path.suffix == ".pt"
            elif relative[0] == "saes":
                ours = is_folder if len(relative) < 4 else len(relative) == 4 and not is_folder
            else:
                ours = False
            if not ours:
                foreign.append("/".join(relative))
            elif is_folder:
                visit(path, relative)

    visit(output, ())
    return foreign
