"""The findings studies (experiments/{dictionary_robustness,dropout,algorithmic,grokking,sparse_code_checks}.py) at a
tiny size: each runs and computes its statistic (not its sign)."""

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


def _check_per_sae_verdicts(table: pd.DataFrame, check) -> None:
    """The `quality` column of a per-SAE table is the gate's verdict on that row's measurements."""
    check(table["quality"], table["variance_explained"], table["F"], table["d_sae"])


def test_dictionary_robustness_quick_parity_sweep(tmp_path, check_gate_verdicts):
    study = _load("dictionary_robustness")
    table = study.main(["--quick", "--out", str(tmp_path)])
    _check_per_sae_verdicts(table, check_gate_verdicts)
    assert len(table) == 2 * 3 * 2  # 2 model seeds x 3 widths x 2 SAE seeds
    assert sorted(table["d_sae"].unique()) == [8, 32, 128]  # 0.5, 2, 8 x N = 16
    assert table["sae_steps"].isin([20, 40]).all()  # a budget of the VE-plateau rule
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert summary["F_mean"].notna().all() and summary["F_low95"].notna().all()  # interval over model seeds
    assert (summary["F_low95"] <= summary["F_mean"]).all() and (summary["F_mean"] <= summary["F_high95"]).all()
    passed = table.groupby("expansion")["quality"].agg(lambda v: f"{(v == 'ok').sum()}/{len(v)}")
    assert summary["gate_pass"].tolist() == passed.tolist()
    readme = _check_outputs(tmp_path, "dictionary_robustness", "f_vs_width.svg", table)
    assert "plateau" in readme
    assert f"{(table['quality'] == 'ok').sum()} of {len(table)} SAEs pass the quality gate" in readme


def test_dictionary_robustness_quick_toy_setting_reports_the_ground_truth(tmp_path, check_gate_verdicts):
    study = _load("dictionary_robustness")
    table = study.main(["--quick", "--setting", "toy", "--toy-steps", "50", "--out", str(tmp_path)])
    _check_per_sae_verdicts(table, check_gate_verdicts)
    assert sorted(table["d_sae"].unique()) == [5, 20, 80]  # 0.5, 2, 8 x m = 10
    assert table["ground_truth"].between(1, 40).all() and table["F"].notna().all()
    assert "Toy models store" in (tmp_path / "README.md").read_text()


def test_the_papers_parity_task_enumerates_every_input_with_the_right_label():
    tasks = _load("tasks")
    task = tasks.DisjointParityTask(n_tasks=3, bits_per_task=4)
    inputs, labels, task_ids = task.all_inputs()
    assert inputs.shape == (3 * 2**12, 15)
    bits = inputs[:, 3:].view(-1, 3, 4)
    assert torch.equal(labels, bits[torch.arange(len(bits)), task_ids].sum(1).long() % 2)
    train, test = task.split(seed=0)
    assert len(set(train.tolist()) | set(test.tolist())) == len(inputs) and len(test) == 2460


def test_dropout_quick(tmp_path, check_gate_verdicts):
    study = _load("dropout")
    table = study.main(["--quick", "--out", str(tmp_path)])
    _check_per_sae_verdicts(table, check_gate_verdicts)
    assert len(table) == 3 * 3  # 3 rates x 3 seeds at one width
    assert set(table["dropout"]) == {0.0, 0.1, 0.5}
    assert table["F"].between(1, table["d_sae"]).all()
    slopes = pd.read_csv(tmp_path / "slopes.csv")
    assert len(slopes) == 1 and slopes[["slope", "slope_low", "slope_high", "p_holm"]].notna().all(axis=None)
    assert slopes["slope_low"].iloc[0] <= slopes["slope"].iloc[0] <= slopes["slope_high"].iloc[0]
    readme = _check_outputs(tmp_path, "dropout", "f_vs_dropout.svg", table)
    assert "Holm" in readme and "gate_pass" in readme
    assert f"{(table['quality'] == 'ok').sum()} of {len(table)} SAEs pass the quality gate" in readme


def test_algorithmic_quick_with_control_and_l1_sweep(tmp_path, check_gate_verdicts):
    study = _load("algorithmic")
    table = study.main(["--quick", "--out", str(tmp_path)])
    _check_per_sae_verdicts(table, check_gate_verdicts)
    assert (table.loc[table["dead_sae"], "quality"].str.contains("no latent fires")).all()
    assert len(table) == 4 * 1 * 2 * 2  # 4 tasks (3 + the positive control) x 1 seed x 2 layers x 2 L1
    assert set(table["task"]) == {"modular_addition", "sparse_parity", "multitask_sparse_parity", "sparse_features"}
    assert set(table["l1_coefficient"]) == {1.0, 3.0}
    live = table[~table["dead_sae"]]
    assert len(live) > 0 and (live["psi"] == live["F"] / live["N"]).all()
    assert (table["neuron_psi"].dropna() <= 1 + 1e-9).all()  # F of N neurons can never exceed N
    assert (table.loc[table["task"] == "modular_addition", "measured_samples"] == 11**2).all()
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert {"psi_mean", "psi_low95", "psi_high95", "gate_pass"} <= set(summary.columns)
    readme = _check_outputs(tmp_path, "algorithmic", "psi_per_layer.svg", table)
    assert f"{(table['quality'] == 'ok').sum()} of {len(table)} SAEs pass the quality gate" in readme


def test_sparse_code_checks_quick(tmp_path, check_gate_verdicts):
    study = _load("sparse_code_checks")
    stability, additivity = study.main(["--quick", "--out", str(tmp_path)])
    d_sae = [4 * 10] * len(stability)  # 4 x m
    for side in ("a", "b"):
        check_gate_verdicts(stability[f"quality_{side}"], effective_features=stability[f"F_{side}"], d_sae=d_sae)
    on_disk = pd.read_csv(tmp_path / "stability.csv")
    assert on_disk["quality_a"].tolist() == stability["quality_a"].tolist()
    assert len(stability) == 2  # 2 toy configs x 1 pair of SAE seeds
    for column in ("cross_seed_cosine", "truth_cosine_a", "truth_cosine_b"):
        assert stability[column].between(-1, 1 + 1e-6).all()
    assert len(additivity) == 2  # 1 seed x 2 layers
    assert additivity[["concept_additivity", "sample_additivity"]].notna().all(axis=None)
    readme = (tmp_path / "README.md").read_text()
    assert "python -m experiments.sparse_code_checks --quick" in readme
    verdicts = [*stability["quality_a"], *stability["quality_b"]]  # 2 SAEs per config, each in the one pair
    assert f"{verdicts.count('ok')} of {len(verdicts)} SAEs pass the quality gate" in readme
    assert (tmp_path / "sparse_code_checks.svg").stat().st_size > 0


def test_matched_cosine_is_one_for_a_permuted_copy_and_lower_for_other_directions():
    study = _load("sparse_code_checks")
    directions = torch.nn.functional.normalize(torch.randn(6, 10, generator=torch.Generator().manual_seed(0)), dim=1)
    assert abs(study.matched_cosine(directions, directions[[3, 1, 5, 0, 2, 4]]) - 1) < 1e-6
    other = torch.nn.functional.normalize(torch.randn(6, 10, generator=torch.Generator().manual_seed(1)), dim=1)
    assert study.matched_cosine(directions, other) < 0.9


def test_grokking_quick_across_seeds(tmp_path, check_gate_verdicts):
    study = _load("grokking")
    table = study.main(["--quick", "--out", str(tmp_path)])
    for label in ("mlp", "resid"):
        per_sae = table[f"{label}_quality"].str.split(study.QUALITY_SEPARATOR, regex=False)
        assert per_sae.map(len).eq(2).all()  # the 2 SAE seeds of each checkpoint
        check_gate_verdicts([verdict for cell in per_sae for verdict in cell])
        passed = per_sae.map(lambda cell: f"{cell.count('ok')}/{len(cell)}")
        assert table[f"{label}_gate_pass"].tolist() == passed.tolist()
    assert table["seed"].tolist() == [0] * 4 + [1] * 4 and table["step"].tolist() == [10, 20, 30, 40] * 2
    for column in ("mlp_F", "resid_F", "mlp_neuron_F", "train_accuracy", "test_accuracy"):
        assert table[column].notna().all()
    assert (table["mlp_F_sae_min"] <= table["mlp_F"]).all() and (table["mlp_F"] <= table["mlp_F_sae_max"]).all()
    assert table["mlp_neuron_F"].between(1, 32).all()
    assert (table["weight_norm"] > 0).all() and table["weight_norm"].map(math.isfinite).all()
    lags = pd.read_csv(tmp_path / "lags.csv")
    assert lags["seed"].tolist() == [0, 1] and lags["mlp_F_drop_step"].notna().all()  # the drop step is found
    readme = _check_outputs(tmp_path, "grokking", "grokking.svg", table)
    assert "lag_mean" in readme


def test_gemma_stability_quick_on_synthetic_activations(tmp_path):
    study = _load("gemma_stability")
    table = study.main(["--quick", "--out", str(tmp_path)])
    # a language model's hooks: the gate owes CE loss recovered, which this study does not measure
    for side in ("a", "b"):
        assert table[f"quality_{side}"].str.contains("CE recovered not measured").all()
    assert table["hook"].tolist() == ["a", "b"]
    assert table["cross_seed_cosine"].between(-1, 1 + 1e-6).all() and table["variance_explained"].notna().all()
    assert "python -m experiments.gemma_stability --quick" in (tmp_path / "README.md").read_text()
    assert (tmp_path / "stability.svg").stat().st_size > 0
