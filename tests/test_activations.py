import pytest
import torch

from lm_superposition.activations import ActivationBatch, stream_activations
from lm_superposition.data import PAD_DOC_ID, token_windows

HOOKS = [
    "hook_embed",
    "blocks.0.hook_resid_pre",
    "blocks.1.hook_attn_out",
    "blocks.2.mlp.hook_post",
    "blocks.3.hook_resid_post",
]


@pytest.fixture(scope="module")
def windows(make_windows):
    # 5 windows of 16 tokens, each starting with BOS, the last ending in 3 padding tokens.
    return make_windows(5, 16, vocab=50304, n_pad_last=3)


def _concatenated(batches: list[ActivationBatch]) -> dict[str, torch.Tensor]:
    return {hook: torch.cat([batch.activations[hook] for batch in batches]) for hook in batches[0].activations}


def test_streamed_activations_equal_run_with_cache(pythia_shaped_model, windows):
    batches = list(stream_activations(pythia_shaped_model, windows, HOOKS, batch_size=2, progress=False))
    assert [batch.window_slice for batch in batches] == [slice(0, 2), slice(2, 4), slice(4, 5)]

    _, cache = pythia_shaped_model.run_with_cache(windows.tokens, names_filter=HOOKS)
    measured = windows.measured_mask.flatten()
    streamed = _concatenated(batches)
    assert set(streamed) == set(HOOKS)
    for hook in HOOKS:
        expected = cache[hook].flatten(0, 1)[measured]
        assert streamed[hook].shape == expected.shape
        torch.testing.assert_close(streamed[hook], expected, atol=1e-5, rtol=1e-5)
    assert streamed["blocks.2.mlp.hook_post"].shape[1] == 2048
    assert torch.equal(torch.cat([batch.doc_ids for batch in batches]), windows.doc_ids.flatten()[measured])


def test_bos_and_padding_are_excluded_by_default(pythia_shaped_model, windows):
    kept = list(stream_activations(pythia_shaped_model, windows, ["blocks.0.hook_resid_post"], progress=False))
    every = list(
        stream_activations(
            pythia_shaped_model, windows, ["blocks.0.hook_resid_post"], exclude_special=False, progress=False
        )
    )
    # 5 BOS and 3 padding tokens out of 80
    assert sum(batch.n_tokens for batch in kept) == windows.n_tokens == 80 - 5 - 3
    assert sum(batch.n_tokens for batch in every) == 80
    assert PAD_DOC_ID not in torch.cat([batch.doc_ids for batch in kept])
    all_rows = _concatenated(every)["blocks.0.hook_resid_post"].reshape(5, 16, 512)
    torch.testing.assert_close(_concatenated(kept)["blocks.0.hook_resid_post"], all_rows[windows.measured_mask])


def test_forward_stops_after_the_deepest_requested_block(pythia_shaped_model, windows):
    model = pythia_shaped_model
    ran = []
    handles = [
        module.register_forward_hook(lambda *_, name=name: ran.append(name))
        for name, module in [
            ("block 2", model.blocks[2]),
            ("block 3", model.blocks[3]),
            ("block 4", model.blocks[4]),
            ("ln_final", model.ln_final),
            ("unembed", model.unembed),
        ]
    ]
    try:
        list(
            stream_activations(
                model, windows, ["blocks.3.hook_attn_out", "blocks.1.hook_mlp_out"], batch_size=5, progress=False
            )
        )
        assert ran == ["block 2", "block 3"]
        ran.clear()
        list(stream_activations(model, windows, ["hook_embed"], batch_size=5, progress=False))
        assert ran == []
    finally:
        for handle in handles:
            handle.remove()


def test_activations_are_ordinary_tensors_that_can_train(pythia_shaped_model, windows):
    batch = next(stream_activations(pythia_shaped_model, windows, ["blocks.0.hook_mlp_out"], progress=False))
    activations = batch.activations["blocks.0.hook_mlp_out"]
    assert not activations.is_inference() and not activations.requires_grad
    weight = torch.zeros(512, 4, requires_grad=True)
    (activations @ weight).square().sum().backward()  # an inference tensor would refuse this
    assert weight.grad is not None


def test_progress_bar_counts_tokens(pythia_shaped_model, windows, capsys):
    list(stream_activations(pythia_shaped_model, windows, ["hook_embed"], progress=True))
    progress = capsys.readouterr().err
    assert "72.0/72.0" in progress and "tok/s" in progress  # every measured token, as a rate


def test_bad_input_fails_at_the_call(pythia_shaped_model, windows, make_windows):
    with pytest.raises(ValueError, match="unknown hook 'blocks.0.hook_resid_mid'.*blocks.0.hook_resid_pre"):
        stream_activations(pythia_shaped_model, windows, ["blocks.0.hook_resid_mid"])
    with pytest.raises(ValueError, match="no hook names"):
        stream_activations(pythia_shaped_model, windows, [])
    with pytest.raises(ValueError, match="batch_size"):
        stream_activations(pythia_shaped_model, windows, ["hook_embed"], batch_size=0)
    too_long = make_windows(1, 2049, vocab=50304)
    with pytest.raises(ValueError, match="2049 tokens are longer than the model's context of 2048"):
        stream_activations(pythia_shaped_model, too_long, ["hook_embed"])


@pytest.mark.slow
def test_streaming_gemma_matches_run_with_cache(gemma_model):
    text = (
        "Superposition lets a layer represent more features than it has neurons. "
        "Sparse autoencoders recover those features from the activations."
    )
    windows = token_windows([text, text.upper()], gemma_model.tokenizer, context_size=24, shuffle=False)
    hooks = ["blocks.2.hook_resid_mid", "blocks.5.mlp.hook_post"]
    batches = list(stream_activations(gemma_model, windows, hooks, batch_size=2, progress=False))

    streamed = _concatenated(batches)
    assert streamed["blocks.2.hook_resid_mid"].shape == (windows.n_tokens, 640)
    assert streamed["blocks.5.mlp.hook_post"].shape == (windows.n_tokens, 2048)
    _, cache = gemma_model.run_with_cache(windows.tokens, names_filter=hooks, stop_at_layer=6)
    for hook in hooks:
        torch.testing.assert_close(streamed[hook], cache[hook][windows.measured_mask], atol=1e-4, rtol=1e-4)
