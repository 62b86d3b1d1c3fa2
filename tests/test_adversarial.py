"""The attacks, adversarial training, the tasks and the sweep of experiments/adversarial at tiny sizes."""

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from experiments.adversarial import attacks, sweep
from experiments.adversarial.sparse_features import SparseFeatureImages, SparseFeatureTask
from experiments.tasks import ClassifierTraining, CNNClassifier, MLPClassifier, accuracy
from experiments.toy import ToySAEConfig, measure_sae, train_toy_sae

torch.set_num_threads(1)  # the machine is shared


@pytest.fixture(scope="module")
def trained():
    task = SparseFeatureTask(n_features=8, n_classes=3, seed=0)
    inputs, labels = task.sample(1024, seed=1)
    model = MLPClassifier(8, [16], 3, seed=0)
    attacks.train_adversarially(model, inputs, labels, ClassifierTraining(steps=150, lr=1e-2, seed=0), "pgd", 0.0)
    return model, inputs, labels


@pytest.fixture(scope="module")
def trained_cnn():
    images = SparseFeatureImages(SparseFeatureTask(n_features=8, n_classes=3, seed=0), image_size=6)
    inputs, labels = images.sample(1024, seed=1)
    model = CNNClassifier(6, [4, 4], 3, seed=0)
    attacks.train_adversarially(model, inputs, labels, ClassifierTraining(steps=150, lr=1e-2, seed=0), "pgd", 0.0)
    return model, inputs, labels


def test_the_cnn_learns_the_image_task(trained_cnn):
    model, inputs, labels = trained_cnn
    majority = labels.bincount().max().item() / len(labels)
    assert accuracy(model, inputs, labels) > majority + 0.2


@pytest.mark.parametrize("kind", attacks.ATTACKS)
@pytest.mark.parametrize("classifier", ["trained", "trained_cnn"])
def test_attacks_raise_the_loss_and_stay_in_the_epsilon_ball(classifier, kind, request):
    model, inputs, labels = request.getfixturevalue(classifier)
    epsilon = 0.1
    adversarial = attacks.attack(model, inputs, labels, kind, epsilon, generator=torch.Generator().manual_seed(0))
    assert adversarial.shape == inputs.shape
    assert (adversarial - inputs).abs().max() <= epsilon + 1e-6
    with torch.no_grad():
        assert F.cross_entropy(model(adversarial), labels) > F.cross_entropy(model(inputs), labels) + 0.05
    assert accuracy(model, adversarial, labels) < accuracy(model, inputs, labels)


def test_pgd_is_at_least_as_strong_as_fgsm_and_projects_large_steps(trained):
    model, inputs, labels = trained
    with torch.no_grad():
        loss = lambda x: F.cross_entropy(model(x), labels).item()  # noqa: E731
    fgsm_loss = loss(attacks.fgsm(model, inputs, labels, 0.1))
    pgd_inputs = attacks.pgd(
        model, inputs, labels, 0.1, steps=10, step_size=1.0, generator=torch.Generator().manual_seed(0)
    )
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
    task = SparseFeatureTask(n_features=8, n_classes=2, seed=0)
    inputs, labels = task.sample(1024, seed=1)
    test_inputs, test_labels = task.sample(512, seed=2)
    robust = {}
    for epsilon in (0.0, 0.1):
        model = MLPClassifier(8, [16], 2, seed=0)
        attacks.train_adversarially(
            model, inputs, labels, ClassifierTraining(steps=200, lr=1e-2, seed=0), "fgsm", epsilon
        )
        attacked = attacks.pgd(model, test_inputs, test_labels, 0.1, generator=torch.Generator().manual_seed(0))
        robust[epsilon] = accuracy(model, attacked, test_labels)
    assert robust[0.1] > robust[0.0] + 0.05


def test_sparse_feature_task_labels_follow_the_class_scores():
    task = SparseFeatureTask(n_features=6, n_classes=4, seed=3)
    features, labels = task.sample(500, seed=0)
    assert ((features == 0).float().mean() - task.sparsity).abs() < 0.05
    assert torch.equal(labels, ((features - features.mean(0)) @ task.class_scores.T).argmax(-1))
    assert len(labels.unique()) == 4
    with pytest.raises(ValueError, match="n_classes >= 2"):
        SparseFeatureTask(n_classes=1)


def test_sparse_feature_images_draw_each_feature_as_its_own_stamp():
    task = SparseFeatureTask(n_features=16, n_classes=3, seed=0)
    images = SparseFeatureImages(task, image_size=6)
    stamps = images.stamps
    assert stamps.shape == (16, 6, 6)
    for stamp in stamps:  # a 3x3 block of +-1 in a zero image
        rows, columns = stamp.nonzero(as_tuple=True)
        assert len(rows) == 9 and rows.max() - rows.min() == 2 and columns.max() - columns.min() == 2
        assert set(stamp[rows, columns].tolist()) <= {-1.0, 1.0}
    corners = {tuple(stamp.nonzero()[0].tolist()) for stamp in stamps}
    assert len(corners) == 16  # every feature has its own place
    # the images are the features, linearly and invertibly drawn; the labels are the task's
    rendered, labels = images.sample(300, seed=5)
    features, task_labels = task.sample(300, seed=5)
    assert rendered.shape == (300, 1, 6, 6) and torch.equal(labels, task_labels)
    recovered = torch.linalg.lstsq(stamps.flatten(1).T, rendered.flatten(1).T).solution.T
    torch.testing.assert_close(recovered, features, atol=1e-4, rtol=0)
    assert torch.equal(stamps, SparseFeatureImages(task, image_size=6).stamps)
    assert not torch.equal(stamps, SparseFeatureImages(task, image_size=6, seed=1).stamps)
    with pytest.raises(ValueError, match="16 features need as many distinct stamp locations.*only 9"):
        SparseFeatureImages(task, image_size=5)


def test_conv_layers_are_measured_per_position_with_whole_images_as_bootstrap_blocks():
    maps = torch.rand(10, 3, 4, 4)
    rows, image_ids = sweep.activation_rows(maps)
    assert rows.shape == (160, 3) and image_ids.shape == (160,)
    assert torch.equal(rows[2 * 16 + 1 * 4 + 3], maps[2, :, 1, 3])  # image 2, position (1, 3)
    assert torch.equal(image_ids[2 * 16 : 3 * 16], torch.full((16,), 2))
    vectors = torch.rand(7, 5)
    assert torch.equal(sweep.activation_rows(vectors)[0], vectors)
    # the same budget as one row per sample (toy.measure_sae); only the bootstrap blocks differ
    sae = train_toy_sae(rows, ToySAEConfig(d_sae=8, steps=20, seed=0))
    per_image, per_row = sweep.measure(sae, rows, image_ids), measure_sae(sae, rows)
    assert per_image["F"] == pytest.approx(per_row["F"]) and per_image["N"] == 3 and per_image["tokens"] == 160


def test_quick_sweep_writes_table_plot_and_readme(tmp_path):
    table = sweep.main(["--quick", "--out", str(tmp_path)])
    assert {"table.csv", "f_vs_epsilon.png", "README.md"} <= {p.name for p in tmp_path.iterdir()}
    saved = pd.read_csv(tmp_path / "table.csv")
    # 2 models x 1 regime x 1 seed x (no attack + fgsm + pgd at eps 0.1) x 2 hidden layers
    assert len(saved) == len(table) == 12
    assert set(saved["attack"]) == {"none", "fgsm", "pgd"}
    assert saved.groupby("model")["width"].unique().map(list).to_dict() == {"mlp": [8], "cnn": [4]}
    cnn = saved[saved.model == "cnn"]
    assert cnn.groupby("layer")["positions"].unique().map(list).to_dict() == {0: [64], 1: [16]}  # 8x8, then 4x4
    assert (cnn["N"] == 4).all() and (cnn["test_samples"] == 256 * cnn["positions"]).all()
    assert (saved["F_clean"] > 0).all() and (saved["F_clean"] <= saved["d_sae"]).all()
    clean = saved[saved.attack == "none"]
    assert (clean["F_clean"] == clean["F_adversarial"]).all()  # epsilon 0: the adversarial inputs are the clean ones
    assert "python -m experiments.adversarial.sweep --quick" in (tmp_path / "README.md").read_text()


def test_models_option_runs_only_the_named_model(tmp_path):
    table = sweep.main(["--quick", "--models", "cnn", "--attacks", "fgsm", "--out", str(tmp_path)])
    assert set(table["model"]) == {"cnn"} and len(table) == 4
    assert (tmp_path / "f_vs_epsilon.png").stat().st_size > 0
    assert "CNN (regimes CLASSESxCHANNELS 2x4)" in (tmp_path / "README.md").read_text()


def test_a_collapsed_layer_keeps_its_accuracies_and_reports_no_f(monkeypatch):
    def train_to_a_dead_network(model, *args, **kwargs):  # every weight and bias 0: every ReLU outputs 0
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.zero_()

    monkeypatch.setattr(sweep, "train_adversarially", train_to_a_dead_network)
    args = sweep.parse_args(["--quick"])
    rows = sweep.measure_model(args, sweep.Run("mlp", n_classes=2, width=8, attack="pgd", epsilon=0.1, seed=0))
    assert len(rows) == 2  # both hidden layers, each with a row
    for row in rows:
        assert row["dead_neurons"] == 8 and "F_clean" not in row  # F is undefined, not invented
        assert 0 <= row["clean_accuracy"] <= 1
    table = pd.DataFrame(rows, columns=["F_clean", "dead_neurons"])
    assert table["F_clean"].isna().all()


def test_regime_parsing_rejects_malformed_text():
    assert sweep.parse_regime("16x8") == (16, 8)
    with pytest.raises(Exception, match="CLASSESxWIDTH"):
        sweep.parse_regime("16-8")


def test_preregistered_quick_computes_every_registered_test(tmp_path, check_gate_verdicts):
    from experiments.adversarial import preregistered

    table = preregistered.main(["--quick", "--out", str(tmp_path)])
    registration = preregistered.load_registration(preregistered.DEFAULT_CONFIG, quick=True)
    measured = table[~table["dead_layer"]]
    d_sae = measured["channels"] * registration["common"]["sae_expansion"]
    check_gate_verdicts(measured["quality"], measured["variance_explained"], measured["F"], d_sae)
    assert (table.loc[table["dead_layer"], "quality"] == preregistered.DEAD_LAYER).all()
    assert set(table["seed"]) == set(registration["common"]["seeds"])
    tests = pd.read_csv(tmp_path / "tests.csv")
    assert len(tests) == len(registration["regime"]) + len(registration["capacity"]["channels"])
    assert tests[["estimate", "low95", "high95", "p", "p_holm"]].notna().all(axis=None)
    assert (tests["p_holm"] >= tests["p"] - 1e-12).all()  # Holm never lowers a p-value
    readme = (tmp_path / "README.md").read_text()
    assert "Holm" in readme and "python -m experiments.adversarial.preregistered --quick" in readme
    assert f"{(table['quality'] == 'ok').sum()} of {len(table)} SAEs pass the quality gate" in readme
    assert tests["gate_pass"].str.fullmatch(r"\d+/\d+").all()
    assert (tmp_path / "preregistered.svg").stat().st_size > 0


def test_holm_adjustment_matches_the_step_down_rule():
    from experiments.findings_stats import holm

    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])
