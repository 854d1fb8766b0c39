"""Router experiments against the real Triton: variant split, fallback, breaker, shadow traffic,
table swaps under load, and routing tables from the registry watch (cache, stream, reconnects).

Extra copies of the tabular model are loaded into the session's Triton under other names, with
the model's fault knobs: `tabular_canary` (healthy), `tabular_bad` (every batch fails) and
`tabular_slow` (every batch takes SLOW_MS).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from services.common import errors
from services.common.api import (
    common_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
    router_pb2,
    router_pb2_grpc,
    routing_pb2,
)
from services.common.domain import GenerateInput, PredictInput, RequestContext, TensorData
from services.common.net import free_port
from services.common.routing import (
    HOLDOUT_VARIANT,
    STABLE_VARIANT,
    Experiment,
    ModelRoute,
    RouteTable,
    RouteTarget,
    Shadow,
    Variant,
    table_to_dict,
    table_to_proto,
)
from services.common.triton_server import TritonServer
from services.gateway.events import prediction_event
from services.gateway.hooks import CompletedRequest, GatewayHook
from services.gateway.keys import KeyStore
from services.gateway.settings import GatewaySettings, TenantLimits
from services.mesh import start_mesh
from services.router.assignment import assign
from services.router.breaker import OPEN, BreakerConfig
from services.router.client import GrpcRouterClient
from services.router.core import RouterCore
from services.router.settings import RouterSettings
from services.router.shadow import ShadowResult
from services.router.triton import TritonBackend
from services.router.watch import RegistryWatcher, load_cached_table
from tests.integration.model_copies import loaded_copies

pytestmark = pytest.mark.integration

MODEL = "tabular-classifier"
SLOW_MS = 300
STABLE = RouteTarget("tabular_classifier", "", "1")
CANARY = RouteTarget("tabular_canary", "", "2")
BAD = RouteTarget("tabular_bad", "", "2")
SLOW = RouteTarget("tabular_slow", "", "3")
LLM = RouteTarget("llm", "", "1")
NO_BREAKER = BreakerConfig(failure_threshold=0, failure_rate=0.0)
COPIES = {
    "tabular_canary": {},
    "tabular_bad": {"fault_error_rate": "1.0"},
    "tabular_slow": {"fault_delay_ms": str(SLOW_MS)},
}


@pytest.fixture(scope="module")
async def copies(triton: TritonServer) -> AsyncIterator[None]:
    async with loaded_copies(triton.grpc_url, COPIES):
        yield


def features(rows: int = 1, seed: int = 0) -> np.ndarray:
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer().data.astype(np.float32)
    return data[np.random.default_rng(seed).choice(len(data), rows, replace=False)]


X = features()


def predict_input(unit_id: str = "", request_id: str = "") -> PredictInput:
    tensor = TensorData("features", "FP32", X.shape, X.astype("<f4").tobytes())
    return PredictInput(MODEL, [tensor], request_id=request_id, unit_id=unit_id)


_ids = iter(range(10**9))


def ctx(timeout_s: float = 10.0) -> RequestContext:
    return RequestContext(f"{next(_ids):032x}", "test", timeout_s)


def table(version: int, *routes: ModelRoute) -> RouteTable:
    return RouteTable(version, routes)


def tabular(
    stable: RouteTarget = STABLE, experiment: Experiment | None = None, shadows: tuple[Shadow, ...] = ()
) -> ModelRoute:
    return ModelRoute(MODEL, "tabular", stable, experiment, shadows)


def split(canary: RouteTarget, weight: float = 0.5, holdout: float = 0.0, name: str = "exp") -> Experiment:
    return Experiment(
        name, f"{name}-salt", (Variant("canary", canary, weight), Variant(STABLE_VARIANT, STABLE, 1 - weight)), holdout
    )


def units_of(experiment: Experiment, variant: str, count: int, prefix: str = "u") -> list[str]:
    found, i = [], 0
    while len(found) < count:
        unit = f"{prefix}{i}"
        if assign(experiment, unit, STABLE)[0] == variant:
            found.append(unit)
        i += 1
    return found


class Recorder:
    def __init__(self) -> None:
        self.results: list[ShadowResult] = []

    def on_shadow_result(self, result: ShadowResult) -> None:
        self.results.append(result)


@pytest.fixture
async def make_core(triton: TritonServer, copies: None) -> AsyncIterator:
    cores: list[RouterCore] = []

    async def make(first: RouteTable, **kwargs: object) -> RouterCore:
        core = RouterCore(TritonBackend(triton.grpc_url), table(0), **kwargs)  # type: ignore[arg-type]
        assert await core.apply_table(first)
        cores.append(core)
        return core

    yield make
    for core in cores:
        await core.close()


# -- assignment, visible in ServedBy --


async def test_variant_split_is_visible_in_served_by(make_core) -> None:
    exp = split(CANARY, weight=0.5, holdout=0.2)
    core = await make_core(table(1, tabular(experiment=exp)))
    units = [f"user-{i}" for i in range(150)]
    results = await asyncio.gather(*(core.predict(ctx(), predict_input(unit)) for unit in units))
    versions = {"canary": "2", STABLE_VARIANT: "1", HOLDOUT_VARIANT: "1"}
    seen = set()
    for unit, result in zip(units, results, strict=True):
        variant = assign(exp, unit, STABLE)[0]
        assert (result.served_by.experiment, result.served_by.variant) == ("exp", variant)
        assert result.served_by.model_version == versions[variant]
        seen.add(variant)
    assert seen == {"canary", STABLE_VARIANT, HOLDOUT_VARIANT}
    # Sticky: the same units again get the same variants.
    again = await asyncio.gather(*(core.predict(ctx(), predict_input(unit)) for unit in units[:30]))
    assert [r.served_by for r in again] == [r.served_by for r in results[:30]]
    # No unit id: the caller's request id decides, else the prediction id.
    by_request = await core.predict(ctx(), predict_input(request_id=units[0]))
    assert by_request.served_by == results[0].served_by
    c = ctx()
    no_ids = await core.predict(c, predict_input())
    assert no_ids.served_by.variant == assign(exp, c.prediction_id, STABLE)[0]
    # Counters per variant.
    canary = core.metrics.get(MODEL, "exp", "canary", "2")
    assert canary is not None and canary.requests == sum(assign(exp, u, STABLE)[0] == "canary" for u in units) + sum(
        assign(exp, u, STABLE)[0] == "canary" for u in units[:30]
    ) + (by_request.served_by.variant == "canary") + (no_ids.served_by.variant == "canary")
    assert canary.errors == canary.fallbacks == canary.in_flight == 0


async def test_route_without_experiment_reports_no_variant(make_core) -> None:
    core = await make_core(table(1, tabular()))
    result = await core.predict(ctx(), predict_input("someone"))
    assert (result.served_by.experiment, result.served_by.variant, result.served_by.model_version) == ("", "", "1")
    stable = core.metrics.get(MODEL, "", STABLE_VARIANT, "1")
    assert stable is not None and stable.requests == 1 and sum(stable.latency_counts or []) == 1


# -- fallback and circuit breaker --


async def test_failing_canary_falls_back_to_stable_with_no_failed_request(make_core) -> None:
    exp = split(BAD, weight=0.5)
    core = await make_core(table(1, tabular(experiment=exp)), breaker=NO_BREAKER)
    units = [f"user-{i}" for i in range(60)]
    results = await asyncio.gather(*(core.predict(ctx(), predict_input(unit)) for unit in units))
    assigned_canary = sum(assign(exp, unit, STABLE)[0] == "canary" for unit in units)
    assert 0 < assigned_canary < len(units)
    # Every request answered, by stable, and the response says so.
    assert {(r.served_by.variant, r.served_by.model_version) for r in results} == {(STABLE_VARIANT, "1")}
    assert all(r.outputs for r in results)
    canary = core.metrics.get(MODEL, "exp", "canary", "2")
    assert canary is not None
    assert canary.requests == canary.errors == canary.fallbacks == assigned_canary
    stable = core.metrics.get(MODEL, "exp", STABLE_VARIANT, "1")
    assert stable is not None and stable.requests == len(units) and stable.errors == 0


async def test_breaker_opens_and_sends_the_canary_straight_to_stable(make_core) -> None:
    exp = split(BAD, weight=0.5)
    config = BreakerConfig(failure_threshold=3, failure_rate=0.0, cooldown_s=0.5)
    core = await make_core(table(1, tabular(experiment=exp)), breaker=config)
    canary_units = units_of(exp, "canary", 20)
    for unit in canary_units:  # sequential: the breaker sees each outcome before the next call
        result = await core.predict(ctx(), predict_input(unit))
        assert result.served_by.variant == STABLE_VARIANT
    canary = core.metrics.get(MODEL, "exp", "canary", "2")
    assert canary is not None
    assert canary.errors == 3  # then the target was not called any more
    assert canary.fallbacks == canary.requests == 20
    breaker = core.breaker(BAD)
    assert breaker is not None and breaker.state == OPEN
    # After the cooldown one probe goes to the target; it fails, so the breaker opens again.
    await asyncio.sleep(0.6)
    for unit in canary_units[:5]:
        assert (await core.predict(ctx(), predict_input(unit))).served_by.variant == STABLE_VARIANT
    assert canary.errors == 4 and breaker.state == OPEN and breaker.opens == 2
    # A table swap keeps the open breaker of a target that is still routed.
    assert await core.apply_table(table(2, tabular(experiment=split(BAD, weight=0.3))))
    assert core.breaker(BAD) is breaker


async def test_client_errors_are_not_retried_on_stable(make_core) -> None:
    exp = split(CANARY, weight=1.0)
    core = await make_core(table(1, tabular(experiment=exp)))
    bad_shape = PredictInput(MODEL, [TensorData("features", "FP32", (1, 29), b"\0" * 29 * 4)], unit_id="u1")
    with pytest.raises(errors.InvalidArgument):
        await core.predict(ctx(), bad_shape)
    canary = core.metrics.get(MODEL, "exp", "canary", "2")
    assert canary is not None and canary.errors == 1 and canary.fallbacks == 0
    stable = core.metrics.get(MODEL, "exp", STABLE_VARIANT, "1")
    assert stable is None or stable.requests == 0


async def test_generate_falls_back_before_the_first_token(make_core) -> None:
    missing = RouteTarget("llm_not_loaded", "", "9")
    exp = Experiment("llm-exp", "s", (Variant("canary", missing, 1.0),))
    core = await make_core(table(1, ModelRoute("llm", "llm", LLM, exp)), breaker=NO_BREAKER)
    chunks = [c async for c in core.generate(ctx(30), GenerateInput("llm", "Hello there", max_tokens=4))]
    assert chunks and chunks[-1].finish_reason
    assert {(c.served_by.experiment, c.served_by.variant, c.served_by.model_version) for c in chunks} == {
        ("llm-exp", STABLE_VARIANT, "1")
    }
    canary = core.metrics.get("llm", "llm-exp", "canary", "9")
    assert canary is not None and canary.errors == canary.fallbacks == 1


# -- shadow traffic --


async def _latencies(core: RouterCore, count: int) -> list[float]:
    latencies = []
    for i in range(count):
        started = time.perf_counter()
        await core.predict(ctx(), predict_input(f"user-{i}"))
        latencies.append(time.perf_counter() - started)
    return latencies


async def test_shadow_is_marked_and_never_slows_the_caller(make_core) -> None:
    recorder = Recorder()
    baseline = await make_core(table(1, tabular()))
    shadowed = await make_core(
        table(1, tabular(shadows=(Shadow("candidate", SLOW, 1.0),))), observer=recorder, shadow_max_in_flight=8
    )
    await _latencies(baseline, 5)  # warm both paths
    await _latencies(shadowed, 1)
    await shadowed.wait_shadows()
    recorder.results.clear()
    base = statistics.median(await _latencies(baseline, 30))
    with_shadow = statistics.median(await _latencies(shadowed, 30))
    # An awaited shadow would cost SLOW_MS per request; the caller sees the stable target's latency.
    assert with_shadow < max(5 * base, base + 0.02), (base, with_shadow)
    assert with_shadow < SLOW_MS / 1000 / 3
    assert shadowed.shadow_in_flight > 0  # still running after the callers got their answers
    await shadowed.wait_shadows()
    series = shadowed.metrics.get(MODEL, "", "candidate", "3", shadow=True)
    assert series is not None
    # At most 8 copies in flight: the rest were dropped and counted, never queued.
    assert series.dropped > 0 and series.requests + series.dropped == 31
    assert len(recorder.results) == series.requests - 1  # the warm-up one was cleared
    for result in recorder.results:
        assert (result.served_by.variant, result.served_by.model_version) == ("candidate", "3")
        assert result.error is None and result.outputs and result.latency_ms >= SLOW_MS * 0.9
    # The caller's own series never counts the shadow.
    assert shadowed.metrics.get(MODEL, "", STABLE_VARIANT, "1").requests == 31  # type: ignore[union-attr]


async def test_shadow_errors_are_swallowed_and_counted(make_core) -> None:
    recorder = Recorder()
    core = await make_core(table(1, tabular(shadows=(Shadow("bad", BAD, 1.0),))), observer=recorder)
    results = await asyncio.gather(*(core.predict(ctx(), predict_input(f"u{i}")) for i in range(10)))
    assert all(r.served_by.model_version == "1" for r in results)
    await core.wait_shadows()
    series = core.metrics.get(MODEL, "", "bad", "2", shadow=True)
    assert series is not None and series.requests == series.errors == 10
    assert {r.status for r in recorder.results} == {"INTERNAL"}


async def test_shadow_sampling_fraction(make_core) -> None:
    core = await make_core(table(1, tabular(shadows=(Shadow("half", CANARY, 0.5),))))
    await asyncio.gather(*(core.predict(ctx(), predict_input()) for _ in range(200)))
    await core.wait_shadows()
    series = core.metrics.get(MODEL, "", "half", "2", shadow=True)
    assert series is not None and 60 < series.requests < 140


async def test_generate_shadow_drains_the_stream(make_core) -> None:
    recorder = Recorder()
    core = await make_core(
        table(1, ModelRoute("llm", "llm", LLM, shadows=(Shadow("copy", LLM, 1.0),))), observer=recorder
    )
    chunks = [c async for c in core.generate(ctx(30), GenerateInput("llm", "Hi", max_tokens=4, seed=1))]
    await core.wait_shadows()
    assert [r.rpc for r in recorder.results] == ["Generate"]
    shadow = recorder.results[0]
    assert shadow.served_by.variant == "copy" and shadow.error is None and shadow.finish_reason
    assert shadow.completion_text == "".join(c.text for c in chunks)  # same seed, same model


async def test_close_cancels_shadows_in_flight(triton: TritonServer, copies: None) -> None:
    core = RouterCore(TritonBackend(triton.grpc_url), table(1, tabular(shadows=(Shadow("slow", SLOW, 1.0),))))
    await core.refresh_model_info()
    await core.predict(ctx(), predict_input())
    assert core.shadow_in_flight == 1
    await core.close()
    assert core.shadow_in_flight == 0


# -- table swaps --


async def test_apply_table_swaps_under_concurrent_load_without_a_failed_request(make_core) -> None:
    core = await make_core(table(1, tabular()))
    seen: set[tuple[str, str, str]] = set()
    failures: list[BaseException] = []
    stop = asyncio.Event()

    async def worker(n: int) -> None:
        i = 0
        while not stop.is_set():
            try:
                result = await core.predict(ctx(), predict_input(f"w{n}-{i}"))
                seen.add((result.served_by.model_version, result.served_by.experiment, result.served_by.variant))
            except Exception as exc:
                failures.append(exc)
            i += 1

    workers = [asyncio.create_task(worker(n)) for n in range(8)]
    tables = [
        table(2, tabular(stable=CANARY)),
        table(3, tabular(experiment=split(CANARY, 0.5))),
        table(4, tabular(shadows=(Shadow("slow", SLOW, 0.2),))),
        table(5, tabular()),
    ]
    for next_table in tables:
        await asyncio.sleep(0.4)
        assert await core.apply_table(next_table)
        # The new targets' contracts are known before the swap (batched from the first request).
        for target in next_table.routes[0].targets():
            info = core.target_info(target)
            assert info is not None and info.batchable
    assert not await core.apply_table(table(3, tabular(stable=BAD)))  # older: ignored
    await asyncio.sleep(0.4)
    stop.set()
    await asyncio.gather(*workers)
    assert not failures, failures[:3]
    assert core.table_version == 5
    assert seen == {("1", "", ""), ("2", "", ""), ("2", "exp", "canary"), ("1", "exp", STABLE_VARIANT)}


# -- routing tables from the registry --


EXPERIMENT_TABLE = table(7, tabular(experiment=split(CANARY, 0.5, name="cached-exp")))


async def test_cached_table_is_served_when_the_registry_is_unreachable(
    make_core, tmp_path: Path, triton: TritonServer, copies: None
) -> None:
    cache = tmp_path / "router-table.json"
    cache.write_text(json.dumps(table_to_dict(EXPERIMENT_TABLE)))
    core = RouterCore(TritonBackend(triton.grpc_url), RouterSettings(routes={}).static_table())
    watcher = RegistryWatcher(f"127.0.0.1:{free_port()}", "r1", core, cache, 0.1, backoff_max_s=0.2)
    try:
        await watcher.start()
        assert core.table_version == 7
        result = await core.predict(ctx(), predict_input("user-1"))
        assert result.served_by.experiment == "cached-exp"
        await asyncio.sleep(1.0)
        assert watcher.connect_attempts >= 3 and not watcher.connected and watcher.reports_sent == 0
        assert watcher.last_error.startswith("UNAVAILABLE")
        # Still serving from the cached table while the registry stays away.
        results = await asyncio.gather(*(core.predict(ctx(), predict_input(f"u{i}")) for i in range(20)))
        assert {r.served_by.experiment for r in results} == {"cached-exp"}
        assert load_cached_table(cache) == EXPERIMENT_TABLE  # untouched
    finally:
        await watcher.stop()
        await core.close()


class FakeRegistry(registry_pb2_grpc.RegistryServicer):
    """Only the two router-facing RPCs, with tables pushed by the test (the real registry's live
    watch test lives with the registry)."""

    def __init__(self) -> None:
        self.tables: asyncio.Queue[routing_pb2.RoutingTable] = asyncio.Queue()
        self.watch_requests: list[registry_pb2.WatchRoutesRequest] = []
        self.reports: list[routing_pb2.RouterMetricsReport] = []

    async def WatchRoutes(self, request, context):
        self.watch_requests.append(request)
        while True:
            yield await self.tables.get()

    async def ReportRouterMetrics(self, request, context):
        self.reports.append(request)
        return registry_pb2.ReportRouterMetricsResponse()


async def start_fake_registry(registry: FakeRegistry, port: int) -> grpc.aio.Server:
    server = grpc.aio.server()
    registry_pb2_grpc.add_RegistryServicer_to_server(registry, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server


async def eventually(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_watcher_applies_pushed_tables_caches_them_reports_and_reconnects(
    tmp_path: Path, triton: TritonServer, copies: None
) -> None:
    port = free_port()
    registry = FakeRegistry()
    server = await start_fake_registry(registry, port)
    cache = tmp_path / "cache" / "table.json"
    core = RouterCore(TritonBackend(triton.grpc_url), table(0, tabular()))
    await core.refresh_model_info()
    watcher = RegistryWatcher(f"127.0.0.1:{port}", "router-a", core, cache, 0.1, backoff_max_s=0.3)
    try:
        await watcher.start()
        await eventually(lambda: registry.watch_requests)
        assert (registry.watch_requests[0].router_id, registry.watch_requests[0].known_version) == ("router-a", 0)
        registry.tables.put_nowait(table_to_proto(table(3, tabular(experiment=split(CANARY, 0.5)))))
        await eventually(lambda: core.table_version == 3)
        assert watcher.connected
        assert load_cached_table(cache) == table(3, tabular(experiment=split(CANARY, 0.5)))
        await asyncio.gather(*(core.predict(ctx(), predict_input(f"u{i}")) for i in range(20)))
        await eventually(lambda: any(r.table_version == 3 and r.counters for r in registry.reports))
        report = registry.reports[-1]
        assert report.router_id == "router-a" and report.uptime_s > 0
        by_variant = {(c.experiment, c.variant): c for c in report.counters if c.model == MODEL}
        assert sum(c.requests for c in by_variant.values()) == 20
        assert by_variant[("exp", "canary")].model_version == "2"

        # The registry goes away: serving goes on from the last table.
        await server.stop(grace=None)
        await eventually(lambda: not watcher.connected)
        results = await asyncio.gather(*(core.predict(ctx(), predict_input(f"u{i}")) for i in range(10)))
        assert {r.served_by.experiment for r in results} == {"exp"}

        # It comes back: the router reconnects, telling the registry which table it has.
        registry.watch_requests.clear()
        server = await start_fake_registry(registry, port)
        await eventually(lambda: registry.watch_requests)
        assert registry.watch_requests[-1].known_version == 3
        registry.tables.put_nowait(table_to_proto(table(2, tabular(stable=BAD))))  # older: ignored
        registry.tables.put_nowait(table_to_proto(table(4, tabular(stable=CANARY))))
        await eventually(lambda: core.table_version == 4)
        assert (await core.predict(ctx(), predict_input("x"))).served_by.model_version == "2"
        assert load_cached_table(cache) == table(4, tabular(stable=CANARY))
    finally:
        await watcher.stop()
        await core.close()
        await server.stop(grace=None)


# -- end to end: experiment and variant reach responses and events --


class CaptureHook(GatewayHook):
    def __init__(self) -> None:
        self.records: list[CompletedRequest] = []

    def on_complete(self, record: CompletedRequest) -> None:
        self.records.append(record)


async def test_served_by_reaches_clients_and_events_end_to_end(
    tmp_path: Path, triton: TritonServer, copies: None
) -> None:
    exp = split(CANARY, 0.5, name="e2e-exp")
    cache = tmp_path / "router-table.json"
    cache.write_text(json.dumps(table_to_dict(table(9, tabular(experiment=exp), ModelRoute("llm", "llm", LLM)))))
    keys_db = tmp_path / "keys.db"
    api_key = KeyStore(keys_db).create("exp", TenantLimits(requests_per_s=10_000, burst=10_000)).api_key
    mesh = await start_mesh(
        {"gateway", "router"},
        GatewaySettings(port=free_port(), keys_db=keys_db),
        RouterSettings(
            port=free_port(),
            triton_url=triton.grpc_url,
            registry_address=f"127.0.0.1:{free_port()}",  # nothing listens: the cache is served
            table_cache_path=cache,
            metrics_report_interval_s=0.2,
        ),
    )
    hook = CaptureHook()
    assert mesh.gateway is not None and mesh.router is not None
    mesh.gateway.hooks.append(hook)
    router_client = GrpcRouterClient(mesh.address("router"))
    try:
        assert mesh.router.table_version == 9
        await mesh.gateway.refresh_models()
        metadata = [("authorization", f"Bearer {api_key}")]
        tensor = common_pb2.Tensor(name="features", dtype="FP32", shape=[1, 30], raw_data=X.astype("<f4").tobytes())
        async with (
            grpc.aio.insecure_channel(mesh.address("gateway")) as gateway_channel,
            grpc.aio.insecure_channel(mesh.address("router")) as router_channel,
        ):
            gateway = gateway_pb2_grpc.GatewayStub(gateway_channel)
            router = router_pb2_grpc.RouterStub(router_channel)
            for unit in ("alice", "bob", "carol", "dave"):
                variant = assign(exp, unit, STABLE)[0]
                request = gateway_pb2.PredictRequest(model=MODEL, inputs=[tensor], unit_id=unit)
                # Public API (gateway, co-hosted router).
                response = await gateway.Predict(request, metadata=metadata, timeout=10)
                assert (response.served_by.experiment, response.served_by.variant) == ("e2e-exp", variant)
                assert response.served_by.model_version == ("2" if variant == "canary" else "1")
                # Internal API (router over gRPC) and its client.
                routed = await router.Predict(
                    router_pb2.RoutePredictRequest(
                        context=router_pb2.RouteContext(prediction_id="p-" + unit, tenant="t"), request=request
                    ),
                    timeout=10,
                )
                assert routed.served_by == response.served_by
                via_client = await router_client.predict(ctx(), predict_input(unit))
                assert (via_client.served_by.experiment, via_client.served_by.variant) == ("e2e-exp", variant)
            chunks = [
                c
                async for c in gateway.Generate(
                    gateway_pb2.GenerateRequest(
                        model="llm", prompt="Hi", params=common_pb2.GenerationParams(max_tokens=3), unit_id="alice"
                    ),
                    metadata=metadata,
                    timeout=30,
                )
            ]
            assert chunks[0].served_by.model == "llm" and chunks[0].served_by.model_version == "1"
        # Events built from what the gateway saw carry experiment and variant.
        predicted = [r for r in hook.records if r.rpc == "Predict"]
        assert len(predicted) == 4
        for record in predicted:
            event = prediction_event(record, 8)
            assert event.experiment == "e2e-exp"
            assert event.variant == assign(exp, record.request.unit_id, STABLE)[0]
    finally:
        await router_client.close()
        await mesh.stop()
