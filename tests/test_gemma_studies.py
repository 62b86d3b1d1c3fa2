"""The Gemma studies' logic on small synthetic inputs: the recipe comparison, the config
overlay, the width ladder's plateau rule."""

import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from experiments.full_depth_recipes import BASE_CONFIG, correlations, recipe_config, statements
from experiments.full_depth_report import per_layer_table
from lm_superposition.config import RunConfig


def _curve(psi_of_depth, kinds=("resid", "mlp_out", "attn_out"), n_blocks=18) -> pd.DataFrame:
    rows = [
        {
            "hook": f"blocks.{layer}.{kind}",
            "group": kind,
            "layer": layer,
            "depth": layer + 1.0,
            "psi": psi_of_depth(kind, layer + 1.0),
            "psi_low": 0.0,
            "psi_high": 9.0,
            "quality": "ok",
        }
        for layer in range(n_blocks)
        for kind in kinds
    ]
    return pd.DataFrame(rows)


def test_recipes_are_compared_by_rank_agreement_and_the_curves_statements():
    rising = _curve(lambda kind, depth: depth + {"resid": 100, "mlp_out": 50, "attn_out": 0}[kind])
    falling = _curve(lambda kind, depth: -depth + {"resid": 0, "mlp_out": 50, "attn_out": 100}[kind])
    runs = {"a": rising, "b": rising.copy(), "c": falling}
    by_pair = correlations(runs).set_index(["recipes", "hooks"])["spearman"]
    assert by_pair["a vs b", "all"] == pytest.approx(1.0)
    assert by_pair["a vs c", "resid"] == pytest.approx(-1.0)
    statement = statements(runs).set_index("recipe")
    assert statement.loc["a", "mlp_out peak depth"] == 18.0 and statement.loc["c", "mlp_out peak depth"] == 1.0
    assert statement.loc["a", "kinds by mean psi"] == "resid > mlp_out > attn_out"
    assert statement.loc["c", "kinds by mean psi"] == "attn_out > mlp_out > resid"
    assert bool(statement.loc["a", "resid late > early"]) and not bool(statement.loc["c", "resid late > early"])


def test_per_layer_table_puts_each_kind_in_its_column_and_counts_the_gate():
    curve = _curve(lambda kind, depth: depth / 10)
    curve.loc[(curve["group"] == "attn_out") & (curve["depth"] == 3.0), "quality"] = "variance explained 0.5 < 0.9"
    embedding = {"hook": "blocks.0.hook_resid_pre", "group": "embedding", "layer": 0, "depth": 0.0}
    curve = pd.concat(
        [pd.DataFrame([embedding | {"psi": 2.0, "psi_low": 1.5, "psi_high": 2.5, "quality": "ok"}]), curve]
    )
    table = per_layer_table(curve).set_index("depth")
    assert len(table) == 19
    assert table.loc[0, "resid psi [95%]"] == "2.00 [1.50, 2.50]" and table.loc[0, "mlp_out psi [95%]"] == ""
    assert table.loc[3, "attn_out psi [95%]"] == "0.30 [0.00, 9.00]"
    assert (table.loc[3, "pass the gate"], table.loc[4, "pass the gate"]) == ("2 of 3", "3 of 3")


def test_recipe_config_changes_only_the_recipe_the_seeds_and_the_folder():
    base = RunConfig.from_toml(BASE_CONFIG)
    topk = recipe_config(base, "topk32", sae_seeds=[0], data_seeds=[5], ce_windows=1)
    assert (topk.saes.train.architecture, topk.saes.train.k, topk.saes.train.sae_seeds) == ("topk", 32, [0])
    assert topk.saes.train.hooks == base.saes.train.hooks and len(base.saes.train.hooks) == 55
    assert topk.saes.train.training_tokens == base.saes.train.training_tokens
    assert topk.run.output != base.run.output and (topk.run.seeds, topk.run.ce_windows) == ([5], 1)
    assert topk.run.token_budget == base.run.token_budget
    assert base.saes.train.recipe_verdict() == "validated" and topk.saes.train.recipe_verdict() != "validated"
    assert recipe_config(base, "validated", sae_seeds=[0], data_seeds=[5], ce_windows=1) is base


def test_width_ladder_trains_until_a_doubling_stops_helping(tmp_path):
    """The plateau rule on random activations: every hook ends with one kept SAE, marked
    plateaued only where the last doubling added less than the threshold."""
    from argparse import Namespace

    from experiments.gemma_width_ladder import _train_until_plateau
    from lm_superposition.models import HookPoint

    generator = torch.Generator().manual_seed(0)
    points = [
        HookPoint("blocks.0.hook_mlp_out", "mlp_out", 0, 16),
        HookPoint("blocks.1.hook_resid_post", "resid_post", 1, 16),
    ]
    train = {point.name: torch.randn(2048, 16, generator=generator) for point in points}
    heldout = {point.name: torch.randn(256, 16, generator=generator) for point in points}
    args = Namespace(
        start_training_tokens=512, max_training_tokens=2048, plateau=1.0, batch_size_tokens=128, work=tmp_path
    )
    rows, kept = _train_until_plateau(2, lambda: train, heldout, points, args)
    # plateau = 1.0: any first doubling counts as a plateau, so each hook stops at 1,024 tokens.
    assert set(kept) == {point.name for point in points}
    assert all(sae.cfg.d_sae == 32 for sae in kept.values())
    final = [row for row in rows if row["kept"]]
    assert [row["training_tokens"] for row in final] == [1024, 1024] and all(row["plateaued"] for row in final)

    args.plateau, args.work = -1.0, tmp_path / "never"  # never a plateau: trained up to the cap, marked so
    rows, _ = _train_until_plateau(2, lambda: train, heldout, points[:1], args)
    assert [row["training_tokens"] for row in rows] == [512, 1024, 2048]
    assert rows[-1]["kept"] and not rows[-1]["plateaued"]


def test_full_depth_report_writes_the_results_folder_from_a_run_folder(tmp_path):
    """The report on the committed demo run (a run folder of the same form, 10 hooks)."""
    from experiments.full_depth_report import COPIED, main

    demo = Path(__file__).resolve().parents[1] / "results" / "gemma3_270m_offline"
    run_folder = tmp_path / "run"
    run_folder.mkdir()
    for name in COPIED:
        shutil.copy2(demo / name, run_folder / name)
    config = tmp_path / "config.toml"
    text = (Path(__file__).resolve().parents[1] / "lm_superposition" / "configs" / "demo.toml").read_text()
    config.write_text(text.replace('output = "runs/demo"', f'output = "{run_folder}"'))
    main(["--config", str(config), "--conditions", "a test", "--out", str(tmp_path / "out")])
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "0 of 20 rows (hook x data seed x SAE seed) pass the quality gate" in readme
    table = pd.read_csv(demo / "layerwise.csv")
    f_mlp = table[table.hook == "blocks.3.hook_mlp_out"].F.mean()  # mean over the data seeds
    assert f"| blocks.3.hook_mlp_out | {f_mlp:,.0f} |" in readme  # the demo's own per-hook table
    assert (tmp_path / "out" / "compression_curve.png").is_file()


def test_anisotropy_share_sees_one_dominant_direction_and_an_isotropic_cloud():
    from experiments.hook_anisotropy import top_direction_shares

    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(2000, 16, generator=generator)
    direction = torch.zeros(16)
    direction[3] = 1.0
    # Along one direction a mean of 20 and a spread of 10, beside unit noise in 16 dimensions: the
    # raw share counts the mean, (400 + 100) / (400 + 100 + 16), the centered one only the spread,
    # 100 / (100 + 16).
    scale = 20 + 10 * torch.randn(2000, 1, generator=generator)
    raw, centered = top_direction_shares(noise + scale * direction)
    assert raw == pytest.approx(500 / 516, abs=0.01) and centered == pytest.approx(100 / 116, abs=0.02)
    raw, centered = top_direction_shares(noise)
    assert raw < 0.15 and centered < 0.15
