"""`python -m bench.run`: the mesh side by side with direct Triton and MLServer, in one run.

Starts Triton, the mesh (gateway + router, own process) and MLServer on free loopback ports,
drives them from spawned grpc.aio client processes, prints one table (with ratios to direct
Triton and to MLServer) and the design's floor checks, and writes everything to
bench/results/bench-<timestamp>.json and bench/results/latest.json. With `--events` (or target
`gateway+events`) a second, identical mesh emits prediction events to a Tansu broker, so the
hot-path cost of emission is measured next to the plain gateway. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console

from bench import report
from bench.cpu import CpuMeter
from bench.load import KIND_GATEWAY, KIND_KSERVE, KIND_ROUTER, ClientPool, Target
from bench.stack import (
    MLSERVER_MODEL_NAME,
    MLSERVER_VENV,
    PUBLIC_LLM,
    PUBLIC_TABULAR,
    REPO_ROOT,
    TRITON_LLM,
    TRITON_TABULAR,
    Stack,
)

RESULTS_DIR = REPO_ROOT / "bench" / "results"
DEFAULT_TARGETS = (report.DIRECT, report.ROUTER, report.GATEWAY, report.MLSERVER)
# Opt-in: `gateway+events` (a second mesh emitting prediction events to Kafka; also --events) and
# `proxy` (bench/baseline_proxy.py, a bare Python aio pass-through, a yardstick).
ALL_TARGETS = (*DEFAULT_TARGETS, report.GATEWAY_EVENTS, report.PROXY)
DEFAULT_PROMPT = "What is the capital of France?"


class _Terminated(Exception):
    """SIGTERM/SIGHUP arrived: unwind like Ctrl-C so every server is stopped."""


def _raise_terminated(signum: int, _frame: object) -> None:
    raise _Terminated(signal.Signals(signum).name)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds per cell (default 8)")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds per cell (default 2)")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated in-flight requests (default 1,8,32)")
    parser.add_argument("--repeat", type=int, default=1, help="rounds over all cells; results are merged")
    parser.add_argument(
        "--targets",
        default=",".join(DEFAULT_TARGETS),
        help=f"subset of {','.join(ALL_TARGETS)} (default: all but gateway+events and proxy)",
    )
    parser.add_argument(
        "--events",
        action="store_true",
        help="add target gateway+events: a second mesh emitting prediction events to a Tansu broker",
    )
    parser.add_argument("--clients", type=int, default=1, help="load-generator processes (default 1)")
    parser.add_argument("--llm", choices=["tiny", "smollm2"], default="tiny", help="model behind `llm`")
    parser.add_argument("--stream-requests", type=int, default=20, help="generations per target (default 20)")
    parser.add_argument("--stream-warmup", type=int, default=2, help="unrecorded generations per target")
    parser.add_argument("--max-tokens", type=int, default=32, help="max_tokens per generation (default 32)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--no-stream", action="store_true", help="skip the streaming comparison")
    parser.add_argument(
        "--profile",
        choices=["none", "cprofile", "pyspy"],
        default="none",
        help="after the benchmark, profile the mesh process during an extra gateway window",
    )
    parser.add_argument("--profile-seconds", type=float, default=8.0)
    parser.add_argument("--pyspy-native", action="store_true", help="py-spy: include native (C/Cython) frames")
    parser.add_argument("--profile-concurrency", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="smoke run: ~1 s cells, 3 generations")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a floor check fails")
    parser.add_argument("--raw", action="store_true", help="also store every latency in the JSON")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--keep-workdir", action="store_true", help="keep logs/keys in the temp dir")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.warmup = min(args.duration, 1.0), min(args.warmup, 0.5)
        args.stream_requests, args.stream_warmup = min(args.stream_requests, 3), min(args.stream_warmup, 1)
        args.profile_seconds = min(args.profile_seconds, 2.0)
    args.concurrency_levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    args.target_list = [t.strip() for t in args.targets.split(",") if t.strip()]
    if args.events and report.GATEWAY_EVENTS not in args.target_list:
        args.target_list.append(report.GATEWAY_EVENTS)
    unknown = set(args.target_list) - set(ALL_TARGETS)
    if unknown or not args.target_list:
        parser.error(f"--targets: unknown {sorted(unknown)}; choose from {ALL_TARGETS}")
    if any(c < 1 for c in args.concurrency_levels) or not args.concurrency_levels:
        parser.error("--concurrency: positive integers")
    if args.duration <= 0 or args.warmup < 0 or args.repeat < 1 or args.clients < 1:
        parser.error("--duration > 0, --warmup >= 0, --repeat >= 1, --clients >= 1")
    return args


def _targets(stack: Stack, names: list[str]) -> dict[str, Target]:
    every = {
        report.DIRECT: Target(report.DIRECT, KIND_KSERVE, stack.triton_grpc, TRITON_TABULAR),
        report.ROUTER: Target(report.ROUTER, KIND_ROUTER, stack.router, PUBLIC_TABULAR),
        report.GATEWAY: Target(report.GATEWAY, KIND_GATEWAY, stack.gateway, PUBLIC_TABULAR, stack.api_key),
        report.GATEWAY_EVENTS: Target(
            report.GATEWAY_EVENTS, KIND_GATEWAY, stack.events_gateway, PUBLIC_TABULAR, stack.api_key
        ),
        report.MLSERVER: Target(report.MLSERVER, KIND_KSERVE, stack.mlserver, MLSERVER_MODEL_NAME),
        report.PROXY: Target(report.PROXY, KIND_KSERVE, stack.proxy, TRITON_TABULAR),
    }
    return {name: every[name] for name in names}


def _sample_features() -> bytes:
    """One real row of the held-out breast-cancer data, as 120 bytes of little-endian float32."""
    import numpy as np

    from services.common.model_build.tabular import load_data

    return np.ascontiguousarray(load_data().test_features[0], dtype="<f4").tobytes()


def _cpu_meter(stack: Stack, pool: ClientPool) -> CpuMeter:
    meter = CpuMeter()
    for name, pid in (
        ("triton", stack.triton_pid),
        ("mesh", stack.mesh_pid),
        ("mesh_events", stack.events_mesh_pid),
        ("tansu", stack.tansu_pid),
        ("mlserver", stack.mlserver_pid),
        ("proxy", stack.proxy_pid),
    ):
        if pid is not None:
            meter.process_groups[name] = pid  # each runs in its own session: pgid == pid
    meter.processes["clients"] = pool.pids
    meter.processes["harness"] = [os.getpid()]
    return meter


def _run_unary(
    console: Console,
    meter: CpuMeter,
    pool: ClientPool,
    targets: dict[str, Target],
    features: bytes,
    args: argparse.Namespace,
) -> dict[tuple[str, int], report.Cell]:
    cells: dict[tuple[str, int], report.Cell] = {}
    names = list(targets)
    total = args.repeat * len(args.concurrency_levels) * len(names)
    done = 0
    for round_index in range(args.repeat):
        for level_index, concurrency in enumerate(args.concurrency_levels):
            # Rotate the order so no target always runs first (or right after the same neighbour).
            shift = (round_index + level_index) % len(names)
            for name in names[shift:] + names[:shift]:
                before, wall = meter.snapshot(), time.monotonic()
                part = pool.unary(targets[name], features, concurrency, args.warmup, args.duration)
                cpu_s = meter.delta(before, meter.snapshot(), time.monotonic() - wall)
                cell = cells.setdefault((name, concurrency), report.Cell(name, concurrency))
                cell.add(part, cpu_s)
                done += 1
                stats = report.latency_stats(part.latencies_s)
                rps = len(part.latencies_s) / part.window_s if part.window_s else 0.0
                console.print(
                    f"  [{done}/{total}] {name:<14} c={concurrency:<3} "
                    f"p50 {stats.get('p50_ms', float('nan')):7.3f}  p99 {stats.get('p99_ms', float('nan')):7.3f} ms"
                    f"  {rps:8.0f} req/s  errors {part.errors + part.warmup_errors}"
                    f"  foreign CPU {cpu_s['foreign'] / cpu_s['wall']:.2f} cores",
                    highlight=False,
                )
    return cells


def _delivery_check(
    console: Console, stack: Stack, cells: dict[tuple[str, int], report.Cell], timeout_s: float = 60.0
) -> dict[str, Any]:
    """Reads the predictions topic from the start with a fresh consumer group and counts the
    events (and distinct prediction ids) against the requests sent to gateway+events."""
    from services.common.api import events_pb2
    from services.common.kafka import KafkaSettings, make_consumer

    sent_cells = [cell for (target, _), cell in cells.items() if target == report.GATEWAY_EVENTS]
    sent = sum(cell.requests_sent for cell in sent_cells)
    settings = KafkaSettings(bootstrap_servers=stack.kafka_bootstrap)
    group_id = f"bench-delivery-{uuid.uuid4().hex[:8]}"
    console.print(f"delivery check: reading {settings.predictions_topic} with group {group_id}", highlight=False)
    messages, ids = 0, set()
    started = time.monotonic()
    last_new = started
    consumer = make_consumer(settings, group_id, [settings.predictions_topic])
    try:
        # Until every request has its event and nothing new came for 2 s (duplicates), or the timeout.
        while time.monotonic() - started < timeout_s:
            batch = consumer.poll(timeout_ms=500)
            for records in batch.values():
                for record in records:
                    messages += 1
                    ids.add(events_pb2.PredictionEvent.FromString(record.value).prediction_id)
            if batch:
                last_new = time.monotonic()
            elif len(ids) >= sent and time.monotonic() - last_new >= 2.0:
                break
    finally:
        consumer.close()
    return {
        "topic": settings.predictions_topic,
        "group_id": group_id,
        "messages": messages,
        "distinct_prediction_ids": len(ids),
        "requests_sent": sent,
        "request_errors": sum(cell.errors + cell.warmup_errors for cell in sent_cells),
        "read_s": time.monotonic() - started,
    }


def _run_stream(
    console: Console, pool: ClientPool, stack: Stack, names: list[str], args: argparse.Namespace
) -> dict[str, Any] | None:
    stream_targets = [
        Target(report.DIRECT, KIND_KSERVE, stack.triton_grpc, TRITON_LLM),
        Target(report.GATEWAY, KIND_GATEWAY, stack.gateway, PUBLIC_LLM, stack.api_key),
    ]
    stream_targets = [t for t in stream_targets if t.name in names]
    if args.no_stream or not stream_targets:
        return None
    console.print(
        f"streaming: {args.stream_requests} generations x {len(stream_targets)} targets, "
        f"max_tokens {args.max_tokens}, alternating"
    )
    result = pool.stream(stream_targets, args.prompt, args.max_tokens, args.stream_warmup, args.stream_requests)
    return report.stream_summary(result, [t.name for t in stream_targets])


def _profile(
    console: Console,
    pool: ClientPool,
    stack: Stack,
    targets: dict[str, Target],
    features: bytes,
    args: argparse.Namespace,
) -> dict[str, Any] | None:
    if args.profile == "none" or report.GATEWAY not in targets:
        return None
    from bench import profiling

    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    console.print(f"profiling the mesh ({args.profile}) during gateway c={args.profile_concurrency}")
    if args.profile == "cprofile":
        assert stack.mesh_profile_path is not None
        return profiling.cprofile_window(
            stack, pool, targets[report.GATEWAY], features, args, args.results_dir / f"mesh-{stamp}.prof", console
        )
    return profiling.pyspy_window(
        stack, pool, targets[report.GATEWAY], features, args, args.results_dir / f"mesh-{stamp}", console
    )


def run(args: argparse.Namespace, console: Console) -> int:
    started = datetime.now(UTC)
    stamp = started.strftime("%Y%m%d-%H%M%S")
    workdir = Path(tempfile.mkdtemp(prefix="mlmesh-bench-"))
    stack = Stack(workdir, progress=lambda msg: console.print(f"[dim]{msg}[/dim]", highlight=False), llm=args.llm)
    pool: ClientPool | None = None
    succeeded = False
    previous = {sig: signal.signal(sig, _raise_terminated) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        machine = report.machine_info(REPO_ROOT, MLSERVER_VENV / "bin" / "python")
        cprofile_path = None
        if args.profile == "cprofile":
            args.results_dir.mkdir(parents=True, exist_ok=True)
            cprofile_path = args.results_dir / f".mesh-{stamp}.prof"
        stack.start(
            with_mlserver=report.MLSERVER in args.target_list,
            with_proxy=report.PROXY in args.target_list,
            mesh_cprofile=cprofile_path,
            with_events=report.GATEWAY_EVENTS in args.target_list,
        )
        features = _sample_features()
        targets = _targets(stack, args.target_list)
        pool = ClientPool(args.clients)
        console.print(
            f"stack up: Triton {stack.triton_version} {stack.triton_grpc} | router {stack.router} | "
            f"gateway {stack.gateway} | gateway+events {stack.events_gateway or '-'} "
            f"(Kafka {stack.kafka_bootstrap or '-'}) | MLServer {stack.mlserver or '-'} | client procs {args.clients} "
            f"| nproc {machine['nproc']}",
            highlight=False,
        )
        console.print(
            f"unary: {args.warmup:g} s warm-up + {args.duration:g} s per cell, c in {args.concurrency_levels}, "
            f"{args.repeat} round(s)"
        )
        cells = _run_unary(console, _cpu_meter(stack, pool), pool, targets, features, args)
        delivery = _delivery_check(console, stack, cells) if report.GATEWAY_EVENTS in targets else None
        stream = _run_stream(console, pool, stack, args.target_list, args)
        profile = _profile(console, pool, stack, targets, features, args)
        checks = report.floor_checks(cells, args.concurrency_levels, stream)
        if delivery:
            checks.append(report.delivery_check(delivery))
        console.print()
        report.render(console, cells, args.target_list, args.concurrency_levels, stream, checks, delivery)
        machine["loadavg_at_end"] = os.getloadavg()
        record = {
            "started_at": started.isoformat(),
            "finished_at": datetime.now(UTC).isoformat(),
            "command": [sys.executable, "-m", "bench.run", *sys.argv[1:]],
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "machine": machine,
            "servers": {
                "triton_version": stack.triton_version,
                "triton_grpc": stack.triton_grpc,
                "router": stack.router,
                "gateway": stack.gateway,
                "mlserver": stack.mlserver,
                "proxy": stack.proxy,
                "events_gateway": stack.events_gateway,
                "events_router": stack.events_router,
                "kafka_bootstrap": stack.kafka_bootstrap,
                "llm_dir": stack.llm_dir,
                "mesh_process": "python -m bench.mesh_entry (services.mesh: gateway+router in one process)",
            },
            "unary": [
                cells[(t, c)].summary(include_raw=args.raw)
                for c in args.concurrency_levels
                for t in args.target_list
                if (t, c) in cells
            ],
            "stream": stream,
            "events": {
                "emission_cost": report.emission_cost(cells, args.concurrency_levels),
                "delivery": delivery,
            }
            if delivery
            else None,
            "checks": [vars(check) for check in checks],
            "profile": profile,
        }
        path = report.write_json(record, args.results_dir, stamp)
        console.print(f"results: {path} (and {args.results_dir / 'latest.json'})", highlight=False)
        errors = any(c.status == "FAIL" and c.name == "errors == 0" for c in checks)
        failed = any(c.status == "FAIL" for c in checks)
        succeeded = True
        if errors:
            return 1
        return 1 if (args.strict and failed) else 0
    finally:
        # No second Ctrl-C may cut the cleanup short and leave servers behind.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        if pool is not None:
            pool.close()
        stack.close()
        if succeeded and not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            console.print(f"logs kept in {workdir}", highlight=False)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Even when started with SIGINT ignored (e.g. `cmd &` in a script), Ctrl-C must stop the servers.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # Wide enough for the ratio columns even when stdout is a pipe or a file.
    console = Console(width=max(Console().width, 160))
    started = time.monotonic()
    try:
        code = run(args, console)
    except (KeyboardInterrupt, _Terminated) as reason:
        console.print(f"interrupted ({type(reason).__name__}); every server was stopped", highlight=False)
        return 130
    console.print(f"total {time.monotonic() - started:.0f} s", highlight=False)
    return code


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
