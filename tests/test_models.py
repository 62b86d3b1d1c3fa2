import huggingface_hub.constants
import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from lm_superposition import models
from lm_superposition.models import (
    OFFLINE_DEFAULT_MODEL,
    HookPoint,
    HubUnavailableError,
    hook_catalogue,
    hook_point,
    hook_table,
    load_model,
    offline_cache_dir,
    paper_hooks,
)

# ---------------------------------------------------------------- catalogue, Pythia-70M shape


def test_pythia_catalogue_has_every_hook_with_its_width(pythia_shaped_model):
    catalogue = hook_catalogue(pythia_shaped_model)
    kinds = [point.kind for point in catalogue]
    # Parallel attention+MLP: no resid_mid.
    assert {kind: kinds.count(kind) for kind in set(kinds)} == {
        "embed": 1,
        "resid_pre": 6,
        "attn_out": 6,
        "mlp_post": 6,
        "mlp_out": 6,
        "resid_post": 6,
    }
    assert all(point.width == (2048 if point.kind == "mlp_post" else 512) for point in catalogue)
    assert catalogue[0] == HookPoint("hook_embed", "embed", 0, 512)
    assert HookPoint("blocks.4.mlp.hook_post", "mlp_post", 4, 2048) in catalogue
    assert all(point.name in pythia_shaped_model.hook_dict for point in catalogue)


def test_pythia_paper_hooks_are_the_papers_19(pythia_shaped_model):
    names = [point.name for point in paper_hooks(pythia_shaped_model)]
    expected = ["blocks.0.hook_resid_pre"] + [
        f"blocks.{layer}.hook_{kind}" for layer in range(6) for kind in ("attn_out", "mlp_out", "resid_post")
    ]
    assert names == expected
    assert {point.width for point in paper_hooks(pythia_shaped_model)} == {512}


def test_sequential_and_attention_only_models_list_only_their_hooks():
    small = dict(n_layers=2, d_model=16, n_heads=2, d_head=8, n_ctx=8, d_vocab=20, act_fn="gelu")
    sequential = HookedTransformer(HookedTransformerConfig(**small, d_mlp=40))
    attn_only = HookedTransformer(HookedTransformerConfig(**small, attn_only=True))
    assert hook_point(sequential, "blocks.1.hook_resid_mid") == HookPoint("blocks.1.hook_resid_mid", "resid_mid", 1, 16)
    assert hook_point(sequential, "blocks.0.mlp.hook_post").width == 40
    assert {point.kind for point in hook_catalogue(attn_only)} == {"embed", "resid_pre", "attn_out", "resid_post"}


def test_unknown_hook_lists_the_real_names(pythia_shaped_model):
    with pytest.raises(ValueError, match="blocks.9.hook_resid_post") as error:
        hook_point(pythia_shaped_model, "blocks.9.hook_resid_post")
    message = str(error.value)
    assert "blocks.5.hook_resid_post" in message and "blocks.0.mlp.hook_post" in message
    assert "hook_resid_mid" not in message  # only hooks this model has


def test_hook_table_is_the_catalogue(pythia_shaped_model):
    table = hook_table(pythia_shaped_model)
    assert list(table.columns) == ["hook", "kind", "layer", "N", "paper"]
    assert len(table) == 31 and table["paper"].sum() == 19
    assert table.set_index("hook").loc["blocks.3.mlp.hook_post", "N"] == 2048


# ---------------------------------------------------------------- loading: names, folders, hub


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(
        ValueError,
        match="unknown model 'no-such-model-xyz' for backend 'hooked'.*offline model.*"
        "backend='bridge' opens any Hugging Face model name",
    ):
        load_model("no-such-model-xyz", backend="hooked")
    # The bridge opens any hub name, so only the hub can say a name does not exist; a name the
    # hub could never hold is refused at once.
    with pytest.raises(
        ValueError, match="unknown model 'no such model!' for backend 'bridge': the Hugging Face hub has no"
    ):
        load_model("no such model!")


def test_name_the_hub_does_not_have_is_a_clear_error_on_the_bridge(monkeypatch):
    import httpx
    from huggingface_hub.errors import RepositoryNotFoundError
    from transformers import AutoConfig

    def no_such_repository(name, **kwargs):  # what transformers raises when the hub answers 404
        request = httpx.Request("GET", f"https://huggingface.co/api/models/{name}")
        cause = RepositoryNotFoundError(
            "404 Client Error. Repository Not Found", response=httpx.Response(404, request=request)
        )
        raise OSError(f"{name} is not a local folder and is not a valid model identifier") from cause

    monkeypatch.setattr(AutoConfig, "from_pretrained", no_such_repository)
    with pytest.raises(
        ValueError,
        match="unknown model 'someone/no-such-model' for backend 'bridge': the Hugging "
        "Face hub has no such model.*not an offline model",
    ):
        load_model("someone/no-such-model")


@pytest.mark.parametrize("backend", models.BACKENDS)
def test_folder_without_config_is_a_clear_error(tmp_path, backend):
    with pytest.raises(ValueError, match="no config.json"):
        load_model(str(tmp_path), backend=backend)


@pytest.fixture
def hub_unreachable(monkeypatch, tmp_path):
    """The hub switched off and an empty cache, whatever the machine has cached."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))


@pytest.mark.parametrize("backend", models.BACKENDS)
def test_official_name_without_hub_raises_hub_unavailable(hub_unreachable, backend):
    with pytest.raises(HubUnavailableError) as error:
        load_model("pythia-70m-deduped", backend=backend)
    assert isinstance(error.value, RuntimeError)
    message = str(error.value)
    assert f"could not reach the Hugging Face hub for 'pythia-70m-deduped' (backend '{backend}')" in message
    assert OFFLINE_DEFAULT_MODEL in message and models.SMOLLM2_MODEL in message
    assert "lm-superposition[offline]" in message


def _tiny_hooked_transformer():
    config = HookedTransformerConfig(n_layers=1, d_model=8, d_head=4, n_ctx=4, d_vocab=10, attn_only=True)
    return HookedTransformer(config)


def test_pythia_checkpoint_is_passed_to_transformer_lens(monkeypatch):
    calls = []
    monkeypatch.setattr(
        HookedTransformer,
        "from_pretrained_no_processing",
        lambda name, **kwargs: calls.append((name, kwargs)) or _tiny_hooked_transformer(),
    )
    load_model("pythia-70m-deduped", checkpoint=1000, backend="hooked")
    assert calls[0][0] == "EleutherAI/pythia-70m-deduped"
    assert calls[0][1]["checkpoint_value"] == 1000


def test_pythia_checkpoint_is_passed_to_the_bridge(monkeypatch):
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoConfig, GPTNeoXConfig

    calls = []
    monkeypatch.setattr(AutoConfig, "from_pretrained", lambda name, **kwargs: GPTNeoXConfig())  # the hub's config.json
    monkeypatch.setattr(
        TransformerBridge,
        "boot_transformers",
        lambda name, **kwargs: calls.append((name, kwargs)) or _tiny_hooked_transformer(),
    )
    monkeypatch.setattr(models, "_enable_compatibility_mode", lambda model: None)
    model = load_model("pythia-70m-deduped", checkpoint=1000)  # the TransformerLens alias resolves to the hub name
    assert calls[0][0] == "EleutherAI/pythia-70m-deduped"
    assert calls[0][1]["checkpoint_value"] == 1000
    assert model.cfg.model_name == "pythia-70m-deduped"


@pytest.mark.parametrize("backend", models.BACKENDS)
def test_checkpoint_that_was_never_saved_is_a_clear_error(backend):
    with pytest.raises(ValueError, match="checkpoint=1234 is not a saved step of EleutherAI/pythia-70m"):
        load_model("pythia-70m", checkpoint=1234, backend=backend)
    with pytest.raises(ValueError, match="gpt2 has no training checkpoints"):
        load_model("gpt2", checkpoint=1000, backend=backend)


def _save_tiny_hf_folder(folder, hf_model):
    """Save `hf_model` (vocabulary 64) with a word-level tokenizer as a HF checkpoint folder."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    word_level = Tokenizer(WordLevel({f"w{i}": i for i in range(64)}, unk_token="w1"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, bos_token="w0", eos_token="w0", unk_token="w1")
    hf_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return hf_model


def _save_tiny_neox_folder(folder):
    """A tiny random GPT-NeoX (Pythia's architecture) saved as a HF folder."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    config = GPTNeoXConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        rotary_pct=0.25,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    return _save_tiny_hf_folder(folder, GPTNeoXForCausalLM(config).eval())


@pytest.mark.parametrize("backend", models.BACKENDS)
def test_local_hf_folder_loads_offline_with_the_same_logits(tmp_path, hub_unreachable, backend):
    hf_model = _save_tiny_neox_folder(tmp_path / "tiny-neox")
    model = load_model(str(tmp_path / "tiny-neox"), backend=backend)
    assert models.backend_of(model) == backend
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model(tokens), hf_model(tokens).logits, atol=1e-5)
    assert model.tokenizer.bos_token_id == 0
    assert hook_point(model, "blocks.1.mlp.hook_post").width == 64


def test_local_folder_transformer_lens_cannot_map_is_a_clear_error(tmp_path, hub_unreachable):
    # HookedTransformer configures Gemma 3 from official names only; this folder's name is none.
    # The bridge needs no name.
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
    )
    _save_tiny_hf_folder(tmp_path / "my-model", Gemma3ForCausalLM(config))
    with pytest.raises(
        models.UnsupportedArchitectureError,
        match="backend 'hooked' .*cannot convert the Gemma3ForCausalLM checkpoint in .*my-model.*"
        "backend='bridge' opens Gemma3ForCausalLM models",
    ):
        load_model(str(tmp_path / "my-model"), backend="hooked")
    assert len(hook_catalogue(load_model(str(tmp_path / "my-model")))) == 1 + 2 * 6


# ---------------------------------------------------------------- the offline default, Gemma 3 270M


def test_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    assert offline_cache_dir() == tmp_path / "gemma-3-270m-it"


def _down_proj(model, layer: int) -> torch.Tensor:
    """The MLP output weight of `layer` as Hugging Face stores it ([d_model, d_mlp]), from either backend."""
    if models.backend_of(model) == "bridge":
        return model.original_model.model.layers[layer].mlp.down_proj.weight
    return model.blocks[layer].mlp.W_out.T


@pytest.mark.slow
def test_gemma_cache_holds_plain_fp32_weights(gemma_model):
    import json

    from safetensors import safe_open

    config = json.loads((offline_cache_dir() / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 18
    (cached_file,) = offline_cache_dir().glob("*.safetensors")
    with safe_open(cached_file, "pt") as cached:
        down_proj = cached.get_tensor("model.layers.5.mlp.down_proj.weight")
    assert down_proj.dtype == torch.float32
    assert torch.equal(down_proj, _down_proj(gemma_model, 5))


@pytest.mark.slow
def test_gemma_second_load_reads_the_cache(gemma_model, monkeypatch):
    def no_dequantizing(offline, cache):
        raise AssertionError("dequantized the GGUF again instead of reading the cache")

    handed_over = {}

    def capture(name, hf_model, tokenizer, **kwargs):
        handed_over.update(name=name, hf_model=hf_model, tokenizer=tokenizer)
        return gemma_model  # the TransformerLens conversion itself is covered by the logits test

    monkeypatch.setattr(models, "_dequantize_to_cache", no_dequantizing)
    monkeypatch.setattr(HookedTransformer, "from_pretrained_no_processing", capture)
    load_model(backend="hooked")
    assert handed_over["name"] == OFFLINE_DEFAULT_MODEL
    hf_model = handed_over["hf_model"]
    assert getattr(hf_model.config, "quantization_config", None) is None
    assert torch.equal(hf_model.model.layers[3].mlp.down_proj.weight, _down_proj(gemma_model, 3))
    assert handed_over["tokenizer"].bos_token_id == gemma_model.tokenizer.bos_token_id == 2

    # The bridge boots from the cache folder itself.
    monkeypatch.setattr(
        models,
        "_boot_bridge",
        lambda source, model_name, device, dtype: (
            handed_over.update(source=source, model_name=model_name) or gemma_model
        ),
    )
    load_model(backend="bridge")
    assert handed_over["source"] == str(offline_cache_dir())


@pytest.fixture(scope="module")
def gemma_transformers_model(gemma_model):
    """The reference: the cached dequantized weights run by transformers itself, loaded once."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(offline_cache_dir(), dtype=torch.float32).eval()


@pytest.mark.slow
def test_gemma_logits_equal_the_transformers_model(gemma_model, gemma_transformers_model):
    # Two rows of equal length: with padding, HookedTransformer masks the pads and a bare
    # transformers call does not, so pad positions would differ for no fault of ours.
    text = gemma_model.to_tokens("def add(a, b):\n    return a + b  # sums two numbers, like Paris + France")
    tokens = torch.cat([text, torch.cat([text[:, :1], text[:, 1:].flip(1)], dim=1)])
    with torch.no_grad():
        ours = gemma_model(tokens)
        reference = gemma_transformers_model(tokens).logits
    assert ours.shape == reference.shape == (2, tokens.shape[1], 262144)
    assert (ours - reference).abs().max() < 1e-4


@pytest.mark.slow
def test_gemma_catalogue(gemma_model):
    catalogue = hook_catalogue(gemma_model)
    assert len(catalogue) == 1 + 18 * 6  # sequential blocks: resid_mid present
    assert hook_point(gemma_model, "blocks.17.hook_resid_mid").width == 640
    assert hook_point(gemma_model, "blocks.0.mlp.hook_post").width == 2048
    assert len(paper_hooks(gemma_model)) == 1 + 18 * 3
