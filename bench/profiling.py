"""Where the mesh process spends its time under gateway load (cProfile window or py-spy).

cProfile: the mesh runs as `python -m bench.mesh_entry` with MLMESH_BENCH_CPROFILE set; SIGUSR1
starts the profiler, SIGUSR2 stops it and writes the stats. py-spy (installed in .venv-mlserver
by bench/setup_mlserver.sh) samples the running process from outside, without touching it.
Both summaries group time by area (gRPC, protobuf, OpenTelemetry, asyncio, mesh code, ...).
"""

from __future__ import annotations

import argparse
import collections
import os
import pstats
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.load import ClientPool, Target
from bench.report import latency_stats
from bench.stack import MLSERVER_VENV, Stack

# First match wins; matched against "file:function" of a frame.
AREAS: list[tuple[str, re.Pattern[str]]] = [
    # cProfile cannot see into Cython/C: gRPC's aio core and asyncio's C Task steps run inside
    # the event loop's Context.run calls and show up as its self time.
    ("gRPC Cython/C + asyncio C (inside loop callbacks)", re.compile(r"_contextvars\.Context")),
    ("epoll wait (idle or I/O)", re.compile(r"select\.epoll|EpollSelector\.select|epoll_wait")),
    ("mesh: gateway", re.compile(r"services/gateway/")),
    ("mesh: router", re.compile(r"services/router/")),
    ("mesh: server kit (interceptor, errors)", re.compile(r"services/common/(server|errors)\.py")),
    ("mesh: telemetry helpers", re.compile(r"services/common/telemetry\.py")),
    ("mesh: convert/domain", re.compile(r"services/common/(convert|domain)\.py")),
    ("opentelemetry", re.compile(r"opentelemetry")),
    ("protobuf", re.compile(r"google/protobuf|protobuf|SerializeToString|FromString|ParseFromString|MergeFrom")),
    ("grpc (aio / cygrpc)", re.compile(r"grpc|cygrpc|_cython")),
    ("asyncio / event loop", re.compile(r"asyncio|selectors|select\.epoll|_run_once|uvloop")),
    ("uuid / hashlib / time", re.compile(r"uuid|hashlib|sha256|perf_counter|time\.time|monotonic")),
    ("logging", re.compile(r"logging/")),
]
OTHER = "other"


def area_of(location: str) -> str:
    for name, pattern in AREAS:
        if pattern.search(location):
            return name
    return OTHER


def _short(location: str) -> str:
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in location:
            return location.split(marker, 1)[1]
    return location


def _run_load(pool: ClientPool, target: Target, features: bytes, args: argparse.Namespace) -> dict[str, Any]:
    part = pool.unary(target, features, args.profile_concurrency, 0.5, args.profile_seconds)
    stats = latency_stats(part.latencies_s)
    return {
        # The profiler sees warm-up requests too: normalise by everything that was served.
        "requests_total": len(part.latencies_s) + part.warmup_requests,
        "requests": len(part.latencies_s),
        "rps": len(part.latencies_s) / part.window_s if part.window_s else 0.0,
        "p50_ms": stats.get("p50_ms"),
        "p99_ms": stats.get("p99_ms"),
        "errors": part.errors,
    }


def _print_table(console: Console, title: str, rows: list[tuple[str, ...]], columns: tuple[str, ...]) -> None:
    table = Table(title=title)
    for index, column in enumerate(columns):
        table.add_column(column, justify="left" if index == len(columns) - 1 else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)


def cprofile_window(
    stack: Stack,
    pool: ClientPool,
    target: Target,
    features: bytes,
    args: argparse.Namespace,
    out_path: Path,
    console: Console,
) -> dict[str, Any]:
    dump = stack.mesh_profile_path
    assert dump is not None
    dump.unlink(missing_ok=True)
    stack.signal_mesh(signal.SIGUSR1)
    time.sleep(0.2)
    load = _run_load(pool, target, features, args)
    stack.signal_mesh(signal.SIGUSR2)
    deadline = time.monotonic() + 20
    while not dump.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the mesh did not write its profile to {dump}")
        time.sleep(0.1)
    os.replace(dump, out_path)

    stats = pstats.Stats(str(out_path))
    total = sum(entry[2] for entry in stats.stats.values())  # type: ignore[attr-defined]
    rows = []
    by_area: collections.Counter[str] = collections.Counter()
    for (filename, line, function), (_cc, calls, tottime, cumtime, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        location = f"{filename}:{line}:{function}"
        by_area[area_of(location)] += tottime
        rows.append((tottime, cumtime, calls, _short(location)))
    requests = max(1, load["requests_total"])
    top_self = sorted(rows, reverse=True)[:25]
    # The mesh's own request path (and the tracing it calls), by cumulative time.
    top_cum = sorted(
        (r for r in rows if "services/" in r[3] or "opentelemetry/" in r[3]), key=lambda r: r[1], reverse=True
    )[:25]
    _print_table(
        console,
        f"cProfile of the mesh, gateway c={args.profile_concurrency}, {load['requests_total']} requests "
        f"({load['rps']:.0f} req/s under the profiler): self time",
        [
            (f"{t * 1e6 / requests:.1f}", f"{100 * t / total:.1f}%", f"{c * 1e6 / requests:.1f}", str(n), loc)
            for t, c, n, loc in top_self
        ],
        ("self us/req", "self %", "cum us/req", "calls", "function"),
    )
    _print_table(
        console,
        "cProfile: the mesh's Python request path (cumulative)",
        [(f"{c * 1e6 / requests:.1f}", f"{t * 1e6 / requests:.1f}", str(n), loc) for t, c, n, loc in top_cum[:20]],
        ("cum us/req", "self us/req", "calls", "function"),
    )
    _print_table(
        console,
        "cProfile: self time by area",
        [(f"{t * 1e6 / requests:.1f}", f"{100 * t / total:.1f}%", area) for area, t in by_area.most_common()],
        ("us/req", "share", "area"),
    )
    console.print(f"profile: {out_path} (python -m pstats {out_path})", highlight=False)
    return {
        "tool": "cprofile",
        "path": str(out_path),
        "load": load,
        "total_profiled_s": total,
        "by_area_us_per_request": {area: t * 1e6 / requests for area, t in by_area.most_common()},
        "top_self": [
            {"function": loc, "self_us_per_req": t * 1e6 / requests, "cum_us_per_req": c * 1e6 / requests, "calls": n}
            for t, c, n, loc in top_self
        ],
        "top_cumulative": [
            {"function": loc, "self_us_per_req": t * 1e6 / requests, "cum_us_per_req": c * 1e6 / requests, "calls": n}
            for t, c, n, loc in top_cum
        ],
    }


_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _parse_frame(frame: str) -> str:
    match = _FRAME.match(frame)
    if not match:
        return frame
    return f"{_short(match['file'])}:{match['func']}"


def pyspy_window(
    stack: Stack,
    pool: ClientPool,
    target: Target,
    features: bytes,
    args: argparse.Namespace,
    out_prefix: Path,
    console: Console,
) -> dict[str, Any] | None:
    py_spy = MLSERVER_VENV / "bin" / "py-spy"
    if not py_spy.is_file():
        console.print("py-spy is not installed in .venv-mlserver (bench/setup_mlserver.sh): skipping")
        return None
    raw_path = out_prefix.with_suffix(".pyspy.txt")
    raw_path.parent.mkdir(parents=True, exist_ok=True)
    seconds = args.profile_seconds + 0.5
    command = [
        str(py_spy), "record", "--pid", str(stack.mesh_pid), "--duration", f"{max(1, round(seconds))}",
        "--rate", "200", "--format", "raw", "--output", str(raw_path),
    ]  # fmt: skip
    # Native frames need the target paused per sample; otherwise sample without stopping it.
    command.append("--native" if args.pyspy_native else "--nonblocking")
    sampler = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(0.5)  # attach before the load starts
        load = _run_load(pool, target, features, args)
        _, err = sampler.communicate(timeout=seconds + 30)
    finally:
        if sampler.poll() is None:
            sampler.kill()
            sampler.wait()
    if sampler.returncode != 0 or not raw_path.exists():
        console.print(f"py-spy failed ({sampler.returncode}): {err.decode(errors='replace')[-800:]}")
        return None

    self_counts: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    by_area: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw_path.read_text().splitlines():
        stack_text, _, count_text = line.rpartition(" ")
        if not stack_text or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_parse_frame(f) for f in stack_text.split(";") if f and not f.startswith("process ")]
        frames = [f for f in frames if not f.startswith("thread ")]
        if not frames:
            continue
        total += count
        self_counts[frames[-1]] += count
        by_area[area_of(frames[-1])] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        console.print("py-spy recorded no samples")
        return None
    _print_table(
        console,
        f"py-spy of the mesh, gateway c={args.profile_concurrency} ({load['rps']:.0f} req/s): self samples",
        [(f"{100 * n / total:.1f}%", f"{100 * inclusive[f] / total:.1f}%", f) for f, n in self_counts.most_common(25)],
        ("self", "incl.", "function"),
    )
    _print_table(
        console,
        "py-spy: self samples by area",
        [(f"{100 * n / total:.1f}%", area) for area, n in by_area.most_common()],
        ("share", "area"),
    )
    console.print(f"py-spy raw stacks: {raw_path}", highlight=False)
    return {
        "tool": "py-spy",
        "path": str(raw_path),
        "load": load,
        "samples": total,
        "by_area_share": {area: n / total for area, n in by_area.most_common()},
        "top_self": [
            {"function": f, "self_share": n / total, "inclusive_share": inclusive[f] / total}
            for f, n in self_counts.most_common(40)
        ],
        "top_inclusive": [{"function": f, "inclusive_share": n / total} for f, n in inclusive.most_common(40)],
    }
