import math

import pytest
import torch

from lm_superposition.sparse_coding import compressed_sensing_margin, linear_additivity

torch.set_num_threads(1)  # the machine is shared


def test_a_linear_map_is_perfectly_additive():
    weights = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    a, b = torch.randn(10, 5), torch.randn(10, 5)
    result = linear_additivity(lambda x: x @ weights, a, b)
    assert result.cosines.shape == (10,)
    assert torch.allclose(result.cosines, torch.ones(10, dtype=torch.float64), atol=1e-6)
    assert result.mean == pytest.approx(1.0, abs=1e-6)


def test_relu_on_opposite_signs_is_not_additive_with_a_hand_computed_cosine():
    # a = (1, 2), b = (-1, 0): relu(a) + relu(b) = (1, 2), relu(a + b) = (0, 2): cosine = 4 / (sqrt(5) * 2).
    a, b = torch.tensor([[1.0, 2.0], [3.0, 1.0]]), torch.tensor([[-1.0, 0.0], [-3.0, -1.0]])
    result = linear_additivity(torch.relu, a, b)
    assert result.cosines[0].item() == pytest.approx(2 / math.sqrt(5))
    assert result.cosines[1].item() == 0.0  # relu(a + b) = 0: no shared direction left
    assert result.cosines[0] < 1


def test_additivity_with_concatenation_for_sequences():
    # A summed-over-positions embedding is additive under concatenation; a mean over positions is not (lengths differ).
    embedding = torch.randn(20, 4, generator=torch.Generator().manual_seed(1))
    a, b = torch.randint(20, (6, 3)), torch.randint(20, (6, 5))
    concatenate = lambda x, y: torch.cat([x, y], dim=1)  # noqa: E731
    summed = linear_additivity(lambda t: embedding[t].sum(1), a, b, combine=concatenate)
    assert summed.mean == pytest.approx(1.0, abs=1e-6)


def test_additivity_rejects_unpaired_inputs_and_mismatched_shapes():
    with pytest.raises(ValueError, match="same, non-zero number of rows"):
        linear_additivity(torch.relu, torch.ones(3, 2), torch.ones(4, 2))
    with pytest.raises(ValueError, match="one representation of fixed size"):
        linear_additivity(lambda t: t, torch.ones(3, 2), torch.ones(3, 2), combine=lambda x, y: torch.cat([x, y], 1))


def test_compressed_sensing_margin_hand_computed():
    # M = 512, K = 20, N = 2000: 512 / (20 ln 100) = 5.5589...
    assert compressed_sensing_margin(512, 20, 2000) == pytest.approx(512 / (20 * math.log(100)))
    assert compressed_sensing_margin(512, 20, 2000) == pytest.approx(5.5589, abs=1e-4)
    # A denser code needs more room: the margin falls as K grows.
    assert compressed_sensing_margin(64, 30, 256) < compressed_sensing_margin(64, 3, 256)


@pytest.mark.parametrize("mean_l0", [0, -1, 256, 300])
def test_compressed_sensing_margin_rejects_k_outside_0_n(mean_l0):
    with pytest.raises(ValueError, match=r"mean_l0 \(K\) must lie in \(0, d_sae\)"):
        compressed_sensing_margin(64, mean_l0, 256)


def test_compressed_sensing_margin_rejects_bad_widths():
    with pytest.raises(ValueError, match="hook_width"):
        compressed_sensing_margin(0, 2, 10)
    with pytest.raises(ValueError, match="d_sae"):
        compressed_sensing_margin(8, 2, 0)
