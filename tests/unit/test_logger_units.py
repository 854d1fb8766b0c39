"""Logger pieces without servers: the read-only SQL checks and the protobuf ingest schema."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.common import errors
from services.common.api import events_pb2
from services.logger import ingest_schema
from services.logger.readonly_sql import check_ast, check_text


@pytest.mark.parametrize(
    ("sql", "statement"),
    [
        ("SELECT 1", "SELECT 1"),
        ("  select count() from predictions FINAL ;", "select count() from predictions FINAL"),
        ("-- a comment\nWITH x AS (SELECT 1) SELECT * FROM x", "-- a comment\nWITH x AS (SELECT 1) SELECT * FROM x"),
        ("/* why */ SELECT 2;;", "/* why */ SELECT 2"),
    ],
)
def test_text_check_accepts_selects(sql: str, statement: str) -> None:
    assert check_text(sql) == statement


@pytest.mark.parametrize(
    "sql",
    [
        "",
        "INSERT INTO predictions VALUES (1)",
        "DROP TABLE predictions",
        "SELECT 1; DROP TABLE predictions",
        "SELECT 'a;b'",  # simple rule: no ';' inside, even in a literal
        "SELECT 1 INTO OUTFILE '/tmp/x'",
        "SYSTEM SHUTDOWN",
        "ALTER TABLE predictions DELETE WHERE 1",
    ],
)
def test_text_check_refuses_the_rest(sql: str) -> None:
    with pytest.raises(errors.InvalidArgument):
        check_text(sql)


AST_FILE_TABLE_FUNCTION = """SelectWithUnionQuery (children 2)
 ExpressionList (children 1)
  SelectQuery (children 2)
   ExpressionList (children 1)
    Asterisk
   TablesInSelectQuery (children 1)
    TablesInSelectQueryElement (children 1)
     TableExpression (children 1)
      Function file (children 1)
       ExpressionList (children 1)
        Literal '/etc/passwd'
 Identifier Native"""

AST_URL_TABLE_FUNCTION = AST_FILE_TABLE_FUNCTION.replace("Function file", "Function url")

AST_NUMBERS_WITH_COUNT = """SelectWithUnionQuery (children 2)
 ExpressionList (children 1)
  SelectQuery (children 2)
   ExpressionList (children 1)
    Function count (children 1)
     ExpressionList
   TablesInSelectQuery (children 1)
    TablesInSelectQueryElement (children 1)
     TableExpression (children 1)
      Function numbers (alias n) (children 1)
       ExpressionList (children 1)
        Literal UInt64_3
 Identifier Native"""


def test_ast_check() -> None:
    check_ast(AST_NUMBERS_WITH_COUNT.splitlines())
    with pytest.raises(errors.InvalidArgument, match=r"file\(\) is not allowed"):
        check_ast(AST_FILE_TABLE_FUNCTION.splitlines())
    with pytest.raises(errors.InvalidArgument, match=r"table function url\(\)"):
        check_ast(AST_URL_TABLE_FUNCTION.splitlines())
    with pytest.raises(errors.InvalidArgument, match="SETTINGS"):
        check_ast(["SelectWithUnionQuery (children 2)", " ExpressionList (children 1)", "  SelectQuery", "   Set"])
    with pytest.raises(errors.InvalidArgument):
        check_ast(["InsertQuery   (children 1)", " Identifier t"])


def test_ingest_schema_covers_every_event_field() -> None:
    for name in ingest_schema.EVENT_MESSAGES:
        descriptor = events_pb2.DESCRIPTOR.message_types_by_name[name]
        for field in descriptor.fields:
            assert f" {field.name} = {field.number};" in ingest_schema.SCHEMA, (name, field.name)
    assert "optional double rating = 8;" in ingest_schema.SCHEMA
    assert "map<string, string> labels = 12;" in ingest_schema.SCHEMA


def test_kafka_suffix_is_wire_compatible() -> None:
    event = events_pb2.PredictionEvent(schema_version=1, prediction_id="p", prompt="x")
    body = event.SerializeToString() + ingest_schema.kafka_suffix(2, 12345678901, 1_795_471_753_984)
    # Any protobuf reader of the contract still reads the event (the extra fields are unknown).
    parsed = events_pb2.PredictionEvent.FromString(body)
    parsed.DiscardUnknownFields()
    assert parsed == event
    framed = ingest_schema.length_prefix(len(body)) + body
    assert framed[0] == len(body)
    assert ingest_schema.length_prefix(300) == bytes((0xAC, 0x02))


def test_schema_source_per_store(tmp_path: Path) -> None:
    embedded = ingest_schema.schema_file_for(f"chdb://{tmp_path / 'store'}")
    assert embedded is not None and Path(embedded).read_text() == ingest_schema.SCHEMA
    assert Path(embedded).parent == tmp_path / "store" / "format_schemas"
    assert ingest_schema.insert_settings("FeedbackEvent", embedded) == {"format_schema": f"{embedded}:FeedbackEvent"}
    assert ingest_schema.schema_file_for("http://clickhouse:8123") is None  # inline
    inline = ingest_schema.insert_settings("AlertEvent", None)
    assert inline["format_schema_source"] == "string" and inline["format_schema_message_name"] == "AlertEvent"
    assert ingest_schema.schema_file_for("http://clickhouse:8123", "mlmesh_ingest.proto") == "mlmesh_ingest.proto"
