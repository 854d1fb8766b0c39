"""Registry rules without servers: artifacts, audit chain, stages, traffic windows, triggers."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.common import errors
from services.common.api import routing_pb2
from services.registry import stages
from services.registry.artifacts import LocalArtifactStore, read_directory
from services.registry.audit import verify_chain
from services.registry.deployer import triton_name, validate_artifact
from services.registry.fleet import RouterFleet, Traffic
from services.registry.rollout import StepWindow, TriggerJudge, Triggers
from services.registry.store import RegistryStore

CONFIG = b'name: "x"\nbackend: "python"\nmax_batch_size: 8\n'


def test_artifacts_are_content_addressed_deduplicated_and_read_only(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    first = store.put({"config.pbtxt": CONFIG, "1/model.py": b"print(1)"})
    again = store.put({"1/model.py": b"print(1)", "config.pbtxt": CONFIG})
    changed = store.put({"config.pbtxt": CONFIG, "1/model.py": b"print(2)"})
    assert first.digest == again.digest != changed.digest
    blobs = [p for p in (tmp_path / "blobs").rglob("*") if p.is_file()]
    assert len(blobs) == 3  # the config is stored once for both versions
    assert all(p.stat().st_mode & 0o222 == 0 for p in blobs)
    assert store.read(first.digest) == {"config.pbtxt": CONFIG, "1/model.py": b"print(1)"}


def test_tampered_blob_is_detected_on_read(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    manifest = store.put({"config.pbtxt": CONFIG, "1/model.py": b"print(1)"})
    blob = next(p for p in (tmp_path / "blobs").rglob("*") if p.is_file() and p.read_bytes() == b"print(1)")
    blob.chmod(0o644)
    blob.write_bytes(b"print('evil')")
    with pytest.raises(errors.Internal, match="corrupt"):
        store.read(manifest.digest)


@pytest.mark.parametrize("bad_path", ["../escape.py", "/etc/passwd", ""])
def test_artifact_paths_must_stay_inside(tmp_path: Path, bad_path: str) -> None:
    with pytest.raises(errors.InvalidArgument, match="files"):
        LocalArtifactStore(tmp_path).put({bad_path: b"x", "config.pbtxt": CONFIG})


def test_read_directory_skips_caches(tmp_path: Path) -> None:
    (tmp_path / "1" / "__pycache__").mkdir(parents=True)
    (tmp_path / "1" / "__pycache__" / "model.cpython-311.pyc").write_bytes(b"junk")
    (tmp_path / "1" / "model.py").write_text("x = 1\n")
    (tmp_path / "config.pbtxt").write_bytes(CONFIG)
    assert sorted(read_directory(tmp_path)) == ["1/model.py", "config.pbtxt"]


def test_artifact_validation_names_the_problem() -> None:
    with pytest.raises(errors.InvalidArgument, match=r"config\.pbtxt"):
        validate_artifact({"1/model.py": b""})
    with pytest.raises(errors.InvalidArgument, match="version folder"):
        validate_artifact({"config.pbtxt": CONFIG})
    with pytest.raises(errors.InvalidArgument, match="does not parse"):
        validate_artifact({"config.pbtxt": b"name: [", "1/model.py": b""})
    assert triton_name("tabular-classifier", 3) == "tabular_classifier_v3"


def test_stage_transitions() -> None:
    stages.check_transition(stages.DEVELOPMENT, stages.STAGING)
    stages.check_transition(stages.STAGING, stages.PRODUCTION)
    stages.check_transition(stages.CANARY, stages.PRODUCTION)
    stages.check_transition(stages.PRODUCTION, stages.ARCHIVED, replacing_production=True)
    with pytest.raises(errors.FailedPrecondition, match="cannot move from development to production"):
        stages.check_transition(stages.DEVELOPMENT, stages.PRODUCTION)
    with pytest.raises(errors.FailedPrecondition, match="another version replaces it"):
        stages.check_transition(stages.PRODUCTION, stages.ARCHIVED)
    with pytest.raises(errors.FailedPrecondition, match="already in staging"):
        stages.check_transition(stages.STAGING, stages.STAGING)
    with pytest.raises(errors.InvalidArgument, match="unknown stage 'prod'"):
        stages.check_transition(stages.STAGING, "prod")


def _sqlite_store(tmp_path: Path) -> RegistryStore:
    return RegistryStore(f"sqlite:///{tmp_path / 'registry.db'}")


def test_audit_chain_detects_edits_and_deletions(tmp_path: Path) -> None:
    store = _sqlite_store(tmp_path)
    with store.transaction() as conn:
        for i in range(5):
            store.append_audit(conn, "alice", "register", "m", f"reason {i}", {"version": i})
    with store.transaction() as conn:
        entries = store.audit_entries(conn)
    assert verify_chain(entries).ok and verify_chain(entries).entries == 5

    with store.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE audit_log SET reason = 'nothing to see' WHERE seq = 3")
    with store.transaction() as conn:
        verdict = verify_chain(store.audit_entries(conn))
    assert not verdict.ok and verdict.first_bad_seq == 3 and "modified" in verdict.problem

    with store.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE audit_log SET reason = 'reason 2' WHERE seq = 3")
        conn.exec_driver_sql("DELETE FROM audit_log WHERE seq = 2")
    with store.transaction() as conn:
        verdict = verify_chain(store.audit_entries(conn))
    assert not verdict.ok and verdict.first_bad_seq == 2 and "missing" in verdict.problem
    store.close()


def _counters(variant: str, version: str, requests: int, errors_: int, latencies: list[int]) -> routing_pb2.TargetCounters:
    return routing_pb2.TargetCounters(
        model="m", variant=variant, model_version=version, requests=requests, errors=errors_,
        latency_bounds_ms=[1, 2, 5, 10, 20, 50, 100], latency_counts=latencies,
    )


async def test_fleet_windows_subtract_the_baseline_and_survive_router_restarts() -> None:
    fleet = RouterFleet()
    keys = [("canary", "2")]
    await fleet.report(routing_pb2.RouterMetricsReport(
        router_id="r1", table_version=4, uptime_s=10, counters=[_counters("canary", "2", 100, 5, [0, 100, 0, 0, 0, 0, 0, 0])]
    ))
    baseline = fleet.snapshot("m", keys)
    await fleet.report(routing_pb2.RouterMetricsReport(
        router_id="r1", table_version=4, uptime_s=20, counters=[_counters("canary", "2", 150, 15, [0, 100, 0, 0, 50, 0, 0, 0])]
    ))
    window = fleet.since("m", ("canary", "2"), baseline)
    assert (window.requests, window.errors) == (50, 10)
    assert 10 < window.latency_quantile_ms(0.95) <= 20  # all 50 new requests took 10-20 ms
    # A restarted router (counters reset) counts from zero, not negative.
    await fleet.report(routing_pb2.RouterMetricsReport(
        router_id="r1", table_version=4, uptime_s=1, counters=[_counters("canary", "2", 7, 1, [7, 0, 0, 0, 0, 0, 0, 0])]
    ))
    assert fleet.since("m", ("canary", "2"), baseline).requests == 7
    assert await fleet.wait_applied(4, 0.1) and not await fleet.wait_applied(5, 0.1)


def _traffic(requests: int, errors_: int, bucket: int) -> Traffic:
    counts = [0] * 8
    counts[bucket] = requests
    return Traffic(requests=requests, errors=errors_, bounds_ms=(1, 2, 5, 10, 20, 50, 100), counts=counts)


def test_trigger_judge() -> None:
    judge = TriggerJudge(Triggers(max_error_rate=0.05, max_latency_p95_ms=0, max_latency_ratio=3.0))
    healthy = _traffic(200, 2, 1)
    # Clearly failing: the whole Wilson interval is above 5% -> roll back before the step ends.
    early = judge.judge(StepWindow(_traffic(30, 12, 1), healthy, 1.0, 60.0, 100))
    assert early.rollback and "error rate" in early.reasons[0]
    # A couple of errors in few requests is not yet evidence.
    assert not judge.judge(StepWindow(_traffic(30, 2, 1), healthy, 1.0, 60.0, 100)).rollback
    # 10x slower than stable at a complete step.
    slow = judge.judge(StepWindow(_traffic(150, 0, 5), _traffic(150, 0, 1), 61.0, 60.0, 100))
    assert slow.rollback and "stable" in slow.reasons[0]
    assert not judge.judge(StepWindow(_traffic(150, 1, 1), _traffic(150, 1, 1), 61.0, 60.0, 100)).rollback


def test_requests_an_open_breaker_sent_to_stable_count_against_the_canary() -> None:
    judge = TriggerJudge(Triggers(max_error_rate=0.05, max_latency_p95_ms=0, max_latency_ratio=0))
    # 5 real errors, then the breaker opened: 195 requests answered by stable as fallbacks.
    canary = Traffic(requests=200, errors=5, fallbacks=200, bounds_ms=(1,), counts=[200, 0])
    assert canary.failed == 200 and canary.error_rate == 1.0
    assert judge.judge(StepWindow(canary, _traffic(200, 0, 1), 1.0, 60.0, 100)).rollback
