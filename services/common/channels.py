"""Client channels between mesh components (router -> Triton, gateway -> router)."""

from __future__ import annotations

import grpc

INTERNAL_CHANNEL_OPTIONS = [
    # Reconnect quickly after a peer restarts instead of gRPC's default backoff of up to 2 min.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 30_000),
]


def internal_channel(address: str) -> grpc.aio.Channel:
    """One long-lived channel per peer; create it once and reuse it for every call."""
    return grpc.aio.insecure_channel(address, options=INTERNAL_CHANNEL_OPTIONS)
