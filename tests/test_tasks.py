"""Algorithmic task data and the small networks of the findings studies (lm_superposition.tasks)."""

import pytest
import torch

from experiments.tasks import (
    ClassifierTraining,
    CNNClassifier,
    GrokkingConfig,
    MLPClassifier,
    SparseParityTask,
    accuracy,
    grokking_tokens,
    modular_addition_pairs,
    neuron_basis_measure,
    one_hot_pairs,
    scaled_to_unit_rms,
    train_classifier,
    train_grokking,
    train_test_split,
)


def test_sparse_parity_labels_are_the_parity_of_the_tasks_bits():
    task = SparseParityTask(n_tasks=5, n_bits=12, k=3, seed=4)
    inputs, labels, task_ids = task.sample(500, seed=1)
    assert inputs.shape == (500, 5 + 12) and labels.shape == task_ids.shape == (500,)
    prefix, bits = inputs[:, :5], inputs[:, 5:]
    # the prefix is exactly one-hot and names the task
    assert torch.equal(prefix.sum(1), torch.ones(500))
    assert torch.equal(prefix.argmax(1), task_ids)
    assert set(bits.unique().tolist()) <= {0.0, 1.0}
    subsets = task.subsets
    for row in range(500):
        chosen = subsets[task_ids[row]]
        assert labels[row] == int(bits[row, chosen].sum()) % 2
    # every task appears, labels are balanced-ish: the generator is not degenerate
    assert set(task_ids.tolist()) == set(range(5))
    assert 0.35 < labels.float().mean() < 0.65


def test_sparse_parity_subsets_are_distinct_bits_and_fixed_by_the_seed():
    task = SparseParityTask(n_tasks=6, n_bits=10, k=4, seed=0)
    subsets = task.subsets
    assert subsets.shape == (6, 4)
    assert all(len(set(row.tolist())) == 4 for row in subsets)
    assert torch.equal(subsets, SparseParityTask(n_tasks=6, n_bits=10, k=4, seed=0).subsets)
    assert not torch.equal(subsets, SparseParityTask(n_tasks=6, n_bits=10, k=4, seed=1).subsets)


def test_sparse_parity_samples_repeat_with_the_seed_and_change_without_it():
    task = SparseParityTask()
    first, second, other = task.sample(64, seed=3), task.sample(64, seed=3), task.sample(64, seed=4)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not torch.equal(first[0], other[0])


def test_sparse_parity_rejects_bad_arguments():
    with pytest.raises(ValueError, match="k"):
        SparseParityTask(n_bits=3, k=4)
    with pytest.raises(ValueError, match="n_tasks"):
        SparseParityTask(n_tasks=0)


def test_modular_addition_covers_every_pair_once_with_its_sum_mod_p():
    pairs, labels = modular_addition_pairs(7)
    assert pairs.shape == (49, 2)
    assert len({tuple(row) for row in pairs.tolist()}) == 49
    assert torch.equal(labels, (pairs[:, 0] + pairs[:, 1]) % 7)
    inputs = one_hot_pairs(pairs, 7)
    assert inputs.shape == (49, 14)
    assert torch.equal(inputs[:, :7].argmax(1), pairs[:, 0]) and torch.equal(inputs[:, 7:].argmax(1), pairs[:, 1])
    with pytest.raises(ValueError, match="p"):
        modular_addition_pairs(1)


def test_train_test_split_partitions_and_is_seeded():
    train, test = train_test_split(100, 0.3, seed=0)
    assert len(train) == 30 and len(test) == 70
    assert sorted(torch.cat([train, test]).tolist()) == list(range(100))
    assert torch.equal(train, train_test_split(100, 0.3, seed=0)[0])
    with pytest.raises(ValueError, match="train_fraction"):
        train_test_split(100, 1.5, seed=0)


def test_mlp_dropout_acts_in_training_only_and_seed_fixes_the_weights():
    model = MLPClassifier(10, [32, 16], 3, dropout=0.5, seed=0)
    inputs = torch.randn(8, 10)
    hidden = model.eval().hidden_activations(inputs)
    assert [h.shape for h in hidden] == [(8, 32), (8, 16)]
    assert torch.equal(model(inputs), model(inputs))  # eval: deterministic
    model.train()
    assert not torch.equal(model(inputs), model(inputs))  # training: dropout masks differ
    again = MLPClassifier(10, [32, 16], 3, dropout=0.5, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    with pytest.raises(ValueError, match="dropout"):
        MLPClassifier(10, [32], 3, dropout=1.0)


def test_cnn_feature_maps_keep_then_halve_the_image_and_seed_fixes_the_weights():
    model = CNNClassifier(8, [4, 6], n_classes=3, seed=0).eval()
    images = torch.randn(5, 1, 8, 8)
    maps = model.hidden_activations(images)
    assert [m.shape for m in maps] == [(5, 4, 8, 8), (5, 6, 4, 4)]
    assert all((m >= 0).all() for m in maps)  # post-ReLU
    assert model(images).shape == (5, 3)
    again = CNNClassifier(8, [4, 6], n_classes=3, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert CNNClassifier(7, [2, 2, 2], 2)(torch.zeros(1, 1, 7, 7)).shape == (1, 2)  # odd sizes: 7 -> 4 -> 2
    with pytest.raises(ValueError, match=r"images must have shape \[batch, 1, 8, 8\], got \(5, 8, 8\)"):
        model(images[:, 0])
    with pytest.raises(ValueError, match="channels"):
        CNNClassifier(8, [], 2)


def test_cnn_learns_where_a_blob_is():
    generator = torch.Generator().manual_seed(0)
    n = 512
    images = 0.3 * torch.randn(n, 1, 8, 8, generator=generator)
    rows, columns = torch.randint(7, (n,), generator=generator), torch.randint(7, (n,), generator=generator)
    for image, row, column in zip(images, rows, columns):
        image[0, row : row + 2, column : column + 2] += 2.0
    labels = (columns >= 3).long()  # the blob's left edge in the right half or not
    model = CNNClassifier(8, [4, 4], 2, seed=0)
    before = accuracy(model, images, labels)
    train_classifier(model, images[:384], labels[:384], ClassifierTraining(steps=120, batch_size=64, lr=1e-2, seed=0))
    assert accuracy(model, images[384:], labels[384:]) > max(0.85, before + 0.2)


def test_grokking_tokens_end_in_the_equals_token():
    config = GrokkingConfig(p=5)
    tokens, labels = grokking_tokens(config)
    assert tokens.shape == (25, 3) and (tokens[:, 2] == 5).all()
    assert torch.equal(labels, (tokens[:, 0] + tokens[:, 1]) % 5)


def test_grokking_checkpoint_loop_keeps_evaluated_snapshots_that_reload():
    config = GrokkingConfig(
        p=7, d_model=16, n_heads=2, d_mlp=32, steps=25, checkpoint_every=10, lr=1e-2, train_fraction=0.5
    )
    run = train_grokking(config)
    assert [c.step for c in run.checkpoints] == [10, 20, 25]  # every 10 steps and the last
    assert len(run.train_indices) + len(run.test_indices) == 49
    first, last = run.checkpoints[0], run.checkpoints[-1]
    # snapshots are copies, not views of the live weights
    assert not torch.equal(first.state_dict["blocks.0.mlp.W_in"], last.state_dict["blocks.0.mlp.W_in"])
    tokens, labels = grokking_tokens(config)
    model = run.model_at(last)
    with torch.no_grad():
        correct = model(tokens)[:, -1].argmax(-1) == labels
    assert float(correct[run.train_indices].float().mean()) == pytest.approx(last.train_accuracy)
    assert float(correct[run.test_indices].float().mean()) == pytest.approx(last.test_accuracy)
    assert last.train_loss < first.train_loss


def test_grokking_config_rejects_bad_shapes():
    with pytest.raises(ValueError, match="divisible"):
        GrokkingConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="train_fraction"):
        GrokkingConfig(train_fraction=0.0)


def test_unit_rms_scaling_and_neuron_basis_F():
    activations = torch.rand(100, 8) * 7
    scaled = scaled_to_unit_rms(activations)
    assert scaled.pow(2).sum(1).mean().item() == pytest.approx(8, rel=1e-5)
    # two neurons used equally, the rest never: F = 2 in the neuron basis
    codes = torch.zeros(50, 8)
    codes[:, :2] = 1.0
    assert neuron_basis_measure(codes)["F"] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="dead"):
        scaled_to_unit_rms(torch.zeros(4, 3))
