"""Drift and A/B analysis against REAL chdb, hosted as in the mesh: the logger (its migrations, its
tables, its Kafka consumer on a REAL Tansu broker) with the drift service given LoggerApp.client.

Synthetic predictions are written straight into the logger's `predictions` / `feedback` tables
with SQL. Every random number is a hash of the row number (Box-Muller on cityHash64), so the data,
and therefore every statistic asserted here, is the same on every run.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import numpy as np
import pytest
from scipy import stats

from services.common.api import drift_pb2, drift_pb2_grpc, events_pb2
from services.common.kafka import KafkaSettings, make_consumer
from services.common.net import free_port
from services.common.tansu import TansuBroker
from services.drift.app import DriftApp, start_drift
from services.drift.queries import REFUSAL_PATTERN
from services.drift.service import DriftService
from services.drift.settings import DriftSettings, ScheduledCheck
from services.drift.statistics import beta_binomial_ab, thompson_weights
from services.drift.statistics.pushdown import ks_from_grid, profile_on_grid, wasserstein_from_grid
from services.logger.app import LoggerApp, start_logger
from services.logger.settings import LoggerSettings

pytestmark = pytest.mark.integration

# The reference hour (the drifted / steady hours follow): recent, or the table's TTL drops the rows.
T0 = (datetime.now(UTC) - timedelta(days=2)).replace(minute=0, second=0, microsecond=0)
TIMEOUT_S = 20.0


def uniform(seed: str) -> str:
    """A uniform in (0, 1) from the row number: deterministic."""
    return f"((cityHash64(number, '{seed}') % 4294967296) + 0.5) / 4294967296"


def normal(seed: str, mean: float = 0.0) -> str:
    return f"({mean} + sqrt(-2 * ln({uniform(seed + 'a')})) * cos(2 * pi() * {uniform(seed + 'b')}))"


def prediction_id(seed: str) -> str:
    """Lowercase hex ids, like the gateway's uuid4().hex (drift samples by prediction id ranges)."""
    return f"lower(hex(cityHash64('{seed}', number)))"


def insert_predictions(
    client: Any,
    *,
    model: str,
    n: int,
    start: datetime,
    seed: str,
    shifts: tuple[float, float, float] = (0.0, 0.0, 0.0),
    experiment: str = "",
    variant: str = "''",
    unit: str = "concat('u-', toString(number))",
    error_rate: str = "0.02",
    latency: str = "10",
    id_prefix: str = "",
    completion: str = "''",
) -> None:
    """n predictions of `model` with three input values (tensor `input`), one per 10 ms from start."""
    values = ", ".join(normal(f"{seed}-{k}", shifts[k]) for k in range(3))
    client.command(
        f"""
        INSERT INTO predictions (prediction_id, request_id, tenant, unit_id, rpc, model, model_version, experiment,
            variant, shadow, started_at, latency_ms, status_code, finish_reason, input_tensors, input_sizes,
            input_values, output_tensors, output_sizes, output_values, schema_version, completion)
        SELECT {prediction_id(id_prefix or seed)}, '', 'acme', {unit}, 'Predict', '{model}', '1',
            '{experiment}', {variant} AS v, false,
            toDateTime64('{start:%Y-%m-%d %H:%M:%S}', 3, 'UTC') + toIntervalMillisecond(number * 10),
            {latency} - 5 * ln({uniform(seed + "-lat")}),
            if({uniform(seed + "-err")} < {error_rate}, 'INTERNAL', 'OK'),
            if({uniform(seed + "-fin")} < 0.9, 'stop', 'length'),
            ['input'], [3], [{values}], ['probabilities'], [2], [0.25, 0.75], 1, {completion}
        FROM numbers({n})
        """
    )


async def eventually(check: Callable[[], Any], what: str, timeout_s: float = TIMEOUT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = await asyncio.to_thread(check)
        if last:
            return last
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what} (last: {last!r})")


def ts(value: datetime) -> Any:
    from google.protobuf.timestamp_pb2 import Timestamp

    stamp = Timestamp()
    stamp.FromDatetime(value.replace(tzinfo=None))
    return stamp


def window(start: datetime, minutes: int = 60) -> drift_pb2.TimeWindow:
    return drift_pb2.TimeWindow(start=ts(start), end=ts(start + timedelta(minutes=minutes)))


@dataclass
class Env:
    logger: LoggerApp
    drift: DriftApp
    kafka: KafkaSettings
    stub: drift_pb2_grpc.DriftStub

    @property
    def client(self) -> Any:
        return self.logger.client


@pytest.fixture(scope="module")
async def env(kafka_broker: TansuBroker, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    run = uuid.uuid4().hex[:8]
    kafka = KafkaSettings(
        bootstrap_servers=kafka_broker.bootstrap,
        predictions_topic=f"d{run}.predictions",
        feedback_topic=f"d{run}.feedback",
        alerts_topic=f"d{run}.alerts",
        deadletter_topic=f"d{run}.deadletter",
    )
    logger = await start_logger(
        LoggerSettings(
            port=free_port(),
            kafka=kafka,
            clickhouse_dsn=f"chdb://{tmp_path_factory.mktemp('drift') / 'clickhouse'}",
            group_id=f"logger-{run}",
            batch_max_wait_ms=50,
            pii_hash_salt="drift-test-salt",
        )
    )
    settings = DriftSettings(
        port=free_port(),
        kafka=kafka,
        reference_sample_size=10_000,  # < the 20k reference rows: edges from a sample, counts exact in SQL
        checks=[
            ScheduledCheck(model="drifting", window_minutes=60),
            ScheduledCheck(model="steady", window_minutes=60),
        ],
    )
    drift = await start_drift(settings, logger.client)  # as the mesh hosts it: next to the logger
    channel = grpc.aio.insecure_channel(drift.address)
    try:
        yield Env(logger, drift, kafka, drift_pb2_grpc.DriftStub(channel))
    finally:
        await channel.close()
        await drift.stop()
        await logger.stop()


# ----------------------------------------------------------------------------------------- drift


async def test_controlled_drift_alerts_and_steady_traffic_does_not(env: Env) -> None:
    for model in ("drifting", "steady"):
        await asyncio.to_thread(insert_predictions, env.client, model=model, n=20_000, start=T0, seed=f"{model}-ref")
    hour = T0 + timedelta(hours=1)
    await asyncio.to_thread(
        insert_predictions, env.client, model="drifting", n=20_000, start=hour, seed="drift-cur", shifts=(0.5, 0, 0)
    )
    await asyncio.to_thread(insert_predictions, env.client, model="steady", n=20_000, start=hour, seed="steady-cur")

    for model in ("drifting", "steady"):
        created = await env.stub.CreateReferenceProfile(
            drift_pb2.CreateReferenceProfileRequest(
                model=model,
                window=window(T0),
                features=drift_pb2.FeatureSelection(inputs=True, outputs=True, columns=["latency_ms", "finish_reason"]),
            )
        )
        assert created.rows == 20_000
        assert {(f.source, f.feature, f.kind) for f in created.features} == {
            ("input", "input[0]", "numeric"),
            ("input", "input[1]", "numeric"),
            ("input", "input[2]", "numeric"),
            ("output", "probabilities[0]", "numeric"),
            ("output", "probabilities[1]", "numeric"),
            ("column", "latency_ms", "numeric"),
            ("column", "finish_reason", "categorical"),
        }

    drifted = await env.stub.ComputeDrift(drift_pb2.ComputeDriftRequest(model="drifting", window=window(hour)))
    assert drifted.rows == 20_000 and drifted.status == "alert"
    status = {f.feature: f.status for f in drifted.features}
    assert status == {
        "input[0]": "alert",
        "input[1]": "ok",
        "input[2]": "ok",
        "probabilities[0]": "ok",
        "probabilities[1]": "ok",
        "latency_ms": "ok",
        "finish_reason": "ok",
    }
    checks = {(r.feature, r.method): r for r in drifted.results}
    # A 0.5 sd location shift: PSI ~ 0.25, KS D ~ 0.2, Wasserstein 0.5 sd; every check agrees.
    assert 0.2 < checks["input[0]", "psi"].statistic < 0.35
    assert 0.17 < checks["input[0]", "ks"].statistic < 0.23 and checks["input[0]", "ks"].p_value < 1e-12
    assert 0.45 < checks["input[0]", "wasserstein"].statistic < 0.55
    assert {checks["input[0]", m].status for m in ("psi", "jensen_shannon", "ks", "wasserstein")} == {"alert"}
    assert checks["input[1]", "psi"].statistic < 0.01 and checks["finish_reason", "chi_square"].p_value > 0.01

    steady = await env.stub.ComputeDrift(drift_pb2.ComputeDriftRequest(model="steady", window=window(hour)))
    assert steady.status == "ok", [(r.feature, r.method, r.statistic, r.status) for r in steady.results]

    # The scheduled check: the same hour, AlertEvents on the alerts topic, stored by the logger.
    published = await asyncio.to_thread(env.drift.scheduler.run_once, now=hour + timedelta(hours=1))
    assert published == 1
    assert env.drift.scheduler.stats.failures == 0
    assert env.drift.scheduler.stats.last_reports["steady"].status == "ok"
    stats = await env.stub.Stats(drift_pb2.DriftStatsRequest())
    assert (stats.checks_run, stats.alerts_published, stats.failures) == (2, 1, 0)
    by_model = {m.model: m for m in stats.models}
    assert by_model["drifting"].status == "alert" and list(by_model["drifting"].drifted_features) == ["input[0]"]
    assert by_model["steady"].status == "ok" and by_model["steady"].rows == 20_000

    def stored() -> list[tuple]:
        return env.client.query(
            "SELECT model, severity, kind, metric, labels['feature'], labels['status'] FROM alerts FINAL"
        ).result_rows

    rows = await eventually(stored, "the drift alert in the alerts table")
    assert rows == [("drifting", "critical", "drift", "psi", "input[0]", "alert")]

    # Re-running the same check republishes the same alert id: still one row.
    assert await asyncio.to_thread(env.drift.scheduler.run_once, now=hour + timedelta(hours=1)) == 1

    def read_topic() -> list[Any]:
        consumer = make_consumer(env.kafka, f"reader-{uuid.uuid4().hex[:6]}", [env.kafka.alerts_topic])
        found: list[Any] = []
        try:
            deadline = time.monotonic() + TIMEOUT_S
            while len(found) < 2 and time.monotonic() < deadline:
                for records in consumer.poll(timeout_ms=500).values():
                    found.extend(records)
        finally:
            consumer.close(autocommit=False)
        return found

    records = await asyncio.to_thread(read_topic)
    events = [events_pb2.AlertEvent.FromString(r.value) for r in records]
    assert len({e.alert_id for e in events}) == 1 and len(events) == 2
    assert events[0].labels["profile_id"] and events[0].value > events[0].threshold == 0.2
    await asyncio.sleep(0.5)
    assert await asyncio.to_thread(lambda: env.client.query("SELECT count() FROM alerts FINAL").result_rows[0][0]) == 1


async def test_profile_from_caller_rows_and_errors(env: Env) -> None:
    rng = np.random.default_rng(7)
    reference = rng.normal(size=5000)
    created = await env.stub.CreateReferenceProfile(
        drift_pb2.CreateReferenceProfileRequest(
            model="drifting",
            rows=drift_pb2.ReferenceRows(
                features=[
                    drift_pb2.FeatureValues(name="input[1]", values=reference.tolist()),
                    drift_pb2.FeatureValues(
                        name="finish_reason", source="column", categories=["stop"] * 9 + ["length"]
                    ),
                ]
            ),
        )
    )
    report = await env.stub.ComputeDrift(
        drift_pb2.ComputeDriftRequest(
            model="drifting", window=window(T0 + timedelta(hours=1)), profile_id=created.profile_id
        )
    )
    assert report.profile_id == created.profile_id
    assert {f.feature: f.status for f in report.features} == {"input[1]": "ok", "finish_reason": "ok"}
    assert {f.feature: f.n_reference for f in report.features} == {"input[1]": 5000, "finish_reason": 10}

    async def code_of(call: Any) -> grpc.StatusCode:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        return info.value.code()

    assert await code_of(env.stub.ComputeDrift(drift_pb2.ComputeDriftRequest(model="unknown", window=window(T0)))) == (
        grpc.StatusCode.FAILED_PRECONDITION
    )
    assert (
        await code_of(
            env.stub.ComputeDrift(drift_pb2.ComputeDriftRequest(model="drifting", window=window(T0), profile_id="nope"))
        )
        == grpc.StatusCode.NOT_FOUND
    )
    assert await code_of(env.stub.ComputeDrift(drift_pb2.ComputeDriftRequest(model="drifting"))) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    assert (
        await code_of(
            env.stub.CreateReferenceProfile(
                drift_pb2.CreateReferenceProfileRequest(model="drifting", window=window(T0 - timedelta(days=30)))
            )
        )
        == grpc.StatusCode.FAILED_PRECONDITION
    )
    assert (
        await code_of(
            env.stub.CreateReferenceProfile(
                drift_pb2.CreateReferenceProfileRequest(
                    model="drifting", window=window(T0), features=drift_pb2.FeatureSelection(columns=["password"])
                )
            )
        )
        == grpc.StatusCode.INVALID_ARGUMENT
    )


async def test_missing_values_other_layouts_and_sampling(env: Env) -> None:
    """NaN values count as missing; rows with another tensor layout are read by name; big windows
    can be sampled by prediction-id range and still see the drift."""
    await asyncio.to_thread(insert_predictions, env.client, model="gappy", n=5000, start=T0, seed="gappy-ref")
    hour = T0 + timedelta(hours=1)
    await asyncio.to_thread(insert_predictions, env.client, model="gappy", n=4000, start=hour, seed="gappy-cur")
    # 1000 more rows: input[1] missing (NaN), and the tensors in another order with an extra one.
    await asyncio.to_thread(
        env.client.command,
        f"""INSERT INTO predictions (prediction_id, model, started_at, status_code, input_tensors, input_sizes,
            input_values, latency_ms)
        SELECT {prediction_id("gappy-odd")}, 'gappy', toDateTime64('{hour:%Y-%m-%d %H:%M:%S}', 3, 'UTC'), 'OK',
            ['mask', 'input'], [1, 3], [1, {normal("odd-0")}, nan, {normal("odd-2")}], 12
        FROM numbers(1000)""",
    )
    created = await env.stub.CreateReferenceProfile(
        drift_pb2.CreateReferenceProfileRequest(model="gappy", window=window(T0))
    )
    report = await env.stub.ComputeDrift(
        drift_pb2.ComputeDriftRequest(model="gappy", window=window(hour), profile_id=created.profile_id)
    )
    assert report.rows == 5000 and report.status == "ok" and report.sampled_fraction == 1.0
    by_feature = {f.feature: f for f in report.features}
    assert (by_feature["input[0]"].n_current, by_feature["input[0]"].missing) == (5000, 0)
    assert (by_feature["input[1]"].n_current, by_feature["input[1]"].missing) == (4000, 1000)

    sampled = DriftService(env.drift.service.client, DriftSettings(drift_sample_rows=5000))
    reference = await env.stub.CreateReferenceProfile(
        drift_pb2.CreateReferenceProfileRequest(model="drifting", window=window(T0))
    )
    full = await asyncio.to_thread(
        sampled.compute_drift, "drifting", "", hour, hour + timedelta(hours=1), reference.profile_id
    )
    assert full.rows == 20_000 and full.sampled_fraction == pytest.approx(0.25)
    n = {f.feature: f.n_current for f in full.features}
    assert 4000 < n["input[0]"] < 6000  # ids below a bound: about a quarter of the rows
    assert {f.feature: f.status for f in full.features}["input[0]"] == "alert"
    assert all(f.status == "ok" for f in full.features if f.feature != "input[0]")


def test_grid_statistics_match_scipy_on_raw_samples() -> None:
    """The pushdown forms (grid counts, bins from grid-snapped edges) against numpy/scipy on raw samples."""
    rng = np.random.default_rng(3)
    shapes = {
        "normal": lambda n, shift: rng.normal(size=n) + shift,
        "heavy tails": lambda n, shift: rng.normal(size=n) / np.sqrt(rng.uniform(0.05, 1, n)) + shift,
        "counts": lambda n, shift: rng.poisson(3 + 3 * shift, n).astype(float),
    }
    for draw in shapes.values():
        for ref_n, shift in ((1500, 0.0), (1500, 0.3), (200_000, 0.2)):
            reference, current = draw(ref_n, 0.0), draw(50_000, shift)
            profile, grid = profile_on_grid(reference, n_bins=10, max_points=2001, cells=1000)
            counts = grid.counts(current)
            assert np.array_equal(grid.bin_counts(profile.edges, counts), profile.bin_counts(current))
            ks = ks_from_grid(profile, grid, counts)
            exact = stats.ks_2samp(reference, current)
            assert abs(ks.statistic - exact.statistic) <= ks.max_statistic_error + 1e-12
            assert abs(ks.statistic - exact.statistic) < 0.005
            ws = wasserstein_from_grid(profile, grid, counts, *grid.excess(current))
            # Values are placed uniformly within their cell: each moves by at most one cell width.
            assert abs(ws.distance - stats.wasserstein_distance(reference, current)) <= grid.width


# ------------------------------------------------------------------------------------ experiments


async def test_experiment_with_a_known_effect(env: Env) -> None:
    """40k users, 3 requests each. Treatment: errors 2 % -> 3 %, latency +3 ms; labels unchanged."""
    variant = "if(cityHash64(number % 40000, 'assign') % 2 = 0, 'control', 'treatment')"
    await asyncio.to_thread(
        insert_predictions,
        env.client,
        model="ranker",
        n=120_000,
        start=T0,
        seed="exp",
        experiment="exp-1",
        variant=variant,
        unit="concat('user-', toString(number % 40000))",
        error_rate="if(v = 'treatment', 0.03, 0.02)",
        latency="if(v = 'treatment', 13, 10)",
    )
    # Feedback for every other prediction: label "1" with probability 0.3 in both arms.
    await asyncio.to_thread(
        env.client.command,
        f"""INSERT INTO feedback (feedback_id, prediction_id, tenant, unit_id, created_at, label, rating, outcome)
        SELECT concat('fb-', toString(number)), {prediction_id("exp")}, 'acme', '',
            toDateTime64('{T0:%Y-%m-%d %H:%M:%S}', 3, 'UTC') + toIntervalSecond(number),
            if({uniform("label")} < 0.3, '1', '0'), 4, ''
        FROM numbers(120000) WHERE number % 2 = 0""",
    )
    request = drift_pb2.AnalyzeExperimentRequest(
        model="ranker",
        experiment="exp-1",
        expected_weights={"control": 1, "treatment": 1},
        metrics=[
            drift_pb2.MetricSpec(kind="error_rate"),
            drift_pb2.MetricSpec(kind="mean", column="latency_ms"),
            drift_pb2.MetricSpec(kind="quantile", column="latency_ms", quantile=0.95),
            drift_pb2.MetricSpec(kind="label_rate", value="1"),
        ],
    )
    reply = await env.stub.AnalyzeExperiment(request)
    assert reply.analysis_unit == "unit" and not reply.srm.mismatch
    assert {v.variant: v.predictions for v in reply.variants}.keys() == {"control", "treatment"}
    assert sum(v.units for v in reply.variants) == 40_000
    results = {r.metric: r for r in reply.results}
    err = results["error_rate"]
    assert err.decision == "increase" and err.method == "delta_method_welch"
    assert err.ci_low < 0.01 < err.ci_high and err.p_value < 1e-6
    assert err.control_value == pytest.approx(0.02, abs=0.003)
    lat = results["mean_latency_ms"]
    assert lat.decision == "increase" and lat.ci_low < 3 < lat.ci_high
    p95 = results["p95_latency_ms"]
    assert p95.decision == "increase" and p95.ci_low < 3 < p95.ci_high
    assert p95.control_value == pytest.approx(10 + 5 * np.log(20), abs=0.5)  # exponential(5) + 10
    labels = results["label_rate[1]"]
    assert labels.decision == "no_significant_difference" and labels.ci_low < 0 < labels.ci_high
    assert labels.control_value == pytest.approx(0.3, abs=0.01)
    assert not any(r.srm_mismatch for r in reply.results)

    # The same data at prediction level (two-proportion z-test) and sequentially (mSPRT).
    request.analysis_unit = "prediction"
    by_prediction = {r.metric: r for r in (await env.stub.AnalyzeExperiment(request)).results}
    assert by_prediction["error_rate"].method == "two_proportion_ztest"
    assert by_prediction["error_rate"].decision == "increase"
    request.analysis_unit, request.sequential = "unit", True
    sequential = {r.metric: r for r in (await env.stub.AnalyzeExperiment(request)).results}
    assert sequential["error_rate"].decision == "increase"
    assert not sequential["error_rate"].HasField("p_value")
    assert sequential["error_rate"].always_valid_p_value < 0.05
    assert sequential["label_rate[1]"].decision == "continue"

    # The Bayesian view of each proportion and the Thompson weights of the feedback rate, from the
    # same totals the frequentist results report.
    request.analysis_unit, request.sequential, request.bandit_floor = "prediction", False, 0.05
    reply = await env.stub.AnalyzeExperiment(request)
    by_prediction = {r.metric: r for r in reply.results}
    for name in ("error_rate", "label_rate[1]"):
        r = by_prediction[name]
        counts = [round(r.control_value * r.n_control), r.n_control, round(r.treatment_value * r.n_treatment),
                  r.n_treatment]
        expected = beta_binomial_ab(*counts)
        assert r.prob_treatment_better == pytest.approx(expected.prob_treatment_better, abs=1e-9)
        assert r.expected_loss_treatment == pytest.approx(expected.expected_loss_treatment, abs=1e-9)
    assert by_prediction["error_rate"].prob_treatment_better > 0.999  # 3 % vs 2 % errors
    assert not by_prediction["mean_latency_ms"].HasField("prob_treatment_better")
    [bandit] = reply.bandit  # feedback rates only: error_rate is not a reward
    labels = by_prediction["label_rate[1]"]
    assert bandit.metric == "label_rate[1]"
    assert dict(bandit.trials) == {"control": labels.n_control, "treatment": labels.n_treatment}
    expected = thompson_weights(
        [bandit.successes["control"], bandit.successes["treatment"]], [labels.n_control, labels.n_treatment],
        floor=0.05, draws=20_000,
    )
    assert [bandit.weights["control"], bandit.weights["treatment"]] == pytest.approx(expected.weights)
    assert sum(bandit.weights.values()) == pytest.approx(1.0)


async def test_srm_detected_on_a_508_492_split(env: Env) -> None:
    for experiment, control_units in (("srm-off", 50_800), ("srm-fine", 50_000)):
        await asyncio.to_thread(
            insert_predictions,
            env.client,
            model="splitter",
            n=100_000,
            start=T0,
            seed=experiment,
            experiment=experiment,
            variant=f"if(number < {control_units}, 'control', 'treatment')",
            unit="''" if experiment == "srm-fine" else "concat('u-', toString(number))",  # no unit id: own unit
        )
    off = await env.stub.AnalyzeExperiment(
        drift_pb2.AnalyzeExperimentRequest(
            model="splitter", experiment="srm-off", expected_weights={"control": 50, "treatment": 50}
        )
    )
    assert {v.variant: v.units for v in off.variants} == {"control": 50_800, "treatment": 49_200}
    assert off.srm.mismatch and off.srm.p_value < 1e-5  # chi2 = 25.6 on 1 df
    assert off.srm.statistic == pytest.approx(25.6)
    assert all(r.srm_mismatch for r in off.results)
    fine = await env.stub.AnalyzeExperiment(
        drift_pb2.AnalyzeExperimentRequest(
            model="splitter", experiment="srm-fine", expected_weights={"control": 50, "treatment": 50}
        )
    )
    assert not fine.srm.mismatch and fine.srm.p_value == pytest.approx(1.0)
    assert {v.variant: v.units for v in fine.variants} == {"control": 50_000, "treatment": 50_000}
    # A variant the planned split leaves out is still counted, never silently dropped: its units
    # make the split mismatch and it gets its own results.
    partial = await env.stub.AnalyzeExperiment(
        drift_pb2.AnalyzeExperimentRequest(model="splitter", experiment="srm-fine", expected_weights={"control": 1})
    )
    assert {v.variant: v.units for v in partial.variants} == {"control": 50_000, "treatment": 50_000}
    assert {v.variant: v.expected_fraction for v in partial.variants} == {"control": 1.0, "treatment": 0.0}
    assert partial.srm.mismatch
    assert {r.treatment_variant for r in partial.results} == {"treatment"}


def refusals(seed: str, rate: float) -> str:
    """A completion per row: a refusal (worded several ways) with probability `rate`, else an answer."""
    return (
        f"if({uniform(seed)} < {rate}, arrayElement(['I\\'m sorry, but I can\\'t help with that.', "
        "'I cannot share that.', 'As an AI, I won\u2019t do this.', '  i am unable to comply'], 1 + number % 4), "
        "'The capital of France is Paris.')"
    )


async def test_llm_refusal_rate_drift(env: Env) -> None:
    """The refusal column classifies completions in SQL; a jump from 2 % to 6 % refusals alerts."""
    await asyncio.to_thread(
        insert_predictions, env.client, model="chat", n=20_000, start=T0, seed="chat-ref",
        completion=refusals("chat-ref-r", 0.02),
    )
    hour = T0 + timedelta(hours=1)
    await asyncio.to_thread(
        insert_predictions, env.client, model="chat", n=20_000, start=hour, seed="chat-cur",
        completion=refusals("chat-cur-r", 0.06),
    )
    await env.stub.CreateReferenceProfile(
        drift_pb2.CreateReferenceProfileRequest(
            model="chat", window=window(T0), features=drift_pb2.FeatureSelection(columns=["refusal", "finish_reason"])
        )
    )
    reply = await env.stub.ComputeDrift(drift_pb2.ComputeDriftRequest(model="chat", window=window(hour)))
    status = {f.feature: f.status for f in reply.features}
    assert status == {"refusal": "alert", "finish_reason": "ok"}, status
    rate = next(r for r in reply.results if r.method == "refusal_rate")
    assert 0.035 < rate.statistic < 0.045 and rate.p_value < 1e-12  # 2 % -> 6 %
    assert rate.status == "alert"
    classified = await asyncio.to_thread(
        lambda: env.client.query(
            "SELECT if(match(completion, {pattern:String}), 'refused', 'answered') AS c, count() FROM predictions "
            "WHERE model = 'chat' AND started_at < {hour:DateTime64(3)} GROUP BY c ORDER BY c",
            parameters={"pattern": REFUSAL_PATTERN, "hour": hour},
        ).result_rows
    )
    counts = dict(classified)
    assert counts["refused"] + counts["answered"] == 20_000
    assert 0.015 < counts["refused"] / 20_000 < 0.025  # every wording of a refusal is caught


async def test_sample_size(env: Env) -> None:
    reply = await env.stub.SampleSize(drift_pb2.SampleSizeRequest(baseline_rate=0.05, relative_mde=0.1))
    assert reply.n_per_variant == 31_218 and reply.total == 62_436
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await env.stub.SampleSize(drift_pb2.SampleSizeRequest(baseline_rate=1.5, relative_mde=0.1))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
