"""The Gemma studies' logic on small synthetic inputs: the recipe comparison, the config
overlay, the width ladder's plateau rule."""

import pandas as pd
import pytest
import torch

from experiments.full_depth_recipes import BASE_CONFIG, compare, recipe_config
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


def test_compare_reads_rank_agreement_and_the_curves_statements():
    rising = _curve(lambda kind, depth: depth + {"resid": 100, "mlp_out": 50, "attn_out": 0}[kind])
    falling = _curve(lambda kind, depth: -depth + {"resid": 0, "mlp_out": 50, "attn_out": 100}[kind])
    correlations, statements = compare({"a": rising, "b": rising.copy(), "c": falling})
    by_pair = correlations.set_index(["recipes", "hooks"])["spearman"]
    assert by_pair["a vs b", "all"] == pytest.approx(1.0)
    assert by_pair["a vs c", "resid"] == pytest.approx(-1.0)
    statement = statements.set_index("recipe")
    assert statement.loc["a", "mlp_out peak depth"] == 18.0 and statement.loc["c", "mlp_out peak depth"] == 1.0
    assert statement.loc["a", "kinds by mean psi"] == "resid > mlp_out > attn_out"
    assert statement.loc["c", "kinds by mean psi"] == "attn_out > mlp_out > resid"
    assert bool(statement.loc["a", "resid late > early"]) and not bool(statement.loc["c", "resid late > early"])


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
