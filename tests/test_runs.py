"""Scripted runs: TOML configs, run folders, resume, the CLI, and the demo's code path."""

import json

import pandas as pd
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

from lm_superposition import cli, runs
from lm_superposition.analyze import SeedMeasurement
from lm_superposition.config import RunConfig, demo_config

TEXT = [
    "def effective_features(budget): return math.exp(entropy(budget))",
    "the residual stream carries more features than it has dimensions",
    "class FeatureBudget: sums of absolute codes, kept per document block",
]


@pytest.fixture(scope="module")
def tiny_pythia_folder(tmp_path_factory):
    """A 2-layer GPT-NeoX (Pythia's architecture) with its tokenizer, saved as a local HF folder."""
    folder = tmp_path_factory.mktemp("models") / "tiny-pythia"
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(
        TEXT,
        trainers.BpeTrainer(
            vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    torch.manual_seed(0)
    config = GPTNeoXConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        rotary_pct=0.25,
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=0,
    )
    GPTNeoXForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture()
def corpus_folder(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(40):
        (folder / f"doc{i:02d}.txt").write_text(" ".join(TEXT[j % 3] for j in range(i % 5 + 2)) + f" document {i}")
    return folder


def small_config(model_folder, corpus, output, **run_overrides) -> RunConfig:
    raw = {
        "run": {
            "output": str(output),
            "seeds": [0, 1],
            "token_budget": 600,
            "batch_size": 4,
            "context_size": 32,
            "checkpoint_every": 1,
            "ce_windows": 2,
            "n_blocks": 8,
            **run_overrides,
        },
        "model": {"names": [str(model_folder)]},
        "saes": {
            "train": {
                "hooks": ["blocks.0.hook_resid_pre", "blocks.1.hook_mlp_out"],
                "expansion_factor": 2,
                "training_tokens": 1024,
                "batch_size_tokens": 128,
                "shuffle_buffer_batches": 2,
                "epochs": 2,
            }
        },
        "corpus": {"sources": [str(corpus)]},
    }
    return RunConfig.from_dict(raw)


def test_run_writes_a_complete_run_folder(tiny_pythia_folder, corpus_folder, tmp_path):
    output = tmp_path / "run"
    table = runs.run(small_config(tiny_pythia_folder, corpus_folder, output), progress=False)
    assert len(table) == 2 * 2  # hooks x seeds
    assert (table["tokens"] == 600).all()
    assert set(table["quality"]) <= {"ok"} | set(table["quality"])  # a flag is always present
    assert table["quality"].map(bool).all()
    assert (table["recipe"] == "validated").all()  # small_config trains with the default recipe
    for name in (
        "layerwise.csv",
        "layerwise.json",
        "convergence.csv",
        "compression_curve.png",
        "compression_curve.svg",
        "convergence.png",
        "manifest.json",
    ):
        assert (output / name).is_file(), name
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["config"]["run"]["token_budget"] == 600
    assert manifest["versions"]["torch"] and manifest["versions"]["sae-lens"]
    assert manifest["timings_s"]["total"] > 0
    assert len(json.loads((output / "layerwise.json").read_text())) == 4
    assert (output / "saes").is_dir()


def test_killed_run_resumes_to_the_uninterrupted_table(tiny_pythia_folder, corpus_folder, tmp_path, monkeypatch):
    straight = runs.run(small_config(tiny_pythia_folder, corpus_folder, tmp_path / "straight"), progress=False)

    original_save = SeedMeasurement.save
    saves = []

    def save_then_die(self, path):
        original_save(self, path)
        saves.append(self.windows_done)
        if len(saves) == 3:  # seed 0 part-way through
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(SeedMeasurement, "save", save_then_die)
    config = small_config(tiny_pythia_folder, corpus_folder, tmp_path / "resumed")
    with pytest.raises(KeyboardInterrupt):
        runs.run(config, progress=False)
    monkeypatch.setattr(SeedMeasurement, "save", original_save)

    with pytest.raises(FileExistsError, match="--resume.*--overwrite"):
        runs.run(config, progress=False)
    resumed = runs.run(config, resume=True, progress=False)
    columns = [c for c in straight.columns if c not in ("sae",)]
    pd.testing.assert_frame_equal(resumed[columns], straight[columns])


def test_overwrite_replaces_a_run_folder_and_nothing_else(tiny_pythia_folder, corpus_folder, tmp_path):
    output = tmp_path / "run"
    runs.run(small_config(tiny_pythia_folder, corpus_folder, output, seeds=[0]), progress=False)
    (output / "layerwise.csv").write_text("stale")
    runs.run(small_config(tiny_pythia_folder, corpus_folder, output, seeds=[1]), overwrite=True, progress=False)
    assert pd.read_csv(output / "layerwise.csv")["seed"].unique().tolist() == [1]


def test_unknown_config_keys_name_the_key_and_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match=r"'token_budgt' in \[run\]; valid keys: output, seeds, token_budget"):
        RunConfig.from_dict({"run": {"token_budgt": 5}})
    with pytest.raises(ValueError, match=r"'modle' in the top level; valid keys: run, model, saes, corpus"):
        RunConfig.from_dict({"modle": {}})
    with pytest.raises(ValueError, match=r"'expansion' in \[saes.train\].*expansion_factor"):
        RunConfig.from_dict({"saes": {"train": {"expansion": 4}}})
    path = tmp_path / "bad.toml"
    path.write_text('[corpus]\nsource = "offline"\n')
    with pytest.raises(ValueError, match="'source' in \\[corpus\\]; valid keys: sources"):
        RunConfig.from_toml(path)


def test_shipped_configs_parse():
    for path in ("experiments/pythia70m_layerwise.toml", "lm_superposition/configs/demo.toml"):
        assert RunConfig.from_toml(path).run.seeds
    paper = RunConfig.from_toml("experiments/pythia70m_layerwise.toml")
    assert paper.saes.releases == [
        "pythia-70m-deduped-res-sm",
        "pythia-70m-deduped-att-sm",
        "pythia-70m-deduped-mlp-sm",
    ]


def test_the_demo_runs_the_packaged_config_with_only_its_overrides():
    shipped = RunConfig.from_toml("lm_superposition/configs/demo.toml")
    assert demo_config().to_dict() == shipped.to_dict()
    changed = demo_config(output="elsewhere", token_budget=123)
    assert (changed.run.output, changed.run.token_budget) == ("elsewhere", 123)
    changed.run.output, changed.run.token_budget = shipped.run.output, shipped.run.token_budget
    assert changed.to_dict() == shipped.to_dict()


def test_a_config_without_saes_is_refused(tiny_pythia_folder, corpus_folder, tmp_path):
    run_config = small_config(tiny_pythia_folder, corpus_folder, tmp_path / "run")
    run_config.saes.train = None
    with pytest.raises(ValueError, match="names no SAEs"):
        runs.run(run_config, progress=False)
    assert not (tmp_path / "run").exists()


def test_cli_run_and_its_errors(tiny_pythia_folder, corpus_folder, tmp_path, capsys):
    config_path = tmp_path / "run.toml"
    config_path.write_text(
        f'[run]\noutput = "{tmp_path / "cli_run"}"\nseeds = [0]\ntoken_budget = 300\ncontext_size = 32\n'
        f'[model]\nnames = ["{tiny_pythia_folder}"]\n'
        '[saes.train]\nhooks = ["blocks.1.hook_resid_post"]\nexpansion_factor = 2\ntraining_tokens = 512\n'
        "batch_size_tokens = 128\nshuffle_buffer_batches = 2\n"
        f'[corpus]\nsources = ["{corpus_folder}"]\n'
    )
    assert cli.main(["run", str(config_path)]) == 0
    out = capsys.readouterr().out
    assert "blocks.1.hook_resid_post" in out and "wrote" in out
    assert cli.main(["run", str(config_path)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert cli.main(["run", str(tmp_path / "missing.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_hooks_lists_the_catalogue(tiny_pythia_folder, capsys):
    assert cli.main(["hooks", "--model", str(tiny_pythia_folder)]) == 0
    out = capsys.readouterr().out
    assert "blocks.1.hook_mlp_out" in out and "256" in out  # d_mlp of the tiny model


@pytest.mark.parametrize("command", list(cli.EXAMPLES))
def test_every_command_has_help_with_an_example(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    assert "example" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_code_path_at_a_reduced_budget(gemma_model, tmp_path, monkeypatch):
    """The demo exactly as `lm-superposition demo` runs it, with small budgets and the session's Gemma."""
    monkeypatch.setattr(runs, "load_model", lambda *args, **kwargs: gemma_model)
    demo = demo_config(str(tmp_path / "demo"), token_budget=300, training_tokens=2048)
    demo.saes.train.batch_size_tokens = 256
    demo.run.ce_windows = 1
    table = runs.run(demo, progress=False)
    hooks = demo.saes.train.hooks
    assert len(table) == len(hooks) * len(demo.run.seeds)
    assert set(table["hook"]) == set(hooks)
    assert (table["N"] == 640).all() and (table["tokens"] == 300).all()
    assert table["additivity"].between(-1, 1).all()  # the demo asks for the linear-additivity check
    assert (tmp_path / "demo" / "compression_curve.png").stat().st_size > 10_000
