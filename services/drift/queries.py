"""SQL pushdown for drift and A/B analysis: ClickHouse aggregates, Python gets the aggregates only.

Feature values come out of the logger's `predictions` table (services/logger/migrations/001).
An input or output value is addressed by position: a model's rows nearly always share one tensor
layout, so the layout of one row is read first and the values are taken at constant positions
(`input_values[4]` for "input[3]"), while the same pass counts the rows whose layout differs (by
the layout hash the table materializes, migration 005); if there are any, the pass is repeated
locating each row's tensor by name (offset = sizes of the tensors before it). Both are cheaper
than an ARRAY JOIN of every value.

Numeric drift of a window is ONE pass over the rows. Per feature, the cell of each value on an
equal-width grid over the reference's range, `floor((x - lo) * inv) + 1` clamped to the two tail
cells, counted with `countResample` (a histogram of a small integer key: no GROUP BY), plus the
sums of the values in the tail cells and the rows without a finite value. The profile's bin edges
lie on cell boundaries (profiles are built that way), so PSI / Jensen-Shannon counts per bin are
sums of cells; KS and Wasserstein use the cells directly (statistics.pushdown). A profile whose
edges are off the grid gets its bins counted too, with a sum of comparisons `(x >= e1) + ...`.
Windows larger than `drift_sample_rows` can be read as a uniform sample: prediction ids below a
bound, a primary-key range (the table is ordered by prediction_id, ids are random hex).

Experiments: the variants (from the expected weights when given, else a pass over the window;
the sums pass counts the predictions of variants not listed, and a non-zero count makes the caller
list the variants with that pass and run again), then per-unit sums in one GROUP BY on a single
UInt64 key (unit hash and variant index), then per-variant sums, sums of squares and cross
products (delta method); quantiles with exact `quantilesExact` at three levels per arm.

Every table is read with FINAL when `final` is on (exact under Kafka redelivery, as the logger's
canonical queries), and shadow predictions are never counted.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np

from services.common.clickhouse import Client
from services.drift.statistics.pushdown import Grid, RatioMoments

SOURCES = ("input", "output", "column")
NUMERIC_COLUMNS: dict[str, str] = {
    "latency_ms": "latency_ms",
    "input_tokens": "toFloat64(input_tokens)",
    "output_tokens": "toFloat64(output_tokens)",
    "time_to_first_token_ms": "time_to_first_token_ms",
    "cost_usd": "cost_usd",
    "prompt_chars": "toFloat64(lengthUTF8(prompt))",
    "completion_chars": "toFloat64(lengthUTF8(completion))",
}
# An LLM answer that declines: how it opens. RE2, case-insensitive; "." stands for the apostrophe
# (straight or curly) so the pattern needs no quoting inside SQL.
REFUSAL_PATTERN = (
    "(?i)^[[:space:]]*(i.?m sorry|i am sorry|sorry, (but )?i|i apologi[sz]e|i can.?t|i cannot|i can not|"
    "i won.?t|i will not|i.?m (not able|unable)|i am (not able|unable)|as an ai)"
)
CATEGORICAL_COLUMNS: dict[str, str] = {
    "finish_reason": "toString(finish_reason)",
    # The refusal rate's drift is the chi-square of this two-category column.
    "refusal": f"if(completion = '', 'none', if(match(completion, '{REFUSAL_PATTERN}'), 'refused', 'answered'))",
    "status_code": "toString(status_code)",
    "model_version": "toString(model_version)",
}
METRIC_COLUMNS = ("latency_ms", "time_to_first_token_ms", "input_tokens", "output_tokens", "cost_usd")
_ELEMENT = re.compile(r"^(?P<tensor>.+)\[(?P<index>\d+)\]$")


@dataclass(frozen=True)
class Feature:
    """A monitored feature: an input or output value ("input[3]") or a scalar column."""

    source: str
    name: str
    kind: str  # "numeric" or "categorical"

    @property
    def key(self) -> str:
        """The name in a stored ReferenceProfile: "input/input[3]", "column/latency_ms"."""
        return f"{self.source}/{self.name}"

    @classmethod
    def from_key(cls, key: str, kind: str) -> Feature:
        source, _, name = key.partition("/")
        if source not in SOURCES or not name:
            raise ValueError(f"profile feature {key!r} is not of the form source/name")
        return cls(source, name, kind)


@dataclass(frozen=True)
class Scope:
    """Which predictions: one model (optionally one version / experiment), a time range, no shadows."""

    model: str
    model_version: str = ""
    start: datetime | None = None
    end: datetime | None = None
    experiment: str = ""
    final: bool = True
    # A uniform sample by primary key: prediction ids (random hex) below this bound. The table is
    # ordered by prediction_id, so ClickHouse reads only that key range.
    id_below: str = ""

    def table(self) -> str:
        return "predictions FINAL" if self.final else "predictions"

    def where(self) -> tuple[str, dict[str, Any]]:
        conds = ["model = {model:String}", "NOT shadow"]
        params: dict[str, Any] = {"model": self.model}
        if self.model_version:
            conds.append("model_version = {model_version:String}")
            params["model_version"] = self.model_version
        if self.experiment:
            conds.append("experiment = {experiment:String}")
            params["experiment"] = self.experiment
        if self.start is not None:
            conds.append("started_at >= {start:DateTime64(3, 'UTC')}")
            params["start"] = self.start
        if self.end is not None:
            conds.append("started_at < {end:DateTime64(3, 'UTC')}")
            params["end"] = self.end
        if self.id_below:
            conds.append("prediction_id < {id_below:String}")
            params["id_below"] = self.id_below
        return " AND ".join(conds), params


class _Params:
    """Collects query parameters under generated names."""

    def __init__(self, base: dict[str, Any]) -> None:
        self.values = dict(base)

    def add(self, value: str) -> str:
        name = f"p{len(self.values)}"
        self.values[name] = value
        return f"{{{name}:String}}"


def _float(x: float) -> str:
    if not math.isfinite(x):
        raise ValueError(f"non-finite constant {x!r} in a query")
    return repr(float(x))


class _Tensors:
    """Per-row aliases locating each tensor in the flattened values: position, offset and size."""

    def __init__(self, params: _Params) -> None:
        self.params = params
        self.known: dict[tuple[str, str], tuple[str, str]] = {}
        self.definitions: list[str] = []

    def locate(self, prefix: str, tensor: str) -> tuple[str, str]:
        key = (prefix, tensor)
        if key not in self.known:
            i = len(self.known)
            pos, off, size = f"_t{i}", f"_o{i}", f"_s{i}"
            self.definitions.append(
                f"indexOf({prefix}_tensors, {self.params.add(tensor)}) AS {pos}, "
                f"arraySum(arraySlice({prefix}_sizes, 1, {pos} - 1)) AS {off}, {prefix}_sizes[{pos}] AS {size}"
            )
            self.known[key] = (off, size)
        return self.known[key]

    def element(self, source: str, name: str) -> str:
        """Value of "input[3]" (element 3 of tensor `input`); a name without [k] is a one-value tensor."""
        prefix = "input" if source == "input" else "output"
        match = _ELEMENT.match(name)
        tensor, index, scalar = (match["tensor"], int(match["index"]), False) if match else (name, 0, True)
        off, size = self.locate(prefix, tensor)
        guard = f"{size} = 1" if scalar else f"{size} > {index}"
        return f"if({guard}, {prefix}_values[{off} + {index + 1}], nan)"


@dataclass(frozen=True)
class Layout:
    """The tensors of a row, in order, with their value counts (inputs and outputs)."""

    inputs: tuple[tuple[str, int], ...]
    outputs: tuple[tuple[str, int], ...]
    # The table has the layout-hash columns (migration 005): check() compares them.
    hashed: bool = False

    def position(self, source: str, name: str) -> int | None:
        """1-based position of the value "tensor[k]" (or one-value "tensor") in the flattened values."""
        match = _ELEMENT.match(name)
        tensor, index, scalar = (match["tensor"], int(match["index"]), False) if match else (name, 0, True)
        offset = 0
        for t_name, size in self.inputs if source == "input" else self.outputs:
            if t_name == tensor:
                ok = size == 1 if scalar else index < size
                return offset + index + 1 if ok else None
            offset += size
        return None

    def check(self, params: _Params, sources: set[str]) -> str:
        """SQL true for rows with exactly this layout (for the sources used).

        When hashed, compares the row's layout hash, a UInt64 the table materializes from its
        tensor names and sizes (migration 005), with the same function of this layout's names and
        sizes cast to the same types (constant-folded): one integer per row instead of two arrays
        (about 0.03 s instead of 0.25 s per 10M rows on 2 cores). Otherwise compares the arrays.
        """
        conds = []
        for source in sorted(sources & {"input", "output"}):
            tensors = self.inputs if source == "input" else self.outputs
            names = f"[{', '.join(params.add(n) for n, _ in tensors)}]::Array(LowCardinality(String))"
            sizes = f"[{', '.join(str(int(s)) for _, s in tensors)}]::Array(UInt32)"
            if self.hashed:
                conds.append(f"{source}_layout = cityHash64({names}, {sizes})")
            else:
                conds.append(f"{source}_tensors = {names} AND {source}_sizes = {sizes}")
        return " AND ".join(conds) or "1"


def value_expressions(
    features: Sequence[Feature], params: _Params, layout: Layout | None = None
) -> tuple[list[str], list[str]]:
    """(per-row alias definitions, one value expression per feature).

    With a layout, input/output values are read at constant positions (the caller checks that
    every row has that layout); without, each row's tensor offsets are looked up.
    """
    tensors = _Tensors(params)
    exprs: list[str] = []
    for feature in features:
        if feature.source == "column":
            table = NUMERIC_COLUMNS if feature.kind == "numeric" else CATEGORICAL_COLUMNS
            if feature.name not in table:
                raise ValueError(f"unknown {feature.kind} column {feature.name!r}; known: {sorted(table)}")
            exprs.append(table[feature.name])
        elif feature.kind != "numeric":
            raise ValueError(f"{feature.source} values are numeric; {feature.name!r} cannot be categorical")
        elif layout is not None:
            pos = layout.position(feature.source, feature.name)
            exprs.append(f"{feature.source}_values[{pos}]" if pos is not None else "nan")
        else:
            exprs.append(tensors.element(feature.source, feature.name))
    return tensors.definitions, exprs


def guess_layout(client: Client, scope: Scope, *, timeout_s: float) -> Layout | None:
    """The layout of one row of the scope (reads one granule), None when the scope is empty; and
    whether the table has the layout-hash columns (a store not yet migrated to 005 has not)."""
    where, params = scope.where()
    hashed = (
        "(SELECT count() = 2 FROM system.columns WHERE database = currentDatabase() AND table = 'predictions' "
        "AND name IN ('input_layout', 'output_layout'))"
    )
    rows = client.query(
        f"SELECT input_tensors, input_sizes, output_tensors, output_sizes, {hashed} "
        f"FROM {scope.table()} WHERE {where} LIMIT 1",
        parameters=params,
        settings=_settings(timeout_s),
    ).result_rows
    if not rows:
        return None
    it, isz, ot, osz, has_hash = rows[0]
    return Layout(
        tuple((str(n), int(s)) for n, s in zip(it, isz, strict=False)),
        tuple((str(n), int(s)) for n, s in zip(ot, osz, strict=False)),
        hashed=bool(has_hash),
    )


def _settings(timeout_s: float) -> dict[str, Any]:
    return {"max_execution_time": max(1, math.ceil(timeout_s))}


# ------------------------------------------------------------------------------------- layouts


def feature_names(client: Client, scope: Scope, source: str, *, limit: int, timeout_s: float) -> list[str]:
    """Input or output value names seen in the scope, in tensor order (from the distinct layouts)."""
    prefix = "input" if source == "input" else "output"
    where, params = scope.where()
    rows = client.query(
        f"SELECT {prefix}_tensors, {prefix}_sizes, count() AS c FROM {scope.table()} WHERE {where} "
        f"GROUP BY {prefix}_tensors, {prefix}_sizes ORDER BY c DESC LIMIT 64",
        parameters=params,
        settings=_settings(timeout_s),
    ).result_rows
    names: list[str] = []
    seen: set[str] = set()
    for tensors, sizes, _ in rows:
        for tensor, size in zip(tensors, sizes, strict=False):
            for name in [tensor] if size == 1 else [f"{tensor}[{i}]" for i in range(size)]:
                if name not in seen:
                    seen.add(name)
                    names.append(name)
                    if len(names) > limit:
                        return names
    return names


def count_rows(client: Client, scope: Scope, *, timeout_s: float) -> int:
    where, params = scope.where()
    return int(
        client.query(
            f"SELECT count() FROM {scope.table()} WHERE {where}", parameters=params, settings=_settings(timeout_s)
        ).result_rows[0][0]
    )


# ----------------------------------------------------------------------------- reference window


@dataclass(frozen=True)
class NumericSummary:
    n: int  # finite values
    mean: float
    std: float
    min: float
    max: float
    sample: np.ndarray  # uniform sample without replacement (every value when n <= sample size)


def numeric_summaries(
    client: Client, scope: Scope, features: Sequence[Feature], *, sample_size: int, timeout_s: float
) -> list[NumericSummary]:
    """Count, mean, std, min, max and a uniform sample of each numeric feature, in one pass."""
    where, base = scope.where()
    params = _Params(base)
    definitions, exprs = value_expressions(features, params)
    inner = ", ".join([*definitions, *(f"{e} AS f{i}" for i, e in enumerate(exprs))])
    aggs = []
    for i in range(len(features)):
        ok = f"isFinite(f{i})"
        aggs.append(
            f"countIf({ok}), avgIf(f{i}, {ok}), stddevSampIf(f{i}, {ok}), minIf(f{i}, {ok}), maxIf(f{i}, {ok}), "
            f"groupArraySampleIf({int(sample_size)}, 1)(f{i}, {ok})"
        )
    row = client.query(
        f"SELECT {', '.join(aggs)} FROM (SELECT {inner} FROM {scope.table()} WHERE {where})",
        parameters=params.values,
        settings=_settings(timeout_s),
    ).result_rows[0]
    out = []
    for i in range(len(features)):
        n, mean, std, lo, hi, sample = row[6 * i : 6 * i + 6]
        out.append(
            NumericSummary(
                int(n),
                float(mean) if n else math.nan,
                float(std) if n > 1 and math.isfinite(std) else 0.0,
                float(lo) if n else math.nan,
                float(hi) if n else math.nan,
                np.asarray(sample, dtype=np.float64),
            )
        )
    return out


def _bin_expression(value: str, edges: Sequence[float]) -> str:
    """Bin index = number of edges <= x (the profiles' rule), as a vectorised sum of comparisons."""
    if len(edges) == 0:
        return "toUInt16(0)"
    return "toUInt16(" + " + ".join(f"({value} >= {_float(e)})" for e in edges) + ")"


def _cell_expression(value: str, grid: Grid) -> str:
    """Grid.cell_index in SQL: the same float operations on the same constants."""
    return (
        f"toUInt16(least(greatest(floor(({value} - {_float(grid.lo)}) * {_float(grid.inv)}) + 1, 0), {grid.cells + 1}))"
    )


def category_counts(
    client: Client, scope: Scope, features: Sequence[Feature], *, timeout_s: float, limit: int = 10_000
) -> list[dict[str, int]]:
    """Counts per category of each categorical column (one GROUP BY each; low cardinality)."""
    where, base = scope.where()
    out = []
    for feature in features:
        params = _Params(base)
        _, (expr,) = value_expressions([feature], params)
        rows = client.query(
            f"SELECT {expr} AS v, count() AS c FROM {scope.table()} WHERE {where} GROUP BY v ORDER BY c DESC "
            f"LIMIT {int(limit)}",
            parameters=params.values,
            settings=_settings(timeout_s),
        ).result_rows
        out.append({str(v): int(c) for v, c in rows})
    return out


# ------------------------------------------------------------------------------ current window


@dataclass(frozen=True)
class NumericWindow:
    """Aggregates of one numeric feature over a window."""

    grid_counts: np.ndarray  # grid.cells + 2 entries (finite values)
    below_excess: float  # sum of lo - x over the values below the grid
    above_excess: float  # sum of x - hi over the values at or above its end
    missing: int  # rows without a finite value
    bin_counts: np.ndarray | None  # per profile bin, only when asked for (edges off the grid)

    @property
    def n(self) -> int:
        return int(self.grid_counts.sum())


def numeric_window(
    client: Client,
    scope: Scope,
    features: Sequence[Feature],
    grids: Sequence[Grid],
    edges: Sequence[Sequence[float] | None],
    *,
    layout: Layout | None,
    timeout_s: float,
) -> tuple[int, int, list[NumericWindow]]:
    """One pass: (rows, rows not matching `layout`, per-feature aggregates).

    Per feature: counts on its grid (`countResample`, a histogram of a small integer key), the
    excess sums beyond the grid, missing values, and, where edges are given (a profile whose bin
    edges are not grid boundaries), counts per bin. With a layout the values are read at constant
    positions; if some rows have another layout the caller must run again with layout=None.
    """
    where, base = scope.where()
    params = _Params(base)
    definitions, exprs = value_expressions(features, params, layout)
    cols = [*definitions]
    if layout is not None:
        cols.append(f"({layout.check(params, {f.source for f in features})}) AS layout_ok")
    aggs = ["count()", "countIf(NOT layout_ok)" if layout is not None else "0"]
    for i, (expr, grid, e) in enumerate(zip(exprs, grids, edges, strict=True)):
        g = grid.cells
        cols.append(f"{expr} AS f{i}")
        cols.append(f"if(isFinite(f{i}), {_cell_expression(f'f{i}', grid)}, {g + 2}) AS c{i}")
        aggs.append(f"countResample(0, {g + 3}, 1)(c{i})")
        aggs.append(f"sumIf(f{i}, c{i} = 0)")  # tail sums; with the tail counts, the excess beyond the grid
        aggs.append(f"sumIf(f{i}, c{i} = {g + 1})")
        if e is not None:
            aggs.append(f"countResampleIf(0, {len(e) + 1}, 1)({_bin_expression(f'f{i}', e)}, c{i} <= {g + 1})")
    sql = f"SELECT {', '.join(aggs)} FROM (SELECT {', '.join(cols) or '1'} FROM {scope.table()} WHERE {where})"
    row = list(client.query(sql, parameters=params.values, settings=_settings(timeout_s)).result_rows[0])
    rows, mismatched = int(row[0]), int(row[1])
    out = []
    k = 2
    for e in edges:
        cells = np.asarray(row[k], dtype=np.int64)
        grid = grids[len(out)]
        below = float(cells[0]) * grid.lo - float(row[k + 1])  # sum of lo - x below the grid
        above = float(row[k + 2]) - float(cells[grid.cells + 1]) * grid.hi  # sum of x - hi above it
        k += 3
        bins = None
        if e is not None:
            bins = np.asarray(row[k], dtype=np.int64)
            k += 1
        out.append(NumericWindow(cells[:-1], below, above, int(cells[-1]), bins))
    return rows, mismatched, out


# ---------------------------------------------------------------------------------- experiments


@dataclass(frozen=True)
class RatioSpec:
    """A ratio metric sum(y) / sum(x) over a unit's predictions, as row-level SQL expressions."""

    name: str
    y: str
    x: str = "1"
    needs_feedback: bool = False


@dataclass(frozen=True)
class VariantSums:
    variant: str
    units: int
    predictions: int
    metrics: dict[str, RatioMoments]


FEEDBACK_JOIN = (
    " LEFT ANY JOIN (SELECT prediction_id, argMax(label, created_at) AS fb_label, "
    "argMax(outcome, created_at) AS fb_outcome, argMax(rating, created_at) AS fb_rating, 1 AS fb_has "
    "FROM {feedback} GROUP BY prediction_id) AS fb ON p.prediction_id = fb.prediction_id"
)


def variant_counts(client: Client, scope: Scope, *, timeout_s: float) -> dict[str, int]:
    """Predictions per variant (a cheap pass over a LowCardinality column)."""
    where, params = scope.where()
    rows = client.query(
        f"SELECT toString(variant) AS v, count() FROM {scope.table()} WHERE {where} GROUP BY v ORDER BY v",
        parameters=params,
        settings=_settings(timeout_s),
    ).result_rows
    return {str(v): int(c) for v, c in rows}


def variant_sums(
    client: Client,
    scope: Scope,
    variants: Sequence[str],
    metrics: Sequence[RatioSpec],
    *,
    by_unit: bool,
    timeout_s: float,
    extra_params: dict[str, Any] | None = None,
) -> tuple[list[VariantSums], int]:
    """Per variant: units, predictions and, per metric, the sums the delta method needs.

    Also returns the predictions in the scope whose variant is NOT in `variants` (their units are
    left out of the sums): a caller that guessed the variant list (from the expected weights,
    without a pass over the window) must find 0 here, or list the variants and run again.

    by_unit: GROUP BY the unit (unit_id, or the prediction id when a prediction has none) first,
    so x and y are per-unit sums; otherwise every prediction is its own unit. The unit key is one
    UInt64: 56 bits of the unit's hash and 8 bits for the variant's index in `variants` (a flat
    integer key aggregates about twice as fast as (variant, unit); a collision of two units' 56-bit
    hashes, ~1e-5 for a million units, would merge them).
    """
    if not 0 < len(variants) < 256:
        raise ValueError(f"an experiment needs 1 to 255 variants, got {len(variants)}")
    where, params = scope.where()
    params = {**params, **(extra_params or {}), "variant_names": list(variants)}
    where = where.replace("model =", "p.model =", 1)
    table = "predictions AS p FINAL" if scope.final else "predictions AS p"
    join = ""
    if any(m.needs_feedback for m in metrics):
        join = FEEDBACK_JOIN.format(feedback="feedback FINAL" if scope.final else "feedback")
    variant_index = "toUInt64(indexOf({variant_names:Array(String)}, toString(p.variant)))"  # 0: not listed
    # x = 1 per prediction (most metrics): the unit's x is its prediction count n, no column needed.
    xs = {i: "n" if m.x == "1" else f"x{i}" for i, m in enumerate(metrics)}
    row_cols = [f"toFloat64({m.y}) AS y{i}" for i, m in enumerate(metrics)]
    row_cols += [f"toFloat64({m.x}) AS x{i}" for i, m in enumerate(metrics) if xs[i] != "n"]
    if by_unit:
        # A prediction without a unit id is its own unit: a random key (rand64 only runs for those
        # rows, and the prediction_id strings are never read).
        key = (
            "bitOr(bitAnd(if(p.unit_id = '', rand64(), xxh3(p.unit_id)), 72057594037927935), "
            f"bitShiftLeft({variant_index}, 56))"
        )
        unit_cols = [
            "bitShiftRight(k, 56) AS v",
            "count() AS n",
            *(f"sum(y{i}) AS y{i}" for i in range(len(metrics))),
            *(f"sum(x{i}) AS x{i}" for i in range(len(metrics)) if xs[i] != "n"),
        ]
        source = (
            f"(SELECT {', '.join(unit_cols)} FROM (SELECT {', '.join([f'{key} AS k', *row_cols])} "
            f"FROM {table}{join} WHERE {where}) GROUP BY k)"
        )
    else:
        row_cols += [f"{variant_index} AS v", "1 AS n"]
        source = f"(SELECT {', '.join(row_cols)} FROM {table}{join} WHERE {where})"
    aggs = ["v", "count() AS units", "sum(n) AS predictions"]
    for i in range(len(metrics)):
        x = xs[i]
        aggs.append(f"sum({x}), sum(y{i}), sum({x} * {x}), sum(y{i} * y{i}), sum({x} * y{i})")
    rows = client.query(
        f"SELECT {', '.join(aggs)} FROM {source} GROUP BY v ORDER BY v",
        parameters=params,
        settings=_settings(timeout_s),
    ).result_rows
    out = []
    unlisted = 0
    for row in rows:
        if int(row[0]) == 0:  # variants not in the list, all under index 0
            unlisted = int(row[2])
            continue
        variant, units, predictions = variants[int(row[0]) - 1], int(row[1]), int(row[2])
        sums = {}
        for i, m in enumerate(metrics):
            sx, sy, sxx, syy, sxy = (float(x) for x in row[3 + 5 * i : 8 + 5 * i])
            sums[m.name] = RatioMoments(units, sx, sy, sxx, syy, sxy)
        out.append(VariantSums(variant, units, predictions, sums))
    return out, unlisted


def variant_quantiles(
    client: Client,
    scope: Scope,
    column: str,
    levels: dict[str, tuple[float, float, float]],
    *,
    timeout_s: float,
) -> dict[str, tuple[int, float, float, float]]:
    """Per variant: (finite values, quantiles at the three levels) of a numeric column, exact."""
    if column not in METRIC_COLUMNS:
        raise ValueError(f"unknown metric column {column!r}; known: {list(METRIC_COLUMNS)}")
    where, base = scope.where()
    params = _Params(base)
    expr = NUMERIC_COLUMNS[column]
    aggs = []
    variants = list(levels)
    for variant in variants:
        cond = f"toString(variant) = {params.add(variant)} AND isFinite(x)"
        lv = ", ".join(_float(x) for x in levels[variant])
        aggs.append(f"countIf({cond}), quantilesExactIf({lv})(x, {cond})")
    row = client.query(
        f"SELECT {', '.join(aggs)} FROM (SELECT variant, {expr} AS x FROM {scope.table()} WHERE {where})",
        parameters=params.values,
        settings=_settings(timeout_s),
    ).result_rows[0]
    out = {}
    for i, variant in enumerate(variants):
        n, qs = row[2 * i], row[2 * i + 1]
        out[variant] = (int(n), float(qs[0]), float(qs[1]), float(qs[2]))
    return out
