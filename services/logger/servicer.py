"""gRPC transport for the logger: mlmesh.v1.Logger over the store this process owns."""

from __future__ import annotations

import asyncio
from typing import Protocol

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from services.common.api import logger_pb2, logger_pb2_grpc
from services.common.server import ServiceRegistration
from services.logger.consumer import ConsumerStats
from services.logger.privacy import DeletionReport
from services.logger.readonly_sql import QueryResult


class LoggerBackend(Protocol):
    """What the servicer needs; LoggerApp provides it. Methods block (run in a thread)."""

    def query(self, sql: str, max_rows: int) -> QueryResult: ...

    def delete_user(self, unit_id: str, requested_by: str, reason: str) -> DeletionReport: ...

    def stats(self) -> tuple[ConsumerStats, bool]: ...


class LoggerServicer(logger_pb2_grpc.LoggerServicer):
    def __init__(self, backend: LoggerBackend) -> None:
        self.backend = backend

    async def Query(
        self, request: logger_pb2.QueryRequest, context: grpc.aio.ServicerContext
    ) -> logger_pb2.QueryResponse:
        result = await asyncio.to_thread(self.backend.query, request.sql, request.max_rows)
        return logger_pb2.QueryResponse(
            columns=[logger_pb2.QueryColumn(name=name, type=ch_type) for name, ch_type in result.columns],
            rows=result.rows,
            truncated=result.truncated,
            elapsed_ms=result.elapsed_ms,
        )

    async def DeleteUser(
        self, request: logger_pb2.DeleteUserRequest, context: grpc.aio.ServicerContext
    ) -> logger_pb2.DeleteUserResponse:
        report = await asyncio.to_thread(
            self.backend.delete_user, request.unit_id, request.requested_by, request.reason
        )
        completed_at = Timestamp()
        completed_at.FromDatetime(report.completed_at)
        return logger_pb2.DeleteUserResponse(
            audit_id=report.audit_id,
            tables=[
                logger_pb2.TableDeletion(
                    table=table, rows_removed=removed, rows_remaining=report.rows_remaining.get(table, 0)
                )
                for table, removed in report.rows_removed.items()
            ],
            verified=report.verified,
            completed_at=completed_at,
        )

    async def Stats(
        self, request: logger_pb2.StatsRequest, context: grpc.aio.ServicerContext
    ) -> logger_pb2.StatsResponse:
        stats, consuming = self.backend.stats()
        return logger_pb2.StatsResponse(
            consumed=stats.consumed,
            stored=stats.stored,
            dead_lettered=stats.dead_lettered,
            dropped_erased=stats.dropped_erased,
            batches=stats.batches,
            failures=stats.failures,
            lag=stats.lag,
            partitions=[
                logger_pb2.PartitionLag(
                    topic=p.topic, partition=p.partition, position=p.position, end_offset=p.end_offset, lag=p.lag
                )
                for p in stats.partitions
            ],
            last_error=stats.last_error,
            last_batch_ms=stats.last_batch_ms,
            consuming=consuming,
            in_flight=stats.in_flight,
        )


def registration(backend: LoggerBackend) -> ServiceRegistration:
    servicer = LoggerServicer(backend)
    return ServiceRegistration(
        "mlmesh.v1.Logger", lambda server: logger_pb2_grpc.add_LoggerServicer_to_server(servicer, server)
    )
