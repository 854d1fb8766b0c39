"""The generated protobuf and gRPC modules, imported from one place."""

from services.common.gen.mlmesh.v1 import (
    common_pb2,
    drift_pb2,
    drift_pb2_grpc,
    events_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    logger_pb2,
    logger_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
    router_pb2,
    router_pb2_grpc,
    routing_pb2,
)

__all__ = [
    "common_pb2",
    "drift_pb2",
    "drift_pb2_grpc",
    "events_pb2",
    "gateway_pb2",
    "gateway_pb2_grpc",
    "logger_pb2",
    "logger_pb2_grpc",
    "registry_pb2",
    "registry_pb2_grpc",
    "router_pb2",
    "router_pb2_grpc",
    "routing_pb2",
]
