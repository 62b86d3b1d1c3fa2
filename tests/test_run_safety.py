"""Runs that never lose data and never mix results (issue 18).

- Every bad config or input is a named error (type, key, value, what is valid) raised before
  any folder is created, deleted or left behind.
- --overwrite replaces only a run folder this tool made; --resume continues only the same run.
- A run killed at any write point resumes to the uninterrupted run's table; SIGINT saves the
  checkpoint and prints one line with the --resume command.

Sizes are tiny (a 2-layer GPT-NeoX of width 64, a 40-document corpus) so the whole file runs in
about a minute on two CPU cores.
"""

import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import test_runs
import torch
from test_runs import TEXT, small_config

from lm_superposition import atomic, cli, runs
from lm_superposition.analyze import measure_layers
from lm_superposition.config import ConfigError, RunConfig
from lm_superposition.data import load_texts, token_windows
from lm_superposition.metric import FeatureBudget
from lm_superposition.models import load_model

# test_runs's tiny GPT-NeoX folder and 40-document corpus, as fixtures of this module under these
# names (pytest names a fixture after the attribute that holds it).
tiny_model = test_runs.tiny_pythia_folder
text_folder = test_runs.corpus_folder

HOOKS = ["blocks.0.hook_resid_pre", "blocks.1.hook_mlp_out"]


def raw_config(model_folder, corpus, output, **run_overrides) -> dict:
    """small_config's tables, as a dict to break and write as TOML."""
    return small_config(model_folder, corpus, output, **run_overrides).to_dict()


def write_toml(path: Path, tables: dict) -> Path:
    """A TOML file of nested tables; JSON's strings, numbers, booleans and lists are TOML's too."""
    lines = []

    def table(name, values):
        scalars = {k: v for k, v in values.items() if not isinstance(v, dict) and v is not None}
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in scalars.items())
        for key, value in values.items():
            if isinstance(value, dict):
                table(f"{name}.{key}", value)

    for name, values in tables.items():
        table(name, values)
    path.write_text("\n".join(lines) + "\n")
    return path


def listing(folder: Path) -> list[str]:
    """Every path under `folder` (relative), to show nothing was created or deleted."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def without_paths(table: pd.DataFrame) -> pd.DataFrame:
    return table.drop(columns=["sae"]).reset_index(drop=True)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One thread: on a shared two-core machine, two threads per process made these tiny runs
    20 times slower (lock contention on every small matmul)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- bad configs: named before the disk is touched


def fail_if_called(*args, **kwargs):
    pytest.fail("the model loaded before the corpus was checked")


@pytest.mark.parametrize(
    "key, value, expected",
    [
        (
            "token_budget",
            "1000",
            r"\[run\] token_budget = '1000' must be an integer \(tokens measured per seed\); "
            r"did you mean token_budget = 1000\?",
        ),
        ("checkpoint_every", 0, r"\[run\] checkpoint_every must be a positive integer, got 0"),
        ("seeds", [], r"\[run\] seeds = \[\] must hold at least one seed, e.g. seeds = \[0\]"),
        (
            "seeds",
            "0",
            r"\[run\] seeds = '0' must be a list of integers \(data seeds.*\); did you mean seeds = \[0\]\?",
        ),
        ("seeds", [0, -1], r"\[run\] every seed must be a non-negative integer, got -1"),
        ("output", "", r"\[run\] output must name a folder, got ''"),
        ("output", "   ", r"\[run\] output must name a folder"),
        ("context_size", 1, r"\[run\] context_size must be at least 2"),
        ("device", "gpu", r"\[run\] device must be cpu, cuda, cuda:N or mps, got 'gpu'"),
    ],
)
def test_a_bad_run_setting_names_the_file_key_value_and_what_is_valid(
    key, value, expected, tmp_path, tiny_model, text_folder
):
    tables = raw_config(tiny_model, text_folder, tmp_path / "run")
    tables["run"][key] = value
    path = write_toml(tmp_path / "bad.toml", tables)
    before = listing(tmp_path)
    with pytest.raises(ConfigError, match=expected) as error:
        RunConfig.from_toml(path)
    assert str(error.value).startswith(f"{path}: ")
    assert listing(tmp_path) == before


def test_a_bad_training_setting_names_its_table(tmp_path, tiny_model, text_folder):
    tables = raw_config(tiny_model, text_folder, tmp_path / "run")
    tables["saes"]["train"]["expansion_factor"] = 0
    expected = r"bad.toml: \[saes.train\] expansion_factor must be a positive integer, got 0"
    with pytest.raises(ConfigError, match=expected):
        RunConfig.from_toml(write_toml(tmp_path / "bad.toml", tables))


def test_malformed_toml_names_the_file_and_the_line(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[run]\ntoken_budget = \n")
    with pytest.raises(ConfigError, match=r"broken.toml: not valid TOML: .*line 2"):
        RunConfig.from_toml(path)


def test_the_cli_prints_one_line_and_creates_nothing(tmp_path, tiny_model, text_folder, capsys):
    tables = raw_config(tiny_model, text_folder, tmp_path / "run")
    tables["run"]["checkpoint_every"] = 0
    path = write_toml(tmp_path / "bad.toml", tables)
    assert cli.main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "bad.toml" in err and "checkpoint_every must be a positive integer, got 0" in err
    assert not (tmp_path / "run").exists()


def test_a_config_built_in_code_is_checked_like_a_file(tmp_path, tiny_model, text_folder):
    config = small_config(tiny_model, text_folder, tmp_path / "run")
    config.run.token_budget = "1000"  # bypasses from_dict; run() checks again
    with pytest.raises(ConfigError, match=r"\[run\] token_budget = '1000' must be an integer"):
        runs.run(config, progress=False)
    assert not (tmp_path / "run").exists()


def test_a_missing_local_corpus_is_named_before_the_model_loads(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setattr(runs, "load_model", fail_if_called)
    config = small_config(tiny_model, tmp_path / "no_such_corpus", tmp_path / "run")
    expected = r"\[corpus\] sources: text source '.*no_such_corpus' looks like a local path but does not exist; give an"
    with pytest.raises(FileNotFoundError, match=expected + " existing file or folder"):
        runs.run(config, progress=False)
    assert listing(tmp_path) == []


def test_an_unreachable_hub_corpus_is_named_before_the_model_loads(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(runs, "load_model", fail_if_called)
    config = small_config(tiny_model, "no-such-org/no-such-dataset", tmp_path / "run")
    started = time.time()
    with pytest.raises(
        ConnectionError,
        match=r"\[corpus\] sources: could not reach the Hugging Face hub for dataset "
        r"'no-such-org/no-such-dataset'.*local .txt/.jsonl/.parquet file or "
        r"folder",
    ):
        runs.run(config, progress=False)
    assert time.time() - started < 30  # offline: no retries
    assert listing(tmp_path) == []


def test_an_unknown_hook_lists_the_real_ones_and_leaves_no_folder(tmp_path, tiny_model, text_folder):
    config = small_config(tiny_model, text_folder, tmp_path / "runs" / "run")
    config.saes.train.hooks = ["blocks.0.hook_resid_pre", "blocks.7.hook_resid_post"]
    with pytest.raises(
        ConfigError,
        match=r"\[saes.train\] hooks: unknown hook 'blocks.7.hook_resid_post'.*"
        r"the model has 2 blocks.*its measurable hooks are: .*blocks.1.hook_mlp_out",
    ):
        runs.run(config, progress=False)
    assert not (tmp_path / "runs").exists()  # neither the run folder nor the parent it created


# ---------------------------------------------------------------- bad inputs to the API


def test_token_windows_refuses_one_string(tiny_model):
    tokenizer = load_model(str(tiny_model)).tokenizer
    expected = r"texts must be a sequence or iterator of documents.*got one string of 10 characters.*\[text\]"
    with pytest.raises(TypeError, match=expected):
        token_windows("one string", tokenizer, context_size=8)


def test_load_texts_refuses_the_text_of_a_document():
    expected = r"looks like the text of a document, not the name of a source.*token_windows as a list"
    with pytest.raises(ValueError, match=expected):
        load_texts("first line of my document\nsecond line")


@pytest.mark.parametrize(
    "doc_ids, expected",
    [
        (torch.tensor([0, 1, -1, 2]), r"doc_ids must be non-negative document indices; token 2 has -1"),
        (torch.tensor([0.0, 1.0, math.nan, 2.0]), r"doc_ids must be integer document indices.*token 2 has nan"),
        (torch.tensor([0.0, 1.5, 1.0, 2.0]), r"doc_ids must be integer document indices.*token 1 has 1.5"),
        (-1, r"doc_ids must be non-negative document indices, got -1"),
        (math.nan, r"doc_ids must be integer document indices, got nan"),
    ],
)
def test_feature_budget_refuses_bad_doc_ids(doc_ids, expected):
    budget = FeatureBudget(d_sae=8, width=4)
    with pytest.raises(ValueError, match=expected):
        budget.update(torch.rand(4, 8), doc_ids)
    assert budget.tokens == 0  # nothing was added


def test_feature_budget_names_the_row_of_non_finite_codes():
    codes = torch.rand(5, 8)
    codes[3, 6] = math.inf
    with pytest.raises(ValueError, match=r"codes contain inf .* first at token 3 of this batch, feature 6"):
        FeatureBudget(d_sae=8, width=4).update(codes, torch.arange(5))


def test_measure_layers_refuses_empty_seeds(tiny_model):
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    model = load_model(str(tiny_model))
    sae = StandardSAE(StandardSAEConfig(d_in=64, d_sae=32, metadata=SAEMetadata(hook_name=HOOKS[0])))
    windows = token_windows(TEXT, model.tokenizer, context_size=16)
    with pytest.raises(ValueError, match=r"seeds is empty: give at least one seed, e.g. seeds=\[0\]"):
        measure_layers(model, {HOOKS[0]: sae}, windows, seeds=[], progress=False)


@pytest.mark.parametrize("content", [b"not a torch file at all", None])
def test_a_corrupt_or_foreign_feature_budget_file_is_named(content, tmp_path):
    path = tmp_path / "budget.pt"
    if content is None:
        torch.save({"weights": torch.zeros(3)}, path)  # a torch file, but not a FeatureBudget
    else:
        path.write_bytes(content)
    expected = re.escape(f"{path} is not a saved FeatureBudget (expected a torch file with d_sae, width, n_blocks")
    with pytest.raises(ValueError, match=expected):
        FeatureBudget.load(path)


def test_feature_budget_save_is_atomic(tmp_path):
    budget = FeatureBudget(d_sae=8, width=4)
    budget.update(torch.rand(4, 8), torch.arange(4))
    budget.save(tmp_path / "budget.pt")
    assert FeatureBudget.load(tmp_path / "budget.pt").tokens == 4
    assert listing(tmp_path) == ["budget.pt"]


# ---------------------------------------------------------------- runs on disk


@pytest.fixture(scope="module")
def finished_run(tiny_model, tmp_path_factory):
    """One uninterrupted run, and its table: the reference for the kill and resume tests."""
    root = tmp_path_factory.mktemp("finished")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(40):  # text_folder's documents (that fixture is function-scoped)
        (corpus / f"doc{i:02d}.txt").write_text(" ".join(TEXT[j % 3] for j in range(i % 5 + 2)) + f" document {i}")
    config = small_config(tiny_model, corpus, root / "run", token_budget=300)
    commits = []
    original = atomic._commit

    def counting(temporary, final):
        commits.append(Path(final))
        original(temporary, final)

    atomic._commit = counting
    try:
        table = runs.run(config, progress=False)
    finally:
        atomic._commit = original
    return config, table, commits


def copy_of_run(finished_run, output: Path) -> dict:
    """A copy of the finished run's folder at `output`; its config (as a dict) pointing there."""
    config = finished_run[0]
    shutil.copytree(config.run.output, output)
    raw = config.to_dict()
    raw["run"]["output"] = str(output)
    return raw


def test_a_corrupt_checkpoint_is_named_on_resume_and_nothing_is_deleted(finished_run, tmp_path):
    raw = copy_of_run(finished_run, tmp_path / "run")
    checkpoint = sorted((tmp_path / "run" / "checkpoints").glob("*__seed1.pt"))[0]
    checkpoint.write_bytes(b"\x00garbage")
    before = listing(tmp_path)
    expected = re.escape(f"{checkpoint} is not a checkpoint this version can resume (expected a SeedMeasurement state")
    with pytest.raises(ValueError, match=expected + ".*Delete it to measure that seed again"):
        runs.run(RunConfig.from_dict(raw), resume=True, progress=False)
    assert listing(tmp_path) == before


def test_overwrite_refuses_a_folder_holding_a_users_file(tmp_path, tiny_model, text_folder):
    output = tmp_path / "results"
    output.mkdir()
    (output / "thesis.tex").write_text("years of work")
    for overwrite in (False, True):
        with pytest.raises(
            FileExistsError,
            match=r"results is not a run folder of this tool \(no manifest.json\); "
            r"it holds thesis.tex. Nothing was deleted",
        ):
            runs.run(small_config(tiny_model, text_folder, output), overwrite=overwrite, progress=False)
    assert (output / "thesis.tex").read_text() == "years of work"
    assert listing(output) == ["thesis.tex"]


def test_overwrite_refuses_a_run_folder_holding_a_users_file(finished_run, tmp_path):
    raw = copy_of_run(finished_run, tmp_path / "run")
    (tmp_path / "run" / "checkpoints" / "my_notes.txt").write_text("keep me")
    (tmp_path / "run" / ".git").mkdir()
    before = listing(tmp_path)
    with pytest.raises(
        FileExistsError,
        match=r"--overwrite refused: .*run holds files this tool did not write: "
        r"\['.git', 'checkpoints/my_notes.txt'\]. Nothing was deleted",
    ):
        runs.run(RunConfig.from_dict(raw), overwrite=True, progress=False)
    assert listing(tmp_path) == before


@pytest.mark.parametrize("how", ["dot", "absolute", "parent"])
def test_overwrite_refuses_the_working_directory(how, finished_run, tmp_path, monkeypatch):
    raw = copy_of_run(finished_run, tmp_path / "run")
    (tmp_path / "run" / "saes" / "mine").mkdir()  # the user works in a folder inside the run
    before = listing(tmp_path)
    monkeypatch.chdir(tmp_path / "run" / ("saes/mine" if how == "parent" else ""))
    raw["run"]["output"] = {"dot": ".", "absolute": str(tmp_path / "run"), "parent": "../.."}[how]
    expected = r"--overwrite refused: .* holds the current working directory. Nothing was deleted"
    with pytest.raises(FileExistsError, match=expected):
        runs.run(RunConfig.from_dict(raw), overwrite=True, progress=False)
    assert listing(tmp_path) == before


def test_overwrite_replaces_a_run_folder(finished_run, tmp_path):
    raw = copy_of_run(finished_run, tmp_path / "run")
    raw["run"]["seeds"] = [1]
    replaced = runs.run(RunConfig.from_dict(raw), overwrite=True, progress=False)
    assert replaced["seed"].unique().tolist() == [1]
    assert pd.read_csv(tmp_path / "run" / "layerwise.csv")["seed"].unique().tolist() == [1]
    assert [p.name.rsplit("__", 1)[-1] for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["seed1.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # the old run is gone, nothing left beside it


def test_overwrite_keeps_the_old_run_if_the_new_one_fails_before_writing_anything(finished_run, tmp_path):
    raw = copy_of_run(finished_run, tmp_path / "run")
    before = listing(tmp_path)
    raw["saes"]["train"]["hooks"] = ["blocks.0.hook_resid_prex"]  # a typo, found once the model is loaded
    with pytest.raises(ConfigError, match="unknown hook 'blocks.0.hook_resid_prex'"):
        runs.run(RunConfig.from_dict(raw), overwrite=True, progress=False)
    assert listing(tmp_path) == before


@pytest.mark.parametrize(
    "change, listed",
    [
        ({"run": {"token_budget": 400}}, r"run.token_budget: 300 -> 400"),
        ({"saes.train": {"expansion_factor": 4}}, r"saes.train.expansion_factor: 2 -> 4"),
        ({"run": {"seeds": [0, 2], "batch_size": 2}}, r"run.batch_size: 4 -> 2; run.seeds: \[0, 1\] -> \[0, 2\]"),
    ],
)
def test_resume_refuses_a_different_config_and_lists_the_differences(change, listed, finished_run, tmp_path):
    raw = copy_of_run(finished_run, tmp_path / "run")
    manifest = (tmp_path / "run" / "manifest.json").read_text()
    before = listing(tmp_path)
    for table, values in change.items():
        (raw["saes"]["train"] if table == "saes.train" else raw[table]).update(values)
    expected = (
        rf"--resume refused: .*run was made by a different config.*Differences: {listed}\. "
        r"Only \[run\] output, checkpoint_every may change on resume"
    )
    with pytest.raises(ValueError, match=expected):
        runs.run(RunConfig.from_dict(raw), resume=True, progress=False)
    assert listing(tmp_path) == before
    assert (tmp_path / "run" / "manifest.json").read_text() == manifest  # the old run's record is untouched


def test_resume_accepts_a_setting_added_since_the_run_only_at_its_default(finished_run, tmp_path):
    raw = copy_of_run(finished_run, tmp_path / "run")
    manifest_path = tmp_path / "run" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["fingerprint"]["saes"]["train"]["aux_loss_coefficient"]  # a run made before the option
    manifest_path.write_text(json.dumps(manifest))
    raw["saes"]["train"]["aux_loss_coefficient"] = 0.5
    with pytest.raises(ValueError, match=r"Differences: saes.train.aux_loss_coefficient: None -> 0.5\."):
        runs.run(RunConfig.from_dict(raw), resume=True, progress=False)
    del raw["saes"]["train"]["aux_loss_coefficient"]
    resumed = runs.run(RunConfig.from_dict(raw), resume=True, progress=False)
    pd.testing.assert_frame_equal(without_paths(resumed), without_paths(finished_run[1]))


def test_resume_accepts_another_output_and_checkpoint_every(finished_run, tmp_path):
    raw = copy_of_run(finished_run, tmp_path / "moved")
    raw["run"]["checkpoint_every"] = 7
    resumed = runs.run(RunConfig.from_dict(raw), resume=True, progress=False)
    pd.testing.assert_frame_equal(without_paths(resumed), without_paths(finished_run[1]))
    assert json.loads((tmp_path / "moved" / "manifest.json").read_text())["config"]["run"]["checkpoint_every"] == 7


def test_resume_of_a_missing_folder_is_refused(tmp_path, tiny_model, text_folder):
    expected = r"nothing to resume: .*missing does not exist; drop --resume to start a run"
    with pytest.raises(FileNotFoundError, match=expected):
        runs.run(small_config(tiny_model, text_folder, tmp_path / "missing"), resume=True, progress=False)
    assert not (tmp_path / "missing").exists()


# ---------------------------------------------------------------- killed at every write point


class Killed(BaseException):
    """A kill -9 as the run sees it: no `except Exception` handler runs (only `finally` blocks,
    which a real kill skips too: the fault leaves a copy of the half-written file behind)."""


def _kind(path: Path, output: Path) -> str:
    """What a commit writes: 'manifest.json', 'saes/<hook>', 'checkpoints/seed<S>', 'layerwise.csv'..."""
    relative = path.relative_to(output)
    if relative.parts[0] == "saes":
        return f"saes/{relative.name}"
    if relative.parts[0] == "checkpoints":
        return "checkpoints/" + relative.stem.rsplit("__", 1)[-1]
    return str(relative)


def commit_or_die(point: int, calls: list, commit):
    """An atomic._commit that makes the `point`-th call (from 0) a kill, leaving the half-written
    temporary behind as a killed process would; every other call commits."""

    def fault(temporary, final):
        calls.append(final)
        if len(calls) - 1 == point:
            leftover = Path(temporary).with_name(Path(temporary).name + "-killed")
            os.link(temporary, leftover) if Path(temporary).is_file() else Path(temporary).rename(leftover)
            raise Killed(f"killed before writing {final}")
        commit(temporary, final)

    return fault


def test_a_run_killed_at_each_write_point_resumes_to_the_same_table(finished_run, tmp_path, monkeypatch):
    """Killed at the k-th commit (atomic._commit, the one rename that makes any write visible),
    for every k of an uninterrupted run: the manifest, each SAE folder, every checkpoint of each
    seed, each table and plot, the final manifest. Then --resume must give the same table."""
    config, straight, commits = finished_run
    output = Path(config.run.output)
    kinds = [_kind(path, output) for path in commits]
    assert kinds[0] == kinds[-1] == "manifest.json"
    written = {
        "checkpoints/seed0",
        "checkpoints/seed1",
        "layerwise.csv",
        "layerwise.json",
        "convergence.csv",
        "compression_curve.png",
        "compression_curve.svg",
        "convergence.png",
        "convergence.svg",
    }
    assert {"saes/" + hook for hook in HOOKS} | written <= set(kinds)
    assert kinds.count("checkpoints/seed0") >= 3  # mid-seed kills too
    original = atomic._commit

    for point in range(len(kinds)):
        killed_output = tmp_path / f"killed_at_{point}"
        raw = config.to_dict()
        raw["run"]["output"] = str(killed_output)
        killed_config = RunConfig.from_dict(raw)
        calls = []
        monkeypatch.setattr(atomic, "_commit", commit_or_die(point, calls, original))
        with pytest.raises(Killed):
            runs.run(killed_config, progress=False)
        monkeypatch.setattr(atomic, "_commit", original)
        assert _kind(Path(calls[-1]), killed_output) == kinds[point]

        resumed = runs.run(killed_config, resume=True, progress=False)
        where = f"killed at commit {point} ({kinds[point]})"
        pd.testing.assert_frame_equal(without_paths(resumed), without_paths(straight), obj=where)
        on_disk = pd.read_csv(killed_output / "layerwise.csv")
        pd.testing.assert_frame_equal(without_paths(on_disk), without_paths(pd.read_csv(output / "layerwise.csv")))
        convergence = pd.read_csv(killed_output / "convergence.csv")
        pd.testing.assert_frame_equal(convergence, pd.read_csv(output / "convergence.csv"))


def test_a_run_killed_before_its_manifest_restarts_without_resume(finished_run, tmp_path, monkeypatch):
    config, straight, _ = finished_run
    raw = config.to_dict()
    raw["run"]["output"] = str(tmp_path / "run")
    killed_config = RunConfig.from_dict(raw)
    monkeypatch.setattr(atomic, "_commit", commit_or_die(0, [], atomic._commit))
    with pytest.raises(Killed):
        runs.run(killed_config, progress=False)
    monkeypatch.undo()
    restarted = runs.run(killed_config, progress=False)
    pd.testing.assert_frame_equal(without_paths(restarted), without_paths(straight))


# ---------------------------------------------------------------- SIGINT


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("overwrite", [False, True])
def test_a_signal_before_any_result_leaves_the_disk_as_it_was(
    signum, overwrite, finished_run, tmp_path, monkeypatch, capsys
):
    """Stopped while the model loads: a new folder is removed (with the parent it made), a run
    --overwrite moved aside is put back, and the one line says to start again (nothing to resume)."""
    output = tmp_path / "runs" / "run"
    raw = copy_of_run(finished_run, output) if overwrite else finished_run[0].to_dict()
    raw["run"]["output"] = str(output)
    path = write_toml(tmp_path / "run.toml", raw)
    before, handler = listing(tmp_path), signal.getsignal(signum)
    monkeypatch.setattr(runs, "load_model", lambda *a, **k: os.kill(os.getpid(), signum) or pytest.fail("not stopped"))
    argv = ["run", str(path)] + (["--overwrite"] if overwrite else [])
    assert cli.main(argv) == 130
    err = capsys.readouterr().err
    assert err == (
        f"lm-superposition run: stopped by {signum.name} before writing anything; nothing on disk changed. "
        f"Start again with: lm-superposition run {path}{' --overwrite' if overwrite else ''}\n"
    )
    assert listing(tmp_path) == before
    assert signal.getsignal(signum) == handler  # the run's handler is gone again


@pytest.mark.parametrize("flag", [[], ["--resume"], ["--overwrite"]])
def test_a_signal_while_the_corpus_is_checked_says_to_start_again(flag, finished_run, tmp_path, monkeypatch, capsys):
    """Before the folder is touched there is nothing to continue, whatever the flags: the line
    repeats the command as given."""
    raw = copy_of_run(finished_run, tmp_path / "run")
    path = write_toml(tmp_path / "run.toml", raw)
    before = listing(tmp_path)
    monkeypatch.setattr(runs, "check_text_source", lambda *a, **k: os.kill(os.getpid(), signal.SIGINT))
    assert cli.main(["run", str(path), *flag]) == 130
    command = shlex.join(["lm-superposition", "run", str(path), *flag])
    err = capsys.readouterr().err
    assert (
        err == "lm-superposition run: stopped by SIGINT before writing anything; nothing on disk changed. "
        f"Start again with: {command}\n"
    )
    assert listing(tmp_path) == before


def test_sigint_saves_the_checkpoint_and_prints_the_resume_command(tiny_model, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(200):
        (corpus / f"doc{i:03d}.txt").write_text(" ".join(TEXT[j % 3] for j in range(i % 5 + 2)) + f" document {i}")
    tables = raw_config(tiny_model, corpus, tmp_path / "run", token_budget=1000, batch_size=1)
    path = write_toml(tmp_path / "run.toml", tables)
    environment = os.environ | {"PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(
        [sys.executable, "-m", "lm_superposition", "run", str(path)],
        cwd=tmp_path,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while not list((tmp_path / "run" / "checkpoints").glob("*.pt")) and child.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 130, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "--resume" in line]
    assert len(lines) == 1, err
    assert "stopped by SIGINT; the checkpoint was saved" in lines[0]
    command = shlex.split(lines[0].split("Continue with: ")[1])
    assert command == ["lm-superposition", "run", str(path), "--resume"]

    resumed = subprocess.run(
        [sys.executable, "-m", "lm_superposition", *command[1:]],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    tables["run"]["output"] = str(tmp_path / "straight")
    straight = runs.run(RunConfig.from_dict(tables), progress=False)
    pd.testing.assert_frame_equal(
        without_paths(pd.read_csv(tmp_path / "run" / "layerwise.csv")),
        without_paths(pd.read_csv(tmp_path / "straight" / "layerwise.csv")),
    )
    assert len(straight) == 4
