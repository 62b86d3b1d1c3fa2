"""The findings studies (experiments/{dictionary_robustness,dropout,algorithmic,grokking}.py) at a tiny size."""

import importlib.util
import math
import sys
from pathlib import Path

import pandas as pd
import torch

REPO = Path(__file__).resolve().parent.parent


def _load(study: str):
    spec = importlib.util.spec_from_file_location(study, REPO / "experiments" / f"{study}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[study] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _check_outputs(folder: Path, study: str, plot_name: str, table: pd.DataFrame) -> str:
    assert (folder / plot_name).stat().st_size > 0
    on_disk = pd.read_csv(folder / "table.csv")
    assert len(on_disk) == len(table) and list(on_disk.columns) == list(table.columns)
    readme = (folder / "README.md").read_text()
    assert f"python -m experiments.{study} --quick --out {folder}" in readme
    return readme


def test_plateau_is_the_first_width_after_which_F_stays_within_ten_percent():
    plateau_expansion = _load("dictionary_robustness").plateau_expansion
    assert plateau_expansion([0.5, 1, 2, 4, 8], [5, 15, 20, 21, 20.5]) == 2
    assert plateau_expansion([8, 4, 2, 1], [20.5, 21, 20, 15]) == 2  # order of the sweep does not matter
    assert plateau_expansion([1, 2, 4], [10, 20, 40]) is None  # still growing: no plateau inside the sweep
    assert plateau_expansion([1, 2, 4], [10, 10.5, 30]) is None  # a later jump breaks an early plateau


def test_dictionary_robustness_quick_toy_sweep(tmp_path):
    study = _load("dictionary_robustness")
    table = study.main(["--quick", "--out", str(tmp_path)])
    assert len(table) == 3  # 3 expansions x 1 L1 on the toy, no real model in --quick
    assert table["d_sae"].tolist() == [5, 20, 80]  # 0.5, 2, 8 x m = 10
    assert (table["F"] <= table["d_sae"] + 1e-9).all() and (table["F"] >= 1).all()
    readme = _check_outputs(tmp_path, "dictionary_robustness", "f_vs_width.png", table)
    assert "Plateau" in readme


def test_dictionary_robustness_real_layer_sweep_on_held_out_documents():
    study = _load("dictionary_robustness")
    args = study.parse_args(
        ["--real-expansions", "0.5", "2", "--real-l1", "1", "--training-tokens", "2048", "--batch-size-tokens", "128"]
    )
    generator = torch.Generator().manual_seed(0)
    activations = torch.randn(3000, 16, generator=generator)
    doc_ids = torch.arange(3000) // 100  # 30 documents
    table = study.real_sweep(activations, doc_ids, args, "random")
    assert table["d_sae"].tolist() == [8, 32]
    assert (table["tokens"] == 600).all()  # the last 20% of documents (6 of 30) are held out
    assert (table["F_low"] <= table["F"]).all() and (table["F"] <= table["F_high"]).all()


def test_dropout_quick(tmp_path):
    study = _load("dropout")
    table = study.main(["--quick", "--out", str(tmp_path)])
    assert len(table) == 2 * 1 * 2  # 2 rates x 1 seed x 2 hidden layers
    assert set(table["dropout"]) == {0.0, 0.5} and set(table["layer"]) == {0, 1}
    assert table["F"].between(1, table["d_sae"]).all()
    assert table["neuron_F"].between(1, table["N"]).all()
    readme = _check_outputs(tmp_path, "dropout", "f_vs_dropout.png", table)
    assert "spearman_with_dropout" in readme


def test_algorithmic_quick(tmp_path):
    study = _load("algorithmic")
    table = study.main(["--quick", "--out", str(tmp_path)])
    assert len(table) == 3 * 1 * 2  # 3 tasks x 1 seed x 2 layers
    assert set(table["task"]) == {"modular_addition", "sparse_parity", "multitask_sparse_parity"}
    assert (table["psi"] == table["F"] / table["N"]).all()
    assert (table["neuron_psi"] <= 1 + 1e-9).all()  # F of N neurons can never exceed N
    assert (table.loc[table["task"] == "modular_addition", "measured_samples"] == 11**2).all()
    _check_outputs(tmp_path, "algorithmic", "psi_per_layer.png", table)


def test_grokking_quick(tmp_path):
    study = _load("grokking")
    table = study.main(["--quick", "--out", str(tmp_path)])
    assert table["step"].tolist() == [10, 20, 30, 40]
    for column in ("mlp_F", "resid_F", "mlp_neuron_F", "train_accuracy", "test_accuracy"):
        assert table[column].notna().all()
    assert table["mlp_F"].between(1, 2 * 32).all() and table["resid_F"].between(1, 4 * 16).all()
    assert table["mlp_neuron_F"].between(1, 32).all()
    assert (table["weight_norm"] > 0).all() and table["weight_norm"].map(math.isfinite).all()
    readme = _check_outputs(tmp_path, "grokking", "grokking.png", table)
    assert "mlp_F_drop_step" in readme
