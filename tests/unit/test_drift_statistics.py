"""Drift statistics: values against scipy/statsmodels and hand computations, profiles, statuses."""

import json
import math

import numpy as np
import pytest
from scipy import stats
from scipy.spatial.distance import jensenshannon
from statsmodels.stats.proportion import confint_proportions_2indep, proportions_ztest

from services.drift.statistics import (
    DEFAULT_EPSILON,
    CategoricalProfile,
    DriftThresholds,
    LLMReferenceProfile,
    LLMTrafficWindow,
    NumericProfile,
    ReferenceProfile,
    build_llm_profile,
    build_numeric_profile,
    build_reference_profile,
    categorical_drift,
    category_psi,
    chi_square_categorical,
    chi_square_from_counts,
    jensen_shannon,
    js_from_counts,
    ks_from_profile,
    ks_test,
    llm_traffic_drift,
    numeric_drift,
    psi,
    psi_from_counts,
    psi_from_profile,
    two_proportion_drift,
    wasserstein,
    wasserstein_from_profile,
    worst_status,
)

# ------------------------------------------------------------------------------------------- PSI


def test_psi_matches_hand_computation() -> None:
    # reference 25/25/25/25 %, current 10/20/30/40 %: sum((c - r) ln(c / r))
    expected = -0.15 * math.log(0.4) - 0.05 * math.log(0.8) + 0.05 * math.log(1.2) + 0.15 * math.log(1.6)
    res = psi_from_counts([250, 250, 250, 250], [100, 200, 300, 400])
    assert res.psi == pytest.approx(expected, rel=1e-12)
    assert res.psi == pytest.approx(0.22822, abs=1e-5)
    assert res.status == "alert"
    assert sum(res.contributions) == pytest.approx(res.psi)
    assert res.expected_under_no_drift == pytest.approx(3 * (1 / 1000 + 1 / 1000))
    assert psi_from_counts([250, 250, 250, 250], [240, 260, 250, 250]).status == "ok"


def test_psi_thresholds_are_configurable() -> None:
    th = DriftThresholds(psi_warn=0.25, psi_alert=0.5)
    assert psi_from_counts([250] * 4, [100, 200, 300, 400], thresholds=th).status == "ok"
    assert (
        psi_from_counts([250] * 4, [100, 200, 300, 400], thresholds=DriftThresholds(psi_warn=0.2, psi_alert=0.3)).status
        == "warn"
    )
    with pytest.raises(ValueError, match="psi_warn"):
        DriftThresholds(psi_warn=0.3, psi_alert=0.2)


def test_psi_empty_bins_use_the_epsilon_floor() -> None:
    res = psi_from_counts([50, 50, 0], [50, 40, 10])
    r = np.array([0.5, 0.5, DEFAULT_EPSILON])
    r /= r.sum()
    c = np.array([0.5, 0.4, 0.1])
    assert res.psi == pytest.approx(float(np.sum((c - r) * np.log(c / r))), rel=1e-12)
    assert math.isfinite(res.psi) and res.status == "alert"
    # a bin empty on both sides contributes nothing
    assert psi_from_counts([50, 50, 0], [50, 50, 0]).psi == pytest.approx(0.0, abs=1e-15)
    assert res.reference_proportions == (0.5, 0.5, 0.0)  # reported proportions are the raw ones


def test_psi_bins_come_from_reference_quantiles() -> None:
    reference = np.arange(1000.0)
    profile = build_numeric_profile(reference, n_bins=10)
    np.testing.assert_allclose(profile.edges, np.quantile(reference, np.linspace(0.1, 0.9, 9)))
    assert profile.counts == (100,) * 10
    # values outside the reference range land in the open-ended first/last bins
    np.testing.assert_array_equal(profile.bin_counts([-5.0, 0.0, 2000.0, 999.0]), [2, 0, 0, 0, 0, 0, 0, 0, 0, 2])
    raw = psi(reference, np.arange(1000.0) + 100.0)
    assert raw.psi == pytest.approx(psi_from_profile(profile, profile.bin_counts(np.arange(1000.0) + 100.0)).psi)


def test_tied_reference_merges_duplicate_quantile_edges() -> None:
    rng = np.random.default_rng(3)
    reference = np.where(rng.random(5000) < 0.6, 0.0, rng.integers(1, 50, 5000)).astype(float)
    profile = build_numeric_profile(reference, n_bins=10)
    assert profile.n_bins < 10
    assert all(b > a for a, b in zip(profile.edges, profile.edges[1:], strict=False))
    current = np.where(rng.random(5000) < 0.6, 0.0, rng.integers(1, 50, 5000)).astype(float)
    assert psi_from_profile(profile, profile.bin_counts(current)).status == "ok"


def test_psi_validation_names_the_argument() -> None:
    with pytest.raises(ValueError, match="current_counts"):
        psi_from_counts([1, 2], [1, -2])
    with pytest.raises(ValueError, match="same length"):
        psi_from_counts([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="reference_counts"):
        psi_from_counts([0, 0], [1, 2])
    with pytest.raises(ValueError, match="current"):
        psi([1.0, 2.0, 3.0], [])
    with pytest.raises(ValueError, match="reference"):
        psi([1.0, np.nan], [1.0])
    profile = build_numeric_profile(np.arange(100.0))
    with pytest.raises(ValueError, match="one count per reference bin"):
        psi_from_profile(profile, [1, 2, 3])


# ------------------------------------------------------------------------------- JS, KS, Wasserstein


def test_jensen_shannon_is_scipy_distance_squared_in_bits() -> None:
    ref, cur = [10, 20, 30, 40], [40, 30, 20, 10]
    res = js_from_counts(ref, cur)
    expected = jensenshannon(np.array(ref) / 100, np.array(cur) / 100, base=2)
    assert res.distance == pytest.approx(expected)
    assert res.divergence == pytest.approx(expected**2)
    assert res.base == 2
    assert js_from_counts(ref, ref).divergence == pytest.approx(0.0, abs=1e-12)
    assert js_from_counts([1, 0], [0, 1]).divergence == pytest.approx(1.0)  # disjoint supports: 1 bit


def test_js_thresholds_match_psi_for_small_shifts() -> None:
    """For small shifts JS ≈ PSI / (8 ln 2): the reason the default JS cut-offs are 0.018 / 0.036."""
    rng = np.random.default_rng(11)
    ref = rng.normal(size=50_000)
    cur = rng.normal(0.3, 1.0, 50_000)
    p, j = psi(ref, cur), jensen_shannon(ref, cur)
    assert j.divergence * 8 * math.log(2) / p.psi == pytest.approx(1.0, abs=0.03)
    th = DriftThresholds()
    assert th.js_warn == pytest.approx(th.psi_warn / (8 * math.log(2)), rel=0.01)
    assert th.js_alert == pytest.approx(th.psi_alert / (8 * math.log(2)), rel=0.01)


def test_ks_and_wasserstein_equal_scipy() -> None:
    rng = np.random.default_rng(5)
    ref, cur = rng.normal(size=800), rng.normal(0.2, 1.1, 600)
    ks = ks_test(ref, cur)
    expected = stats.ks_2samp(ref, cur)
    assert (ks.statistic, ks.p_value) == (pytest.approx(expected.statistic), pytest.approx(expected.pvalue))
    w = wasserstein(ref, cur)
    assert w.distance == pytest.approx(stats.wasserstein_distance(ref, cur))
    assert w.normalized == pytest.approx(w.distance / ref.std(ddof=1))
    # a profile small enough to hold the whole reference gives the exact results
    profile = build_numeric_profile(ref, max_points=1000)
    assert profile.exact
    assert ks_from_profile(profile, cur).p_value == pytest.approx(expected.pvalue)
    assert wasserstein_from_profile(profile, cur).distance == pytest.approx(w.distance)


def test_profile_sketch_approximates_ks_and_wasserstein_within_documented_bounds() -> None:
    rng = np.random.default_rng(6)
    ref, cur = rng.gamma(2.0, 3.0, 200_000), rng.gamma(2.1, 3.0, 20_000)
    profile = build_numeric_profile(ref, max_points=2001)
    assert not profile.exact and len(profile.quantile_points) == 2001
    exact_ks, approx_ks = ks_test(ref, cur), ks_from_profile(profile, cur)
    assert approx_ks.max_statistic_error == pytest.approx(1 / (2 * 2001))
    assert abs(approx_ks.statistic - exact_ks.statistic) <= approx_ks.max_statistic_error
    assert approx_ks.p_value == pytest.approx(exact_ks.p_value, rel=0.5)  # same asymptotic formula, D within 2.5e-4
    exact_w, approx_w = wasserstein(ref, cur), wasserstein_from_profile(profile, cur)
    assert abs(approx_w.distance - exact_w.distance) <= (ref.max() - ref.min()) / 2001
    assert approx_w.distance == pytest.approx(exact_w.distance, rel=0.01)


# ----------------------------------------------------------------------------------- chi-square


def test_chi_square_handles_categories_missing_on_one_side() -> None:
    ref = {"stop": 700, "length": 300}
    cur = {"stop": 500, "length": 250, "tool_calls": 250}  # new category
    res = chi_square_from_counts(ref, cur)
    table = np.array([[300, 700, 0], [250, 500, 250]])  # categories sorted: length, stop, tool_calls
    expected = stats.chi2_contingency(table, correction=False)
    assert res.categories == ("length", "stop", "tool_calls")
    assert res.pooled == ()
    assert res.statistic == pytest.approx(expected.statistic)
    assert res.p_value == pytest.approx(expected.pvalue)
    assert res.dof == 2
    assert res.cramers_v == pytest.approx(math.sqrt(expected.statistic / 2000))
    # divergence = sum((p_cur - p_ref)^2 / p_pooled): sample-size free
    p_ref, p_cur = table[0] / 1000, table[1] / 1000
    assert res.divergence == pytest.approx(float(np.sum((p_cur - p_ref) ** 2 / (table.sum(0) / 2000))))
    assert res.status == "alert"
    # a category missing from the current side works the same way
    assert chi_square_from_counts(cur, ref).statistic == pytest.approx(expected.statistic)


def test_chi_square_pools_rare_categories() -> None:
    res = chi_square_from_counts({"a": 500, "b": 500, "x": 1, "y": 2}, {"a": 500, "b": 500, "z": 1})
    assert res.categories == ("a", "b", "__other__")
    assert res.pooled == ("x", "y", "z")
    table = np.array([[500, 500, 3], [500, 500, 1]])
    assert res.statistic == pytest.approx(stats.chi2_contingency(table, correction=False).statistic)
    assert res.status == "ok"


def test_chi_square_on_raw_labels_and_category_psi() -> None:
    ref = ["a"] * 60 + ["b"] * 40
    cur = ["a"] * 30 + ["b"] * 70
    res = chi_square_categorical(ref, cur)
    assert res.p_value == pytest.approx(stats.chi2_contingency([[60, 40], [30, 70]], correction=False).pvalue)
    p = category_psi({"a": 60, "b": 40}, {"a": 30, "b": 70})
    assert p.psi == pytest.approx((0.3 - 0.6) * math.log(0.3 / 0.6) + (0.7 - 0.4) * math.log(0.7 / 0.4))
    with pytest.raises(ValueError, match="current_counts"):
        chi_square_from_counts({"a": 1}, {"a": -1})
    with pytest.raises(ValueError, match="reference"):
        chi_square_categorical([], cur)


# --------------------------------------------------------------------------------- proportions


def test_two_proportion_drift_matches_statsmodels() -> None:
    res = two_proportion_drift(200, 10_000, 290, 10_000)
    z, p = proportions_ztest([290, 200], [10_000, 10_000])
    low, high = confint_proportions_2indep(290, 10_000, 200, 10_000, method="newcomb", compare="diff")
    assert (res.z, res.p_value) == (pytest.approx(z), pytest.approx(p))
    assert (res.ci_low, res.ci_high) == (pytest.approx(low), pytest.approx(high))
    assert res.difference == pytest.approx(0.009)
    assert res.status == "alert"
    assert two_proportion_drift(200, 10_000, 205, 10_000).status == "ok"
    assert two_proportion_drift(0, 100, 0, 100).p_value == 1.0
    with pytest.raises(ValueError, match="current_successes"):
        two_proportion_drift(1, 10, 11, 10)


def test_effect_floor_keeps_trivial_but_significant_shifts_quiet() -> None:
    """With huge samples a negligible shift is 'significant'; the effect level keeps the status ok."""
    rng = np.random.default_rng(8)
    ref, cur = rng.normal(size=200_000), rng.normal(0.05, 1.0, 200_000)
    res = ks_test(ref, cur)
    assert res.p_value < 1e-10
    assert res.status == "ok"
    assert (
        ks_test(ref, cur, thresholds=DriftThresholds(ks_statistic_warn=0.0, ks_statistic_alert=0.0)).status == "alert"
    )


# ------------------------------------------------------------------------ controlled drift / none


@pytest.fixture(scope="module")
def reference_features() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(2024)
    return {"income": rng.lognormal(10, 0.5, 20_000), "age": rng.normal(40, 12, 20_000)}


def test_controlled_drift_triggers_alert(reference_features: dict[str, np.ndarray]) -> None:
    profile = build_reference_profile(numeric=reference_features, categorical={"plan": ["free"] * 800 + ["pro"] * 200})
    rng = np.random.default_rng(99)
    shifted_age = rng.normal(40 + 0.75 * 12, 12, 5_000)  # mean shifted by 0.75 sd
    report = numeric_drift(profile.numeric["age"], values=shifted_age)
    assert report.status == "alert"
    assert report.psi.status == "alert" and report.ks is not None and report.ks.status == "alert"
    assert report.jensen_shannon.status == "alert"
    assert report.wasserstein is not None and report.wasserstein.status == "alert"
    cat = categorical_drift(profile.categorical["plan"], {"free": 500, "pro": 500})
    assert cat.status == "alert" and cat.chi_square.status == "alert"


def test_no_drift_triggers_nothing(reference_features: dict[str, np.ndarray]) -> None:
    profile = build_reference_profile(numeric=reference_features, categorical={"plan": ["free"] * 800 + ["pro"] * 200})
    rng = np.random.default_rng(7)  # same distributions, different seed
    current = {"income": rng.lognormal(10, 0.5, 5_000), "age": rng.normal(40, 12, 5_000)}
    for name, values in current.items():
        report = numeric_drift(profile.numeric[name], values=values)
        assert report.status == "ok", (name, report)
        assert report.psi.psi < 3 * report.psi.expected_under_no_drift
    labels = np.where(rng.random(5_000) < 0.8, "free", "pro")
    assert categorical_drift(profile.categorical["plan"], list(labels)).status == "ok"


def test_drift_from_sql_style_bin_counts_equals_drift_from_values(reference_features: dict[str, np.ndarray]) -> None:
    profile = build_numeric_profile(reference_features["age"])
    current = np.random.default_rng(1).normal(45, 12, 3_000)
    from_values = numeric_drift(profile, values=current)
    from_counts = numeric_drift(profile, bin_counts=profile.bin_counts(current))
    assert from_counts.psi == from_values.psi
    assert from_counts.jensen_shannon == from_values.jensen_shannon
    assert from_counts.ks is None and from_counts.wasserstein is None
    with pytest.raises(ValueError, match="values or bin_counts"):
        numeric_drift(profile)


# ------------------------------------------------------------------------------------- profiles


def test_reference_profile_round_trips_through_json(reference_features: dict[str, np.ndarray]) -> None:
    profile = build_reference_profile(numeric=reference_features, categorical={"plan": {"free": 8, "pro": 2}})
    text = profile.to_json()
    restored = ReferenceProfile.from_json(text)
    assert restored == profile
    assert json.loads(text)["schema_version"] == 1
    assert NumericProfile.from_dict(profile.numeric["age"].to_dict()) == profile.numeric["age"]
    assert CategoricalProfile.from_dict({"counts": {"free": 8, "pro": 2}}) == profile.categorical["plan"]
    with pytest.raises(ValueError, match="schema_version"):
        ReferenceProfile.from_dict({"schema_version": 99})
    with pytest.raises(ValueError, match="counts"):
        NumericProfile.from_dict({**profile.numeric["age"].to_dict(), "counts": [1, 2]})
    with pytest.raises(ValueError, match="counts"):
        CategoricalProfile(counts={"a": -1})


def test_worst_status() -> None:
    assert worst_status([]) == "ok"
    assert worst_status(["ok", "warn", "ok"]) == "warn"
    assert worst_status(["warn", "alert"]) == "alert"
    with pytest.raises(ValueError, match="statuses"):
        worst_status(["bad"])  # type: ignore[list-item]


# ------------------------------------------------------------------------------------------ LLM


def _llm_rows(rng: np.random.Generator, n: int, *, prompt_mu: float, length_share: float, refusal: float):
    prompts = np.round(rng.lognormal(prompt_mu, 0.6, n))
    outputs = np.round(rng.gamma(3.0, 40.0, n))
    reasons = rng.choice(["stop", "length", "content_filter"], size=n, p=[0.98 - length_share, length_share, 0.02])
    refused = rng.random(n) < refusal
    return prompts, outputs, list(reasons), refused


def test_llm_traffic_drift() -> None:
    rng = np.random.default_rng(42)
    profile = build_llm_profile(*_llm_rows(rng, 20_000, prompt_mu=5.0, length_share=0.05, refusal=0.02))
    assert LLMReferenceProfile.from_dict(json.loads(json.dumps(profile.to_dict()))) == profile

    same = LLMTrafficWindow.from_records(
        profile, *_llm_rows(rng, 5_000, prompt_mu=5.0, length_share=0.05, refusal=0.02)
    )
    report = llm_traffic_drift(profile, same)
    assert report.status == "ok", report

    drifted = LLMTrafficWindow.from_records(
        profile, *_llm_rows(rng, 5_000, prompt_mu=5.6, length_share=0.25, refusal=0.04)
    )
    report = llm_traffic_drift(profile, drifted)
    assert report.prompt_length.status == "alert"
    assert report.output_tokens.status == "ok"
    assert report.finish_reasons.status == "alert"
    assert report.refusal_rate.status == "alert"
    assert report.refusal_rate.difference == pytest.approx(drifted.refusals / 5_000 - profile.refusals / 20_000)
    assert report.status == "alert"

    # aggregates only, as SQL would return them: no KS/Wasserstein, same PSI
    counts_only = LLMTrafficWindow.from_records(
        profile, *_llm_rows(np.random.default_rng(1), 5_000, prompt_mu=5.6, length_share=0.25, refusal=0.04),
        keep_samples=False,
    )  # fmt: skip
    report = llm_traffic_drift(profile, counts_only)
    assert report.prompt_length.ks is None and report.prompt_length.status == "alert"

    with pytest.raises(ValueError, match="one entry per request"):
        build_llm_profile([1.0, 2.0], [1.0], ["stop"], [False])
