"""Hot-path cost of event emission: the emitter's on_complete next to a no-op hook, same run.

`python -m bench.emission_cost` starts a real Tansu broker and the gateway's emitter: by default
EventProcess (a forwarder thread hands batches to a child process that converts and produces
them through librdkafka), with `--emitter thread` the in-process EventEmitter (its sender thread
converts and produces). Then an asyncio loop that plays the gateway: for every simulated request it does
a fixed slice of Python work, then calls the hook the way Gateway._notify does (synchronously,
on the loop thread). Blocks of records alternate between the no-op hook and the emitter (order
rotating), paced at --rate requests/s, so both see the same machine.

Numbers per hook:
- `call`: the on_complete call alone (what the request path pays directly);
- `request`: work slice + call. The emitter's sender thread (conversion, serialization, handing
  batches to librdkafka) shares the GIL with the loop, so its indirect cost shows up here;
- CPU per event (read from /proc) of this process's Python threads (the forwarder or the sender,
  under the GIL), of its librdkafka C threads (`rdk:*`, outside the GIL; none with a child), and
  of the child process (with EventProcess).
Floor (ARCHITECTURE: nothing on the hot path waits for Kafka): the emitter adds <= 100 us at
p50 to the call. Writes bench/results/emission-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from services.common.domain import GenerateInput, GenerationUsage, PredictInput, PredictResult, ServedBy, TensorData
from services.common.kafka import KafkaSettings
from services.common.net import free_port
from services.common.settings import REPO_ROOT
from services.common.tansu import TansuBroker
from services.gateway.event_process import EventProcess
from services.gateway.events import EventEmitter
from services.gateway.events_settings import EventSettings
from services.gateway.hooks import CompletedRequest, GatewayHook

RESULTS_DIR = REPO_ROOT / "bench" / "results"
FLOOR_ADDED_P50_US = 100.0
FEATURES = np.linspace(0.1, 3.0, 30, dtype="<f4").reshape(1, 30).tobytes()
SERVED = ServedBy("tabular-classifier", "1", "exp", "control")


def make_record(i: int, run: str) -> CompletedRequest:
    """A Predict like the breast-cancer model's (FP32[1,30] in, label + probabilities out);
    every tenth a Generate with a short prompt and completion."""
    prediction_id = f"{run}{i:08d}"
    if i % 10 == 0:
        return CompletedRequest(
            prediction_id=prediction_id,
            tenant="bench",
            rpc="Generate",
            request=GenerateInput(model="llm", prompt="The capital of France is", max_tokens=32),
            served_by=ServedBy("llm", "1"),
            status="OK",
            error="",
            started_at_unix=time.time(),
            latency_ms=80.0,
            trace_id=f"{i:032x}",
            completion_text=" Paris, a city on the Seine." * 3,
            finish_reason="length",
            usage=GenerationUsage(6, 32, 20.0, 80.0),
        )
    outputs = [
        TensorData("label", "INT64", (1,), np.array([1], "<i8").tobytes()),
        TensorData("probabilities", "FP32", (1, 2), np.array([[0.1, 0.9]], "<f4").tobytes()),
    ]
    return CompletedRequest(
        prediction_id=prediction_id,
        tenant="bench",
        rpc="Predict",
        request=PredictInput(model="tabular-classifier", inputs=[TensorData("features", "FP32", (1, 30), FEATURES)]),
        served_by=SERVED,
        status="OK",
        error="",
        started_at_unix=time.time(),
        latency_ms=1.5,
        trace_id=f"{i:032x}",
        result=PredictResult(prediction_id, SERVED, outputs),
    )


def calibrate_work(target_us: float) -> int:
    """Loop count of the synthetic per-request Python work that takes about target_us."""
    if target_us <= 0:
        return 0
    n = 20_000
    work(n)  # warm the interpreter's caches first
    start = time.perf_counter()
    work(n)
    per_iter_us = (time.perf_counter() - start) * 1e6 / n
    return max(1, int(target_us / per_iter_us))


def work(n: int) -> int:
    total = 0
    for i in range(n):
        total += i * i
    return total


async def run_block(
    hook: GatewayHook, records: list[CompletedRequest], rate: float, work_n: int
) -> tuple[list[int], list[int]]:
    """Plays len(records) requests at `rate`/s; returns call and request durations in ns."""
    calls: list[int] = []
    requests: list[int] = []
    interval = 1.0 / rate if rate > 0 else 0.0
    next_at = time.perf_counter()
    for record in records:
        begin = time.perf_counter_ns()
        work(work_n)
        call_start = time.perf_counter_ns()
        hook.on_complete(record)
        end = time.perf_counter_ns()
        calls.append(end - call_start)
        requests.append(end - begin)
        if interval:
            next_at += interval
            delay = next_at - time.perf_counter()
            # asyncio timers have ~1 ms granularity: sleep only when at least that far ahead.
            await asyncio.sleep(delay if delay >= 0.001 else 0)
        else:
            await asyncio.sleep(0)
    return calls, requests


def background_cpu_s() -> tuple[float, float]:
    """CPU seconds of every thread but the main one, split into (Python threads: the emitter's
    sender, under the loop's GIL; librdkafka's C threads, named rdk:*). Linux /proc. A thread
    that ended meanwhile takes its ticks with it (librdkafka's threads live as long as its
    producer, which outlives the measurement)."""
    python_ticks = rdkafka_ticks = 0
    for task in Path("/proc/self/task").iterdir():
        if int(task.name) == os.getpid():
            continue
        try:
            name = (task / "comm").read_text().strip()
            # Fields after the parenthesised command name; utime and stime are the 12th and 13th.
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended meanwhile
        ticks = int(fields[11]) + int(fields[12])
        if name.startswith("rdk:"):
            rdkafka_ticks += ticks
        else:
            python_ticks += ticks
    tick = os.sysconf("SC_CLK_TCK")
    return python_ticks / tick, rdkafka_ticks / tick


def child_cpu_s(emitter: EventEmitter | EventProcess) -> float:
    """CPU seconds of the emitter's child process so far (0 in-process or when it is gone)."""
    pid = getattr(emitter, "child_pid", None)
    if not pid:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentiles_us(samples_ns: list[int]) -> dict[str, float]:
    us = np.asarray(samples_ns, dtype=np.float64) / 1000.0
    p50, p90, p99, p999 = np.percentile(us, [50, 90, 99, 99.9])
    return {
        "count": int(us.size),
        "mean_us": float(us.mean()),
        "p50_us": float(p50),
        "p90_us": float(p90),
        "p99_us": float(p99),
        "p999_us": float(p999),
        "max_us": float(us.max()),
    }


async def measure(args: argparse.Namespace, emitter: EventEmitter | EventProcess, run: str) -> dict[str, Any]:
    noop = GatewayHook()
    work_n = calibrate_work(args.work_us)
    hooks: dict[str, GatewayHook] = {"noop": noop, "emitter": emitter}
    samples: dict[str, dict[str, list[int]]] = {name: {"call": [], "request": []} for name in hooks}
    emitter_records = [make_record(i, run) for i in range(args.records)]
    noop_records = [make_record(i, "noop") for i in range(args.block)]
    # Warm-up (not recorded): imports, first producer batches, numpy paths.
    await run_block(emitter, [make_record(i, "warm") for i in range(args.warmup)], args.rate, work_n)
    await run_block(noop, noop_records[: args.warmup], args.rate, work_n)
    started = time.perf_counter()
    cpu_before = background_cpu_s()
    child_before = child_cpu_s(emitter)
    for block_index, offset in enumerate(range(0, args.records, args.block)):
        order = ["noop", "emitter"] if block_index % 2 == 0 else ["emitter", "noop"]
        for name in order:
            chunk = emitter_records[offset : offset + args.block] if name == "emitter" else noop_records
            calls, requests = await run_block(hooks[name], chunk, args.rate, work_n)
            samples[name]["call"] += calls
            samples[name]["request"] += requests
    played_s = time.perf_counter() - started
    expected = args.records + args.warmup
    for _ in range(1200):  # up to 60 s for the sender to get every ack
        if emitter.stats()["delivered"] + emitter.stats()["replayed"] >= expected:
            break
        await asyncio.sleep(0.05)
    drained_s = time.perf_counter() - started
    cpu_after = background_cpu_s()
    child_s = child_cpu_s(emitter) - child_before
    sender_cpu_s, rdkafka_cpu_s = (after - before for after, before in zip(cpu_after, cpu_before, strict=True))
    return {
        "work_iterations": work_n,
        "sender_cpu_us_per_event": sender_cpu_s * 1e6 / args.records,
        "rdkafka_cpu_us_per_event": rdkafka_cpu_s * 1e6 / args.records,
        "child_cpu_us_per_event": child_s * 1e6 / args.records,
        "played_s": played_s,
        "drained_s": drained_s,
        "hooks": {name: {kind: percentiles_us(v) for kind, v in by_kind.items()} for name, by_kind in samples.items()},
    }


def print_report(result: dict[str, Any], args: argparse.Namespace) -> None:
    hooks = result["hooks"]
    print(
        f"\nemission cost: {args.records} records per hook, blocks of {args.block}, "
        f"rate {args.rate:g}/s, ~{args.work_us:g} us of work per request, linger {args.linger_ms} ms, "
        f"{args.emitter} emitter, real Tansu"
    )
    print(f"{'hook':<10}{'what':<9}{'p50 us':>9}{'p90 us':>9}{'p99 us':>9}{'p99.9 us':>10}{'max us':>10}{'mean us':>9}")
    for name in ("noop", "emitter"):
        for kind in ("call", "request"):
            s = hooks[name][kind]
            print(
                f"{name:<10}{kind:<9}{s['p50_us']:>9.2f}{s['p90_us']:>9.2f}{s['p99_us']:>9.2f}"
                f"{s['p999_us']:>10.1f}{s['max_us']:>10.1f}{s['mean_us']:>9.2f}"
            )
    for kind in ("call", "request"):
        added50 = hooks["emitter"][kind]["p50_us"] - hooks["noop"][kind]["p50_us"]
        added99 = hooks["emitter"][kind]["p99_us"] - hooks["noop"][kind]["p99_us"]
        print(f"added by the emitter ({kind}): p50 {added50:+.2f} us, p99 {added99:+.2f} us")
    stats = result["emitter_stats"]
    print(
        f"emitter: emitted {stats['emitted']}, delivered {stats['delivered']}, spooled {stats['spooled']}, "
        f"shed {stats['shed']}; all acknowledged {result['drained_s']:.2f} s after the first record "
        f"(played for {result['played_s']:.2f} s)"
    )
    print(
        f"CPU per event in this process: Python threads {result['sender_cpu_us_per_event']:.1f} us "
        f"(under the loop's GIL), librdkafka's threads {result['rdkafka_cpu_us_per_event']:.1f} us; "
        f"in the child process: {result['child_cpu_us_per_event']:.1f} us"
    )
    verdict = "PASS" if result["floor"]["ok"] else "FAIL"
    print(f"floor: emitter adds <= {FLOOR_ADDED_P50_US:g} us at p50 (call): {verdict}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=20_000, help="records per hook")
    # Blocks long next to the sender's linger, so its lag barely spills into the no-op blocks.
    parser.add_argument("--block", type=int, default=2000, help="records per alternating block")
    parser.add_argument("--rate", type=float, default=2000.0, help="requests/s (0 = as fast as possible)")
    parser.add_argument("--work-us", type=float, default=50.0, help="synthetic per-request Python work")
    parser.add_argument("--warmup", type=int, default=1000)
    parser.add_argument("--linger-ms", type=int, default=EventSettings().linger_ms, help="EventSettings.linger_ms")
    parser.add_argument(
        "--emitter",
        choices=["process", "thread"],
        default="process",
        help="EventProcess (the gateway's default) or the in-process EventEmitter",
    )
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="emission-bench-") as scratch:
        broker = TansuBroker(free_port(), log_path=Path(scratch) / "tansu.log")
        with broker:
            settings = EventSettings(
                enabled=True,
                linger_ms=args.linger_ms,
                kafka=KafkaSettings(bootstrap_servers=broker.bootstrap),
                spool_dir=Path(scratch) / "spool",
            )
            emitter = EventProcess(settings) if args.emitter == "process" else EventEmitter(settings)
            emitter.start()
            try:
                result = asyncio.run(measure(args, emitter, run=os.urandom(4).hex()))
            finally:
                emitter.close(timeout_s=10)
            result["emitter_stats"] = emitter.stats()

    added = result["hooks"]["emitter"]["call"]["p50_us"] - result["hooks"]["noop"]["call"]["p50_us"]
    result["floor"] = {"added_p50_us": added, "max_us": FLOOR_ADDED_P50_US, "ok": added <= FLOOR_ADDED_P50_US}
    result["config"] = vars(args) | {"results_dir": str(args.results_dir)}
    result["machine"] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "switch_interval_s": sys.getswitchinterval(),
    }
    print_report(result, args)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / f"emission-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {path}")
    return 0 if result["floor"]["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
