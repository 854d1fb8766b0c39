"""Statistics, the side-by-side table, the design's floor checks, and the JSON record."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from bench.load import StreamResult, UnaryResult

DIRECT, ROUTER, GATEWAY, MLSERVER, PROXY = "direct", "router", "gateway", "mlserver", "proxy"
GATEWAY_EVENTS = "gateway+events"  # a second mesh, identical but emitting prediction events to Kafka
TARGET_LABELS = {
    DIRECT: "direct Triton",
    ROUTER: "router",
    GATEWAY: "gateway",
    GATEWAY_EVENTS: "gateway+events",
    MLSERVER: "MLServer",
    PROXY: "bare aio proxy",
}
# Which process groups serve each target (their CPU is the target's cost).
SERVER_GROUPS = {
    DIRECT: ("triton",),
    ROUTER: ("triton", "mesh"),
    GATEWAY: ("triton", "mesh"),
    GATEWAY_EVENTS: ("triton", "mesh_events"),
    MLSERVER: ("mlserver",),
    PROXY: ("triton", "proxy"),
}
# The design's floors (see bench/README.md).
C1_P50_MAX_OVERHEAD_MS = 1.5
C1_P99_MAX_OVERHEAD_MS = 3.0
TTFT_MAX_OVERHEAD_MS = 5.0
GATEWAY_P99_CEILING_MS = 100.0


def latency_stats(latencies_s: list[float]) -> dict[str, float]:
    if not latencies_s:
        return {"count": 0}
    ms = np.asarray(latencies_s, dtype=np.float64) * 1000.0
    p50, p90, p95, p99, p999 = np.percentile(ms, [50, 90, 95, 99, 99.9])
    return {
        "count": int(ms.size),
        "mean_ms": float(ms.mean()),
        "stdev_ms": float(ms.std()),
        "min_ms": float(ms.min()),
        "p50_ms": float(p50),
        "p90_ms": float(p90),
        "p95_ms": float(p95),
        "p99_ms": float(p99),
        "p999_ms": float(p999),
        "max_ms": float(ms.max()),
    }


@dataclass
class Cell:
    """One target at one concurrency, merged over repeats."""

    target: str
    concurrency: int
    latencies_s: list[float] = field(default_factory=list)
    window_s: float = 0.0
    errors: int = 0
    warmup_errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    repeats: list[dict[str, Any]] = field(default_factory=list)
    # CPU seconds per process group over whole cells (warm-up included), and the requests served.
    cpu_s: dict[str, float] = field(default_factory=dict)
    cpu_requests: int = 0
    # Every request the clients sent (warm-up, measured, failed): what an event is expected for.
    requests_sent: int = 0

    def add(self, part: UnaryResult, cpu_s: dict[str, float] | None = None) -> None:
        if cpu_s:
            for name, seconds in cpu_s.items():
                self.cpu_s[name] = self.cpu_s.get(name, 0.0) + seconds
            self.cpu_requests += len(part.latencies_s) + part.warmup_requests
        self.requests_sent += len(part.latencies_s) + part.warmup_requests + part.errors + part.warmup_errors
        self.latencies_s.extend(part.latencies_s)
        self.window_s += part.window_s
        self.errors += part.errors
        self.warmup_errors += part.warmup_errors
        self.error_samples.extend(part.error_samples[: 5 - len(self.error_samples)])
        stats = latency_stats(part.latencies_s)
        self.repeats.append(
            {
                "requests": len(part.latencies_s),
                "window_s": part.window_s,
                "rps": len(part.latencies_s) / part.window_s if part.window_s else 0.0,
                "p50_ms": stats.get("p50_ms"),
                "p99_ms": stats.get("p99_ms"),
                "errors": part.errors,
                "cpu_s": cpu_s,
            }
        )

    @property
    def rps(self) -> float:
        return len(self.latencies_s) / self.window_s if self.window_s else 0.0

    def cpu_us_per_request(self, *groups: str) -> float | None:
        if not self.cpu_requests or not all(g in self.cpu_s for g in groups):
            return None
        return sum(self.cpu_s[g] for g in groups) * 1e6 / self.cpu_requests

    def server_cpu_us_per_request(self) -> float | None:
        """CPU the serving side spent per request: Triton, plus the mesh for mesh targets."""
        groups = SERVER_GROUPS.get(self.target)
        return self.cpu_us_per_request(*groups) if groups else None

    def foreign_cores(self) -> float | None:
        wall = self.cpu_s.get("wall")
        return self.cpu_s.get("foreign", 0.0) / wall if wall else None

    def summary(self, include_raw: bool = False) -> dict[str, Any]:
        data: dict[str, Any] = {
            "target": self.target,
            "concurrency": self.concurrency,
            **latency_stats(self.latencies_s),
            "rps": self.rps,
            "window_s": self.window_s,
            "errors": self.errors,
            "warmup_errors": self.warmup_errors,
            "requests_sent": self.requests_sent,
            "error_samples": self.error_samples,
            "repeats": self.repeats,
            "cpu": {
                "seconds": self.cpu_s,
                "requests_incl_warmup": self.cpu_requests,
                "server_us_per_request": self.server_cpu_us_per_request(),
                "hop_us_per_request": _hop_cpu(self),
                "client_us_per_request": self.cpu_us_per_request("clients"),
                "foreign_cores": self.foreign_cores(),
            },
        }
        if include_raw:
            data["latencies_ms"] = [round(x * 1000.0, 4) for x in self.latencies_s]
        return data


def stream_summary(result: StreamResult, targets: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"errors": dict(result.errors), "error_samples": result.error_samples, "targets": {}}
    texts: dict[str, set[str]] = {}
    for target in targets:
        samples = [s for s in result.samples if s.target == target]
        texts[target] = {s.text for s in samples}
        if not samples:
            out["targets"][target] = {"count": 0}
            continue
        ttft = latency_stats([s.ttft_s for s in samples])
        total = latency_stats([s.total_s for s in samples])
        tokens = [s.output_tokens for s in samples]
        per_request_tps = [s.output_tokens / s.total_s for s in samples if s.total_s > 0]
        out["targets"][target] = {
            "count": len(samples),
            "ttft_p50_ms": ttft["p50_ms"],
            "ttft_p95_ms": ttft["p95_ms"],
            "ttft_mean_ms": ttft["mean_ms"],
            "total_p50_ms": total["p50_ms"],
            "total_p95_ms": total["p95_ms"],
            "output_tokens_mean": float(np.mean(tokens)),
            "tokens_per_s": sum(tokens) / sum(s.total_s for s in samples),
            "tokens_per_s_p50": float(np.median(per_request_tps)) if per_request_tps else 0.0,
            "messages_mean": float(np.mean([s.messages for s in samples])),
        }
    # Greedy decoding: the same prompt must give the same text through every path.
    distinct = {text for group in texts.values() for text in group}
    out["same_text_everywhere"] = len(distinct) == 1
    out["samples"] = [
        {
            "target": s.target,
            "ttft_ms": round(s.ttft_s * 1000, 3),
            "total_ms": round(s.total_s * 1000, 3),
            "output_tokens": s.output_tokens,
            "messages": s.messages,
        }
        for s in result.samples
    ]
    return out


# -- checks --


@dataclass
class Check:
    name: str
    status: str  # PASS, FAIL or SKIP
    detail: str

    def line(self) -> str:
        return f"{self.status} {self.name}: {self.detail}"


def _get(cells: dict[tuple[str, int], Cell], target: str, concurrency: int) -> dict[str, Any] | None:
    cell = cells.get((target, concurrency))
    if cell is None or not cell.latencies_s:
        return None
    return {**latency_stats(cell.latencies_s), "rps": cell.rps}


def floor_checks(
    cells: dict[tuple[str, int], Cell], concurrencies: list[int], stream: dict[str, Any] | None
) -> list[Check]:
    checks: list[Check] = []

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    if 1 in concurrencies:
        gateway, direct = _get(cells, GATEWAY, 1), _get(cells, DIRECT, 1)
        if gateway and direct:
            d50 = gateway["p50_ms"] - direct["p50_ms"]
            d99 = gateway["p99_ms"] - direct["p99_ms"]
            checks.append(
                Check(
                    "c=1 gateway p50 - direct p50 <= 1.5 ms",
                    verdict(d50 <= C1_P50_MAX_OVERHEAD_MS),
                    f"{gateway['p50_ms']:.3f} - {direct['p50_ms']:.3f} = {d50:+.3f} ms",
                )
            )
            checks.append(
                Check(
                    "c=1 gateway p99 - direct p99 <= 3 ms",
                    verdict(d99 <= C1_P99_MAX_OVERHEAD_MS),
                    f"{gateway['p99_ms']:.3f} - {direct['p99_ms']:.3f} = {d99:+.3f} ms",
                )
            )
        else:
            checks.append(Check("c=1 gateway vs direct", "SKIP", "gateway or direct not measured"))
    for concurrency in [c for c in concurrencies if c > 1]:
        gateway, peer = _get(cells, GATEWAY, concurrency), _get(cells, MLSERVER, concurrency)
        if not (gateway and peer):
            checks.append(Check(f"c={concurrency} gateway vs MLServer", "SKIP", "gateway or MLServer not measured"))
            continue
        checks.append(
            Check(
                f"c={concurrency} gateway throughput >= MLServer",
                verdict(gateway["rps"] >= peer["rps"]),
                f"{gateway['rps']:.0f} vs {peer['rps']:.0f} req/s (x{gateway['rps'] / peer['rps']:.2f})",
            )
        )
        checks.append(
            Check(
                f"c={concurrency} gateway p99 <= MLServer p99",
                verdict(gateway["p99_ms"] <= peer["p99_ms"]),
                f"{gateway['p99_ms']:.3f} vs {peer['p99_ms']:.3f} ms",
            )
        )
    if stream and stream["targets"].get(GATEWAY, {}).get("count") and stream["targets"].get(DIRECT, {}).get("count"):
        gateway_ttft = stream["targets"][GATEWAY]["ttft_p50_ms"]
        direct_ttft = stream["targets"][DIRECT]["ttft_p50_ms"]
        checks.append(
            Check(
                "TTFT p50 gateway <= direct + 5 ms",
                verdict(gateway_ttft <= direct_ttft + TTFT_MAX_OVERHEAD_MS),
                f"{gateway_ttft:.2f} vs {direct_ttft:.2f} ms ({gateway_ttft - direct_ttft:+.2f} ms)",
            )
        )
    else:
        checks.append(Check("TTFT gateway vs direct", "SKIP", "streaming not measured"))
    worst = [(c, _get(cells, GATEWAY, c)) for c in concurrencies]
    worst = [(c, s) for c, s in worst if s]
    if worst:
        c_max, s_max = max(worst, key=lambda item: item[1]["p99_ms"])
        checks.append(
            Check(
                "gateway p99 < 100 ms (every concurrency)",
                verdict(s_max["p99_ms"] < GATEWAY_P99_CEILING_MS),
                f"worst {s_max['p99_ms']:.3f} ms at c={c_max}",
            )
        )
    total_errors = sum(c.errors + c.warmup_errors for c in cells.values())
    if stream:
        total_errors += sum(stream["errors"].values())
    checks.append(Check("errors == 0", verdict(total_errors == 0), f"{total_errors} errors"))
    if stream and stream["targets"].get(GATEWAY, {}).get("count"):
        checks.append(
            Check(
                "same generated text via gateway and direct",
                verdict(stream["same_text_everywhere"]),
                "greedy decoding, same prompt",
            )
        )
    return checks


# -- table --


def _hop_cpu(cell: Cell) -> float | None:
    if cell.target in (ROUTER, GATEWAY):
        return cell.cpu_us_per_request("mesh")
    if cell.target == GATEWAY_EVENTS:
        return cell.cpu_us_per_request("mesh_events")
    if cell.target == PROXY:
        return cell.cpu_us_per_request("proxy")
    return None


def emission_cost(cells: dict[tuple[str, int], Cell], concurrencies: list[int]) -> list[dict[str, Any]]:
    """gateway+events next to the plain gateway at each concurrency: what emission adds."""
    rows = []
    for concurrency in concurrencies:
        plain, events = _get(cells, GATEWAY, concurrency), _get(cells, GATEWAY_EVENTS, concurrency)
        if not (plain and events):
            continue
        plain_hop = _hop_cpu(cells[(GATEWAY, concurrency)])
        events_cell = cells[(GATEWAY_EVENTS, concurrency)]
        events_hop = _hop_cpu(events_cell)
        rows.append(
            {
                "concurrency": concurrency,
                "gateway_p50_ms": plain["p50_ms"],
                "events_p50_ms": events["p50_ms"],
                "p50_delta_ms": events["p50_ms"] - plain["p50_ms"],
                "gateway_p99_ms": plain["p99_ms"],
                "events_p99_ms": events["p99_ms"],
                "p99_delta_ms": events["p99_ms"] - plain["p99_ms"],
                "gateway_rps": plain["rps"],
                "events_rps": events["rps"],
                "rps_ratio": events["rps"] / plain["rps"] if plain["rps"] else None,
                "gateway_mesh_us_per_request": plain_hop,
                "events_mesh_us_per_request": events_hop,
                "mesh_us_delta": events_hop - plain_hop if events_hop is not None and plain_hop is not None else None,
                "tansu_us_per_request": events_cell.cpu_us_per_request("tansu"),
            }
        )
    return rows


def delivery_check(delivery: dict[str, Any]) -> Check:
    """Every request to gateway+events must be on the predictions topic (at-least-once)."""
    messages, sent = delivery["messages"], delivery["requests_sent"]
    return Check(
        "gateway+events: events on the topic >= requests sent (at-least-once)",
        "PASS" if delivery["distinct_prediction_ids"] >= sent else "FAIL",
        f"{messages} messages ({delivery['distinct_prediction_ids']} distinct prediction ids) for {sent} requests",
    )


def _micros(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _ratio(value: float | None, base: float | None) -> str:
    if value is None or not base or math.isnan(base):
        return "-"
    return f"{value / base:.2f}x"


def render(
    console: Console,
    cells: dict[tuple[str, int], Cell],
    targets: list[str],
    concurrencies: list[int],
    stream: dict[str, Any] | None,
    checks: list[Check],
    delivery: dict[str, Any] | None = None,
) -> None:
    table = Table(
        title="Unary Predict, one row per target x concurrency (latency in ms)",
        caption="/dir, /mls: ratio to direct Triton, to MLServer at the same c.  srv us: CPU microseconds per request "
        "of the serving processes (Triton; + mesh or proxy; MLServer).  hop us: the mesh's (or proxy's) share.",
    )
    for column in ("target", "c", "n", "err", "p50", "p95", "p99", "req/s"):
        table.add_column(column, justify="left" if column == "target" else "right", no_wrap=True)
    for column in ("p50/dir", "p99/dir", "rps/dir", "p50/mls", "p99/mls", "rps/mls", "srv us", "hop us"):
        table.add_column(column, justify="right", no_wrap=True)
    for concurrency in concurrencies:
        direct = _get(cells, DIRECT, concurrency)
        peer = _get(cells, MLSERVER, concurrency)
        for target in targets:
            stats = _get(cells, target, concurrency)
            cell = cells.get((target, concurrency))
            if stats is None or cell is None:
                continue
            table.add_row(
                TARGET_LABELS.get(target, target),
                str(concurrency),
                str(stats["count"]),
                str(cell.errors + cell.warmup_errors),
                f"{stats['p50_ms']:.3f}",
                f"{stats['p95_ms']:.3f}",
                f"{stats['p99_ms']:.3f}",
                f"{stats['rps']:.0f}",
                _ratio(stats["p50_ms"], direct and direct["p50_ms"]),
                _ratio(stats["p99_ms"], direct and direct["p99_ms"]),
                _ratio(stats["rps"], direct and direct["rps"]),
                _ratio(stats["p50_ms"], peer and peer["p50_ms"]),
                _ratio(stats["p99_ms"], peer and peer["p99_ms"]),
                _ratio(stats["rps"], peer and peer["rps"]),
                _micros(cell.server_cpu_us_per_request()),
                _micros(_hop_cpu(cell)),
            )
        table.add_section()
    console.print(table)
    foreign = [(cell.foreign_cores(), key) for key, cell in cells.items() if cell.foreign_cores() is not None]
    if foreign:
        worst, (worst_target, worst_c) = max(foreign)
        note = "  [yellow]other processes disturbed the run[/]" if worst > 0.15 else ""
        console.print(
            f"CPU used by processes outside the benchmark: at most {worst:.2f} cores (in {worst_target} c={worst_c})"
            f"{note}",
            highlight=False,
        )

    emission = emission_cost(cells, concurrencies)
    if emission:
        emission_table = Table(
            title="Emission cost: gateway with events vs without (same run, same c)",
            caption="delta = with - without.  mesh us: CPU microseconds per request of that mesh process.  "
            "tansu us: the broker's CPU per request.",
        )
        for column in ("c", "p50", "p50+ev", "d p50", "p99", "p99+ev", "d p99", "req/s", "req/s+ev", "rps ev/gw"):
            emission_table.add_column(column, justify="right", no_wrap=True)
        for column in ("mesh us", "mesh us+ev", "tansu us"):
            emission_table.add_column(column, justify="right", no_wrap=True)
        for row in emission:
            emission_table.add_row(
                str(row["concurrency"]),
                f"{row['gateway_p50_ms']:.3f}",
                f"{row['events_p50_ms']:.3f}",
                f"{row['p50_delta_ms']:+.3f}",
                f"{row['gateway_p99_ms']:.3f}",
                f"{row['events_p99_ms']:.3f}",
                f"{row['p99_delta_ms']:+.3f}",
                f"{row['gateway_rps']:.0f}",
                f"{row['events_rps']:.0f}",
                _ratio(row["events_rps"], row["gateway_rps"]),
                _micros(row["gateway_mesh_us_per_request"]),
                _micros(row["events_mesh_us_per_request"]),
                _micros(row["tansu_us_per_request"]),
            )
        console.print(emission_table)
    if delivery:
        console.print(
            f"event delivery: {delivery['messages']} messages on {delivery['topic']} "
            f"({delivery['distinct_prediction_ids']} distinct prediction ids) for {delivery['requests_sent']} "
            f"requests sent to gateway+events ({delivery['request_errors']} failed); read back in "
            f"{delivery['read_s']:.1f} s by fresh group {delivery['group_id']}",
            highlight=False,
        )

    if stream:
        stream_table = Table(title="Streaming Generate, sequential (c=1)")
        for column in ("target", "n", "err", "TTFT p50 ms", "TTFT p95 ms", "total p50 ms", "tokens", "tok/s"):
            stream_table.add_column(column, justify="left" if column == "target" else "right", no_wrap=True)
        stream_table.add_column("TTFT p50 /direct", justify="right")
        base = stream["targets"].get(DIRECT, {})
        for target, data in stream["targets"].items():
            if not data.get("count"):
                continue
            stream_table.add_row(
                TARGET_LABELS.get(target, target),
                str(data["count"]),
                str(stream["errors"].get(target, 0)),
                f"{data['ttft_p50_ms']:.2f}",
                f"{data['ttft_p95_ms']:.2f}",
                f"{data['total_p50_ms']:.1f}",
                f"{data['output_tokens_mean']:.0f}",
                f"{data['tokens_per_s']:.1f}",
                _ratio(data["ttft_p50_ms"], base.get("ttft_p50_ms")),
            )
        console.print(stream_table)

    console.print("[bold]Floor checks[/bold]")
    styles = {"PASS": "green", "FAIL": "bold red", "SKIP": "yellow"}
    for check in checks:
        console.print(f"[{styles[check.status]}]{check.status}[/] {check.name}: {check.detail}", highlight=False)


# -- environment and JSON --


def _versions(names: list[str]) -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def _venv_versions(python: Path, names: list[str]) -> dict[str, str | None]:
    if not python.is_file():
        return {}
    code = (
        "import json, importlib.metadata as m\n"
        "def v(n):\n"
        "    try: return m.version(n)\n"
        "    except m.PackageNotFoundError: return None\n"
        f"print(json.dumps({{n: v(n) for n in {names!r}}}))"
    )
    try:
        out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=30, check=True)
        return json.loads(out.stdout)
    except (subprocess.SubprocessError, json.JSONDecodeError, OSError):
        return {}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 2)
    except OSError:
        pass
    return None


def _git(repo: Path, *args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10, check=True)
        return out.stdout.strip()
    except (subprocess.SubprocessError, OSError):
        return ""


def machine_info(repo: Path, mlserver_python: Path) -> dict[str, Any]:
    return {
        "nproc": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)),
        "cpu_model": _cpu_model(),
        "mem_total_gib": _mem_total_gib(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "python_executable": sys.executable,
        "loadavg_at_start": os.getloadavg(),
        "git_commit": _git(repo, "rev-parse", "HEAD"),
        "git_dirty": bool(_git(repo, "status", "--porcelain", "--untracked-files=no")),
        "versions": _versions(
            ["grpcio", "protobuf", "tritonclient", "nvidia-pytriton", "onnxruntime", "numpy", "opentelemetry-sdk"]
        ),
        "mlserver_venv_versions": _venv_versions(
            mlserver_python, ["mlserver", "uvloop", "onnxruntime", "numpy", "grpcio", "protobuf"]
        ),
    }


def write_json(record: dict[str, Any], results_dir: Path, stamp: str) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, indent=2, default=str)
    path = results_dir / f"bench-{stamp}.json"
    path.write_text(text)
    latest = results_dir / "latest.json"
    partial = latest.with_name(".latest.json.partial")
    partial.write_text(text)
    os.replace(partial, latest)
    return path
