"""One pipeline: a scripted run and measure_layers give the same table; the CLI's defaults are the
configs'; `import lm_superposition` stays light."""

import dataclasses
import subprocess
import sys

import pandas as pd
import torch
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata
from test_runs import corpus_folder, tiny_pythia_folder  # noqa: F401  (fixtures)

from lm_superposition import cli, config, runs
from lm_superposition.analyze import measure_layers
from lm_superposition.data import load_texts, token_windows
from lm_superposition.models import load_model
from lm_superposition.saes import load_sae_from_disk, save_sae

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]


def test_a_run_and_measure_layers_share_one_code_path(tiny_pythia_folder, corpus_folder, tmp_path):  # noqa: F811
    model = load_model(str(tiny_pythia_folder))
    folders = []
    for i, hook in enumerate(HOOKS):
        torch.manual_seed(i)
        width = 256 if "mlp" in hook else 64
        sae = StandardSAE(StandardSAEConfig(d_in=64, d_sae=width, metadata=SAEMetadata(hook_name=hook)))
        with torch.no_grad():
            sae.W_enc.normal_(0, 0.2)
            sae.b_enc.fill_(-0.1)
        folders.append(str(save_sae(sae, tmp_path / "saes" / hook)))
    settings = dict(
        seeds=[0, 1], token_budget=400, batch_size=4, context_size=32, ce_windows=2, additivity_pairs=2, n_blocks=8
    )
    run_config = config.RunConfig.from_dict(
        {
            "run": {"output": str(tmp_path / "run"), **settings},
            "model": {"names": [str(tiny_pythia_folder)]},
            "saes": {"folders": folders},
            "corpus": {"sources": [str(corpus_folder)]},
        }
    )
    from_run = runs.run(run_config, progress=False)

    saes = {hook: load_sae_from_disk(folder) for hook, folder in zip(HOOKS, folders)}

    def windows_for(seed):
        return token_windows(
            load_texts(str(corpus_folder), seed=seed), model.tokenizer, context_size=32, token_budget=400, seed=seed
        )

    from_api = measure_layers(
        model,
        saes,
        windows_for,
        seeds=[0, 1],
        token_budget=400,
        batch_size=4,
        ce_windows=2,
        additivity_pairs=2,
        n_blocks=8,
        model_name=str(tiny_pythia_folder),
        progress=False,
    )
    shared = [c for c in from_api.columns if c != "sae"]
    pd.testing.assert_frame_equal(from_run[shared].reset_index(drop=True), from_api[shared].reset_index(drop=True))


def test_cli_defaults_are_the_config_defaults():
    parser = cli.build_parser()
    args = parser.parse_args(["layerwise"])
    assert cli.given_config(args) == {}  # nothing given: every default is the dataclass's own
    tables = {
        "run": config.RunSettings(),
        "model": config.ModelSettings(),
        "corpus": config.CorpusSettings(),
        "saes.train": config.SAETrainSettings(hooks=["h"]),
    }
    for command, options in (("layerwise", cli.LAYERWISE_OPTIONS), ("train-sae", cli.TRAIN_SAE_OPTIONS)):
        help_text = parser._subparsers._group_actions[0].choices[command].format_help()
        for table, names in options.items():
            if table not in tables:
                continue
            for name in names:
                default = getattr(tables[table], name)
                if default not in (None, [], ["h"]):
                    assert f"(default: {default})" in " ".join(help_text.split()), (command, table, name)
    # a given option reaches the config; one left out keeps the default
    given = cli.given_config(
        parser.parse_args(["train-sae", "--out", "x", "--hooks", "a", "--training-tokens", "5000"])
    )
    train = config.RunConfig.from_dict(given | {"saes": {"train": given["saes"]["train"]}}).saes.train
    assert train.training_tokens == 5000 and train.lr == config.SAETrainingConfig().lr
    fields = {f.name for f in dataclasses.fields(config.SAETrainSettings)} - {"model_name"}
    assert set(cli.TRAIN_SAE_OPTIONS["saes.train"]) == fields


def test_demo_defaults_shown_are_the_packaged_configs():
    help_text = " ".join(cli.build_parser()._subparsers._group_actions[0].choices["demo"].format_help().split())
    demo = config.demo_config()
    assert (
        f"(default: {demo.run.token_budget})" in help_text
        and f"(default: {demo.saes.train.training_tokens})" in help_text
    )


def test_importing_the_package_loads_neither_sae_lens_nor_matplotlib():
    code = (
        "import sys, lm_superposition; "
        "print('sae_lens' in sys.modules, 'matplotlib' in sys.modules, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False", "False"]
