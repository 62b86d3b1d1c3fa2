"""The attacks, adversarial training and the sweep of experiments/adversarial at tiny sizes."""

import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments" / "adversarial"))
import attacks  # noqa: E402
import sweep  # noqa: E402

from lm_superposition.tasks import ClassifierTraining, MLPClassifier, accuracy  # noqa: E402

torch.set_num_threads(1)  # the machine is shared


@pytest.fixture(scope="module")
def trained():
    task = sweep.SparseFeatureTask(n_features=8, n_classes=3, seed=0)
    inputs, labels = task.sample(1024, seed=1)
    model = MLPClassifier(8, [16], 3, seed=0)
    attacks.train_adversarially(model, inputs, labels, ClassifierTraining(steps=150, lr=1e-2, seed=0), "pgd", 0.0)
    return model, inputs, labels


@pytest.mark.parametrize("kind", attacks.ATTACKS)
def test_attacks_raise_the_loss_and_stay_in_the_epsilon_ball(trained, kind):
    model, inputs, labels = trained
    epsilon = 0.1
    adversarial = attacks.attack(model, inputs, labels, kind, epsilon, generator=torch.Generator().manual_seed(0))
    assert (adversarial - inputs).abs().max() <= epsilon + 1e-6
    with torch.no_grad():
        assert F.cross_entropy(model(adversarial), labels) > F.cross_entropy(model(inputs), labels) + 0.05
    assert accuracy(model, adversarial, labels) < accuracy(model, inputs, labels)


def test_pgd_is_at_least_as_strong_as_fgsm_and_projects_large_steps(trained):
    model, inputs, labels = trained
    with torch.no_grad():
        loss = lambda x: F.cross_entropy(model(x), labels).item()  # noqa: E731
    fgsm_loss = loss(attacks.fgsm(model, inputs, labels, 0.1))
    pgd_inputs = attacks.pgd(model, inputs, labels, 0.1, steps=10, step_size=1.0, generator=torch.Generator().manual_seed(0))
    assert (pgd_inputs - inputs).abs().max() <= 0.1 + 1e-6  # steps 10x the radius still end inside the ball
    assert loss(pgd_inputs) >= fgsm_loss - 1e-3


def test_attacks_reject_bad_arguments(trained):
    model, inputs, labels = trained
    with pytest.raises(ValueError, match="epsilon"):
        attacks.fgsm(model, inputs, labels, -0.1)
    with pytest.raises(ValueError, match="unknown attack 'cw'"):
        attacks.attack(model, inputs, labels, "cw", 0.1)
    with pytest.raises(ValueError, match="steps"):
        attacks.pgd(model, inputs, labels, 0.1, steps=0)
    assert attacks.attack(model, inputs, labels, "pgd", 0.0) is inputs


def test_adversarial_training_makes_the_model_more_robust():
    task = sweep.SparseFeatureTask(n_features=8, n_classes=2, seed=0)
    inputs, labels = task.sample(1024, seed=1)
    test_inputs, test_labels = task.sample(512, seed=2)
    robust = {}
    for epsilon in (0.0, 0.1):
        model = MLPClassifier(8, [16], 2, seed=0)
        attacks.train_adversarially(model, inputs, labels, ClassifierTraining(steps=200, lr=1e-2, seed=0), "fgsm", epsilon)
        attacked = attacks.pgd(model, test_inputs, test_labels, 0.1, generator=torch.Generator().manual_seed(0))
        robust[epsilon] = accuracy(model, attacked, test_labels)
    assert robust[0.1] > robust[0.0] + 0.05


def test_sparse_feature_task_labels_follow_the_class_scores():
    task = sweep.SparseFeatureTask(n_features=6, n_classes=4, seed=3)
    features, labels = task.sample(500, seed=0)
    assert ((features == 0).float().mean() - task.sparsity).abs() < 0.05
    assert torch.equal(labels, ((features - features.mean(0)) @ task.class_scores.T).argmax(-1))
    assert len(labels.unique()) == 4
    with pytest.raises(ValueError, match="n_classes >= 2"):
        sweep.SparseFeatureTask(n_classes=1)


def test_quick_sweep_writes_table_plot_and_readme(tmp_path):
    table = sweep.main(["--quick", "--out", str(tmp_path)])
    assert {"table.csv", "f_vs_epsilon.png", "README.md"} <= {p.name for p in tmp_path.iterdir()}
    saved = pd.read_csv(tmp_path / "table.csv")
    # 1 regime x 1 seed x (no attack + fgsm + pgd at eps 0.1) x 2 hidden layers
    assert len(saved) == len(table) == 6
    assert set(saved["attack"]) == {"none", "fgsm", "pgd"}
    assert (saved["F_clean"] > 0).all() and (saved["F_clean"] <= saved["d_sae"]).all()
    clean = saved[saved.attack == "none"]
    assert (clean["F_clean"] == clean["F_adversarial"]).all()  # epsilon 0: the adversarial inputs are the clean ones
    assert "python experiments/adversarial/sweep.py --quick" in (tmp_path / "README.md").read_text()


def test_regime_parsing_rejects_malformed_text():
    assert sweep.parse_regime("16x8") == (16, 8)
    with pytest.raises(Exception, match="CLASSESxWIDTH"):
        sweep.parse_regime("16-8")
