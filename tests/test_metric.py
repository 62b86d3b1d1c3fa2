import math

import pytest
import torch

from lm_superposition.codes import sparse_codes
from lm_superposition.metric import (
    FeatureBudget,
    effective_features,
    entropy,
    superposition_ratio,
)


def test_uniform_codes_over_all_features_give_f_equal_d():
    budget = FeatureBudget(d_sae=64, width=16)
    budget.update(torch.full((10, 64), 0.3))
    assert budget.effective_features() == pytest.approx(64, rel=1e-12)
    assert budget.superposition_ratio() == pytest.approx(4.0, rel=1e-12)


def test_one_hot_codes_give_one_feature():
    codes = torch.zeros(5, 32)
    codes[:, 7] = torch.rand(5) + 0.1
    budget = FeatureBudget(32, 8)
    budget.update(codes)
    assert budget.effective_features() == pytest.approx(1.0, abs=1e-12)
    assert budget.alive_features == 1
    assert budget.dead_fraction == pytest.approx(31 / 32)
    assert budget.mean_l0 == 1.0


def test_two_level_distribution_matches_hand_computation():
    # Features 0..3 carry 3/4 of the budget equally, features 4..11 the other 1/4.
    budget_vector = torch.tensor([3.0 / 16] * 4 + [1.0 / 32] * 8, dtype=torch.float64)
    p_hi, p_lo = 3 / 16, 1 / 32
    expected_h = -(4 * p_hi * math.log(p_hi) + 8 * p_lo * math.log(p_lo))
    assert entropy(budget_vector) == pytest.approx(expected_h, rel=1e-12)
    assert effective_features(budget_vector) == pytest.approx(math.exp(expected_h), rel=1e-12)
    assert superposition_ratio(budget_vector, 4) == pytest.approx(math.exp(expected_h) / 4, rel=1e-12)


def test_negative_codes_count_by_magnitude_and_zeros_add_no_entropy():
    signed = torch.tensor([[-2.0, 2.0, 0.0, 0.0]])
    budget = FeatureBudget(4, 2)
    budget.update(signed)
    assert budget.effective_features() == pytest.approx(2.0)
    assert budget.mean_l0 == 2.0


def test_invariant_to_token_order_and_batching():
    torch.manual_seed(0)
    codes = torch.relu(torch.randn(3, 40, 50))
    whole = FeatureBudget(50, 10)
    whole.update(codes)
    shuffled = FeatureBudget(50, 10)
    flat = codes.reshape(-1, 50)[torch.randperm(120)]
    for chunk in flat.split(7):
        shuffled.update(chunk)
    assert shuffled.tokens == whole.tokens == 120
    assert shuffled.effective_features() == pytest.approx(whole.effective_features(), rel=1e-12)
    assert shuffled.mean_l0 == pytest.approx(whole.mean_l0)


def test_merge_of_disjoint_halves_equals_single_pass():
    torch.manual_seed(1)
    codes = torch.relu(torch.randn(200, 30))
    doc_ids = torch.arange(200) // 10
    single = FeatureBudget(30, 6, n_blocks=8)
    single.update(codes, doc_ids)
    first, second = FeatureBudget(30, 6, n_blocks=8), FeatureBudget(30, 6, n_blocks=8)
    first.update(codes[:90], doc_ids[:90])
    second.update(codes[90:], doc_ids[90:])
    merged = first.merge(second)
    assert torch.equal(merged.block_tokens, single.block_tokens)
    torch.testing.assert_close(merged.block_sums, single.block_sums, rtol=1e-12, atol=0)
    assert merged.summary() == pytest.approx(single.summary(), rel=1e-12)


def test_merge_refuses_different_shapes():
    with pytest.raises(ValueError, match="d_sae, width, n_blocks"):
        FeatureBudget(30, 6).merge(FeatureBudget(31, 6))


def test_save_load_round_trip_then_continue(tmp_path):
    torch.manual_seed(2)
    codes = torch.relu(torch.randn(100, 20))
    straight = FeatureBudget(20, 4, n_blocks=4)
    straight.update(codes[:50])
    straight.update(codes[50:])

    interrupted = FeatureBudget(20, 4, n_blocks=4)
    interrupted.update(codes[:50])
    interrupted.save(tmp_path / "budget.pt")
    resumed = FeatureBudget.load(tmp_path / "budget.pt")
    resumed.update(codes[50:])
    assert torch.equal(resumed.block_sums, straight.block_sums)
    assert torch.equal(resumed.block_tokens, straight.block_tokens)
    assert resumed.summary() == straight.summary()


def test_sums_are_float64_whatever_the_code_dtype():
    budget = FeatureBudget(8, 2)
    budget.update(torch.ones(4, 8, dtype=torch.bfloat16))
    assert budget.feature_sums.dtype == torch.float64
    # 2^24 + 1 is not representable in float32; float64 sums keep it exact.
    for _ in range(2):
        budget.update(torch.full((1, 8), 2.0**23))
    budget.update(torch.ones(1, 8))
    assert budget.feature_sums[0].item() == 2.0**24 + 1 + 4


def test_doc_ids_group_tokens_into_blocks():
    budget = FeatureBudget(4, 2, n_blocks=3)
    doc_ids = torch.tensor([0, 0, 1, 4])
    budget.update(torch.ones(4, 4), doc_ids)
    assert budget.block_tokens.tolist() == [2, 2, 0]  # doc 4 -> block 1


def test_bootstrap_interval_covers_the_population_value():
    # Codes from a fixed distribution over 40 features: the population F is known exactly.
    torch.manual_seed(3)
    weights = torch.linspace(1, 5, 40, dtype=torch.float64)
    population_f = effective_features(weights)
    features = torch.multinomial(weights, 20000, replacement=True)
    codes = torch.nn.functional.one_hot(features, 40).float()
    budget = FeatureBudget(40, 10, n_blocks=50)
    budget.update(codes, doc_ids=torch.arange(20000) // 50)
    interval = budget.bootstrap_effective_features(n_resamples=500)
    assert interval.low < budget.effective_features() < interval.high
    assert interval.low < population_f < interval.high
    assert interval.high - interval.low < 0.05 * population_f
    psi_interval = budget.bootstrap_superposition_ratio(n_resamples=500)
    assert psi_interval.low == pytest.approx(interval.low / 10)


def test_bootstrap_is_seeded():
    budget = FeatureBudget(10, 2)
    budget.update(torch.rand(100, 10), doc_ids=torch.arange(100))
    assert budget.bootstrap_effective_features(seed=5) == budget.bootstrap_effective_features(seed=5)


def test_bootstrap_needs_two_blocks():
    budget = FeatureBudget(10, 2)
    budget.update(torch.rand(100, 10), doc_ids=0)
    with pytest.raises(ValueError, match="at least 2 non-empty"):
        budget.bootstrap_effective_features()
    assert math.isnan(budget.summary()["F_low"])  # the summary says "unknown", never invents one


@pytest.mark.parametrize("layout", ["dense", "csr", "coo"])
def test_sparse_and_dense_codes_give_the_same_budget(layout):
    generator = torch.Generator().manual_seed(1)
    codes = torch.relu(torch.randn(50, 300, generator=generator) - 1.5) * torch.sign(
        torch.randn(50, 300, generator=generator)
    )
    doc_ids = torch.arange(50) // 7
    dense = FeatureBudget(300, 10, n_blocks=4)
    dense.update(codes.reshape(5, 10, 300), doc_ids.reshape(5, 10))  # any leading shape
    given = {"dense": codes, "csr": sparse_codes(codes), "coo": codes.to_sparse()}[layout]
    other = FeatureBudget(300, 10, n_blocks=4)
    other.update(given, doc_ids)
    assert torch.allclose(other.block_sums, dense.block_sums, rtol=1e-12, atol=0)
    assert torch.equal(other.block_tokens, dense.block_tokens)
    assert other.mean_l0 == dense.mean_l0 == pytest.approx(float((codes != 0).sum(1).float().mean()))
    assert torch.allclose(dense.feature_sums, codes.abs().sum(0).double(), rtol=1e-6)


def test_dense_codes_larger_than_one_slice_are_summed_whole():
    codes = torch.rand(2**22 // 1000 * 3 + 5, 1000)  # several slices of 2^22 elements, all nonzero
    budget = FeatureBudget(1000, 10)
    budget.update(codes, torch.arange(codes.shape[0]))
    assert budget.tokens == codes.shape[0]
    assert torch.allclose(budget.feature_sums, codes.sum(0, dtype=torch.float64), rtol=1e-9)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_codes_are_rejected(bad):
    codes = torch.rand(4, 6)
    codes[2, 3] = bad
    with pytest.raises(ValueError, match=r"\(NaN or Inf\) in 1 of 4 tokens, first at token 2 of this batch, feature 3"):
        FeatureBudget(6, 2).update(codes)


@pytest.mark.parametrize(
    "field, kwargs",
    [
        ("width", dict(d_sae=4, width=-3)),
        ("d_sae", dict(d_sae=0, width=3)),
        ("n_blocks", dict(d_sae=4, width=3, n_blocks=0)),
    ],
)
def test_non_positive_sizes_are_rejected(field, kwargs):
    with pytest.raises(ValueError, match=f"{field} must be a positive integer"):
        FeatureBudget(**kwargs)


def test_empty_budget_has_no_result():
    budget = FeatureBudget(4, 2)
    with pytest.raises(ValueError, match="seen no tokens"):
        budget.effective_features()
    with pytest.raises(ValueError, match="seen no tokens"):
        budget.summary()


def test_all_zero_codes_have_no_result():
    budget = FeatureBudget(4, 2)
    budget.update(torch.zeros(8, 4))
    with pytest.raises(ValueError, match="all zero"):
        budget.effective_features()
    # the summary of an SAE whose latents never fire: no F, said by NaN and alive_features 0, not an exception
    summary = budget.summary()
    assert summary["alive_features"] == 0 and summary["dead_fraction"] == 1.0 and summary["tokens"] == 8
    for key in ("entropy", "F", "F_low", "F_high", "psi", "psi_low", "psi_high"):
        assert math.isnan(summary[key]), key


def test_wrong_code_width_names_both():
    with pytest.raises(ValueError, match="5 features.*d_sae=4"):
        FeatureBudget(4, 2).update(torch.rand(3, 5))


def test_interval_contains_f_while_f_is_still_growing():
    # Zipf-distributed features over 5,000: 1,500 tokens see only part of them, so F is far
    # from saturated. Leaving documents out (as the classic bootstrap does) would put every
    # resample below F; the interval must still hold F.
    torch.manual_seed(4)
    weights = 1.0 / torch.arange(1, 5001, dtype=torch.float64)
    features = torch.multinomial(weights, 1500, replacement=True)
    budget = FeatureBudget(5000, 100, n_blocks=64)
    budget.update(torch.nn.functional.one_hot(features, 5000).float(), doc_ids=torch.arange(1500) // 50)
    interval = budget.bootstrap_effective_features()
    assert interval.low < budget.effective_features() < interval.high
