"""Reduced precision where it is an option (issue 16), and the quality check of many SAEs from one forward.

The bfloat16 encode must give the float32 F to within its documented price, keep the budget's
sums in float64 and leave the default untouched; the screened encode must give float32's codes,
none lost at the ReLU's threshold; bfloat16 autocast of a forward pass must hand
back activations in the model's dtype; `evaluate_saes` must give every SAE what `evaluate_sae`
gives it alone, CE loss only where asked. Speed is the benchmarks' business, never asserted here.
"""

import math

import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
from sae_lens.evals import get_recons_loss
from sae_lens.training.activation_scaler import ActivationScaler
from transformer_lens import HookedTransformer, HookedTransformerConfig

from lm_superposition.activations import stream_activations
from lm_superposition.analyze import LayerwiseAnalyzer, sae_budget
from lm_superposition.codes import LowPrecisionSAE, ScreenedSAE, _sampled_dots, _stable_order, decode, sparse_encode
from lm_superposition.config import RunSettings, SAETrainingConfig
from lm_superposition.metric import SUM_DTYPE, FeatureBudget, _mixture_entropies, entropy
from lm_superposition.saes.quality import evaluate_sae, evaluate_saes

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]


@pytest.fixture(scope="module")
def tiny_model():
    config = HookedTransformerConfig(
        n_layers=2,
        d_model=32,
        n_heads=2,
        d_head=16,
        d_mlp=64,
        d_vocab=97,
        n_ctx=32,
        act_fn="gelu",
        normalization_type="LN",
        seed=0,
        device="cpu",
    )
    return HookedTransformer(config).eval()


def standard_sae(d_in: int, d_sae: int, seed: int, hook: str = "h") -> StandardSAE:
    torch.manual_seed(seed)
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae))
    sae.cfg.metadata.hook_name = hook
    with torch.no_grad():
        sae.b_enc.fill_(-0.2)  # sparse codes, as trained SAEs have
    return sae


@pytest.mark.parametrize("kind", ["standard", "topk"])
def test_bfloat16_encode_gives_the_float32_f_within_its_price(kind):
    torch.manual_seed(0)
    if kind == "standard":
        sae = standard_sae(64, 512, seed=0)  # computed in place from bf16 copies of W_enc, b_enc
    else:
        sae = TopKSAE(TopKSAEConfig(d_in=64, d_sae=512, k=16))  # any other class: SAE-Lens encode under autocast
    activations = torch.randn(20_000, 64)
    exact = sae_budget(sae, activations, merge_duplicates=False)
    reduced = sae_budget(sae, activations, merge_duplicates=False, encode_dtype="bfloat16")
    assert reduced.block_sums.dtype == SUM_DTYPE  # the budget is summed in float64 either way
    assert abs(reduced.effective_features() / exact.effective_features() - 1) < 1e-3
    assert abs(reduced.mean_l0 / exact.mean_l0 - 1) < 0.01
    # float32 (the default) is the SAE's own precision: bit for bit the plain measurement
    same = sae_budget(sae, activations, merge_duplicates=False, encode_dtype="float32")
    assert torch.equal(same.block_sums, exact.block_sums)


def test_bfloat16_decode_reads_the_rounded_decoder_rows_unless_a_hook_needs_the_sae_own():
    sae = standard_sae(64, 512, seed=0)
    weights = LowPrecisionSAE(sae, torch.bfloat16)
    with torch.no_grad():
        codes = sparse_encode(sae, torch.randn(50, 64), weights=weights)
        assert codes.dtype == torch.bfloat16 and codes.values().numel() > 0
        reconstruction = decode(sae, codes, weights)
        dense_codes = codes.to_dense().float()
        from_rounded_rows = dense_codes @ sae.W_dec.bfloat16().float() + sae.b_dec
        from_exact_rows = sae.decode(dense_codes)
    assert reconstruction.dtype == torch.float32
    # products of rounded rows, summed in float32, the sum rounded to bfloat16 once
    torch.testing.assert_close(reconstruction, from_rounded_rows, rtol=2**-8, atol=1e-6)
    assert not torch.allclose(reconstruction, from_exact_rows, rtol=1e-6, atol=0)  # not W_dec's own rows
    calls = []
    sae.hook_sae_recons.add_hook(lambda recons, hook: calls.append(1) or recons)
    with torch.no_grad():
        hooked = decode(sae, codes, weights)  # the SAE's own decode, its hook included
    assert calls
    torch.testing.assert_close(hooked, from_exact_rows)


def test_low_precision_sae_refuses_a_full_precision_dtype():
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        LowPrecisionSAE(standard_sae(8, 16, seed=0), torch.float64)


def near_threshold_sae() -> tuple[StandardSAE, torch.Tensor]:
    """A StandardSAE and activations where many pre-activations lie within bfloat16's error of the
    ReLU's threshold: a quarter of the latents' biases cancel token 0's product to ~1e-4 of its
    sum of magnitudes (bfloat16's error is up to ~4e-3 of it), and
    tokens differ in scale by 10^4 (so any margin fixed in advance is wrong for some)."""
    torch.manual_seed(0)
    sae = StandardSAE(StandardSAEConfig(d_in=64, d_sae=512, apply_b_dec_to_input=True))
    activations = torch.randn(300, 64) * 10 ** torch.empty(300, 1).uniform_(-2, 2)
    with torch.no_grad():
        sae.W_enc.normal_().mul_(torch.rand(512) + 0.1)
        sae.b_dec.normal_(0, 0.01)
        products = sae.process_sae_in(activations).double() @ sae.W_enc.double()
        sae.b_enc.copy_(-products.quantile(0.97, dim=0))  # ~3% of the codes on
        sums_of_magnitudes = sae.process_sae_in(activations[0]).abs().double() @ sae.W_enc.abs().double()
        noise = 1e-4 * sums_of_magnitudes[:128] * torch.randn(128, dtype=torch.float64)
        sae.b_enc[:128] = (-products[0, :128] + noise).float()
    return sae, activations


def test_screened_encode_keeps_every_active_latent_even_at_the_threshold():
    sae, activations = near_threshold_sae()
    with torch.no_grad():
        codes = sparse_encode(sae, activations, weights=ScreenedSAE(sae)).to_dense()
        exact = sae.process_sae_in(activations).double() @ sae.W_enc.double() + sae.b_enc.double()
        rounded = sparse_encode(sae, activations, weights=LowPrecisionSAE(sae, torch.bfloat16)).to_dense()
    assert codes.dtype == torch.float32
    # float32's rounding of each dot product: a few ulps of the sum of |products|
    scale = sae.process_sae_in(activations).abs().double() @ sae.W_enc.abs().double() + sae.b_enc.abs().double()
    tolerance = 1e-6 * scale
    on, off = exact > tolerance, exact < -tolerance
    assert on[0].sum() > 40  # token 0 has latents just above the threshold...
    assert (rounded[on] == 0).any()  # ...that a bfloat16 encode alone loses
    assert (codes[on] > 0).all() and (codes[off] == 0).all()
    assert ((codes.double() - exact.clamp_min(0)).abs() <= tolerance).all()


@pytest.mark.parametrize("n_rows", [300, 2**16 + 5])  # numpy's radix sort, torch's sort
def test_sampled_dots_are_the_products_at_the_positions_in_their_order(n_rows):
    generator = torch.Generator().manual_seed(0)
    inputs, rows = torch.randn(7, 4, generator=generator), torch.randn(n_rows, 4, generator=generator)
    positions = torch.randperm(7 * n_rows, generator=generator)[:500].sort().values
    tokens, latents = positions // n_rows, positions % n_rows
    order = _stable_order(latents, n_rows)
    assert torch.equal(latents[order], latents.sort().values)  # by latent...
    assert all((tokens[order][latents[order] == j].diff() > 0).all() for j in latents.unique())  # ...tokens ascending
    expected = (inputs[tokens] * rows[latents]).sum(1)
    torch.testing.assert_close(_sampled_dots(tokens, latents, inputs, rows), expected)


def test_screened_encode_keeps_nan_as_the_relu_does_and_reads_only_plain_float32_saes():
    sae = standard_sae(16, 64, seed=0)
    activations = torch.randn(5, 16)
    activations[2, 3] = float("nan")
    with torch.no_grad():
        codes = sparse_encode(sae, activations, weights=ScreenedSAE(sae)).to_dense()
        expected = sae.encode(activations)
    assert codes[2].isnan().all() and expected[2].isnan().all()
    torch.testing.assert_close(codes[[0, 1, 3, 4]], expected[[0, 1, 3, 4]])
    with pytest.raises(ValueError, match="float32 StandardSAE.*TopKSAE"):
        ScreenedSAE(TopKSAE(TopKSAEConfig(d_in=16, d_sae=64, k=4)))
    assert not ScreenedSAE.applies(standard_sae(16, 64, seed=0).double())


@pytest.mark.parametrize("kind", ["standard", "topk"])
def test_screened_encode_gives_the_float32_f(kind):
    torch.manual_seed(0)
    if kind == "standard":
        sae = standard_sae(64, 512, seed=0)
    else:  # not screened: its own float32 encode, bit for bit
        sae = TopKSAE(TopKSAEConfig(d_in=64, d_sae=512, k=16))
    activations = torch.randn(20_000, 64)
    exact = sae_budget(sae, activations, merge_duplicates=False)
    screened = sae_budget(sae, activations, merge_duplicates=False, encode_dtype="float32_screened")
    assert abs(screened.effective_features() / exact.effective_features() - 1) < 1e-6
    assert screened.mean_l0 == exact.mean_l0
    if kind == "topk":
        assert torch.equal(screened.block_sums, exact.block_sums)


def test_analyzer_with_bfloat16_encode_measures_the_same_layers(tiny_model, make_windows):
    saes = {hook: standard_sae(tiny_model.cfg.d_model, 256, seed=i, hook=hook) for i, hook in enumerate(HOOKS)}
    windows = make_windows(16, 32, 97, bos=None, pad=None)
    tables = {
        dtype: LayerwiseAnalyzer(
            tiny_model, saes, model_name="tiny", batch_size=4, n_blocks=8, merge_duplicates=False, encode_dtype=dtype
        ).measure(windows, ce_windows=0, progress=False)
        for dtype in (None, "bfloat16")
    }
    exact, reduced = (tables[d].set_index("hook") for d in (None, "bfloat16"))
    assert (reduced.tokens == exact.tokens).all()
    assert ((reduced.F / exact.F - 1).abs() < 0.02).all()  # 496 tokens: a loose bound
    # random SAEs explain nothing (VE far below 0): compare the unexplained variance relative to itself
    assert ((1 - reduced.variance_explained) / (1 - exact.variance_explained) - 1).abs().max() < 0.01


def test_analyzer_with_screened_encode_measures_the_float32_layers(tiny_model, make_windows):
    saes = {hook: standard_sae(tiny_model.cfg.d_model, 256, seed=i, hook=hook) for i, hook in enumerate(HOOKS)}
    windows = make_windows(16, 32, 97, bos=None, pad=None)
    exact, screened = (
        LayerwiseAnalyzer(tiny_model, saes, model_name="tiny", batch_size=4, n_blocks=8, encode_dtype=dtype)
        .measure(windows, ce_windows=0, progress=False)
        .set_index("hook")
        for dtype in ("float32", "float32_screened")
    )
    assert ((screened.F / exact.F - 1).abs() < 1e-6).all()
    assert (screened.mean_l0 == exact.mean_l0).all()
    # random SAEs explain nothing (VE far below 0): compare the unexplained variance relative to itself
    assert ((1 - screened.variance_explained) / (1 - exact.variance_explained) - 1).abs().max() < 1e-6


def test_encode_dtype_is_a_checked_run_setting():
    assert RunSettings().encode_dtype == "float32"
    assert RunSettings(encode_dtype="bfloat16").encode_dtype == "bfloat16"
    assert RunSettings(encode_dtype="float32_screened").encode_dtype == "float32_screened"
    with pytest.raises(ValueError, match="encode_dtype"):
        RunSettings(encode_dtype="int8")
    with pytest.raises(ValueError, match="float32_screened"):  # the API names every valid value too
        sae_budget(standard_sae(8, 16, seed=0), torch.randn(4, 8), encode_dtype="int8")


def test_autocast_training_is_off_by_default_and_not_the_validated_recipe():
    assert SAETrainingConfig().autocast is False and SAETrainingConfig().autocast_lm is False
    assert SAETrainingConfig().recipe_verdict() == "validated"
    assert "autocast" in SAETrainingConfig(autocast=True).recipe_verdict()
    assert SAETrainingConfig(autocast_lm=True).recipe_verdict() == "validated"  # the data's precision, not the recipe


def test_autocast_forward_hands_back_activations_in_the_model_dtype(tiny_model, make_windows):
    windows = make_windows(4, 32, 97)
    exact, reduced = (
        next(iter(stream_activations(tiny_model, windows, HOOKS, batch_size=4, progress=False, autocast_dtype=dtype)))
        for dtype in (None, torch.bfloat16)
    )
    for hook in HOOKS:
        assert reduced.activations[hook].dtype == torch.float32
        relative = (reduced.activations[hook] - exact.activations[hook]).norm() / exact.activations[hook].norm()
        assert 0 < relative < 0.05  # bfloat16 was used, and is close


def test_evaluate_saes_gives_each_sae_what_evaluate_sae_gives_it(tiny_model, make_windows):
    saes = {hook: standard_sae(tiny_model.cfg.d_model, 128, seed=i, hook=hook) for i, hook in enumerate(HOOKS)}
    windows = make_windows(6, 32, 97)
    together = evaluate_saes(tiny_model, saes, windows, batch_size=4, ce_hooks=[HOOKS[1]])
    for hook, sae in saes.items():
        alone = evaluate_sae(tiny_model, sae, hook, windows, batch_size=4)
        assert together[hook].variance_explained == pytest.approx(alone.variance_explained, abs=1e-6)
        assert together[hook].mean_l0 == pytest.approx(alone.mean_l0)
        assert together[hook].n_tokens == alone.n_tokens
    assert math.isnan(together[HOOKS[0]].ce_loss_recovered)  # not asked for
    assert together[HOOKS[1]].ce_loss_recovered == pytest.approx(
        evaluate_sae(tiny_model, saes[HOOKS[1]], HOOKS[1], windows, batch_size=4).ce_loss_recovered
    )
    by_seed = evaluate_saes(tiny_model, {HOOKS[0]: {7: saes[HOOKS[0]]}}, windows, batch_size=4)
    assert by_seed[HOOKS[0]][7].variance_explained == pytest.approx(together[HOOKS[0]].variance_explained)
    with pytest.raises(ValueError, match="ce_hooks"):
        evaluate_saes(tiny_model, saes, windows, ce_hooks=["blocks.5.hook_resid_post"])


def test_ce_with_shared_passes_equals_sae_lens_get_recons_loss(tiny_model, make_windows):
    """evaluate_saes runs the clean pass once per batch and the zero-ablated pass once per hook;
    each SAE's CE losses must still be what SAE-Lens's get_recons_loss gives it alone."""
    windows = make_windows(4, 32, 97, n_pad_last=5)
    hook = HOOKS[1]
    saes = {seed: standard_sae(tiny_model.cfg.d_model, 128, seed=seed, hook=hook) for seed in (3, 4)}
    shared = evaluate_saes(tiny_model, {hook: saes}, windows, batch_size=4, ce_hooks=[hook])[hook]
    special = [windows.bos_token_id, windows.pad_token_id]
    predicts_text = windows.measured_mask[:, 1:]
    for seed, sae in saes.items():
        losses = get_recons_loss(
            sae, tiny_model, ActivationScaler(), windows.tokens, False, True, ignore_tokens=special, hook_name=hook
        )
        mean = {key: losses[key][predicts_text].mean().item() for key in losses}
        assert shared[seed].ce_loss_clean == pytest.approx(mean["ce_loss_without_sae"], rel=1e-5)
        assert shared[seed].ce_loss_reconstructed == pytest.approx(mean["ce_loss_with_sae"], rel=1e-5)
        assert shared[seed].ce_loss_zero_ablated == pytest.approx(mean["ce_loss_with_ablation"], rel=1e-5)
    assert shared[3].ce_loss_reconstructed != pytest.approx(shared[4].ce_loss_reconstructed, rel=1e-5)


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_mixture_entropies_equal_the_entropy_of_each_mixed_budget(dtype, rtol):
    sums = torch.rand(4, 700, dtype=torch.float64) ** 3
    sums[:, :150] = 0  # zeros are 0 ln 0 = 0
    weights = torch.rand(6, 4, dtype=torch.float64)
    weights[2] = 0  # an all-zero budget: no entropy
    expected = torch.tensor(
        [entropy(row) if row.sum() > 0 else math.nan for row in weights @ sums], dtype=torch.float64
    )
    got = _mixture_entropies(weights.to(dtype), sums.to(dtype), latents_at_a_time=256)  # 3 slabs, the last short
    assert got.dtype == torch.float64
    assert torch.allclose(got, expected, rtol=rtol, atol=0, equal_nan=True)


def test_bootstrap_and_curve_are_read_off_the_same_budget():
    budget = FeatureBudget(400, 10, n_blocks=16)
    codes = torch.rand(3000, 400) ** 8
    budget.update(codes, torch.arange(3000))
    interval = budget.bootstrap_effective_features()
    assert interval.low < budget.effective_features() < interval.high
    curve = budget.sample_size_curve()
    assert curve[-1]["blocks"] == 16 and curve[-1]["F"] == pytest.approx(budget.effective_features(), rel=1e-12)
    assert [row["tokens"] for row in curve] == sorted(row["tokens"] for row in curve)


@pytest.mark.parametrize("rescale_acts_by_decoder_norm", [False, True])
@pytest.mark.parametrize("n_dead", [0, 4, 40])  # 4: every token decodes all dead latents, 40: its top k_aux = 16
@pytest.mark.parametrize("kernel", ["onednn", "torch"])  # on oneDNN the auxiliary decode is padded to a fixed width
def test_sparse_topk_training_sae_matches_sae_lens_dense_topk(rescale_acts_by_decoder_norm, n_dead, kernel):
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    from lm_superposition.kernels import float32_kernel
    from lm_superposition.saes.training import SparseTopKTrainingSAE

    torch.manual_seed(0)
    config = TopKTrainingSAEConfig(d_in=32, d_sae=128, k=4, rescale_acts_by_decoder_norm=rescale_acts_by_decoder_norm)
    dense, sparse = TopKTrainingSAE(config), SparseTopKTrainingSAE(config)
    with torch.no_grad():
        dense.W_dec.mul_(torch.rand(128, 1) + 0.5)  # decoder rows of unequal norms
        dense.b_enc.normal_(0, 0.1)
        dense.b_dec.normal_(0, 0.1)  # the encoder's input gradient reaches b_dec through process_sae_in
    sparse.load_state_dict(dense.state_dict())
    dead = torch.zeros(128, dtype=torch.bool)
    dead[torch.randperm(128)[:n_dead]] = True
    step_input = TrainStepInput(
        sae_in=torch.randn(40, 32), coefficients={}, dead_neuron_mask=dead, n_training_steps=0, is_logging_step=False
    )
    with float32_kernel(kernel):
        outputs = [sae.training_forward_pass(step_input) for sae in (dense, sparse)]
        for output in outputs:
            output.loss.backward()
    assert (outputs[1].losses["auxiliary_reconstruction_loss"] > 0) == (n_dead > 0)
    for name in ("mse_loss", "auxiliary_reconstruction_loss"):
        assert torch.allclose(outputs[0].losses[name], outputs[1].losses[name], rtol=1e-6), name
    assert torch.allclose(outputs[0].sae_out, outputs[1].sae_out, atol=1e-6)
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert torch.allclose(getattr(dense, name).grad, getattr(sparse, name).grad, rtol=1e-5, atol=1e-7), name


@pytest.mark.parametrize("n_dead", [0, 40])
def test_sparse_topk_training_sae_under_autocast_trains_as_sae_lens(n_dead):
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    from lm_superposition.saes.training import SparseTopKTrainingSAE

    torch.manual_seed(0)
    config = TopKTrainingSAEConfig(d_in=32, d_sae=128, k=2)
    dense, sparse = TopKTrainingSAE(config), SparseTopKTrainingSAE(config)
    sparse.load_state_dict(dense.state_dict())
    dead = torch.zeros(128, dtype=torch.bool)
    dead[torch.randperm(128)[:n_dead]] = True
    step_input = TrainStepInput(
        sae_in=torch.randn(40, 32), coefficients={}, dead_neuron_mask=dead, n_training_steps=0, is_logging_step=False
    )
    outputs = []
    for sae in (dense, sparse):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs.append(sae.training_forward_pass(step_input))
        outputs[-1].loss.backward()
    assert outputs[1].hidden_pre.dtype == outputs[0].hidden_pre.dtype
    assert torch.equal(outputs[0].hidden_pre, outputs[1].hidden_pre)  # the encode as SAE-Lens's
    assert torch.equal(outputs[0].feature_acts != 0, outputs[1].feature_acts != 0)  # the same latents fire
    for name in ("mse_loss", "auxiliary_reconstruction_loss"):  # ours decodes in float32, SAE-Lens in bfloat16
        assert torch.allclose(outputs[0].losses[name], outputs[1].losses[name], rtol=2e-2), name
    # both W_enc gradients are bfloat16 matmuls (ours of a float32 decode's gradient): equal to bfloat16's precision
    assert sparse.W_enc.grad.dtype == torch.float32
    assert torch.allclose(dense.W_enc.grad, sparse.W_enc.grad, rtol=2e-2, atol=2e-2 * dense.W_enc.grad.abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_top_k_latents_are_torch_topks(dtype):
    """The same top-k values per row as torch.topk (the latents too, where no two values tie),
    also in rows with NaN (largest in both), -inf and ties, at k = 1 and k = the whole width."""
    from lm_superposition.saes.training import _top_k_latents

    torch.manual_seed(0)
    pre = (torch.randn(300, 1280) + torch.randn(1280)).to(dtype)
    pre[3, :] = float("-inf")
    pre[4, 7] = float("nan")
    pre[5, :] = 1.0  # all tied
    pre[6, ::2] = float("-inf")
    for hidden_pre, k in (
        (pre, 32),
        (pre[7:], 32),
        (pre[7:, :256].t().contiguous().t(), 9),  # column-major: not contiguous in its rows
        (pre[7:], 1),
        (pre[:, :40], 40),
    ):
        latents = _top_k_latents(hidden_pre, k)
        expected = hidden_pre.topk(k, dim=-1, sorted=False)
        assert latents.shape == (len(hidden_pre), k) and latents.dtype == torch.int64
        got = hidden_pre.gather(-1, latents)
        assert torch.equal(got.sort(-1).values.nan_to_num(), expected.values.sort(-1).values.nan_to_num())
        assert all(len(set(row.tolist())) == k for row in latents)  # k distinct latents a row
        if dtype != torch.bfloat16 and hidden_pre.shape[0] == 293:  # no ties among random float values
            assert torch.equal(latents.sort(-1).values, expected.indices.sort(-1).values)


def test_centred_linear_has_the_gradients_of_a_matmul():
    from lm_superposition.saes.training import _CentredLinear

    torch.manual_seed(0)
    x, W, b = torch.randn(400, 24), torch.randn(24, 640), torch.randn(640)
    grad = torch.randn(400, 640)
    expected = torch.autograd.grad(x.requires_grad_() @ W.requires_grad_() + b.requires_grad_(), (x, W, b), grad)
    got = torch.autograd.grad(_CentredLinear.apply(x, W, b, None), (x, W, b), grad)
    for name, want, have in zip("xWb", expected, got, strict=True):
        assert torch.allclose(want, have, rtol=1e-5, atol=1e-4), name
    with torch.autocast("cpu", dtype=torch.bfloat16):
        product_autocast = _CentredLinear.apply(x, W, b, None)
        plain_autocast = x @ W + b
    assert torch.equal(product_autocast, plain_autocast)  # the forward in bfloat16, as autocast runs it
    got = torch.autograd.grad(product_autocast, (x, W, b), grad)
    want = torch.autograd.grad(plain_autocast, (x, W, b), grad)
    for name, want_autocast, have in zip("xWb", want, got, strict=True):  # so are the gradients' matmuls
        assert have.dtype == torch.float32 and torch.allclose(want_autocast, have, rtol=1e-2, atol=1e-2), name
    assert not torch.allclose(expected[1], got[1], rtol=1e-4, atol=1e-4)  # bfloat16's W gradient, not float32's


def test_centred_linear_gives_the_centre_its_gradient_without_the_inputs():
    from lm_superposition.saes.training import _CentredLinear

    torch.manual_seed(0)
    data, W, b, centre = torch.randn(40, 24), torch.randn(24, 64), torch.randn(64), torch.randn(24)
    grad = torch.randn(40, 64)
    params = (W.requires_grad_(), b.requires_grad_(), centre.requires_grad_())
    expected = torch.autograd.grad((data - centre) @ W + b, params, grad)
    got = torch.autograd.grad(_CentredLinear.apply((data - centre).detach(), W, b, centre), params, grad)
    for name, want, have in zip(("W", "b", "centre"), expected, got, strict=True):
        assert torch.allclose(want, have, rtol=1e-5, atol=1e-5), name


def test_centred_linear_passes_gradcheck():
    from lm_superposition.saes.training import _CentredLinear

    torch.manual_seed(0)
    shapes = ((5, 4), (4, 7), (7,), (4,))
    x, W, b, centre = (torch.randn(*shape, dtype=torch.float64, requires_grad=True) for shape in shapes)
    assert torch.autograd.gradcheck(lambda x, W, b: _CentredLinear.apply(x, W, b, None), (x, W, b))
    data = x.detach()  # the centre's gradient, as if x = data - centre with data needing none
    centred = lambda W, b, c: _CentredLinear.apply((data - c).detach(), W, b, c)  # noqa: E731
    assert torch.autograd.gradcheck(centred, (W, b, centre))
