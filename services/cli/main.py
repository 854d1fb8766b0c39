"""`mlmesh`: run the mesh, call it, manage API keys, model versions and rollouts."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import grpc
import numpy as np
from rich.console import Console
from rich.table import Table

from services.cli.client import (
    DEFAULT_GATEWAY,
    NUMPY_TO_DTYPE,
    auth_metadata,
    gateway_stub,
    resolve_api_key,
    tensor_to_numpy,
)
from services.cli.registry_commands import add_registry_commands
from services.cli.report_command import add_report_command
from services.common.api import common_pb2, gateway_pb2, logger_pb2, logger_pb2_grpc

console = Console()
err_console = Console(stderr=True)


def _fail_rpc(exc: grpc.RpcError) -> int:
    err_console.print(f"[red]error[/red] {exc.code().name}: {exc.details()}")
    for key, value in exc.trailing_metadata() or ():
        if key == "retry-after-ms":
            err_console.print(f"retry after {int(value) / 1000:.2f}s")
    return 1


def _features_from_args(args: argparse.Namespace) -> np.ndarray:
    if args.features:
        rows = [[float(v) for v in row.split(",")] for row in args.features]
        return np.asarray(rows, dtype=np.float32)
    from sklearn.datasets import load_breast_cancer  # demo rows from a dataset shipped offline

    data = load_breast_cancer()
    rng = np.random.default_rng(args.seed)
    picks = rng.choice(len(data.data), size=args.sample, replace=False)
    return data.data[picks].astype(np.float32)


def _predict_traffic(stub: object, request: gateway_pb2.PredictRequest, args: argparse.Namespace) -> int:
    """Sends the request `repeat` times as different users and summarises who served them."""
    from collections import Counter

    metadata = auth_metadata(resolve_api_key(args.api_key))
    served: Counter[tuple[str, str, str]] = Counter()
    failures: Counter[str] = Counter()
    started = time.perf_counter()
    rows = None
    if not args.features:  # every request its own rows of the dataset, like real traffic
        from sklearn.datasets import load_breast_cancer

        rows = load_breast_cancer().data.astype("<f4")
        rng = np.random.default_rng(args.seed)
    for i in range(args.repeat):
        request.unit_id = f"{args.unit_id or 'user'}-{i}"
        if rows is not None:
            picked = rows[rng.choice(len(rows), size=request.inputs[0].shape[0], replace=False)]
            request.inputs[0].raw_data = picked.tobytes()
        try:
            response = stub.Predict(request, metadata=metadata, timeout=args.timeout)  # type: ignore[attr-defined]
            s = response.served_by
            served[(s.model_version, s.experiment, s.variant)] += 1
        except grpc.RpcError as exc:
            failures[exc.code().name] += 1
        if args.interval:
            time.sleep(args.interval)
    elapsed = time.perf_counter() - started
    table = Table(title=f"{args.repeat} requests as {args.repeat} users in {elapsed:.1f}s")
    for column in ("model version", "experiment", "variant", "requests"):
        table.add_column(column)
    for (version, experiment, variant), count in sorted(served.items()):
        table.add_row(version, experiment or "-", variant or "-", str(count))
    for code, count in sorted(failures.items()):
        table.add_row("[red]failed[/red]", "", code, str(count))
    console.print(table)
    return 1 if failures else 0


def cmd_predict(args: argparse.Namespace) -> int:
    features = _features_from_args(args)
    request = gateway_pb2.PredictRequest(
        model=args.model,
        inputs=[
            common_pb2.Tensor(
                name=args.input_name,
                dtype=NUMPY_TO_DTYPE[features.dtype],
                shape=features.shape,
                raw_data=features.astype(features.dtype.newbyteorder("<")).tobytes(),
            )
        ],
        unit_id=args.unit_id or "",
    )
    channel, stub = gateway_stub(args.gateway)
    if args.repeat > 1:
        try:
            return _predict_traffic(stub, request, args)
        finally:
            channel.close()
    started = time.perf_counter()
    try:
        response = stub.Predict(request, metadata=auth_metadata(resolve_api_key(args.api_key)), timeout=args.timeout)
    except grpc.RpcError as exc:
        return _fail_rpc(exc)
    finally:
        channel.close()
    elapsed_ms = (time.perf_counter() - started) * 1000
    outputs = {t.name: tensor_to_numpy(t.dtype, t.shape, t.raw_data) for t in response.outputs}
    table = Table(title=f"{response.served_by.model} v{response.served_by.model_version}  ({elapsed_ms:.1f} ms)")
    table.add_column("row", justify="right")
    for name in outputs:
        table.add_column(name)
    for row in range(features.shape[0]):
        table.add_row(str(row), *[np.array2string(v[row], precision=4) for v in outputs.values()])
    console.print(table)
    console.print(f"prediction id: [bold]{response.prediction_id}[/bold]")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    request = gateway_pb2.GenerateRequest(
        model=args.model,
        prompt=args.prompt,
        params=common_pb2.GenerationParams(
            max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed
        ),
    )
    channel, stub = gateway_stub(args.gateway)
    last = None
    try:
        for message in stub.Generate(
            request, metadata=auth_metadata(resolve_api_key(args.api_key)), timeout=args.timeout
        ):
            sys.stdout.write(message.text)
            sys.stdout.flush()
            last = message
    except grpc.RpcError as exc:
        print()
        return _fail_rpc(exc)
    finally:
        channel.close()
    print()
    if last is not None and last.HasField("usage"):
        u = last.usage
        err_console.print(
            f"[dim]{last.served_by.model} v{last.served_by.model_version} | finish: {last.finish_reason} | "
            f"tokens in/out: {u.input_tokens}/{u.output_tokens} | TTFT {u.time_to_first_token_ms:.0f} ms | "
            f"total {u.total_time_ms:.0f} ms | prediction id {last.prediction_id}[/dim]"
        )
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    channel, stub = gateway_stub(args.gateway)
    try:
        response = stub.ListModels(
            gateway_pb2.ListModelsRequest(), metadata=auth_metadata(resolve_api_key(args.api_key)), timeout=10
        )
    except grpc.RpcError as exc:
        return _fail_rpc(exc)
    finally:
        channel.close()
    table = Table(title="models")
    for column in ("name", "version", "kind", "ready", "inputs", "outputs"):
        table.add_column(column)
    for m in response.models:
        def specs(ts: list) -> str:
            return ", ".join(f"{t.name}:{t.dtype}{list(t.shape)}" for t in ts)

        table.add_row(m.name, m.version, m.kind, "yes" if m.ready else "no", specs(m.inputs), specs(m.outputs))
    console.print(table)
    return 0


def cmd_feedback(args: argparse.Namespace) -> int:
    request = gateway_pb2.FeedbackRequest(
        prediction_id=args.prediction_id,
        label=args.label or "",
        outcome=args.outcome or "",
        text=args.text or "",
        unit_id=args.unit_id or "",
    )
    if args.rating is not None:
        request.rating = args.rating
    channel, stub = gateway_stub(args.gateway)
    try:
        response = stub.Feedback(request, metadata=auth_metadata(resolve_api_key(args.api_key)), timeout=args.timeout)
    except grpc.RpcError as exc:
        return _fail_rpc(exc)
    finally:
        channel.close()
    console.print(f"feedback [bold]{response.feedback_id}[/bold] recorded for prediction {args.prediction_id}")
    return 0


RECENT_PREDICTIONS_SQL = """
SELECT formatDateTime(p.started_at, '%H:%i:%S') AS time, p.prediction_id, p.model,
       p.model_version AS version, p.status_code AS status, round(p.latency_ms, 1) AS ms,
       f.label, f.rating
FROM (SELECT * FROM predictions FINAL) AS p
LEFT JOIN (SELECT * FROM feedback FINAL) AS f ON f.prediction_id = p.prediction_id
ORDER BY p.started_at DESC
LIMIT {limit}
"""


def _logger_stub(address: str) -> tuple[grpc.Channel, logger_pb2_grpc.LoggerStub]:
    channel = grpc.insecure_channel(address)
    return channel, logger_pb2_grpc.LoggerStub(channel)


def cmd_query(args: argparse.Namespace) -> int:
    sql = args.sql or RECENT_PREDICTIONS_SQL.format(limit=args.limit)
    channel, stub = _logger_stub(args.logger)
    try:
        response = stub.Query(logger_pb2.QueryRequest(sql=sql, max_rows=args.limit), timeout=args.timeout)
    except grpc.RpcError as exc:
        return _fail_rpc(exc)
    finally:
        channel.close()
    if args.json:
        for row in response.rows:
            print(row)
        return 0
    table = Table(title=f"{len(response.rows)} rows ({response.elapsed_ms:.1f} ms)")
    for column in response.columns:
        table.add_column(column.name)
    for row in response.rows:
        table.add_row(*["" if v is None else str(v) for v in json.loads(row)])
    console.print(table)
    if response.truncated:
        console.print(f"[yellow]truncated to {len(response.rows)} rows[/yellow]")
    return 0


def cmd_privacy(args: argparse.Namespace) -> int:
    channel, stub = _logger_stub(args.logger)
    try:
        response = stub.DeleteUser(
            logger_pb2.DeleteUserRequest(unit_id=args.user, requested_by=args.requested_by, reason=args.reason),
            timeout=args.timeout,
        )
    except grpc.RpcError as exc:
        return _fail_rpc(exc)
    finally:
        channel.close()
    table = Table(title=f"right-to-delete for user {args.user!r} (audit id {response.audit_id})")
    for column in ("table", "rows removed", "rows remaining"):
        table.add_column(column)
    for t in response.tables:
        table.add_row(t.table, str(t.rows_removed), str(t.rows_remaining))
    console.print(table)
    console.print("[green]verified: no rows remain[/green]" if response.verified else "[red]NOT verified[/red]")
    return 0 if response.verified else 1


def cmd_keys(args: argparse.Namespace) -> int:
    from services.common import errors
    from services.gateway.keys import KeyStore
    from services.gateway.settings import GatewaySettings, TenantLimits

    store = KeyStore(Path(args.db) if args.db else GatewaySettings().keys_db)
    if args.keys_command == "create":
        defaults = TenantLimits()
        limits = TenantLimits(
            requests_per_s=args.rps or defaults.requests_per_s,
            burst=args.burst or defaults.burst,
            tokens_per_min=args.tokens_per_min or defaults.tokens_per_min,
        )
        try:
            issued = store.create(args.tenant, limits)
        except errors.MeshError as exc:
            err_console.print(f"[red]error[/red] {exc.message}")
            return 2
        console.print(f"created key [bold]{issued.key_id}[/bold] for tenant [bold]{issued.tenant}[/bold]")
        console.print("store it now; it is not shown again:")
        print(issued.api_key)
    elif args.keys_command == "list":
        table = Table(title=f"API keys ({store.path})")
        for column in ("key id", "tenant", "req/s", "burst", "tokens/min", "created", "status"):
            table.add_column(column)
        for k in store.list():
            table.add_row(
                k.key_id,
                k.tenant,
                f"{k.limits.requests_per_s:g}",
                str(k.limits.burst),
                str(k.limits.tokens_per_min),
                time.strftime("%Y-%m-%d %H:%M", time.localtime(k.created_at)),
                "revoked" if k.revoked_at else "active",
            )
        console.print(table)
    elif args.keys_command == "revoke":
        if not store.revoke(args.key_id):
            err_console.print(f"[red]error[/red] no active key with id {args.key_id}")
            return 1
        console.print(f"revoked {args.key_id} (gateways stop accepting it within their key cache TTL)")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from services.cli.up import run_up

    return run_up(config_path=Path(args.config) if args.config else None, llm=args.llm)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlmesh", description="mlmesh model-serving mesh")
    sub = parser.add_subparsers(dest="command", required=True)

    def client_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--gateway", default=DEFAULT_GATEWAY, help="gateway address (default %(default)s)")
        p.add_argument("--api-key", help="API key (default: $MLMESH_API_KEY, then the key `mlmesh up` created)")
        p.add_argument("--timeout", type=float, default=120.0, help="deadline in seconds")

    up = sub.add_parser("up", help="start Triton, router and gateway with embedded defaults")
    up.add_argument("--config", help="YAML with sections gateway:, router:, up:")
    up.add_argument("--llm", choices=["smollm2", "tiny"], help="LLM to serve (default smollm2)")
    up.set_defaults(func=cmd_up)

    predict = sub.add_parser("predict", help="classify rows with the tabular model")
    client_args(predict)
    predict.add_argument("--model", default="tabular-classifier")
    predict.add_argument("--input-name", default="features")
    predict.add_argument("--features", action="append", help="one row of comma-separated numbers (repeatable)")
    predict.add_argument("--sample", type=int, default=3, help="without --features: N rows of breast_cancer")
    predict.add_argument("--seed", type=int, default=0)
    predict.add_argument("--unit-id", help="user/entity id for sticky experiment assignment")
    predict.add_argument("--repeat", type=int, default=1, help="send it N times as N users; print who served them")
    predict.add_argument("--interval", type=float, default=0.0, help="seconds between repeated requests")
    predict.set_defaults(func=cmd_predict)

    generate = sub.add_parser("generate", help="stream a completion from the LLM")
    client_args(generate)
    generate.add_argument("prompt")
    generate.add_argument("--model", default="llm")
    generate.add_argument("--max-tokens", type=int, default=0, help="0 = server default")
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--seed", type=int, default=0)
    generate.set_defaults(func=cmd_generate)

    models = sub.add_parser(
        "models", help="the models the gateway serves; register|list|show|promote|rollback|alias: the registry"
    )
    client_args(models)
    models.set_defaults(func=cmd_models)
    add_registry_commands(sub, models)
    add_report_command(sub)

    feedback = sub.add_parser("feedback", help="send ground truth / a rating for a prediction")
    client_args(feedback)
    feedback.add_argument("prediction_id")
    feedback.add_argument("--label")
    feedback.add_argument("--rating", type=float)
    feedback.add_argument("--outcome")
    feedback.add_argument("--text")
    feedback.add_argument("--unit-id")
    feedback.set_defaults(func=cmd_feedback)

    def logger_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--logger", default="127.0.0.1:50053", help="logger address (default %(default)s)")
        p.add_argument("--timeout", type=float, default=60.0)

    query = sub.add_parser("query", help="query stored predictions and feedback (read-only SQL)")
    logger_args(query)
    query.add_argument("sql", nargs="?", help="a SELECT; default: recent predictions with their feedback")
    query.add_argument("--limit", type=int, default=20)
    query.add_argument("--json", action="store_true", help="one JSON array per row")
    query.set_defaults(func=cmd_query)

    privacy = sub.add_parser("privacy", help="privacy operations")
    privacy_sub = privacy.add_subparsers(dest="privacy_command", required=True)
    delete = privacy_sub.add_parser("delete", help="delete every stored row of one user, verified and audited")
    logger_args(delete)
    delete.add_argument("--user", required=True, help="the unit_id / user id")
    delete.add_argument("--requested-by", default=os.environ.get("USER", "cli"))
    delete.add_argument("--reason", default="right-to-delete request")
    delete.set_defaults(func=cmd_privacy)

    keys = sub.add_parser("keys", help="manage API keys (stored hashed)")
    keys.add_argument("--db", help="key database (default: the gateway's MLMESH_GATEWAY_KEYS_DB)")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="issue a key for a tenant")
    create.add_argument("--tenant", required=True)
    create.add_argument("--rps", type=float, help="requests per second")
    create.add_argument("--burst", type=int, help="request burst")
    create.add_argument("--tokens-per-min", type=int, help="LLM tokens per minute")
    keys_sub.add_parser("list", help="list keys")
    revoke = keys_sub.add_parser("revoke", help="revoke a key")
    revoke.add_argument("key_id")
    keys.set_defaults(func=cmd_keys)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
