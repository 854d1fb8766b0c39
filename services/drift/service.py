"""The drift / A-B analysis domain object: transport-free, blocking (call it from a thread).

ClickHouse computes aggregates (services.drift.queries), the statistics core
(services.drift.statistics) turns them into results. Errors are services.common.errors, which
the shared server bootstrap maps to gRPC statuses.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, ParamSpec, TypeVar

from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError
from scipy import stats

from services.common import errors
from services.common.clickhouse import Client
from services.drift import queries, store
from services.drift.queries import CATEGORICAL_COLUMNS, METRIC_COLUMNS, NUMERIC_COLUMNS, Feature, RatioSpec, Scope
from services.drift.settings import DriftSettings
from services.drift.statistics import (
    BetaBinomialResult,
    CategoricalProfile,
    DriftThresholds,
    MetricResult,
    NumericProfile,
    ReferenceProfile,
    SampleSizeResult,
    SRMResult,
    Status,
    build_categorical_profile,
    build_numeric_profile,
    categorical_drift,
    correct_metric_results,
    js_from_profile,
    msprt_update,
    psi_from_profile,
    sample_ratio_mismatch,
    sample_size_means,
    sample_size_two_proportions,
    thompson_weights,
    two_proportion_drift,
    two_proportion_ztest,
    worst_status,
)
from services.drift.statistics.bayesian import beta_binomial_ab
from services.drift.statistics.pushdown import (
    Grid,
    grid_for,
    ks_from_grid,
    order_statistic_levels,
    profile_from_grid_counts,
    profile_on_grid,
    quantile_difference,
    ratio_welch,
    wasserstein_from_grid,
)

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

FEATURES_PER_QUERY = 48  # keeps each generated query well under ClickHouse's max_query_size
METRIC_KINDS = ("error_rate", "mean", "quantile", "label_rate", "outcome_rate", "rating_mean")
PROPORTION_KINDS = ("error_rate", "label_rate", "outcome_rate")
REWARD_KINDS = ("label_rate", "outcome_rate")  # feedback rates a bandit maximises


def serialized(fn: Callable[P, R]) -> Callable[P, R]:
    """One store-reading analysis at a time per service: a chdb session runs one query at a time
    anyway, and a ClickHouse server session refuses concurrent queries."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with args[0]._lock:  # type: ignore[attr-defined]
            return fn(*args, **kwargs)

    return wrapper


def domain_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """ValueError (bad arguments, from here or the statistics core) -> INVALID_ARGUMENT; store
    failures -> UNAVAILABLE or DEADLINE_EXCEEDED."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except errors.MeshError:
            raise
        except ValueError as error:
            raise errors.InvalidArgument(str(error)) from error
        except OperationalError as error:
            raise errors.Unavailable(f"ClickHouse is unavailable: {error}") from error
        except DatabaseError as error:
            text = str(error)
            if "TIMEOUT_EXCEEDED" in text or "Timeout exceeded" in text:
                raise errors.DeadlineExceeded(f"query ran past its time limit: {text[:300]}") from error
            raise

    return wrapper


def resolve_window(
    start: datetime | None, end: datetime | None, last_minutes: int, *, now: datetime | None = None, required: bool
) -> tuple[datetime | None, datetime | None]:
    """[now - last_minutes, now) when last_minutes is set, else [start, end)."""
    if last_minutes < 0:
        raise errors.InvalidArgument("window.last_minutes must not be negative")
    if last_minutes:
        stop = now or datetime.now(UTC)
        return stop - timedelta(minutes=last_minutes), stop
    if start is None and end is None:
        if required:
            raise errors.InvalidArgument("window is required: set start and end, or last_minutes")
        return None, None
    if required and (start is None or end is None):
        raise errors.InvalidArgument("window needs both start and end (or last_minutes)")
    if start is not None and end is not None and end <= start:
        raise errors.InvalidArgument("window.end must be after window.start")
    return start, end


# ------------------------------------------------------------------------------------ results


@dataclass(frozen=True)
class ProfiledFeature:
    feature: Feature
    n: int
    bins: int


@dataclass(frozen=True)
class ProfileCreated:
    stored: store.StoredProfile
    features: list[ProfiledFeature]


@dataclass(frozen=True)
class DriftCheck:
    feature: str
    source: str
    method: str
    statistic: float
    p_value: float | None
    status: Status
    details: dict[str, float] = field(default_factory=dict)
    note: str = ""


@dataclass(frozen=True)
class FeatureStatus:
    feature: str
    source: str
    kind: str
    status: Status
    n_reference: int
    n_current: int
    missing: int


@dataclass(frozen=True)
class DriftReport:
    profile_id: str
    model: str
    model_version: str
    window_start: datetime
    window_end: datetime
    rows: int
    status: Status
    features: list[FeatureStatus]
    checks: list[DriftCheck]
    elapsed_ms: float
    sampled_fraction: float = 1.0  # < 1: the features were computed on this share of the rows


@dataclass(frozen=True)
class MetricSpec:
    kind: str
    name: str = ""
    column: str = ""
    quantile: float = 0.0
    value: str = ""
    mde: float = 0.0


@dataclass(frozen=True)
class VariantInfo:
    variant: str
    units: int
    predictions: int
    expected_fraction: float
    observed_fraction: float


@dataclass(frozen=True)
class ExperimentMetric:
    result: MetricResult
    kind: str
    control: str
    treatment: str
    srm_mismatch: bool
    note: str = ""
    bayes: BetaBinomialResult | None = None


@dataclass(frozen=True)
class BanditWeights:
    """Thompson allocation over every variant for one proportion metric."""

    metric: str
    weights: dict[str, float]
    prob_best: dict[str, float]
    successes: dict[str, int]
    trials: dict[str, int]


@dataclass(frozen=True)
class ExperimentReport:
    model: str
    experiment: str
    analysis_unit: str
    srm: SRMResult
    variants: list[VariantInfo]
    results: list[ExperimentMetric]
    elapsed_ms: float
    bandit: list[BanditWeights] = field(default_factory=list)


def _chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)] or [items]


# ------------------------------------------------------------------------------------ service


class DriftService:
    """Drift checks against stored reference profiles, experiment analysis, sample sizes."""

    def __init__(self, client: Client, settings: DriftSettings | None = None) -> None:
        self.client = client
        self.settings = settings or DriftSettings()
        self.thresholds: DriftThresholds = self.settings.thresholds.thresholds()
        self._lock = threading.RLock()

    def ensure_schema(self) -> None:
        store.ensure_schema(self.client)

    @property
    def _timeout(self) -> float:
        return self.settings.query_timeout_s

    # ---- reference profiles -------------------------------------------------------------------

    def _select_features(
        self, scope: Scope, inputs: bool, outputs: bool, columns: Sequence[str], names: Sequence[str]
    ) -> list[Feature]:
        wanted = set(names)
        features: list[Feature] = []
        for source, on in (("input", inputs), ("output", outputs)):
            if not on:
                continue
            found = queries.feature_names(
                self.client, scope, source, limit=10 * self.settings.max_features, timeout_s=self._timeout
            )
            features += [Feature(source, n, "numeric") for n in found if not wanted or n in wanted]
        for column in columns:
            if column in NUMERIC_COLUMNS:
                features.append(Feature("column", column, "numeric"))
            elif column in CATEGORICAL_COLUMNS:
                features.append(Feature("column", column, "categorical"))
            else:
                known = sorted([*NUMERIC_COLUMNS, *CATEGORICAL_COLUMNS])
                raise errors.InvalidArgument(f"unknown column {column!r} in features.columns; known: {known}")
        if len(features) > self.settings.max_features:
            raise errors.InvalidArgument(
                f"{len(features)} features exceed max_features={self.settings.max_features}: list them in "
                "features.names"
            )
        return features

    @domain_errors
    @serialized
    def create_profile_from_window(
        self,
        model: str,
        model_version: str,
        start: datetime | None,
        end: datetime | None,
        *,
        inputs: bool = True,
        outputs: bool = False,
        columns: Sequence[str] = (),
        names: Sequence[str] = (),
        description: str = "",
    ) -> ProfileCreated:
        if not model:
            raise errors.InvalidArgument("model is required")
        scope = Scope(model, model_version, start, end, final=self.settings.read_final)
        rows = queries.count_rows(self.client, scope, timeout_s=self._timeout)
        if rows == 0:
            raise errors.FailedPrecondition(f"no predictions of model {model!r} in the reference window")
        features = self._select_features(scope, inputs, outputs, columns, names)
        if not features:
            raise errors.FailedPrecondition("the reference window has none of the selected features")
        numeric = [f for f in features if f.kind == "numeric"]
        categorical = [f for f in features if f.kind == "categorical"]
        numeric_profiles = self._profile_numeric(scope, numeric)
        categorical_profiles = {}
        for feature, counts in zip(
            categorical, queries.category_counts(self.client, scope, categorical, timeout_s=self._timeout), strict=True
        ):
            if counts:
                categorical_profiles[feature.key] = build_categorical_profile(counts)
        if not numeric_profiles and not categorical_profiles:
            raise errors.FailedPrecondition("no selected feature has a finite value in the reference window")
        profile = ReferenceProfile(numeric=numeric_profiles, categorical=categorical_profiles)
        stored = store.save(
            self.client,
            profile,
            model=model,
            model_version=model_version,
            source="window",
            rows=rows,
            window_start=start,
            window_end=end,
            description=description,
        )
        return ProfileCreated(stored, _profiled(profile))

    def _profile_numeric(self, scope: Scope, features: Sequence[Feature]) -> dict[str, NumericProfile]:
        """Quantile sketch and bin edges from a uniform sample of each feature (every value when the
        window is small enough: an exact profile); edges snapped to the feature's grid and exact
        counts from a pass over the whole window, so later windows need their grid counts only."""
        s = self.settings
        if not features:
            return {}
        per_feature = max(s.max_points, min(s.reference_sample_size, 20_000_000 // len(features)))
        profiles: dict[str, NumericProfile] = {}
        for chunk in _chunks(features, FEATURES_PER_QUERY):
            summaries = queries.numeric_summaries(
                self.client, scope, chunk, sample_size=per_feature, timeout_s=self._timeout
            )
            pending: list[tuple[Feature, NumericProfile, Grid]] = []
            for feature, summary in zip(chunk, summaries, strict=True):
                if summary.n == 0:
                    continue
                if summary.n <= summary.sample.size:  # the sample is every value: an exact profile
                    profiles[feature.key], _ = profile_on_grid(
                        summary.sample, n_bins=s.n_bins, max_points=s.max_points, cells=s.grid_cells
                    )
                    continue
                sketch = build_numeric_profile(summary.sample, n_bins=s.n_bins, max_points=s.max_points)
                # The sample's edges and quantile points, the window's own n, mean, std and range.
                sketch = replace(
                    sketch,
                    exact=False,
                    mean=summary.mean,
                    std=summary.std,
                    min=min(summary.min, sketch.min),
                    max=max(summary.max, sketch.max),
                )
                pending.append((feature, sketch, grid_for(sketch, s.grid_cells)))
            if not pending:
                continue
            _, _, windows = queries.numeric_window(
                self.client,
                scope,
                [f for f, _, _ in pending],
                [g for _, _, g in pending],
                [None] * len(pending),
                layout=None,
                timeout_s=self._timeout,
            )
            for (feature, sketch, grid), window in zip(pending, windows, strict=True):
                profiles[feature.key] = profile_from_grid_counts(sketch, grid, window.grid_counts)
        return profiles

    @domain_errors
    @serialized
    def create_profile_from_rows(
        self,
        model: str,
        model_version: str,
        features: Sequence[tuple[str, str, Sequence[float], Sequence[str]]],
        *,
        description: str = "",
    ) -> ProfileCreated:
        """features: (source, name, numeric values, categories); exactly one of the two non-empty."""
        if not model:
            raise errors.InvalidArgument("model is required")
        if not features:
            raise errors.InvalidArgument("rows.features must name at least one feature")
        numeric: dict[str, NumericProfile] = {}
        categorical = {}
        rows = 0
        for source, name, values, categories in features:
            source = source or "input"
            if source not in queries.SOURCES or not name:
                raise errors.InvalidArgument(f"feature {name!r}: source must be one of {queries.SOURCES}")
            if bool(len(values)) == bool(len(categories)):
                raise errors.InvalidArgument(f"feature {name!r}: give either values or categories")
            kind = "numeric" if len(values) else "categorical"
            key = Feature(source, name, kind).key
            if key in numeric or key in categorical:
                raise errors.InvalidArgument(f"feature {key!r} appears twice")
            if kind == "numeric":
                if source == "column" and name not in NUMERIC_COLUMNS:
                    raise errors.InvalidArgument(f"unknown numeric column {name!r}; known: {sorted(NUMERIC_COLUMNS)}")
                numeric[key], _ = profile_on_grid(
                    values,
                    n_bins=self.settings.n_bins,
                    max_points=self.settings.max_points,
                    cells=self.settings.grid_cells,
                )
                rows = max(rows, len(values))
            else:
                if source != "column" or name not in CATEGORICAL_COLUMNS:
                    raise errors.InvalidArgument(
                        f"categorical feature {name!r} must be a column: one of {sorted(CATEGORICAL_COLUMNS)}"
                    )
                categorical[key] = build_categorical_profile(categories)
                rows = max(rows, len(categories))
        profile = ReferenceProfile(numeric=numeric, categorical=categorical)
        stored = store.save(
            self.client,
            profile,
            model=model,
            model_version=model_version,
            source="rows",
            rows=rows,
            description=description,
        )
        return ProfileCreated(stored, _profiled(profile))

    @domain_errors
    @serialized
    def profile(self, model: str, model_version: str = "", profile_id: str = "") -> store.StoredProfile:
        """The profile with this id (of this model), else the newest of the model (and version)."""
        if profile_id:
            found = store.get(self.client, profile_id)
            if found is None:
                raise errors.NotFound(f"no reference profile {profile_id!r}")
            if found.model != model:
                raise errors.InvalidArgument(f"profile {profile_id!r} belongs to model {found.model!r}, not {model!r}")
            return found
        found = store.latest(self.client, model, model_version) or (
            store.latest(self.client, model) if model_version else None
        )
        if found is None:
            raise errors.FailedPrecondition(
                f"model {model!r} has no reference profile yet: call CreateReferenceProfile first"
            )
        return found

    # ---- drift ------------------------------------------------------------------------------

    @domain_errors
    @serialized
    def compute_drift(
        self, model: str, model_version: str, start: datetime, end: datetime, profile_id: str = ""
    ) -> DriftReport:
        began = time.perf_counter()
        if not model:
            raise errors.InvalidArgument("model is required")
        stored = self.profile(model, model_version, profile_id)
        profile = stored.profile
        scope = Scope(model, model_version, start, end, final=self.settings.read_final)
        sample_rows = self.settings.drift_sample_rows
        fraction = 1.0
        rows: int | None = None
        if sample_rows:  # count first: sample only windows that are larger
            rows = queries.count_rows(self.client, scope, timeout_s=self._timeout)
            if rows > sample_rows:
                fraction = sample_rows / rows
                scope = replace(scope, id_below=f"{int(fraction * 16**8):08x}")
        features: list[FeatureStatus] = []
        checks: list[DriftCheck] = []
        numeric = [(Feature.from_key(k, "numeric"), p) for k, p in profile.numeric.items()]
        if numeric and rows != 0:
            layout = queries.guess_layout(self.client, scope, timeout_s=self._timeout)
            for chunk in _chunks(numeric, FEATURES_PER_QUERY):
                grids = [grid_for(p, self.settings.grid_cells) for _, p in chunk]
                # Bins that are unions of grid cells come from the grid counts; others are counted.
                edges = [
                    None if g.edge_cells(p.edges) is not None else p.edges
                    for (_, p), g in zip(chunk, grids, strict=True)
                ]
                args = (self.client, scope, [f for f, _ in chunk], grids, edges)
                n_rows, mismatched, windows = queries.numeric_window(*args, layout=layout, timeout_s=self._timeout)
                if mismatched:  # rows with another tensor layout: locate the values row by row
                    n_rows, _, windows = queries.numeric_window(*args, layout=None, timeout_s=self._timeout)
                if rows is None:
                    rows = n_rows
                for (feature, prof), grid, window in zip(chunk, grids, windows, strict=True):
                    found = self._numeric_checks(feature, prof, grid, window, fraction)
                    checks += found
                    status = worst_status(c.status for c in found)
                    features.append(
                        FeatureStatus(feature.name, feature.source, "numeric", status, prof.n, window.n, window.missing)
                    )
        categorical = [(Feature.from_key(k, "categorical"), p) for k, p in profile.categorical.items()]
        if categorical:
            found_counts = queries.category_counts(
                self.client, scope, [f for f, _ in categorical], timeout_s=self._timeout
            )
            for (feature, prof), counts in zip(categorical, found_counts, strict=True):
                found = self._categorical_checks(feature, prof, counts, fraction)
                checks += found
                features.append(
                    FeatureStatus(
                        feature.name,
                        feature.source,
                        "categorical",
                        worst_status(c.status for c in found),
                        prof.n,
                        sum(counts.values()),
                        0,
                    )
                )
        if rows is None:
            rows = queries.count_rows(self.client, scope, timeout_s=self._timeout)
        return DriftReport(
            profile_id=stored.profile_id,
            model=model,
            model_version=model_version or stored.model_version,
            window_start=start,
            window_end=end,
            rows=rows,
            status=worst_status(f.status for f in features),
            features=features,
            checks=checks,
            elapsed_ms=(time.perf_counter() - began) * 1000,
            sampled_fraction=fraction,
        )

    def _numeric_checks(
        self, feature: Feature, prof: NumericProfile, grid: Grid, window: queries.NumericWindow, fraction: float
    ) -> list[DriftCheck]:
        th = self.thresholds
        common = {"n_reference": float(prof.n), "n_current": float(window.n)}
        if fraction < 1:
            common["sampled_fraction"] = fraction
        name, source = feature.name, feature.source
        if window.n == 0:
            return [DriftCheck(name, source, "none", 0.0, None, "ok", common, "no finite value in the window")]
        bins = window.bin_counts if window.bin_counts is not None else grid.bin_counts(prof.edges, window.grid_counts)
        p = psi_from_profile(prof, bins, thresholds=th)
        js = js_from_profile(prof, bins, thresholds=th)
        ks = ks_from_grid(prof, grid, window.grid_counts, thresholds=th)
        ws = wasserstein_from_grid(
            prof, grid, window.grid_counts, window.below_excess, window.above_excess, thresholds=th
        )
        tests = {"alpha_warn": th.alpha_warn, "alpha_alert": th.alpha_alert}
        return [
            DriftCheck(
                name,
                source,
                "psi",
                p.psi,
                None,
                p.status,
                {
                    **common,
                    "warn": th.psi_warn,
                    "alert": th.psi_alert,
                    "expected_under_no_drift": p.expected_under_no_drift,
                    "bins": float(len(bins)),
                },
            ),
            DriftCheck(
                name,
                source,
                "jensen_shannon",
                js.divergence,
                None,
                js.status,
                {
                    **common,
                    "warn": th.js_warn,
                    "alert": th.js_alert,
                    "distance": js.distance,
                },
            ),
            DriftCheck(
                name,
                source,
                "ks",
                ks.statistic,
                ks.p_value,
                ks.status,
                {
                    **common,
                    **tests,
                    "warn": th.ks_statistic_warn,
                    "alert": th.ks_statistic_alert,
                    "max_statistic_error": ks.max_statistic_error,
                },
            ),
            DriftCheck(
                name,
                source,
                "wasserstein",
                ws.normalized,
                None,
                ws.status,
                {
                    **common,
                    "warn": th.wasserstein_warn,
                    "alert": th.wasserstein_alert,
                    "distance": ws.distance,
                    "reference_std": prof.std,
                },
            ),
        ]

    def _categorical_checks(
        self, feature: Feature, prof: CategoricalProfile, counts: dict[str, int], fraction: float
    ) -> list[DriftCheck]:
        th = self.thresholds
        n_cur = sum(counts.values())
        common = {"n_reference": float(prof.n), "n_current": float(n_cur)}
        if fraction < 1:
            common["sampled_fraction"] = fraction
        name, source = feature.name, feature.source
        if n_cur == 0:
            return [DriftCheck(name, source, "none", 0.0, None, "ok", common, "no value in the window")]
        report = categorical_drift(prof, counts, thresholds=th)
        chi, cpsi = report.chi_square, report.psi
        return [
            DriftCheck(
                name,
                source,
                "chi_square",
                chi.statistic,
                chi.p_value,
                chi.status,
                {
                    **common,
                    "dof": float(chi.dof),
                    "cramers_v": chi.cramers_v,
                    "divergence": chi.divergence,
                    "warn": th.psi_warn,
                    "alert": th.psi_alert,
                    "alpha_warn": th.alpha_warn,
                    "alpha_alert": th.alpha_alert,
                },
                note=f"pooled into __other__: {', '.join(chi.pooled)}" if chi.pooled else "",
            ),
            DriftCheck(
                name,
                source,
                "psi",
                cpsi.psi,
                None,
                cpsi.status,
                {
                    **common,
                    "warn": th.psi_warn,
                    "alert": th.psi_alert,
                    "expected_under_no_drift": cpsi.expected_under_no_drift,
                },
            ),
            *self._refusal_rate_check(feature, prof, counts, common),
        ]

    def _refusal_rate_check(
        self, feature: Feature, prof: CategoricalProfile, counts: dict[str, int], common: dict[str, float]
    ) -> list[DriftCheck]:
        """Refusals are rare, so their rate gets a two-proportion test whose status follows the
        p-value alone: 2 % -> 6 % barely moves a chi-square effect size, yet it matters."""
        if feature.source != "column" or feature.name != "refusal":
            return []
        ref_total = prof.n - prof.counts.get("none", 0)
        cur_total = sum(counts.values()) - counts.get("none", 0)
        if ref_total == 0 or cur_total == 0:
            return []
        rate = two_proportion_drift(
            prof.counts.get("refused", 0), ref_total, counts.get("refused", 0), cur_total, thresholds=self.thresholds
        )
        return [
            DriftCheck(
                feature.name,
                feature.source,
                "refusal_rate",
                rate.difference,
                rate.p_value,
                rate.status,
                {
                    **common,
                    "reference_rate": rate.reference_rate,
                    "current_rate": rate.current_rate,
                    "ci_low": rate.ci_low,
                    "ci_high": rate.ci_high,
                    "alpha_warn": self.thresholds.alpha_warn,
                    "alpha_alert": self.thresholds.alpha_alert,
                },
            )
        ]

    # ---- experiments --------------------------------------------------------------------------

    @domain_errors
    @serialized
    def analyze_experiment(
        self,
        model: str,
        experiment: str,
        start: datetime | None,
        end: datetime | None,
        *,
        control: str = "control",
        expected_weights: dict[str, float] | None = None,
        metrics: Sequence[MetricSpec] = (),
        alpha: float = 0.05,
        sequential: bool = False,
        correction: str = "",
        srm_threshold: float = 0.001,
        analysis_unit: str = "unit",
        bandit_floor: float = 0.0,
    ) -> ExperimentReport:
        began = time.perf_counter()
        if not model or not experiment:
            raise errors.InvalidArgument("model and experiment are required")
        control = control or "control"
        analysis_unit = analysis_unit or "unit"
        if analysis_unit not in ("unit", "prediction"):
            raise errors.InvalidArgument("analysis_unit must be 'unit' or 'prediction'")
        if correction not in ("", "none", "holm", "fdr_bh"):
            raise errors.InvalidArgument("correction must be '', 'holm' or 'fdr_bh'")
        if not 0 < alpha < 1:
            raise errors.InvalidArgument("alpha must lie in (0, 1)")
        specs = _normalise_metrics(metrics)
        scope = Scope(model, "", start, end, experiment=experiment, final=self.settings.read_final)
        if not 0 <= bandit_floor < 0.5:
            raise errors.InvalidArgument("bandit_floor must lie in [0, 0.5)")

        ratio_specs: list[RatioSpec] = []
        extra: dict[str, Any] = {}
        for i, spec in enumerate(specs):
            if spec.kind == "quantile":
                continue
            ratio_specs.append(_ratio_spec(i, spec, extra))
        by_unit = analysis_unit == "unit"
        weights = {k: float(w) for k, w in (expected_weights or {}).items()}
        if any(w < 0 or not math.isfinite(w) for w in weights.values()):
            raise errors.InvalidArgument("expected_weights must be finite and non-negative")

        def sums_of(variants: list[str]) -> tuple[list[queries.VariantSums], int]:
            return queries.variant_sums(
                self.client, scope, variants, ratio_specs, by_unit=by_unit, timeout_s=self._timeout, extra_params=extra
            )

        # The variants: with expected weights, the weighted variants and the control, checked by the
        # sums pass itself (it counts the predictions of any other variant; then the variants are
        # listed with a pass of their own and the sums run again), which saves a full pass over the
        # window in the common case; without weights, that listing pass first. Weights that leave out
        # a variant present in the window cost a wasted sums pass (the SRM check flags them anyway).
        guessed = sorted(set(weights) | {control}) if weights else []
        sums, unlisted = sums_of(guessed) if 0 < len(guessed) < 256 else ([], 1)
        if unlisted:
            counts = queries.variant_counts(self.client, scope, timeout_s=self._timeout)
            if not counts:
                raise errors.FailedPrecondition(f"no predictions of model {model!r} in experiment {experiment!r}")
            sums, _ = sums_of(list(counts))
        by_variant = {s.variant: s for s in sums}
        if not by_variant:
            raise errors.FailedPrecondition(f"no predictions of model {model!r} in experiment {experiment!r}")
        treatments = sorted((set(by_variant) | set(weights)) - {control})
        if not treatments:
            raise errors.FailedPrecondition(f"experiment {experiment!r} has no variant besides {control!r}")
        order = [control, *treatments]
        observed = [by_variant[v].units if v in by_variant else 0 for v in order]
        if weights:
            total_w = sum(weights.values())
            if total_w <= 0:
                raise errors.InvalidArgument("expected_weights must have a positive total")
            expected = [weights.get(v, 0.0) / total_w for v in order]
        else:
            present = [v in by_variant for v in order]
            expected = [1.0 / sum(present) if p else 0.0 for p in present]
        srm = sample_ratio_mismatch(observed, expected, threshold=srm_threshold)
        total_units = sum(observed)
        variants = [
            VariantInfo(
                v,
                observed[i],
                by_variant[v].predictions if v in by_variant else 0,
                expected[i],
                observed[i] / total_units if total_units else 0.0,
            )
            for i, v in enumerate(order)
        ]

        results: list[ExperimentMetric] = []
        z = float(stats.norm.ppf(1 - alpha / 2))
        for spec in specs:
            if spec.kind == "quantile":
                levels = {}
                for v in order:
                    n = by_variant[v].predictions if v in by_variant else 0
                    lo, hi = order_statistic_levels(spec.quantile, max(n, 1), z)
                    levels[v] = (spec.quantile, lo, hi)
                quantiles = queries.variant_quantiles(self.client, scope, spec.column, levels, timeout_s=self._timeout)
                for t in treatments:
                    results.append(
                        self._quantile_result(
                            spec, quantiles[control], quantiles[t], control, t, alpha, z, sequential, srm.mismatch
                        )
                    )
                continue
            for t in treatments:
                results.append(
                    self._ratio_result(
                        spec,
                        by_variant.get(control),
                        by_variant.get(t),
                        control,
                        t,
                        alpha,
                        sequential,
                        analysis_unit,
                        srm.mismatch,
                    )
                )
        if correction in ("holm", "fdr_bh") and not sequential:
            tested = [k for k, r in enumerate(results) if r.result.p_value is not None]
            if len(tested) > 1:
                corrected = correct_metric_results([results[k].result for k in tested], method=correction, alpha=alpha)
                for k, res in zip(tested, corrected, strict=True):
                    results[k] = replace(results[k], result=res)
        bandit = [
            allocation
            for spec in specs
            if spec.kind in REWARD_KINDS
            and (allocation := _bandit_weights(spec, order, by_variant, bandit_floor)) is not None
        ]
        return ExperimentReport(
            model, experiment, analysis_unit, srm, variants, results, (time.perf_counter() - began) * 1000, bandit
        )

    def _ratio_result(
        self,
        spec: MetricSpec,
        control: queries.VariantSums | None,
        treatment: queries.VariantSums | None,
        c_name: str,
        t_name: str,
        alpha: float,
        sequential: bool,
        unit: str,
        srm_mismatch: bool,
    ) -> ExperimentMetric:
        mc = control.metrics[spec.name] if control is not None else None
        mt = treatment.metrics[spec.name] if treatment is not None else None
        if mc is None or mt is None or mc.n < 2 or mt.n < 2 or mc.sum_x <= 0 or mt.sum_x <= 0:
            return _insufficient(spec, c_name, t_name, alpha, mc, mt, srm_mismatch)
        if sequential:
            tau2 = _mixing_variance(spec, mc.ratio, mt.ratio, mc.variance + mt.variance)
            look = msprt_update(
                None,
                n_control=mc.n,
                n_treatment=mt.n,
                control_value=mc.ratio,
                treatment_value=mt.ratio,
                variance=mc.variance + mt.variance,
                mixing_variance=tau2,
                alpha=alpha,
            )
            res = look.to_metric_result(spec.name)
            res = replace(
                res,
                method=f"msprt_{'delta_method' if unit == 'unit' else 'normal'}",
                relative_lift=mt.ratio / mc.ratio - 1 if mc.ratio else None,
            )
        elif unit == "prediction" and spec.kind in PROPORTION_KINDS:
            res = two_proportion_ztest(
                round(mc.sum_y), round(mc.sum_x), round(mt.sum_y), round(mt.sum_x), alpha=alpha, metric=spec.name
            )
        else:
            res = ratio_welch(mc, mt, alpha=alpha, metric=spec.name)
        bayes = None
        if spec.kind in PROPORTION_KINDS:
            # Totals over units or predictions alike; the Beta-Binomial treats trials as independent.
            bayes = beta_binomial_ab(
                round(mc.sum_y), round(mc.sum_x), round(mt.sum_y), round(mt.sum_x), draws=20_000
            )
        return ExperimentMetric(res, spec.kind, c_name, t_name, srm_mismatch, bayes=bayes)

    def _quantile_result(
        self,
        spec: MetricSpec,
        control: tuple[int, float, float, float],
        treatment: tuple[int, float, float, float],
        c_name: str,
        t_name: str,
        alpha: float,
        z: float,
        sequential: bool,
        srm_mismatch: bool,
    ) -> ExperimentMetric:
        if control[0] < 2 or treatment[0] < 2:
            return _insufficient(spec, c_name, t_name, alpha, None, None, srm_mismatch, n=(control[0], treatment[0]))
        res = quantile_difference(control, treatment, quantile=spec.quantile, alpha=alpha, metric=spec.name)
        if sequential:
            variance = ((control[3] - control[2]) / (2 * z)) ** 2 + ((treatment[3] - treatment[2]) / (2 * z)) ** 2
            tau2 = _mixing_variance(spec, control[1], treatment[1], variance)
            look = msprt_update(
                None,
                n_control=control[0],
                n_treatment=treatment[0],
                control_value=control[1],
                treatment_value=treatment[1],
                variance=variance,
                mixing_variance=tau2,
                alpha=alpha,
            )
            res = replace(
                look.to_metric_result(spec.name),
                method="msprt_quantile_order_statistics",
                relative_lift=res.relative_lift,
            )
        return ExperimentMetric(res, spec.kind, c_name, t_name, srm_mismatch)

    # ---- power ------------------------------------------------------------------------------

    @domain_errors
    def sample_size(
        self,
        *,
        baseline_rate: float = 0.0,
        relative_mde: float = 0.0,
        absolute_mde: float = 0.0,
        std: float = 0.0,
        alpha: float = 0.05,
        power: float = 0.8,
        ratio: float = 1.0,
        one_sided: bool = False,
    ) -> SampleSizeResult:
        sides = "one-sided" if one_sided else "two-sided"
        if baseline_rate:
            if bool(relative_mde) == bool(absolute_mde):
                raise errors.InvalidArgument("give exactly one of relative_mde and absolute_mde")
            return sample_size_two_proportions(
                baseline_rate,
                relative_mde=relative_mde or None,
                absolute_mde=absolute_mde or None,
                alpha=alpha,
                power=power,
                ratio=ratio,
                sides=sides,
            )
        if std:
            if not absolute_mde:
                raise errors.InvalidArgument("a means sample size needs absolute_mde")
            return sample_size_means(std, absolute_mde, alpha=alpha, power=power, ratio=ratio, sides=sides)
        raise errors.InvalidArgument("set baseline_rate (proportions) or std (means)")


# ------------------------------------------------------------------------------------ helpers


def _profiled(profile: ReferenceProfile) -> list[ProfiledFeature]:
    out = [ProfiledFeature(Feature.from_key(k, "numeric"), p.n, p.n_bins) for k, p in profile.numeric.items()]
    out += [
        ProfiledFeature(Feature.from_key(k, "categorical"), p.n, len(p.counts)) for k, p in profile.categorical.items()
    ]
    return out


def _normalise_metrics(metrics: Sequence[MetricSpec]) -> list[MetricSpec]:
    specs = list(metrics) or [
        MetricSpec("error_rate"),
        MetricSpec("mean", column="latency_ms"),
        MetricSpec("quantile", column="latency_ms", quantile=0.95),
    ]
    out: list[MetricSpec] = []
    names: set[str] = set()
    for spec in specs:
        if spec.kind not in METRIC_KINDS:
            raise errors.InvalidArgument(f"unknown metric kind {spec.kind!r}; known: {list(METRIC_KINDS)}")
        column, quantile, value = spec.column, spec.quantile, spec.value
        if spec.kind in ("mean", "quantile"):
            column = column or "latency_ms"
            if column not in METRIC_COLUMNS:
                raise errors.InvalidArgument(f"unknown metric column {column!r}; known: {list(METRIC_COLUMNS)}")
        if spec.kind == "quantile":
            quantile = quantile or 0.95
            if not 0 < quantile < 1:
                raise errors.InvalidArgument("quantile must lie in (0, 1)")
        if spec.kind == "label_rate":
            value = value or "1"
        if spec.kind == "outcome_rate" and not value:
            raise errors.InvalidArgument("an outcome_rate metric needs value (the outcome counted as success)")
        if spec.mde < 0 or not math.isfinite(spec.mde):
            raise errors.InvalidArgument("mde must be finite and non-negative")
        name = (
            spec.name
            or {
                "error_rate": "error_rate",
                "mean": f"mean_{column}",
                "quantile": f"p{round(quantile * 100, 4):g}_{column}",
                "label_rate": f"label_rate[{value}]",
                "outcome_rate": f"outcome_rate[{value}]",
                "rating_mean": "rating_mean",
            }[spec.kind]
        )
        if name in names:
            raise errors.InvalidArgument(f"metric name {name!r} appears twice")
        names.add(name)
        out.append(MetricSpec(spec.kind, name, column, quantile, value, spec.mde))
    return out


def _ratio_spec(i: int, spec: MetricSpec, params: dict[str, Any]) -> RatioSpec:
    if spec.kind == "error_rate":
        return RatioSpec(spec.name, "p.status_code != 'OK'")
    if spec.kind == "mean":
        return RatioSpec(spec.name, NUMERIC_COLUMNS[spec.column])
    key = f"metric_value_{i}"
    params[key] = spec.value
    if spec.kind == "label_rate":
        return RatioSpec(spec.name, f"fb_has = 1 AND fb_label = {{{key}:String}}", "fb_has = 1", True)
    if spec.kind == "outcome_rate":
        return RatioSpec(spec.name, f"fb_outcome = {{{key}:String}}", "1", True)
    return RatioSpec(spec.name, "ifNull(fb_rating, 0)", "isNotNull(fb_rating)", True)  # rating_mean


def _mixing_variance(spec: MetricSpec, control_value: float, treatment_value: float, variance: float) -> float:
    """tau^2 = mde^2; without an mde, (10 % of the control value)^2, or the estimate's variance if that is 0."""
    if spec.mde > 0:
        return spec.mde**2
    base = abs(control_value) or abs(treatment_value)
    return (0.1 * base) ** 2 if base > 0 else max(variance, 1e-12)


def _bandit_weights(
    spec: MetricSpec, order: list[str], by_variant: dict[str, queries.VariantSums], floor: float
) -> BanditWeights | None:
    """None until every variant has a trial: a variant with no data cannot be weighed."""
    present = [v for v in order if v in by_variant and by_variant[v].metrics[spec.name].sum_x >= 1]
    if len(present) < 2 or len(present) != len(order) or floor >= 1 / len(present):
        return None
    successes = [round(by_variant[v].metrics[spec.name].sum_y) for v in present]
    trials = [round(by_variant[v].metrics[spec.name].sum_x) for v in present]
    allocation = thompson_weights(successes, trials, floor=floor, draws=20_000)
    return BanditWeights(
        spec.name,
        dict(zip(present, allocation.weights, strict=True)),
        dict(zip(present, allocation.prob_best, strict=True)),
        dict(zip(present, successes, strict=True)),
        dict(zip(present, trials, strict=True)),
    )


def _insufficient(
    spec: MetricSpec,
    c_name: str,
    t_name: str,
    alpha: float,
    mc: Any,
    mt: Any,
    srm_mismatch: bool,
    n: tuple[int, int] | None = None,
) -> ExperimentMetric:
    nc = n[0] if n else (mc.n if mc is not None else 0)
    nt = n[1] if n else (mt.n if mt is not None else 0)
    res = MetricResult(
        metric=spec.name,
        method="none",
        control_value=math.nan,
        treatment_value=math.nan,
        estimate=math.nan,
        ci_low=math.nan,
        ci_high=math.nan,
        p_value=None,
        decision="insufficient_data",
        alpha=alpha,  # type: ignore[arg-type]
        n_control=nc,
        n_treatment=nt,
    )
    return ExperimentMetric(
        res,
        spec.kind,
        c_name,
        t_name,
        srm_mismatch,
        note="insufficient data: each arm needs 2 units with a defined metric",
    )
