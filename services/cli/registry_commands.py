"""`mlmesh models|rollout|audit|policy`: the registry's commands, with readable tables."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
from rich.console import Console
from rich.markdown import Markdown
from rich.table import Table

from services.common.api import drift_pb2, registry_pb2, registry_pb2_grpc
from services.registry.artifacts import read_directory

DEFAULT_REGISTRY = os.environ.get("MLMESH_REGISTRY_ADDRESS", "127.0.0.1:50054")
MAX_MESSAGE_BYTES = 512 * 1024 * 1024

console = Console()
err_console = Console(stderr=True)


def _stub(args: argparse.Namespace) -> tuple[grpc.Channel, registry_pb2_grpc.RegistryStub]:
    channel = grpc.insecure_channel(
        args.registry,
        options=[("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                 ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)],
    )
    return channel, registry_pb2_grpc.RegistryStub(channel)


def _metadata(args: argparse.Namespace) -> list[tuple[str, str]]:
    return [("x-mlmesh-actor", args.actor)]


def _call(args: argparse.Namespace, fn: Callable[[registry_pb2_grpc.RegistryStub], int]) -> int:
    channel, stub = _stub(args)
    try:
        return fn(stub)
    except grpc.RpcError as exc:
        err_console.print(f"[red]error[/red] {exc.code().name}: {exc.details()}")
        return 1
    finally:
        channel.close()


def _versions_table(versions: list[registry_pb2.ModelVersion], title: str) -> Table:
    table = Table(title=title)
    for column in ("model", "version", "stage", "aliases", "artifact", "created", "by", "deployed as"):
        table.add_column(column)
    for v in versions:
        table.add_row(
            v.model, v.version, v.stage, ",".join(v.aliases), v.artifact_sha256[:12],
            v.created_at[:19], v.created_by, v.triton_model or "-",
        )
    return table


def _follow(progress: Iterator[registry_pb2.DeployProgress]) -> registry_pb2.ModelVersion | None:
    """Prints each phase of a swap as it happens (loading a big model takes a while)."""
    final = None
    with console.status("working...") as status:
        for item in progress:
            if item.phase == "done" and item.HasField("version"):
                final = item.version
                continue
            colour = "red" if item.phase == "failed" else "cyan"
            console.print(f"[{colour}]{item.phase:>9}[/{colour}] {item.message}  [dim]{item.elapsed_s:.1f}s[/dim]")
            status.update(f"{item.phase}: {item.message}")
    return final


def cmd_models_register(args: argparse.Namespace) -> int:
    files = read_directory(Path(args.path))
    lineage = registry_pb2.Lineage(
        dataset_version=args.dataset_version or "",
        dataset_sha256=args.dataset_sha256 or "",
        code_commit=args.code_commit or "",
        training_config_json=Path(args.training_config).read_text() if args.training_config else "",
        evaluation_json=Path(args.evaluation).read_text() if args.evaluation else "",
        privacy_epsilon=args.epsilon or 0.0,
        privacy_delta=args.delta or 0.0,
    )
    request = registry_pb2.RegisterVersionRequest(
        model=args.model, kind=args.kind or "", files=files, description=args.description or "", lineage=lineage,
        tags=dict(t.split("=", 1) for t in args.tag or []),
    )

    def run(stub: registry_pb2_grpc.RegistryStub) -> int:
        version = stub.RegisterVersion(request, metadata=_metadata(args), timeout=600)
        console.print(
            f"registered [bold]{version.model} v{version.version}[/bold] ({version.stage}), "
            f"artifact sha256:{version.artifact_sha256} ({version.artifact_files} files, "
            f"{version.artifact_bytes} bytes)"
        )
        return 0

    return _call(args, run)


def cmd_models_list(args: argparse.Namespace) -> int:
    def run(stub: registry_pb2_grpc.RegistryStub) -> int:
        response = stub.ListModels(registry_pb2.ListRegisteredModelsRequest(model=args.model or ""), timeout=30)
        console.print(_versions_table(list(response.versions), "registered versions"))
        return 0

    return _call(args, run)


def cmd_models_show(args: argparse.Namespace) -> int:
    def run(stub: registry_pb2_grpc.RegistryStub) -> int:
        version = stub.GetVersion(registry_pb2.GetVersionRequest(model=args.model, version=args.version or ""),
                                  timeout=30)
        console.print(Markdown(version.model_card))
        return 0

    return _call(args, run)


def cmd_models_promote(args: argparse.Namespace) -> int:
    request = registry_pb2.TransitionStageRequest(
        model=args.model, version=args.version, stage=args.stage, reason=args.reason or ""
    )

    def run(stub: registry_pb2_grpc.RegistryStub) -> int:
        final = _follow(stub.TransitionStage(request, metadata=_metadata(args), timeout=args.timeout))
        if final is not None:
            console.print(f"[green]{final.model} v{final.version} is now {final.stage}[/green]")
        return 0

    return _call(args, run)


def cmd_models_rollback(args: argparse.Namespace) -> int:
    request = registry_pb2.RollbackRequest(model=args.model, reason=args.reason or "")

    def run(stub: registry_pb2_grpc.RegistryStub) -> int:
        final = _follow(stub.Rollback(request, metadata=_metadata(args), timeout=args.timeout))
        if final is not None:
            console.print(f"[green]rolled back: {final.model} v{final.version} is in production again[/green]")
        return 0

    return _call(args, run)


def cmd_models_alias(args: argparse.Namespace) -> int:
    request = registry_pb2.SetAliasRequest(model=args.model, version=args.version, alias=args.alias,
                                           reason=args.reason or "")

    def run(stub: registry_pb2_grpc.RegistryStub) -> int:
        version = stub.SetAlias(request, metadata=_metadata(args), timeout=30)
        console.print(f"{version.model} v{version.version} aliases: {', '.join(version.aliases)}")
        return 0

    return _call(args, run)


def print_rollout(rollout: registry_pb2.Rollout) -> None:
    colours = {"promoted": "green", "rolled_back": "red", "failed": "red", "aborted": "yellow"}
    colour = colours.get(rollout.state, "cyan")
    bandit = rollout.allocation == "bandit"
    where = f"round {rollout.step + 1}" if bandit else f"step {rollout.step + 1}/{len(rollout.steps)}"
    console.print(
        f"rollout [bold]{rollout.id}[/bold] {rollout.model}: v{rollout.candidate_version} vs stable "
        f"v{rollout.stable_version}" + (f" on {rollout.primary_metric}" if rollout.primary_metric else "")
        + (" (bandit)" if bandit else "")
        + f" — [{colour}]{rollout.state}[/{colour}] at {where} ({rollout.fraction:.0%} canary)"
        + (f" — {rollout.reason}" if rollout.reason else "")
    )
    if rollout.state == "rolled_back":
        console.print(
            f"  candidate served {rollout.canary_requests} requests; routing restored "
            f"{rollout.time_to_rollback_s:.1f}s after it first took traffic"
        )
    if rollout.analyses:
        table = Table()
        columns = ["round" if bandit else "step", "canary share", "verdict", "canary req", "canary err",
                   "canary p95 ms", "stable req", "stable err", "stable p95 ms", "reasons"]
        if bandit:
            columns.insert(3, "P(canary better)")
        for column in columns:
            table.add_column(column)
        for a in rollout.analyses:
            row = [
                str(a.step + 1), f"{a.fraction:.0%}", a.verdict, str(a.canary.requests), f"{a.canary.error_rate:.3f}",
                f"{a.canary.latency_p95_ms:.1f}", str(a.stable.requests), f"{a.stable.error_rate:.3f}",
                f"{a.stable.latency_p95_ms:.1f}", "; ".join(a.reasons),
            ]
            if bandit:
                row.insert(3, f"{a.prob_canary_best:.3f}" if a.HasField("prob_canary_best") else "-")
            table.add_row(*row)
        console.print(table)


def parse_metric(text: str) -> drift_pb2.MetricSpec:
    """kind[:value]: label_rate:1, outcome_rate:converted, rating_mean, mean:latency_ms, quantile:latency_ms."""
    kind, _, rest = text.partition(":")
    if kind in ("mean", "quantile"):
        return drift_pb2.MetricSpec(kind=kind, column=rest)
    return drift_pb2.MetricSpec(kind=kind, value=rest)


def cmd_rollout_start(args: argparse.Namespace) -> int:
    request = registry_pb2.StartRolloutRequest(
        model=args.model, version=args.version,
        steps=[float(s) / 100 for s in args.steps.split(",")] if args.steps else [],
        step_duration_s=args.step_duration or 0.0, min_requests_per_step=args.min_requests or 0,
        triggers=registry_pb2.RolloutTriggers(
            max_error_rate=args.max_error_rate or 0.0, max_latency_p95_ms=args.max_p95_ms or 0.0,
            max_latency_ratio=args.max_latency_ratio or 0.0,
        ),
        policy_yaml=Path(args.policy).read_text() if args.policy else "",
        shadow_fraction=(args.shadow or 0.0) / 100, reason=args.reason or "",
        primary_metric=parse_metric(args.primary) if args.primary else None,
        lower_is_better=args.lower_is_better, allocation="bandit" if args.bandit else "",
        max_rounds=args.max_rounds or 0, bandit_floor=(args.bandit_floor or 0.0) / 100,
        decision_probability=args.decision_probability or 0.0,
    )

    def run(stub: registry_pb2_grpc.RegistryStub) -> int:
        rollout = stub.StartRollout(request, metadata=_metadata(args), timeout=args.timeout)
        print_rollout(rollout)
        if not args.watch:
            return 0
        return _watch_rollout(stub, rollout.id)

    return _call(args, run)


def _watch_rollout(stub: registry_pb2_grpc.RegistryStub, rollout_id: str) -> int:
    last = None
    while True:
        rollout = stub.GetRollout(registry_pb2.GetRolloutRequest(id=rollout_id), timeout=10)
        key = (rollout.state, rollout.step, len(rollout.analyses))
        if key != last:
            print_rollout(rollout)
            last = key
        if rollout.state in ("promoted", "rolled_back", "aborted", "failed"):
            return 0 if rollout.state == "promoted" else 2
        time.sleep(1.0)


def cmd_rollout_status(args: argparse.Namespace) -> int:
    def run(stub: registry_pb2_grpc.RegistryStub) -> int:
        if args.watch:
            rollout = stub.GetRollout(registry_pb2.GetRolloutRequest(id=args.id or "", model=args.model or ""))
            return _watch_rollout(stub, rollout.id)
        if args.id or args.model:
            print_rollout(stub.GetRollout(registry_pb2.GetRolloutRequest(id=args.id or "", model=args.model or "")))
        else:
            for rollout in stub.ListRollouts(registry_pb2.ListRolloutsRequest(), timeout=10).rollouts:
                print_rollout(rollout)
        return 0

    return _call(args, run)


def cmd_rollout_control(args: argparse.Namespace) -> int:
    request = registry_pb2.ControlRolloutRequest(id=args.id, action=args.rollout_command, reason=args.reason or "")

    def run(stub: registry_pb2_grpc.RegistryStub) -> int:
        print_rollout(stub.ControlRollout(request, metadata=_metadata(args), timeout=120))
        return 0

    return _call(args, run)


def cmd_audit(args: argparse.Namespace) -> int:
    def run(stub: registry_pb2_grpc.RegistryStub) -> int:
        if args.audit_command == "verify":
            verdict = stub.VerifyAudit(registry_pb2.VerifyAuditRequest(), timeout=60)
            if verdict.ok:
                head = stub.ListAudit(registry_pb2.ListAuditRequest(limit=1), timeout=30).entries
                console.print(f"[green]audit chain intact[/green]: {verdict.entries} entries"
                              + (f", head {head[0].hash}" if head else ""))
                return 0
            console.print(f"[red]audit chain broken[/red] at entry {verdict.first_bad_seq}: {verdict.problem}")
            return 2
        entries = stub.ListAudit(registry_pb2.ListAuditRequest(subject=args.subject or "", limit=args.limit),
                                 timeout=30).entries
        table = Table(title="audit log")
        for column in ("seq", "at", "actor", "action", "subject", "reason", "details"):
            table.add_column(column)
        for e in entries:
            table.add_row(str(e.seq), e.at[:19], e.actor, e.action, e.subject, e.reason, e.details_json)
        console.print(table)
        return 0

    return _call(args, run)


def cmd_policy_check(args: argparse.Namespace) -> int:
    request = registry_pb2.EvaluatePolicyRequest(
        policy_yaml=Path(args.policy).read_text(), report_yaml=Path(args.report).read_text()
    )

    def run(stub: registry_pb2_grpc.RegistryStub) -> int:
        report = stub.EvaluatePolicy(request, timeout=30)
        if args.json:
            print(json.dumps([{"rule": r.rule, "value": r.value, "threshold": r.threshold, "verdict": r.verdict,
                               "detail": r.detail} for r in report.rules], indent=2))
        else:
            console.print(report.text)
        console.print("[green]GO[/green]" if report.go else "[red]NO-GO[/red]")
        return 0 if report.go else 3

    return _call(args, run)


def add_registry_commands(sub: argparse._SubParsersAction, models: argparse.ArgumentParser) -> None:
    def registry_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--registry", default=DEFAULT_REGISTRY, help="registry address (MLMESH_REGISTRY_ADDRESS)")
        p.add_argument("--actor", default=os.environ.get("MLMESH_ACTOR") or getpass.getuser(),
                       help="who acts (recorded in the audit log)")

    models_sub = models.add_subparsers(dest="models_command")
    register = models_sub.add_parser("register", help="register a new version from a Triton model directory")
    registry_args(register)
    register.add_argument("model")
    register.add_argument("--path", required=True, help="Triton model directory (config.pbtxt + 1/...)")
    register.add_argument("--kind", choices=["tabular", "llm"], help="required for a model's first version")
    register.add_argument("--description")
    register.add_argument("--dataset-version")
    register.add_argument("--dataset-sha256")
    register.add_argument("--code-commit")
    register.add_argument("--training-config", help="JSON file")
    register.add_argument("--evaluation", help="JSON file (e.g. an evaluation report)")
    register.add_argument("--epsilon", type=float, help="DP budget epsilon, when trained with DP-SGD")
    register.add_argument("--delta", type=float)
    register.add_argument("--tag", action="append", help="key=value (repeatable)")
    register.set_defaults(func=cmd_models_register)

    listing = models_sub.add_parser("list", help="registered versions and their stages")
    registry_args(listing)
    listing.add_argument("model", nargs="?")
    listing.set_defaults(func=cmd_models_list)

    show = models_sub.add_parser("show", help="a version's model card")
    registry_args(show)
    show.add_argument("model")
    show.add_argument("version", nargs="?", help="number or alias; default the production version")
    show.set_defaults(func=cmd_models_show)

    promote = models_sub.add_parser("promote", help="move a version to a stage (production = zero-downtime swap)")
    registry_args(promote)
    promote.add_argument("model")
    promote.add_argument("version")
    promote.add_argument("--stage", default="production")
    promote.add_argument("--reason")
    promote.add_argument("--timeout", type=float, default=900.0)
    promote.set_defaults(func=cmd_models_promote)

    rollback = models_sub.add_parser("rollback", help="put back the version production replaced")
    registry_args(rollback)
    rollback.add_argument("model")
    rollback.add_argument("--reason")
    rollback.add_argument("--timeout", type=float, default=900.0)
    rollback.set_defaults(func=cmd_models_rollback)

    alias = models_sub.add_parser("alias", help="point an alias (e.g. champion) at a version")
    registry_args(alias)
    alias.add_argument("model")
    alias.add_argument("version")
    alias.add_argument("alias")
    alias.add_argument("--reason")
    alias.set_defaults(func=cmd_models_alias)

    rollout = sub.add_parser("rollout", help="canary rollouts with automatic rollback")
    rollout_sub = rollout.add_subparsers(dest="rollout_command", required=True)
    start = rollout_sub.add_parser("start", help="ramp a version as a canary")
    registry_args(start)
    start.add_argument("model")
    start.add_argument("version")
    start.add_argument("--steps", help="canary percentages, e.g. 1,5,25,50,100 (the default)")
    start.add_argument("--step-duration", type=float, help="seconds at each step (default 60)")
    start.add_argument("--min-requests", type=int, help="canary requests needed to judge a step (default 100)")
    start.add_argument("--max-error-rate", type=float, help="rollback trigger (default 0.05)")
    start.add_argument("--max-p95-ms", type=float, help="rollback trigger on canary latency p95")
    start.add_argument("--max-latency-ratio", type=float, help="rollback if canary p95 > this x stable (default 3)")
    start.add_argument("--policy", help="promotion policy YAML evaluated on live metrics at each step")
    start.add_argument("--shadow", type=float, help="start with a shadow phase copying this percentage")
    start.add_argument("--primary", help="metric to win on (needs the analysis service): label_rate:1, "
                       "outcome_rate:VALUE, rating_mean, mean:COLUMN; a significant win promotes early")
    start.add_argument("--lower-is-better", action="store_true", help="the primary metric wins by decreasing")
    start.add_argument("--bandit", action="store_true",
                       help="Thompson sampling on the primary metric (a feedback rate) sets the canary share")
    start.add_argument("--max-rounds", type=int, help="bandit: rounds before keeping stable (default 20)")
    start.add_argument("--bandit-floor", type=float, help="bandit: minimum percentage per arm (default 5)")
    start.add_argument("--decision-probability", type=float,
                       help="bandit: posterior probability that ends the rollout (default 0.95)")
    start.add_argument("--reason")
    start.add_argument("--watch", action="store_true", help="follow it until it ends")
    start.add_argument("--timeout", type=float, default=900.0)
    start.set_defaults(func=cmd_rollout_start)
    status = rollout_sub.add_parser("status", help="a rollout's steps and analyses")
    registry_args(status)
    status.add_argument("--id")
    status.add_argument("--model")
    status.add_argument("--watch", action="store_true")
    status.set_defaults(func=cmd_rollout_status)
    for action in ("pause", "resume", "abort"):
        p = rollout_sub.add_parser(action, help=f"{action} a rollout")
        registry_args(p)
        p.add_argument("id")
        p.add_argument("--reason")
        p.set_defaults(func=cmd_rollout_control)

    audit = sub.add_parser("audit", help="the registry's hash-chained audit log")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_sub.add_parser("verify", help="check that no entry was edited or deleted")
    registry_args(verify)
    verify.set_defaults(func=cmd_audit)
    show_audit = audit_sub.add_parser("list", help="recent entries")
    registry_args(show_audit)
    show_audit.add_argument("--subject")
    show_audit.add_argument("--limit", type=int, default=50)
    show_audit.set_defaults(func=cmd_audit)

    policy = sub.add_parser("policy", help="promotion policies")
    policy_sub = policy.add_subparsers(dest="policy_command", required=True)
    check = policy_sub.add_parser("check", help="evaluate a policy against an evaluation report (go / no-go)")
    registry_args(check)
    check.add_argument("policy")
    check.add_argument("report")
    check.add_argument("--json", action="store_true")
    check.set_defaults(func=cmd_policy_check)
