"""The layer-wise analyzer end to end on a Pythia-70M-shaped random model with small SAEs."""

import math

import pandas as pd
import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata

from lm_superposition import report
from lm_superposition.analyze import (
    TABLE_COLUMNS,
    LayerwiseAnalyzer,
    SeedMeasurement,
    log_spaced_checkpoints,
    measure_layers,
    sample_windows,
    saturated_features,
)
from lm_superposition.gate import QualityGate
from lm_superposition.metric import FeatureBudget

HOOKS = ["blocks.0.hook_resid_pre", "blocks.1.hook_attn_out", "blocks.2.hook_mlp_out"]


def random_sae(hook_name: str, d_in: int = 512, d_sae: int = 256, seed: int = 0) -> StandardSAE:
    torch.manual_seed(seed)
    sae = StandardSAE(
        StandardSAEConfig(
            d_in=d_in, d_sae=d_sae, metadata=SAEMetadata(hook_name=hook_name, model_name="pythia-70m-deduped")
        )
    )
    with torch.no_grad():
        sae.W_enc.normal_(0, 0.05)
        sae.b_enc.fill_(-0.05)  # sparse-ish codes: some features off on most tokens
    return sae.eval()


@pytest.fixture(scope="module")
def saes():
    return {hook: random_sae(hook, seed=i) for i, hook in enumerate(HOOKS)}


@pytest.fixture(scope="module")
def windows(make_windows):
    return make_windows(24, 32, 50304, n_pad_last=5)


def analyzer_for(model, saes, **kwargs):
    return LayerwiseAnalyzer(model, saes, model_name="pythia-70m-deduped", batch_size=4, n_blocks=16, **kwargs)


def test_table_matches_the_metric_on_the_same_codes(pythia_shaped_model, saes, windows):
    table = measure_layers(
        pythia_shaped_model,
        saes,
        windows,
        seeds=[0],
        batch_size=4,
        ce_windows=2,
        model_name="pythia-70m-deduped",
        progress=False,
    )
    assert list(table.columns) == TABLE_COLUMNS
    assert len(table) == len(HOOKS)

    # Recompute by hand: run_with_cache on every window, drop BOS and padding, encode, sum.
    _, cache = pythia_shaped_model.run_with_cache(windows.tokens, names_filter=HOOKS)
    mask = windows.measured_mask
    for hook in HOOKS:
        codes = saes[hook].encode(cache[hook][mask])
        reference = FeatureBudget(256, 512)
        reference.update(codes * saes[hook].W_dec.norm(dim=1))  # each code in decoder-norm units
        row = table.set_index("hook").loc[hook]
        assert row["tokens"] == windows.n_tokens
        assert row["F"] == pytest.approx(reference.effective_features(), rel=1e-6)
        assert row["psi"] == pytest.approx(reference.effective_features() / 512, rel=1e-6)
        assert row["mean_l0"] == pytest.approx(reference.mean_l0, rel=1e-6)
        assert row["dead_fraction"] == pytest.approx(reference.dead_fraction)
        assert row["F_low"] <= row["F"] * 1.001 and row["F_high"] >= row["F"] * 0.999
        residual = (cache[hook][mask] - saes[hook].decode(codes)).pow(2).sum()
        total = (cache[hook][mask] - cache[hook][mask].mean(0)).pow(2).sum()
        assert row["variance_explained"] == pytest.approx(float(1 - residual / total), abs=1e-4)
        assert math.isfinite(row["ce_recovered"])
        assert row["N"] == 512 and row["d_sae"] == 256
        k = reference.mean_l0
        assert row["cs_margin"] == pytest.approx(512 / (k * math.log(256 / k)), rel=1e-6)
    assert table.set_index("hook").loc["blocks.1.hook_attn_out", "kind"] == "attn_out"


def test_additivity_is_exact_for_the_embedding_and_below_one_after_attention(pythia_shaped_model, saes, windows):
    analyzer = analyzer_for(pythia_shaped_model, saes)
    additivity = analyzer.additivity(windows, n_pairs=4)
    # Pythia's resid_pre of block 0 is the token embedding alone (rotary positions): the summed
    # embedding of A then B is exactly the sum of A's and B's.
    assert additivity["blocks.0.hook_resid_pre"] == pytest.approx(1.0, abs=1e-9)
    for hook in HOOKS[1:]:  # attention and MLP outputs depend on context
        assert -1 <= additivity[hook] < 0.999
    assert analyzer.additivity(windows, n_pairs=4) == additivity  # seeded
    assert analyzer.additivity(windows, n_pairs=4, seed=1) != additivity
    with pytest.warns(
        UserWarning, match="100 pairs asked for, but only 24 windows have 15 tokens of text; using 12 pairs"
    ):
        assert math.isfinite(analyzer.additivity(windows, n_pairs=100)["blocks.1.hook_attn_out"])
    with pytest.raises(ValueError, match="n_pairs >= 1"):
        analyzer.additivity(windows, n_pairs=0)

    table = analyzer.table([analyzer.run_seed(windows[:4], progress=False)], additivity=additivity)
    assert table.set_index("hook")["additivity"].to_dict() == additivity
    assert analyzer.table([analyzer.run_seed(windows[:4], progress=False)]).additivity.isna().all()


def test_seeds_reproduce_bit_for_bit_and_differ_from_each_other(pythia_shaped_model, saes, windows):
    options = dict(seeds=[0, 1], token_budget=300, batch_size=4, ce_windows=0, progress=False)
    first = measure_layers(pythia_shaped_model, saes, windows, **options)
    again = measure_layers(pythia_shaped_model, saes, windows, **options)
    pd.testing.assert_frame_equal(first, again, check_exact=True)
    assert (first["tokens"] == 300).all()
    by_seed = first.set_index(["seed", "hook"])["F"]
    assert by_seed.loc[0].tolist() != by_seed.loc[1].tolist()
    convergence = first.attrs["convergence"]
    assert set(convergence["seed"]) == {0, 1} and convergence["tokens"].max() == pytest.approx(300)


def test_sample_windows_is_exact_and_seeded(windows):
    selected = sample_windows(windows, seed=3, token_budget=100)
    assert selected.n_tokens == 100 and selected[:-1].n_tokens < 100
    assert torch.equal(selected.tokens, sample_windows(windows, 3, 100).tokens)
    assert not torch.equal(selected.tokens, sample_windows(windows, 4, 100).tokens)
    assert windows.n_tokens > 100  # the input is left as it was
    with pytest.raises(ValueError, match="hold only"):
        sample_windows(windows, 0, windows.n_tokens + 1)


def test_interrupted_seed_resumes_to_the_uninterrupted_result(pythia_shaped_model, saes, windows, tmp_path):
    analyzer = analyzer_for(pythia_shaped_model, saes)
    straight = analyzer.run_seed(windows, seed=0, progress=False)

    path = tmp_path / "seed0.pt"
    calls = []

    def save_then_die(state):
        state.save(path)
        calls.append(state.windows_done)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed mid-run")

    with pytest.raises(KeyboardInterrupt):
        analyzer.run_seed(windows, seed=0, checkpoint=save_then_die, checkpoint_every=1, progress=False)
    saved = SeedMeasurement.load(path)
    assert 0 < saved.windows_done < len(windows)
    resumed = analyzer.run_seed(windows, seed=0, resume_from=saved, progress=False)

    assert resumed.tokens == straight.tokens == windows.n_tokens
    for hook in HOOKS:
        assert torch.equal(resumed.budgets[hook].block_sums, straight.budgets[hook].block_sums)
        assert torch.equal(resumed.budgets[hook].block_tokens, straight.budgets[hook].block_tokens)
    pd.testing.assert_frame_equal(analyzer.table([resumed]), analyzer.table([straight]))


def test_resume_state_of_another_seed_is_refused(pythia_shaped_model, saes, windows):
    analyzer = analyzer_for(pythia_shaped_model, saes)
    with pytest.raises(ValueError, match="seed 1, not seed 0"):
        analyzer.run_seed(windows, seed=0, resume_from=analyzer.new_seed(1), progress=False)


def test_sample_size_curve_and_early_stop(pythia_shaped_model, saes, windows):
    analyzer = analyzer_for(pythia_shaped_model, saes)
    full = analyzer.run_seed(windows, seed=0, progress=False)
    budget = full.budgets[HOOKS[1]]
    curve = budget.sample_size_curve()
    assert [row["blocks"] for row in curve] == [1, 2, 4, 8, 16]  # 16 blocks: powers of two, half, all
    assert curve[-1]["tokens"] == windows.n_tokens and curve[-1]["F"] == pytest.approx(budget.effective_features())
    assert all(a["tokens"] < b["tokens"] and a["F"] < b["F"] for a, b in zip(curve, curve[1:]))  # F grows with tokens
    assert all(row["F_low"] <= row["F"] <= row["F_high"] for row in curve[:-1])
    assert curve[-1]["F_low"] == pytest.approx(curve[-1]["F_high"], rel=1e-12)  # every order of all blocks: one sample

    loose = analyzer.run_seed(windows, seed=0, target_relative_interval=10.0, progress=False)
    assert loose.tokens < windows.n_tokens  # stopped at the first convergence point
    strict = analyzer.run_seed(windows, seed=0, target_relative_interval=1e-9, progress=False)
    assert strict.tokens == windows.n_tokens


def test_sae_of_the_wrong_width_is_refused_with_both_widths(pythia_shaped_model):
    wrong = {"blocks.1.hook_mlp_out": random_sae("blocks.1.hook_mlp_out", d_in=2048)}
    with pytest.raises(ValueError, match="2048.*512|512.*2048"):
        analyzer_for(pythia_shaped_model, wrong)


def test_unknown_hook_lists_real_ones(pythia_shaped_model):
    with pytest.raises(ValueError, match="blocks.0.hook_resid_post"):
        analyzer_for(pythia_shaped_model, {"blocks.0.hook_nonsense": random_sae("blocks.0.hook_nonsense")})


def test_log_spaced_checkpoints():
    assert log_spaced_checkpoints(5000) == [256, 512, 1024, 2048, 4096, 5000]
    assert log_spaced_checkpoints(100) == [100]


def test_saturation_fit_recovers_a_known_curve_and_says_when_it_cannot():
    tokens = [2**k for k in range(8, 20)]
    curve = [6000 * t / (t + 30_000) for t in tokens]
    fitted, note = saturated_features(tokens, curve)
    assert fitted == pytest.approx(6000, rel=1e-3) and note == ""
    f, note = saturated_features(tokens[:4], curve[:4])
    assert math.isnan(f) and note == "4 token counts < 5"
    f, note = saturated_features([100, 1200, 1500, 4000, 4000], [10, 11, 12, 14, 14])
    assert math.isnan(f) and note == "4 token counts < 5"  # repeated counts count once
    f, note = saturated_features([1000, 1500, 2000, 3000, 5000], [10, 11, 12, 13, 14])
    assert math.isnan(f) and note == "tokens span 0.7 decades < 1.0"


def test_reports_write_tables_and_both_plots(pythia_shaped_model, saes, windows, tmp_path):
    analyzer = analyzer_for(pythia_shaped_model, saes)
    states = [analyzer.run_seed(windows, seed=s, token_budget=300, progress=False) for s in (0, 1)]
    table = analyzer.table(states)
    written = report.write_tables(table, tmp_path)
    assert pd.read_csv(written[0]).shape == table.shape
    for stem in ("curve", "convergence"):
        plot = (
            report.plot_compression_curve
            if stem == "curve"
            else lambda t, p: report.plot_convergence(t.attrs["convergence"], p)
        )
        for path in plot(table, tmp_path / stem):
            assert path.stat().st_size > 1000
    summary = report.per_hook_summary(table)
    assert len(summary) == len(HOOKS) and (summary["seeds"] == 2).all()
    # the pooled interval spans every seed's interval
    for hook, rows in table.groupby("hook"):
        pooled = summary.set_index("hook").loc[hook]
        assert pooled["F_low"] == rows["F_low"].min() and pooled["F_high"] == rows["F_high"].max()
    assert summary.set_index("hook").loc["blocks.0.hook_resid_pre", "group"] == "embedding"
    assert "blocks.2.hook_mlp_out" in report.format_table(table)
    markdown = report.markdown_summary(table).splitlines()
    assert len(markdown) == 2 + len(HOOKS) and markdown[2].startswith("| blocks.0.hook_resid_pre |")


def test_the_quality_column_is_the_gates_verdict(pythia_shaped_model, saes, windows):
    analyzer = analyzer_for(pythia_shaped_model, saes)
    table = analyzer.table(
        [analyzer.run_seed(windows, progress=False)], ce_recovered={h: (0.95, 20_000) for h in HOOKS}
    )
    for _, row in table.iterrows():
        assert row["quality"] == analyzer.gate.verdict(
            variance_explained=row["variance_explained"],
            ce_recovered=0.95,
            ce_tokens=20_000,
            dead_fraction=row["dead_fraction"],
            effective_features=row["F"],
            d_sae=row["d_sae"],
            last_doubling_growth=row["last_doubling_growth"],
        )
    # random SAEs reconstruct nothing and a 256-latent dictionary is mostly in use: flagged, with the reasons
    assert table["quality"].str.contains("variance explained").all()
    lenient = QualityGate(min_variance_explained=0.0, max_width_usage=1.0, max_last_doubling_growth=10.0)
    assert (
        lenient.verdict(
            variance_explained=0.5,
            ce_recovered=0.95,
            ce_tokens=20_000,
            dead_fraction=0.0,
            effective_features=10,
            d_sae=100,
            last_doubling_growth=0.01,
        )
        == "ok"
    )
    verdict = QualityGate().verdict(
        variance_explained=0.5,
        ce_recovered=0.8,
        ce_tokens=500,
        dead_fraction=0.7,
        effective_features=80,
        d_sae=100,
        last_doubling_growth=0.2,
    )
    for reason in (
        "variance explained 0.500 < 0.9",
        "CE recovered 0.800 < 0.9",
        "CE on 500 tokens < 10,000",
        "dead fraction 0.70 > 0.5",
        "dictionary too narrow to tell",
        "not converged (F +20%",
    ):
        assert reason in verdict


def test_the_gate_skips_ce_where_there_is_no_language_model_and_names_an_sae_that_never_fires():
    measured = dict(
        variance_explained=0.95,
        ce_recovered=math.nan,
        ce_tokens=0,
        dead_fraction=0.1,
        effective_features=10,
        d_sae=100,
        last_doubling_growth=0.01,
    )
    gate = QualityGate()
    assert gate.verdict(**measured) == "CE recovered not measured"  # a language model's hook: CE is owed
    assert gate.verdict(**measured, language_model=False) == "ok"  # a toy: CE does not apply
    # without a language model, CE is not read at all, even a bad one
    assert gate.verdict(**(measured | {"ce_recovered": 0.1, "ce_tokens": 5}), language_model=False) == "ok"
    assert "CE recovered 0.100 < 0.9" in gate.verdict(**(measured | {"ce_recovered": 0.1, "ce_tokens": 5}))
    # the other tests still apply without a language model
    low_ve = gate.verdict(**(measured | {"variance_explained": 0.5}), language_model=False)
    assert low_ve == "variance explained 0.500 < 0.9"
    # no latent fires: F is NaN, and the verdict says why instead of judging its width or convergence
    dead = gate.verdict(
        **(measured | {"effective_features": math.nan, "dead_fraction": 1.0, "last_doubling_growth": math.nan}),
        language_model=False,
    )
    assert dead == "dead fraction 1.00 > 0.5; no latent fires (F undefined)"


def test_a_hook_read_through_several_saes_gives_one_row_per_sae_seed(pythia_shaped_model, saes, windows):
    hook = HOOKS[2]
    several = {hook: {0: random_sae(hook, seed=10), 1: random_sae(hook, seed=11)}}
    table = measure_layers(
        pythia_shaped_model,
        several,
        windows,
        seeds=[0, 1],
        token_budget=300,
        batch_size=4,
        ce_windows=0,
        progress=False,
        model_name="pythia-70m-deduped",
    )
    assert sorted(zip(table["seed"], table["sae_seed"])) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    alone = measure_layers(
        pythia_shaped_model,
        {hook: several[hook][1]},
        windows,
        seeds=[1],
        token_budget=300,
        batch_size=4,
        ce_windows=0,
        progress=False,
        model_name="pythia-70m-deduped",
    )
    both = table.set_index(["seed", "sae_seed"])
    assert both.loc[(1, 1), "F"] == alone["F"].iloc[0]  # reading two SAEs from one pass changes neither
    summary = report.per_hook_summary(table)
    assert summary["interval_over"].iloc[0] == "documents, 2 data seeds, 2 SAE seeds"


def test_merge_duplicates_false_gives_the_raw_measure(pythia_shaped_model, saes, windows):
    merged = analyzer_for(pythia_shaped_model, saes).run_seed(windows[:8], progress=False)
    raw = analyzer_for(pythia_shaped_model, saes, merge_duplicates=False).run_seed(windows[:8], progress=False)
    for hook in HOOKS:
        assert raw.budgets[hook].groups is None
        assert torch.equal(raw.budgets[hook].block_sums, merged.budgets[hook].block_sums)  # the sums are the same...
        if merged.budgets[hook].merged_latents == 0:  # ...and so is F where nothing was merged
            assert raw.budgets[hook].effective_features() == merged.budgets[hook].effective_features()
