"""SAEs: registry/disk/ae.pt loading, training from one stream, quality, and refusing bad input."""

import json
import warnings

import huggingface_hub.constants
import pytest
import torch
from sae_lens import SAE, StandardSAE, TopKSAE
from sae_lens.saes.sae import TrainStepInput
from safetensors.torch import save_file

from lm_superposition.models import HookPoint, hook_order, hook_point
from lm_superposition.saes import (
    SAEQuality,
    SAETrainingConfig,
    VarianceExplained,
    check_sae_fits,
    evaluate_sae,
    load_dictionary_learning_sae,
    load_release,
    load_sae,
    load_sae_from_disk,
    save_sae,
    train_sae,
    train_saes,
    train_saes_for_model,
)
from lm_superposition.saes.training import QUALITY_FILENAME


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These SAEs are small: threads gain nothing, and on a busy 2-core machine OpenMP's
    spinning threads made the training here ~20x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- toy data: sparse features in superposition, with ground truth --------------------------


def sparse_features(n_tokens, n_features=64, d_in=32, density=0.04, seed=0):
    """x = sum of a few of `n_features` unit directions in `d_in` dims, plus a constant offset."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(n_features, d_in, generator=generator), dim=1)
    magnitudes = torch.rand(n_tokens, n_features, generator=generator)
    active = torch.rand(n_tokens, n_features, generator=generator) < density
    return (magnitudes * active) @ directions + 0.5, directions


def variance_explained(x, reconstruction):
    return 1 - ((x - reconstruction) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()


TOY_CONFIG = dict(expansion_factor=4, batch_size_tokens=1024, training_tokens=300_000, lr=2e-3, seed=0)


@pytest.fixture(scope="module")
def toy_data():
    x, directions = sparse_features(40_000)
    return x[:35_000], x[35_000:], directions


@pytest.fixture(scope="module")
def standard_toy_sae(toy_data):
    train, _, _ = toy_data
    return train_sae(
        train, SAETrainingConfig(architecture="standard", l1_coefficient=0.6, **TOY_CONFIG), hook_name="toy"
    )


def test_standard_sae_learns_toy_features(toy_data, standard_toy_sae):
    _, held_out, directions = toy_data
    sae = standard_toy_sae
    assert isinstance(sae, StandardSAE) and sae.cfg.d_sae == 128
    with torch.no_grad():
        codes = sae.encode(held_out)
        reconstruction = sae.decode(codes)
    explained = variance_explained(held_out, reconstruction)
    mean_baseline_mse = ((held_out - held_out.mean(0)) ** 2).sum(1).mean()
    assert explained >= 0.8
    assert ((held_out - reconstruction) ** 2).sum(1).mean() < 0.2 * mean_baseline_mse
    # It found the ground truth: most true directions have a decoder row pointing along them.
    cosine = torch.nn.functional.normalize(sae.W_dec, dim=1) @ directions.T
    assert (cosine.max(dim=0).values > 0.9).float().mean() >= 0.8  # 0.97 when written
    # Sparse: far fewer active features per token than there are features.
    assert (codes > 0).float().sum(1).mean() < 32
    assert sae.cfg.metadata.hook_name == "toy"
    assert sae.cfg.metadata.training_tokens >= 300_000


def test_topk_sae_trains_to_k_active_features(toy_data):
    train, held_out, _ = toy_data
    sae = train_sae(train, SAETrainingConfig(architecture="topk", k=4, **TOY_CONFIG))
    assert isinstance(sae, TopKSAE)
    with torch.no_grad():
        codes = sae.encode(held_out)
        explained = variance_explained(held_out, sae.decode(codes))
    assert explained >= 0.8
    assert ((codes != 0).sum(1) <= 4).all()


def test_training_steps_use_fused_adam_and_leave_the_garbage_collector_as_found():
    import gc

    from lm_superposition.saes.training import _new_trainer

    trainer = _new_trainer("hook", 16, SAETrainingConfig(architecture="topk", k=4, **TOY_CONFIG))
    assert all(group["fused"] for group in trainer.optimizer.param_groups)
    # the validated recipe keeps SAE-Lens's own update (its committed results were made with it)
    trainer = _new_trainer("hook", 16, SAETrainingConfig(architecture="standard", **TOY_CONFIG))
    assert not any(group["fused"] for group in trainer.optimizer.param_groups)
    data = torch.randn(512, 16)
    for enabled in (True, False):
        (gc.enable if enabled else gc.disable)()
        try:
            train_sae(data, SAETrainingConfig(architecture="topk", k=4, **TOY_CONFIG))
            assert gc.isenabled() is enabled
        finally:
            gc.enable()


def test_train_saes_feeds_one_stream_to_every_hook():
    """Two hooks of different widths from one generator (it can only be read once)."""
    x_a, _ = sparse_features(20_000, n_features=48, d_in=24, seed=1)
    x_b, _ = sparse_features(20_000, n_features=32, d_in=16, seed=2)
    reads = []

    def stream(n_epochs):
        for _ in range(n_epochs):
            for start in range(0, 20_000, 700):  # uneven batch sizes: re-cut into training batches
                reads.append(start)
                yield {"hook_a": x_a[start : start + 700], "hook_b": x_b[start : start + 700]}

    config = SAETrainingConfig(
        architecture="standard",
        l1_coefficient=0.3,
        expansion_factor=4,
        batch_size_tokens=512,
        training_tokens=100_000,
        lr=2e-3,
        shuffle_buffer_batches=4,
        model_name="toy-model",
    )
    saes = train_saes(stream(n_epochs=10), {"hook_a": 24, "hook_b": 16}, config, progress=False)
    assert len(reads) < 6 * 29  # stopped reading soon after the budget (5 epochs of 20,000 tokens)
    assert {hook: (sae.cfg.d_in, sae.cfg.d_sae) for hook, sae in saes.items()} == {
        "hook_a": (24, 96),
        "hook_b": (16, 64),
    }
    for hook, x in (("hook_a", x_a), ("hook_b", x_b)):
        sae = saes[hook]
        assert sae.cfg.metadata.hook_name == hook and sae.cfg.metadata.model_name == "toy-model"
        assert sae.cfg.metadata.training_tokens == 196 * 512  # whole batches up to the 100,000-token budget
        with torch.no_grad():
            assert variance_explained(x, sae.decode(sae.encode(x))) >= 0.8

    with pytest.warns(UserWarning, match="stream ended after 19968 tokens"):  # 39 whole batches
        short = train_saes(stream(n_epochs=1), {"hook_a": 24, "hook_b": 16}, config, progress=False)
    assert short["hook_a"].cfg.metadata.training_tokens == 19_968


def test_fixed_size_batches_shuffle_within_the_buffer_as_concatenation_would():
    """The refilled buffers give the batches of the plain recipe: concatenate what is pending,
    permute it, cut whole batches, keep the rest; incoming batches of uneven sizes."""
    from lm_superposition.saes.training import _fixed_size_batches

    sizes = [1, 7, 3, 12, 5, 9, 1, 11]  # the 12 outgrows the buffer made for the first batch
    stream = [{"a": torch.randn(n, 4), "b": torch.randn(n, 2)} for n in sizes]
    got = list(_fixed_size_batches(iter(stream), {"a": 4, "b": 2}, 5, 3, torch.Generator().manual_seed(0)))

    generator, expected, pending = torch.Generator().manual_seed(0), [], {"a": [], "b": []}

    def cut(pending):
        joined = {hook: torch.cat(parts) for hook, parts in pending.items()}
        order = torch.randperm(len(joined["a"]), generator=generator)
        n_full = len(order) - len(order) % 5
        expected.extend({hook: acts[order[i : i + 5]] for hook, acts in joined.items()} for i in range(0, n_full, 5))
        return {hook: [acts[order[n_full:]]] for hook, acts in joined.items()}

    for batch in stream:
        for hook in pending:
            pending[hook].append(batch[hook])
        if sum(len(part) for part in pending["a"]) >= 15:
            pending = cut(pending)
    if sum(len(part) for part in pending["a"]) >= 5:
        cut(pending)
    assert len(got) == len(expected) == sum(sizes) // 5
    for mine, theirs in zip(got, expected, strict=True):
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[hook], theirs[hook]) for hook in mine)


def test_train_saes_rejects_bad_batches():
    config = SAETrainingConfig(batch_size_tokens=8, training_tokens=64)
    with pytest.raises(ValueError, match=r"lacks hooks \['b'\]"):
        train_saes(iter([{"a": torch.zeros(8, 4)}]), {"a": 4, "b": 4}, config, progress=False)
    with pytest.raises(ValueError, match=r"activations for a must be \[tokens, 4\], got shape \(8, 5\)"):
        train_saes(iter([{"a": torch.zeros(8, 5)}]), {"a": 4}, config, progress=False)
    with pytest.raises(ValueError, match="same tokens"):
        train_saes(iter([{"a": torch.zeros(8, 4), "b": torch.zeros(9, 4)}]), {"a": 4, "b": 4}, config, progress=False)
    with pytest.raises(ValueError, match="fewer than batch_size_tokens=8"):
        train_saes(iter([{"a": torch.zeros(5, 4)}]), {"a": 4}, config, progress=False)
    with pytest.raises(ValueError, match="architecture must be one of"):
        SAETrainingConfig(architecture="gated")
    with pytest.raises(ValueError, match="k <= d_sae"):
        SAETrainingConfig(architecture="topk", k=50, d_sae=20).width_for(4)
    with pytest.raises(ValueError, match="aux_loss_coefficient must be a non-negative number, got -1"):
        SAETrainingConfig(architecture="topk", aux_loss_coefficient=-1)
    with pytest.raises(ValueError, match="decoder_init_norm must be a positive number, got 0"):
        SAETrainingConfig(decoder_init_norm=0)


def test_topk_auxiliary_loss_is_weighted_as_configured(toy_data):
    """The coefficient reaches SAE-Lens's TopK SAE, and 0 trains dead latents not at all."""
    from lm_superposition.saes.training import _new_trainer

    train, _, _ = toy_data
    for coefficient in (1.0, 0.0):
        config = SAETrainingConfig(architecture="topk", k=4, aux_loss_coefficient=coefficient, **TOY_CONFIG)
        trainer = _new_trainer("hook", train.shape[1], config)
        assert trainer.sae.cfg.aux_loss_coefficient == coefficient
        every_latent_dead = torch.ones(trainer.sae.cfg.d_sae, dtype=torch.bool)
        step = TrainStepInput(train[:64], {}, every_latent_dead, n_training_steps=0, is_logging_step=False)
        aux = trainer.sae.training_forward_pass(step).losses["auxiliary_reconstruction_loss"]
        assert (aux > 0) if coefficient else (aux == 0)


@pytest.mark.parametrize("architecture", ["standard", "topk"])
def test_decoder_rows_start_at_the_configured_norm(architecture):
    """decoder_init_norm reaches SAE-Lens's initialisation (the encoder starts as the decoder's
    transpose), and a standard SAE started at another norm is no longer the validated recipe."""
    from lm_superposition.saes.training import _new_trainer

    for norm in (0.1, 1.0):
        config = SAETrainingConfig(architecture=architecture, k=4, decoder_init_norm=norm, **TOY_CONFIG)
        sae = _new_trainer("hook", 12, config).sae
        assert torch.allclose(sae.W_dec.norm(dim=1), torch.full((sae.cfg.d_sae,), norm))
        assert torch.equal(sae.W_enc, sae.W_dec.T)
    assert SAETrainingConfig().recipe_verdict() == "validated"
    assert SAETrainingConfig(decoder_init_norm=1.0).recipe_verdict() == "not validated (decoder_init_norm = 1.0)"


# --- disk ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("architecture", ["standard", "topk"])
def test_disk_round_trip_gives_identical_codes(tmp_path, architecture):
    x, _ = sparse_features(3_000, n_features=24, d_in=12)
    config = SAETrainingConfig(
        architecture=architecture,
        k=4,
        expansion_factor=2,
        batch_size_tokens=256,
        training_tokens=5_000,
        l1_coefficient=0.3,
        model_name="toy-model",
    )
    sae = train_sae(x, config, hook_name="blocks.0.hook_resid_post")
    folder = save_sae(sae, tmp_path / "sae")
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    for loaded in (load_sae_from_disk(folder), SAE.load_from_disk(folder)):
        assert type(loaded) is type(sae)
        assert torch.equal(loaded.encode(x), sae.encode(x))
        assert loaded.cfg.metadata.hook_name == "blocks.0.hook_resid_post"
        assert loaded.cfg.metadata.model_name == "toy-model"


def test_disk_loading_names_what_is_wrong(tmp_path, standard_toy_sae):
    with pytest.raises(FileNotFoundError, match="no SAE folder"):
        load_sae_from_disk(tmp_path / "nowhere")
    folder = save_sae(standard_toy_sae, tmp_path / "sae")
    (folder / "sae_weights.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks \['sae_weights.safetensors'\]"):
        load_sae_from_disk(folder)

    folder = save_sae(standard_toy_sae, tmp_path / "corrupt")
    (folder / "cfg.json").write_text('{"d_in": 32, "d_sae": ')
    with pytest.raises(ValueError, match="cfg.json is not valid JSON"):
        load_sae_from_disk(folder)
    (folder / "cfg.json").write_text('{"architecture": "standard"}')
    with pytest.raises(ValueError, match=r"lacks the field\(s\) \['d_in', 'd_sae'\]"):
        load_sae_from_disk(folder)
    # A config whose widths disagree with the weights.
    good = save_sae(standard_toy_sae, tmp_path / "mismatch")
    cfg = json.loads((good / "cfg.json").read_text())
    (good / "cfg.json").write_text(json.dumps(cfg | {"d_sae": 7}))
    with pytest.raises(ValueError, match="do not match"):
        load_sae_from_disk(good)


# --- registry (offline, through the real SAE.from_pretrained path) ----------------------------

MLP_SM_REPO = "ctigges/pythia-70m-deduped__mlp-sm_processed"  # sae_lens's pretrained_saes.yaml
SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"


def write_registry_sae(cache, layer, d_in=8, d_sae=16, seed=0):
    """One SAE in the Hugging Face cache layout of pythia-70m-deduped-mlp-sm, with the
    pre-6.0 SAE-Lens config that repo holds; returns its weights."""
    generator = torch.Generator().manual_seed(seed)
    weights = {
        "W_enc": torch.randn(d_in, d_sae, generator=generator),
        "b_enc": torch.randn(d_sae, generator=generator),
        "W_dec": torch.randn(d_sae, d_in, generator=generator),
        "b_dec": torch.randn(d_in, generator=generator),
    }
    repo = cache / ("models--" + MLP_SM_REPO.replace("/", "--"))
    folder = repo / "snapshots" / SNAPSHOT / f"{layer}-mlp-sm"
    folder.mkdir(parents=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(SNAPSHOT)
    save_file(weights, folder / "sae_weights.safetensors")
    cfg = {
        "architecture": "standard",
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": "float32",
        "device": "cpu",
        "model_name": "pythia-70m-deduped",
        "hook_name": f"blocks.{layer}.hook_mlp_out",
        "hook_layer": layer,
        "hook_head_index": None,
        "activation_fn_str": "relu",
        "apply_b_dec_to_input": True,
        "finetuning_scaling_factor": False,
        "context_size": 128,
        "prepend_bos": True,
        "dataset_path": "monology/pile-uncopyrighted",
        "normalize_activations": "none",
    }
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return weights


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache with the hub switched off; huggingface_hub reads these
    constants at import time, so the module attributes are patched as well as the env."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_registry_sae_loads_offline_from_the_hub_cache(offline_hub):
    weights = write_registry_sae(offline_hub, layer=0)
    sae = load_sae("pythia-70m-deduped-mlp-sm", "blocks.0.hook_mlp_out")
    assert isinstance(sae, StandardSAE)
    assert sae.cfg.metadata.hook_name == "blocks.0.hook_mlp_out"
    assert sae.cfg.metadata.model_name == "pythia-70m-deduped"
    for name, tensor in weights.items():
        assert torch.equal(getattr(sae, name).detach(), tensor)
    x = torch.randn(5, 8)
    assert torch.allclose(sae.encode(x), torch.relu((x - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"]))


def test_release_loads_in_hook_order(offline_hub):
    write_registry_sae(offline_hub, layer=0, seed=0)
    write_registry_sae(offline_hub, layer=1, seed=1)
    saes = load_release("pythia-70m-deduped-mlp-sm", sae_ids=["blocks.1.hook_mlp_out", "blocks.0.hook_mlp_out"])
    assert list(saes) == ["blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out"]
    assert all(saes[hook].cfg.metadata.hook_name == hook for hook in saes)
    # The full release needs all six files; the missing ones are named as missing from the cache.
    with pytest.raises(FileNotFoundError, match="blocks.2.hook_mlp_out.*not in the Hugging Face cache"):
        load_release("pythia-70m-deduped-mlp-sm")
    with pytest.raises(ValueError, match="pythia-70m-deduped-mlp-sm"):
        load_release("pythia-70m-deduped-mlp")
    with pytest.raises(ValueError, match="blocks.9.hook_mlp_out"):
        load_release("pythia-70m-deduped-mlp-sm", sae_ids=["blocks.9.hook_mlp_out"])


def test_hook_order_is_forward_pass_order():
    names = [
        "blocks.1.hook_resid_pre",
        "blocks.0.hook_resid_post",
        "blocks.10.hook_mlp_out",
        "blocks.0.hook_mlp_out",
        "blocks.0.hook_resid_pre",
        "hook_embed",
        "blocks.0.hook_attn_out",
    ]
    assert sorted(names, key=hook_order) == [
        "hook_embed",
        "blocks.0.hook_resid_pre",
        "blocks.0.hook_attn_out",
        "blocks.0.hook_mlp_out",
        "blocks.0.hook_resid_post",
        "blocks.1.hook_resid_pre",
        "blocks.10.hook_mlp_out",
    ]


# --- dictionary_learning ae.pt -------------------------------------------------------------------


def test_dictionary_learning_ae_pt_gives_the_original_codes(tmp_path):
    generator = torch.Generator().manual_seed(0)
    d_in, d_sae = 6, 10
    ae = {
        "encoder.weight": torch.randn(d_sae, d_in, generator=generator),
        "encoder.bias": torch.randn(d_sae, generator=generator),
        "decoder.weight": torch.randn(d_in, d_sae, generator=generator),
        "bias": torch.randn(d_in, generator=generator),
    }
    torch.save(ae, tmp_path / "ae.pt")
    sae = load_dictionary_learning_sae(
        tmp_path / "ae.pt", hook_name="blocks.3.hook_resid_post", model_name="pythia-70m-deduped"
    )
    assert isinstance(sae, StandardSAE)
    assert (sae.cfg.d_in, sae.cfg.d_sae) == (d_in, d_sae)
    assert sae.cfg.metadata.hook_name == "blocks.3.hook_resid_post"
    x = torch.randn(50, d_in, generator=generator) * 3
    original_codes = torch.relu((x - ae["bias"]) @ ae["encoder.weight"].T + ae["encoder.bias"])
    assert (original_codes > 0).any() and (original_codes == 0).any()
    codes = sae.encode(x)
    torch.testing.assert_close(codes, original_codes)
    torch.testing.assert_close(sae.decode(codes), original_codes @ ae["decoder.weight"].T + ae["bias"])
    # The folder form finds ae.pt inside.
    assert torch.equal(load_dictionary_learning_sae(tmp_path, hook_name="h").encode(x), codes)


def test_dictionary_learning_bad_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no dictionary_learning file"):
        load_dictionary_learning_sae(tmp_path, hook_name="h")
    torch.save({"encoder.weight": torch.zeros(4, 2), "encoder.bias": torch.zeros(4)}, tmp_path / "ae.pt")
    with pytest.raises(ValueError, match=r"lacks \['decoder.weight', 'bias'\]"):
        load_dictionary_learning_sae(tmp_path, hook_name="h")
    torch.save(
        {
            "encoder.weight": torch.zeros(4, 2),
            "encoder.bias": torch.zeros(4),
            "decoder.weight": torch.zeros(4, 2),
            "bias": torch.zeros(2),
        },
        tmp_path / "ae.pt",
    )
    with pytest.raises(ValueError, match="decoder.weight"):
        load_dictionary_learning_sae(tmp_path, hook_name="h")
    (tmp_path / "ae.pt").write_text("not a torch file")
    with pytest.raises(ValueError, match="cannot read"):
        load_dictionary_learning_sae(tmp_path, hook_name="h")


# --- checks before use ------------------------------------------------------------------------------


def test_check_sae_fits(standard_toy_sae):
    sae = standard_toy_sae  # d_in 32, hook "toy", model None
    sae_for_pythia = load_sae_from_state(
        sae, hook_name="blocks.2.hook_mlp_out", model_name="EleutherAI/pythia-70m-deduped"
    )
    with pytest.raises(ValueError, match="width 32.*has width 512"):
        check_sae_fits(sae, HookPoint("blocks.2.hook_mlp_out", "mlp_out", 2, 512), "pythia-70m-deduped")
    hook = HookPoint("blocks.2.hook_mlp_out", "mlp_out", 2, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_sae_fits(sae_for_pythia, hook, "pythia-70m-deduped")  # same model, org prefix or not
    with pytest.raises(
        ValueError, match="trained on hook blocks.2.hook_mlp_out, not blocks.3.hook_mlp_out.*allow_hook_mismatch"
    ):
        check_sae_fits(sae_for_pythia, HookPoint("blocks.3.hook_mlp_out", "mlp_out", 3, 32), "pythia-70m-deduped")
    check_sae_fits(
        sae_for_pythia,
        HookPoint("blocks.3.hook_mlp_out", "mlp_out", 3, 32),
        "pythia-70m-deduped",
        allow_hook_mismatch=True,
    )
    with pytest.warns(UserWarning, match="EleutherAI/pythia-70m-deduped.*google/gemma-3-270m-it"):
        check_sae_fits(sae_for_pythia, hook, "google/gemma-3-270m-it")


def load_sae_from_state(sae, hook_name, model_name):
    """A copy of `sae` that claims another hook and model."""
    cfg = sae.cfg.to_dict()
    cfg["metadata"] = cfg["metadata"] | {"hook_name": hook_name, "model_name": model_name}
    copy = SAE.from_dict(cfg)
    copy.load_state_dict(sae.state_dict())
    return copy


# --- quality -----------------------------------------------------------------------------------------


def exact_sae(d_in):
    """z = [relu(x), relu(-x)], x_hat = z_+ - z_-: reconstructs every x exactly."""
    sae = StandardSAE.from_dict({"architecture": "standard", "d_in": d_in, "d_sae": 2 * d_in})
    eye = torch.eye(d_in)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_evaluate_sae_on_exact_and_zero_reconstructions(pythia_shaped_model, make_windows):
    model = pythia_shaped_model
    windows = make_windows(4, 16, 1000, n_pad_last=3)
    hook = "blocks.1.hook_mlp_out"
    exact = evaluate_sae(model, exact_sae(512), hook, windows, batch_size=2)
    assert exact.n_tokens == windows.n_tokens == 4 * 15 - 3  # no BOS, no padding
    assert exact.variance_explained == pytest.approx(1.0, abs=1e-6)
    assert exact.dead_fraction < 0.01  # a coordinate of one sign on every token leaves its twin dead
    assert 500 < exact.mean_l0 <= 512  # one of each +/- pair per nonzero coordinate
    assert exact.ce_loss_reconstructed == pytest.approx(exact.ce_loss_clean, abs=1e-4)
    assert exact.ce_loss_recovered == pytest.approx(1.0, abs=1e-3)
    assert exact.ce_loss_zero_ablated != pytest.approx(exact.ce_loss_clean, abs=1e-3)

    zero = exact_sae(512)
    with torch.no_grad():
        zero.W_dec.zero_()
    nothing = evaluate_sae(model, zero, hook, windows.tokens, batch_size=4)  # plain tensor: every token counts
    assert nothing.n_tokens == 4 * 16
    assert nothing.variance_explained <= 0.0
    assert nothing.ce_loss_recovered == pytest.approx(0.0, abs=1e-4)


def test_streamed_variance_explained_matches_the_direct_formula(toy_data, standard_toy_sae):
    _, held_out, _ = toy_data
    sae = standard_toy_sae
    stats = VarianceExplained()
    with torch.no_grad():
        for part in held_out.split(1_000):  # streamed in pieces
            stats.update(part, sae.decode(sae.encode(part)))
        direct = variance_explained(held_out, sae.decode(sae.encode(held_out)))
    assert stats.n_tokens == len(held_out)
    assert stats.compute() == pytest.approx(direct.item(), abs=1e-5)
    with pytest.raises(ValueError, match="no tokens"):
        VarianceExplained().compute()


def test_quality_json_holds_the_measurements_with_nan_as_null():
    good = SAEQuality(variance_explained=0.9, mean_l0=30, dead_fraction=0.1, n_tokens=1000)
    assert good.to_dict()["ce_loss_clean"] is None  # strict JSON: NaN written as null
    assert "flag" not in good.to_dict()  # the verdict is the gate's, given with each measured row


# --- the CLI's function: stream once, train, save, judge ---------------------------------------


def test_train_saes_for_model_saves_loadable_judged_saes(pythia_shaped_model, make_windows, tmp_path):
    model = pythia_shaped_model
    windows = make_windows(40, 16, 1000, seed=3)
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]
    config = SAETrainingConfig(
        expansion_factor=1, batch_size_tokens=128, training_tokens=384, lr=1e-3, shuffle_buffer_batches=1
    )
    folders = train_saes_for_model(
        model, hooks, windows, config, tmp_path / "saes", batch_size=8, n_eval_windows=4, progress=False
    )
    assert list(folders) == hooks
    for hook, folder in folders.items():
        assert folder == tmp_path / "saes" / hook
        sae = load_sae_from_disk(folder)
        check_sae_fits(sae, hook_point(model, hook), model.cfg.model_name)
        assert sae.cfg.metadata.training_tokens == 384
        summary = json.loads((folder / QUALITY_FILENAME).read_text())
        assert summary["hook_name"] == hook
        assert summary["n_tokens"] == 4 * 15  # the held-out windows, without BOS
    with pytest.raises(ValueError, match="n_eval_windows"):
        train_saes_for_model(model, hooks, windows[:4], config, tmp_path / "x", n_eval_windows=4)


def test_epochs_replay_one_pass_of_activations(pythia_shaped_model, make_windows, tmp_path, monkeypatch):
    import lm_superposition.saes.training as training

    passes = []
    real_stream = training.stream_activations
    monkeypatch.setattr(training, "stream_activations", lambda *a, **k: passes.append(1) or real_stream(*a, **k))
    config = SAETrainingConfig(
        expansion_factor=1, batch_size_tokens=64, training_tokens=3 * 6 * 15, epochs=3, shuffle_buffer_batches=1
    )
    assert config.distinct_tokens == 6 * 15
    # 6 training windows of 15 measured tokens: enough text for one pass only
    windows = make_windows(6 + 2, 16, 1000, seed=4)
    folders = train_saes_for_model(
        pythia_shaped_model, ["blocks.0.hook_mlp_out"], windows, config, tmp_path, n_eval_windows=2, progress=False
    )
    assert len(passes) == 1  # the model ran over the training windows once
    sae = load_sae_from_disk(folders["blocks.0.hook_mlp_out"])
    assert sae.cfg.metadata.training_tokens == 4 * 64  # 270 tokens seen in 3 passes, cut into whole batches
    with pytest.raises(ValueError, match="epochs must be a positive integer"):
        SAETrainingConfig(epochs=0)


def test_several_sae_seeds_train_from_one_stream(pythia_shaped_model, make_windows, tmp_path):
    windows = make_windows(24, 16, 1000, seed=5)
    config = SAETrainingConfig(expansion_factor=1, batch_size_tokens=64, training_tokens=192, shuffle_buffer_batches=1)
    hook = "blocks.0.hook_mlp_out"
    folders = train_saes_for_model(
        pythia_shaped_model, [hook], windows, config, tmp_path, n_eval_windows=2, progress=False, sae_seeds=[0, 7]
    )
    assert folders == {hook: {0: tmp_path / "sae_seed0" / hook, 7: tmp_path / "sae_seed7" / hook}}
    first, second = (load_sae_from_disk(folders[hook][seed]) for seed in (0, 7))
    assert not torch.equal(first.W_dec, second.W_dec)  # different initialisations
    single = train_saes_for_model(
        pythia_shaped_model, [hook], windows, config, tmp_path / "single", n_eval_windows=2, progress=False
    )
    assert torch.equal(load_sae_from_disk(single[hook]).W_dec, first.W_dec)  # seed 0 alone is the same SAE
