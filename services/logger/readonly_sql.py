"""Read-only SQL for operators and the CLI: one SELECT, checked, capped, JSON-encoded rows.

Three layers, because chdb has no users or grants (its default user may read files and call
out with table functions, and it accepts several statements in one call):
1. text: one statement, starting with SELECT or WITH, no INTO OUTFILE;
2. ClickHouse's own parser (EXPLAIN AST): a SELECT tree, no SETTINGS clause, table functions
   only from a small generator allowlist, no `file()`;
3. a session with readonly=2 (no writes, DDL or `readonly` change) and per-query limits.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import math
import re
import time
import uuid
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from services.common import errors
from services.common.clickhouse import Client

ALLOWED_TABLE_FUNCTIONS = frozenset(
    {"numbers", "numbers_mt", "zeros", "zeros_mt", "values", "generate_series", "generateseries"}
)
DENIED_FUNCTIONS = frozenset({"file", "python"})  # scalar file(); chdb's Python() reads process memory
_LEADING_COMMENTS = re.compile(r"^(?:\s+|--[^\n]*(?:\n|$)|/\*.*?\*/)*", re.S)
_FIRST_WORD = re.compile(r"^(\w+)")
_INTO_OUTFILE = re.compile(r"\bINTO\s+OUTFILE\b", re.I)
_AST_LINE = re.compile(r"^( *)(\w+)(?: (\S+))?")


@dataclass(frozen=True)
class QueryResult:
    columns: list[tuple[str, str]]  # (name, ClickHouse type)
    rows: list[str]  # each a JSON array
    truncated: bool
    elapsed_ms: float


def check_text(sql: str) -> str:
    """First layer; returns the statement without trailing semicolons."""
    statement = sql.strip().rstrip(";").strip()
    if not statement:
        raise errors.InvalidArgument("sql is empty")
    if ";" in statement:
        raise errors.InvalidArgument("one statement only (no ';' inside the query)")
    body = _LEADING_COMMENTS.sub("", statement, count=1)
    first = _FIRST_WORD.match(body)
    if first is None or first.group(1).upper() not in ("SELECT", "WITH"):
        raise errors.InvalidArgument("only a single SELECT (or WITH ... SELECT) query is accepted")
    if _INTO_OUTFILE.search(statement):
        raise errors.InvalidArgument("INTO OUTFILE is not accepted")
    return statement


def check_ast(ast_lines: list[str]) -> None:
    """Second layer, over the lines of `EXPLAIN AST <statement>`."""
    if not ast_lines or not ast_lines[0].startswith("SelectWithUnionQuery"):
        raise errors.InvalidArgument("only a single SELECT (or WITH ... SELECT) query is accepted")
    parents: list[tuple[int, str]] = []  # (depth, node) of the open ancestors
    for line in ast_lines:
        match = _AST_LINE.match(line)
        if match is None:
            continue
        depth, node, name = len(match.group(1)), match.group(2), (match.group(3) or "")
        while parents and parents[-1][0] >= depth:
            parents.pop()
        if node == "Set":
            raise errors.InvalidArgument("SETTINGS clauses are not accepted (the service sets the limits)")
        if node == "Function":
            lowered = name.lower()
            if lowered in DENIED_FUNCTIONS:
                raise errors.InvalidArgument(f"function {name}() is not allowed")
            if parents and parents[-1][1] == "TableExpression" and lowered not in ALLOWED_TABLE_FUNCTIONS:
                raise errors.InvalidArgument(
                    f"table function {name}() is not allowed (allowed: {', '.join(sorted(ALLOWED_TABLE_FUNCTIONS))})"
                )
        parents.append((depth, node))


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dt.datetime):
        # Columns here are UTC; the client returns them naive.
        aware = value if value.tzinfo else value.replace(tzinfo=dt.UTC)
        return aware.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, bytes | bytearray):
        try:
            return value.decode()
        except UnicodeDecodeError:
            return "base64:" + base64.b64encode(value).decode()
    if isinstance(value, uuid.UUID | ipaddress.IPv4Address | ipaddress.IPv6Address):
        return str(value)
    if isinstance(value, dict):
        return {str(_jsonable(k)): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_jsonable(v) for v in value]
    return str(value)


def run_readonly(client: Client, sql: str, max_rows: int, timeout_s: float) -> QueryResult:
    """Checks and runs `sql` on a readonly client; at most max_rows rows come back."""
    statement = check_text(sql)
    try:
        ast = client.query(f"EXPLAIN AST {statement}")
    except Exception as error:
        raise errors.InvalidArgument(f"cannot parse the query: {_short(error)}") from error
    check_ast([row[0] for row in ast.result_rows])
    started = time.perf_counter()
    try:
        # `limit` caps the result whatever the query's own LIMIT says; one extra row tells us
        # that more matched.
        result = client.query(statement, settings={"limit": max_rows + 1, "max_execution_time": timeout_s})
    except Exception as error:
        message = _short(error)
        if "TIMEOUT_EXCEEDED" in message:
            raise errors.DeadlineExceeded(f"query ran longer than {timeout_s:.0f} s") from error
        raise errors.InvalidArgument(f"query failed: {message}") from error
    elapsed_ms = (time.perf_counter() - started) * 1000
    rows = result.result_rows
    truncated = len(rows) > max_rows
    return QueryResult(
        columns=[(name, ch_type.name) for name, ch_type in zip(result.column_names, result.column_types, strict=True)],
        rows=[json.dumps(_jsonable(list(row)), ensure_ascii=False) for row in rows[:max_rows]],
        truncated=truncated,
        elapsed_ms=elapsed_ms,
    )


def _short(error: Exception) -> str:
    text = str(error).strip()
    # ClickHouse appends the full stack and version; the first sentence is what a caller needs.
    text = text.split("Stack trace", 1)[0]
    return text[:800]
