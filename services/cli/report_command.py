"""`mlmesh report`: drift per window and the experiment's result, in the terminal and as HTML."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import grpc
from rich.console import Console

from services.common.api import drift_pb2, drift_pb2_grpc
from services.drift.report import collect_report, print_report, render_html

DEFAULT_DRIFT = os.environ.get("MLMESH_DRIFT_ADDRESS", "127.0.0.1:50055")

console = Console()
err_console = Console(stderr=True)


def cmd_report(args: argparse.Namespace) -> int:
    """Collects from the drift service, prints the summary, writes the self-contained HTML."""
    if args.minutes <= 0 or args.windows <= 0:
        err_console.print("[red]error[/red] --minutes and --windows must be positive")
        return 2
    channel = grpc.insecure_channel(args.drift)
    try:
        report = collect_report(
            drift_pb2_grpc.DriftStub(channel),
            args.model,
            experiment=args.experiment or "",
            minutes=args.minutes,
            windows=args.windows,
            timeout=args.timeout,
        )
    finally:
        channel.close()
    print_report(report, console)
    out = Path(args.out)
    out.write_text(render_html(report), encoding="utf-8")
    console.print(f"wrote [bold]{out}[/bold]")
    failed = any(w.error for w in report.drift) and all(w.error for w in report.drift)
    return 1 if failed or (report.experiment is not None and report.experiment.error) else 0


def cmd_profile(args: argparse.Namespace) -> int:
    """Stores a reference profile from the predictions of a past window (what drift compares to)."""
    request = drift_pb2.CreateReferenceProfileRequest(
        model=args.model,
        model_version=args.model_version or "",
        window=drift_pb2.TimeWindow(last_minutes=args.minutes),
        features=drift_pb2.FeatureSelection(inputs=True, outputs=True),
        description=args.description or "",
    )
    channel = grpc.insecure_channel(args.drift)
    try:
        reply = drift_pb2_grpc.DriftStub(channel).CreateReferenceProfile(request, timeout=args.timeout)
    except grpc.RpcError as exc:
        err_console.print(f"[red]error[/red] {exc.code().name}: {exc.details()}")
        return 1
    finally:
        channel.close()
    console.print(
        f"reference profile [bold]{reply.profile_id}[/bold] for {reply.model}: {reply.rows} predictions, "
        f"{len(reply.features)} features"
    )
    return 0


def add_report_command(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Registers `report` on the top-level subparsers (called from services.cli.main)."""
    report = sub.add_parser("report", help="drift per window and the experiment's result, with an HTML report")
    report.add_argument("--model", required=True)
    report.add_argument("--experiment", help="also analyse this experiment (sequential p-value path + final table)")
    report.add_argument("--minutes", type=int, default=60, help="look-back in minutes (default %(default)s)")
    report.add_argument("--windows", type=int, default=6, help="consecutive drift windows (default %(default)s)")
    report.add_argument("--out", default="report.html", help="HTML file to write (default %(default)s)")
    report.add_argument("--drift", default=DEFAULT_DRIFT, help="drift service address (default %(default)s)")
    report.add_argument("--timeout", type=float, default=60.0, help="deadline per RPC in seconds")
    report.set_defaults(func=cmd_report)

    profile = sub.add_parser("profile", help="store a drift reference profile from recent predictions")
    profile.add_argument("--model", required=True)
    profile.add_argument("--model-version")
    profile.add_argument("--minutes", type=int, default=60, help="the reference window: the last N minutes")
    profile.add_argument("--description")
    profile.add_argument("--drift", default=DEFAULT_DRIFT, help="drift service address (default %(default)s)")
    profile.add_argument("--timeout", type=float, default=120.0)
    profile.set_defaults(func=cmd_profile)
    return report
