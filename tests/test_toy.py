import pandas as pd
import pytest
import torch

from experiments import toy_validation
from experiments.toy import (
    FeatureSampler,
    TiedSAE,
    ToyConfig,
    ToyModel,
    ToySAEConfig,
    feature_recovery,
    measure_sae,
    oracle_effective_features,
    represented_features,
    sample_features,
    train_toy_model,
    train_toy_sae,
)


@pytest.fixture(autouse=True)
def one_thread():
    """Toy models are tiny: one thread is several times faster than two fighting over them."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---- data --------------------------------------------------------------------------


def test_features_have_the_asked_shape_range_and_sparsity():
    features = sample_features(200_000, 5, 0.7, torch.Generator().manual_seed(0))
    assert features.shape == (200_000, 5)
    assert features.min() >= 0 and features.max() <= 1
    zero_fraction = (features == 0).float().mean(0)
    assert torch.allclose(zero_fraction, torch.full((5,), 0.7), atol=0.005)
    active = features[features > 0]
    assert active.mean() == pytest.approx(0.5, abs=0.005)  # Uniform[0, 1] when active


def test_per_feature_sparsity_is_honoured_and_zero_sparsity_is_dense():
    sparsity = torch.tensor([0.0, 0.5, 0.99])
    features = sample_features(100_000, 3, sparsity, torch.Generator().manual_seed(1))
    zero_fraction = (features == 0).float().mean(0)
    assert torch.allclose(zero_fraction, sparsity, atol=0.01)
    assert zero_fraction[0] == 0


def test_sampler_is_reproducible_from_its_seed():
    a, b, c = FeatureSampler(8, 0.9, seed=3), FeatureSampler(8, 0.9, seed=3), FeatureSampler(8, 0.9, seed=4)
    first = a.sample(64)
    assert torch.equal(first, b.sample(64))
    assert not torch.equal(first, c.sample(64))
    assert not torch.equal(first, a.sample(64))  # the stream moves on


@pytest.mark.parametrize(
    "sparsity, message",
    [(1.0, r"\[0, 1\)"), (-0.1, r"\[0, 1\)"), (torch.tensor([0.5, 0.5]), "vector of 3")],
)
def test_bad_sparsity_is_rejected(sparsity, message):
    with pytest.raises(ValueError, match=message):
        sample_features(4, 3, sparsity)


def test_bad_toy_config_is_rejected():
    with pytest.raises(ValueError, match="n_hidden"):
        ToyConfig(n_hidden=0)
    with pytest.raises(ValueError, match="importance_decay"):
        ToyConfig(importance_decay=1.5)


# ---- ground truth ------------------------------------------------------------------


def _model_with(W: torch.Tensor, b: torch.Tensor | None = None, sparsity: float = 0.9) -> ToyModel:
    model = ToyModel(ToyConfig(n_features=W.shape[1], n_hidden=W.shape[0], sparsity=sparsity))
    with torch.no_grad():
        model.W.copy_(W)
        model.b.copy_(torch.zeros(W.shape[1]) if b is None else b)
    return model.eval()


def test_norm_ground_truth_counts_columns_longer_than_the_threshold():
    norms = torch.tensor([1.0, 0.9, 0.51, 0.49, 0.1, 0.0])
    directions = torch.nn.functional.normalize(torch.randn(3, 6, generator=torch.Generator().manual_seed(0)), dim=0)
    model = _model_with(directions * norms)
    assert torch.allclose(model.feature_norms, norms, atol=1e-6)
    assert represented_features(model) == 3
    assert represented_features(model, threshold=0.05) == 5


def test_recovery_ground_truth_counts_features_the_output_recovers():
    # Features 0 and 1 pass through orthogonal hidden dims unchanged; feature 2 has no embedding.
    model = _model_with(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    recovery = feature_recovery(model, n_samples=20_000)
    assert recovery[:2].tolist() == pytest.approx([1.0, 1.0])
    assert recovery[2] < 0  # outputting 0 for a feature is worse than its mean
    assert represented_features(model, "recovery") == 2


def test_unknown_ground_truth_method_names_the_valid_ones():
    with pytest.raises(ValueError, match="norm.*recovery"):
        represented_features(_model_with(torch.eye(2, 3)), "energy")


def test_oracle_f_counts_equally_stored_features():
    W = torch.zeros(4, 6)
    W[:, :4] = torch.eye(4)
    features = FeatureSampler(6, 0.5, seed=0).sample(50_000)
    assert oracle_effective_features(_model_with(W), features) == pytest.approx(4.0, rel=0.01)


def test_trained_toy_model_stores_more_features_when_they_are_sparser():
    short = dict(n_features=12, n_hidden=4, steps=1000, batch_size=256, lr=1e-2)
    dense = train_toy_model(ToyConfig(sparsity=0.0, **short))
    sparse = train_toy_model(ToyConfig(sparsity=0.95, **short))
    assert represented_features(dense) == 4  # dense: the m most important, orthogonal
    assert represented_features(sparse) > 8  # sparse: superposition
    assert dense.feature_norms[:4].min() > 0.9


# ---- SAEs --------------------------------------------------------------------------


def _orthogonal_feature_activations(n_samples: int, seed: int, n_features: int = 6, d_in: int = 8):
    """Sparse features along fixed orthonormal directions in d_in dims; `seed` picks the samples."""
    directions = torch.linalg.qr(torch.randn(d_in, d_in, generator=torch.Generator().manual_seed(0)))[0][:n_features]
    features = FeatureSampler(n_features, 0.8, seed=seed).sample(n_samples)
    return features @ directions


def test_tied_sae_finds_orthogonal_sparse_features_and_f_counts_them():
    activations = _orthogonal_feature_activations(20_000, seed=1)
    sae = train_toy_sae(activations, ToySAEConfig(kind="tied", d_sae=24, steps=1500))
    assert isinstance(sae, TiedSAE)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(24), atol=1e-5)
    measured = measure_sae(sae, _orthogonal_feature_activations(10_000, seed=2))
    assert measured["variance_explained"] > 0.9
    assert measured["F"] == pytest.approx(6, rel=0.15)
    assert measured["F_low"] <= measured["F"] <= measured["F_high"]
    assert measured["psi"] == pytest.approx(measured["F"] / 8)


def test_sae_lens_sae_trains_through_dictionaries_and_reconstructs():
    activations = _orthogonal_feature_activations(20_000, seed=1)
    sae = train_toy_sae(activations, ToySAEConfig(kind="sae_lens", d_sae=24, steps=600))
    assert sae.cfg.d_sae == 24 and sae.cfg.d_in == 8
    measured = measure_sae(sae, _orthogonal_feature_activations(5_000, seed=2))
    assert measured["variance_explained"] > 0.8
    assert 1 <= measured["F"] <= 24


def test_bad_sae_inputs_are_rejected():
    with pytest.raises(ValueError, match="unknown SAE kind"):
        ToySAEConfig(kind="gated")
    with pytest.raises(ValueError, match=r"\[samples, d_in\]"):
        train_toy_sae(torch.zeros(10), ToySAEConfig())
    with pytest.raises(ValueError, match="NaN"):
        train_toy_sae(torch.full((4, 2), float("nan")), ToySAEConfig())


# ---- the validation sweep ----------------------------------------------------------


def test_quick_sweep_runs_every_recipe_through_the_project_path(tmp_path):
    table = toy_validation.main(["--quick", "--out", str(tmp_path)])
    assert len(table) == 2 * len(toy_validation.RECIPES)  # 2 configs x every recipe x 1 SAE seed
    assert set(table["recipe"]) == set(toy_validation.RECIPES)
    assert table.set_index("recipe").loc["topk k=2", "mean_l0"].tolist() == pytest.approx([2, 2])
    stats = toy_validation.agreement(table)
    assert set(stats["recipe"]) == set(toy_validation.RECIPES)
    assert stats["MAE all"].notna().all() and (stats["MAE all"] >= 0).all()
    written = pd.read_csv(tmp_path / "table.csv")
    assert written["F"].tolist() == pytest.approx(table["F"].tolist())
    assert (tmp_path / "scatter.png").stat().st_size > 10_000
    readme = (tmp_path / "README.md").read_text()
    assert "python -m experiments.toy_validation --quick --out" in readme and "default recipe" in readme


def test_the_tied_reference_tracks_the_ground_truth_and_rises_with_sparsity(tmp_path):
    """The sweep's statistic on a known-good SAE: F follows the number of stored features."""
    sweep = "--recipes|unit-norm tied SAE|--seeds|0|--n-features|40|--sparsities|0.0|0.5|0.9|0.99|--n-test|20000"
    table = toy_validation.main([*sweep.split("|"), "--out", str(tmp_path)])
    assert table["F"].corr(table["ground_truth"]) >= 0.8, table
    by_sparsity = table.sort_values("sparsity")
    assert (
        by_sparsity["F"].is_monotonic_increasing
        and by_sparsity["ground_truth"].iloc[-1] > by_sparsity["ground_truth"].iloc[0]
    )
    stats = toy_validation.agreement(table)
    assert f"{stats['r all'].iloc[0]:.3f}" in (tmp_path / "README.md").read_text()
