"""The protobuf schema ClickHouse decodes the events with (format Protobuf, schema sent inline).

Rendered from the compiled descriptors of protos/mlmesh/v1/events.proto, so it can never drift
from the contract, with two changes that keep it wire-compatible and self-contained:
- google.protobuf.Timestamp becomes a local `Timestamp {int64 seconds = 1; int32 nanos = 2;}`
  (same wire format; ClickHouse then needs no import path);
- each event message gets the Kafka coordinates as extra fields (numbers below), which the
  logger appends to the event's bytes (concatenating protobuf encodings merges them).
Field numbers KAFKA_FIELDS are therefore reserved: events.proto must not use them.
"""

from __future__ import annotations

import hashlib
import os
import struct

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.internal.encoder import _VarintBytes

from services.common.api import events_pb2
from services.common.clickhouse import chdb_path, is_embedded
from services.common.settings import CACHE_DIR

KAFKA_PARTITION_FIELD = 500_001
KAFKA_OFFSET_FIELD = 500_002
KAFKA_TIMESTAMP_FIELD = 500_003
# Fixed-width wire types: the suffix is one struct.pack, not three varint encodings (hot path).
KAFKA_FIELDS = (
    ("sfixed32", "kafka_partition", KAFKA_PARTITION_FIELD),
    ("sfixed64", "kafka_offset", KAFKA_OFFSET_FIELD),
    ("sfixed64", "kafka_timestamp", KAFKA_TIMESTAMP_FIELD),
)
_WIRE_FIXED64, _WIRE_FIXED32 = 1, 5
EVENT_MESSAGES = ("PredictionEvent", "FeedbackEvent", "AlertEvent")

_SCALARS = {
    FieldDescriptor.TYPE_DOUBLE: "double",
    FieldDescriptor.TYPE_FLOAT: "float",
    FieldDescriptor.TYPE_INT64: "int64",
    FieldDescriptor.TYPE_UINT64: "uint64",
    FieldDescriptor.TYPE_INT32: "int32",
    FieldDescriptor.TYPE_UINT32: "uint32",
    FieldDescriptor.TYPE_BOOL: "bool",
    FieldDescriptor.TYPE_STRING: "string",
    FieldDescriptor.TYPE_BYTES: "bytes",
    FieldDescriptor.TYPE_SINT32: "sint32",
    FieldDescriptor.TYPE_SINT64: "sint64",
    FieldDescriptor.TYPE_FIXED32: "fixed32",
    FieldDescriptor.TYPE_FIXED64: "fixed64",
    FieldDescriptor.TYPE_SFIXED32: "sfixed32",
    FieldDescriptor.TYPE_SFIXED64: "sfixed64",
}


def _type_name(field: FieldDescriptor) -> str:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        name = field.message_type.full_name
        return "Timestamp" if name == "google.protobuf.Timestamp" else field.message_type.name
    if field.type == FieldDescriptor.TYPE_ENUM:
        return "int32"  # same wire format; no enums in events.proto today
    return _SCALARS[field.type]


def _render_message(message: Descriptor, extra: tuple[tuple[str, str, int], ...] = ()) -> str:
    lines = [f"message {message.name} {{"]
    for field in message.fields:
        if field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
            key, value = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
            lines.append(f"  map<{_type_name(key)}, {_type_name(value)}> {field.name} = {field.number};")
            continue
        if field.is_repeated:
            label = "repeated "
        elif field.has_presence and field.containing_oneof is not None and field.containing_oneof.name.startswith("_"):
            label = "optional "  # proto3 `optional` (a synthetic oneof)
        else:
            label = ""
        lines.append(f"  {label}{_type_name(field)} {field.name} = {field.number};")
    for type_name, name, number in extra:
        if number in message.fields_by_number:
            raise RuntimeError(f"{message.full_name} uses field number {number}, reserved for the logger")
        lines.append(f"  {type_name} {name} = {number};")
    lines.append("}")
    return "\n".join(lines)


def render() -> str:
    """The ingest schema as .proto text."""
    file = events_pb2.DESCRIPTOR
    parts = [
        'syntax = "proto3";',
        f"package {file.package}.ingest;",
        "message Timestamp {\n  int64 seconds = 1;\n  int32 nanos = 2;\n}",
    ]
    for name, message in file.message_types_by_name.items():
        parts.append(_render_message(message, KAFKA_FIELDS if name in EVENT_MESSAGES else ()))
    return "\n\n".join(parts) + "\n"


SCHEMA = render()


_SUFFIX = struct.Struct(
    f"<{len(_VarintBytes(KAFKA_PARTITION_FIELD << 3))}si"
    f"{len(_VarintBytes(KAFKA_OFFSET_FIELD << 3))}sq"
    f"{len(_VarintBytes(KAFKA_TIMESTAMP_FIELD << 3))}sq"
)
_PARTITION_TAG = _VarintBytes(KAFKA_PARTITION_FIELD << 3 | _WIRE_FIXED32)
_OFFSET_TAG = _VarintBytes(KAFKA_OFFSET_FIELD << 3 | _WIRE_FIXED64)
_TIMESTAMP_TAG = _VarintBytes(KAFKA_TIMESTAMP_FIELD << 3 | _WIRE_FIXED64)


def kafka_suffix(partition: int, offset: int, timestamp_ms: int) -> bytes:
    """The encoded Kafka fields to append to an event's bytes."""
    return _SUFFIX.pack(_PARTITION_TAG, partition, _OFFSET_TAG, offset, _TIMESTAMP_TAG, timestamp_ms)


def length_prefix(size: int) -> bytes:
    """Varint length prefix of a length-delimited message (short paths for the usual sizes)."""
    if size < 0x80:
        return bytes((size,))
    if size < 0x4000:
        return bytes((size & 0x7F | 0x80, size >> 7))
    return _VarintBytes(size)


def schema_file_for(dsn: str, server_file: str = "") -> str | None:
    """The format_schema file for `dsn`, or None to send the schema inline.

    Embedded: a file inside the store (chdb would cache an inline schema as a file in the
    process's working directory). A server: `server_file` if given (a name in the server's
    format_schemas directory, written with `python -m services.logger.ingest_schema`; needed
    before ClickHouse 25.7, which lacks format_schema_source), else inline.
    """
    if not is_embedded(dsn):
        return server_file or None
    store = chdb_path(dsn)
    directory = store / "format_schemas" if store is not None else CACHE_DIR / "logger" / "format_schemas"
    target = directory / f"ingest-{hashlib.sha256(SCHEMA.encode()).hexdigest()[:16]}.proto"
    if not target.exists():
        directory.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{os.getpid()}")
        partial.write_text(SCHEMA)
        os.replace(partial, target)  # never a half-written schema under the real name
    return str(target)


def insert_settings(message: str, schema_file: str | None) -> dict[str, str]:
    """Settings that make ClickHouse read length-delimited `message`s with this schema."""
    if schema_file is not None:
        # No format_schema_source: its default is `file`, and servers before 25.7 reject the name.
        return {"format_schema": f"{schema_file}:{message}"}
    return {"format_schema": SCHEMA, "format_schema_source": "string", "format_schema_message_name": message}


if __name__ == "__main__":
    print(SCHEMA, end="")  # for a server's format_schemas directory (see schema_file_for)
