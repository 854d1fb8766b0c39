"""`mlmesh report`: did the model drift, did the experiment's variant win, with intervals.

Two halves: collectors that call the Drift gRPC service (ComputeDrift per consecutive window,
AnalyzeExperiment sequentially over growing windows plus once, fixed-horizon, over the whole span)
and pure renderers that turn the resulting plain data into a rich terminal summary and one
self-contained HTML file with inline SVG plots (no scripts, no external assets).
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from services.common.api import drift_pb2, drift_pb2_grpc

STATUS_COLORS = {"ok": "#4caf50", "warn": "#ff9800", "alert": "#e53935"}
RICH_STATUS = {"ok": "green", "warn": "yellow", "alert": "bold red"}
SERIES_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
TREND_METHOD = "psi"  # computed for numeric and categorical features alike: one comparable scale


# ------------------------------------------------------------------------------------ plain data


@dataclass(frozen=True)
class FeaturePoint:
    """One feature in one window: its worst status and its PSI (NaN when not computed)."""

    feature: str
    status: str
    statistic: float
    warn: float = math.nan
    alert: float = math.nan


@dataclass(frozen=True)
class DriftWindow:
    start: datetime
    end: datetime
    rows: int = 0
    status: str = ""
    features: tuple[FeaturePoint, ...] = ()
    error: str = ""  # the RPC failed for this window (e.g. no reference profile yet)


@dataclass(frozen=True)
class MetricRow:
    metric: str
    treatment: str
    control: str
    control_value: float
    treatment_value: float
    estimate: float
    ci_low: float
    ci_high: float
    p_value: float | None
    decision: str
    srm_mismatch: bool = False
    note: str = ""


@dataclass(frozen=True)
class PathPoint:
    """Always-valid p-value and confidence sequence of one metric after a growing window."""

    end: datetime
    metric: str
    treatment: str
    p_value: float | None
    ci_low: float
    ci_high: float
    decision: str


@dataclass(frozen=True)
class ExperimentSummary:
    experiment: str
    final: tuple[MetricRow, ...] = ()  # fixed-horizon, whole span
    path: tuple[PathPoint, ...] = ()  # sequential, growing windows
    srm_mismatch: bool = False
    srm_p_value: float = math.nan
    variants: tuple[tuple[str, int], ...] = ()  # (variant, units)
    error: str = ""


@dataclass(frozen=True)
class Report:
    model: str
    start: datetime
    end: datetime
    drift: tuple[DriftWindow, ...] = ()
    experiment: ExperimentSummary | None = None
    generated_at: datetime = field(default_factory=lambda: datetime.now(UTC))


# ------------------------------------------------------------------------------------ collectors


def _ts(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value.astimezone(UTC).replace(tzinfo=None))
    return stamp


def _window(start: datetime, end: datetime) -> drift_pb2.TimeWindow:
    return drift_pb2.TimeWindow(start=_ts(start), end=_ts(end))


def _rpc_error(error: grpc.RpcError) -> str:
    code = error.code() if hasattr(error, "code") else None
    details = error.details() if hasattr(error, "details") else str(error)
    return f"{code.name if code else 'ERROR'}: {details}"


def split_windows(end: datetime, minutes: int, windows: int) -> list[tuple[datetime, datetime]]:
    """[end - minutes, end) cut into `windows` consecutive equal windows, oldest first."""
    if minutes <= 0 or windows <= 0:
        raise ValueError("minutes and windows must be positive")
    start = end - timedelta(minutes=minutes)
    step = (end - start) / windows
    return [(start + i * step, start + (i + 1) * step) for i in range(windows)]


def drift_window(response: drift_pb2.ComputeDriftResponse, start: datetime, end: datetime) -> DriftWindow:
    """Per feature: the worst status over its checks and the PSI check's statistic/thresholds."""
    trend = {r.feature: r for r in response.results if r.method == TREND_METHOD}
    points = []
    for f in response.features:
        check = trend.get(f.feature)
        points.append(
            FeaturePoint(
                feature=f.feature,
                status=f.status,
                statistic=check.statistic if check is not None else math.nan,
                warn=check.details.get("warn", math.nan) if check is not None else math.nan,
                alert=check.details.get("alert", math.nan) if check is not None else math.nan,
            )
        )
    return DriftWindow(start, end, rows=response.rows, status=response.status, features=tuple(points))


def collect_drift(
    stub: drift_pb2_grpc.DriftStub,
    model: str,
    spans: Sequence[tuple[datetime, datetime]],
    *,
    timeout: float = 60.0,
) -> list[DriftWindow]:
    """ComputeDrift for each window; a failing window is kept (with its error) so the others still show."""
    out = []
    for start, end in spans:
        try:
            response = stub.ComputeDrift(
                drift_pb2.ComputeDriftRequest(model=model, window=_window(start, end)), timeout=timeout
            )
        except grpc.RpcError as error:
            out.append(DriftWindow(start, end, error=_rpc_error(error)))
            continue
        out.append(drift_window(response, start, end))
    return out


def _metric_row(r: drift_pb2.MetricResult) -> MetricRow:
    return MetricRow(
        metric=r.metric,
        treatment=r.treatment_variant,
        control=r.control_variant,
        control_value=r.control_value,
        treatment_value=r.treatment_value,
        estimate=r.estimate,
        ci_low=r.ci_low,
        ci_high=r.ci_high,
        p_value=r.p_value if r.HasField("p_value") else None,
        decision=r.decision,
        srm_mismatch=r.srm_mismatch,
        note=r.note,
    )


def collect_experiment(
    stub: drift_pb2_grpc.DriftStub,
    model: str,
    experiment: str,
    spans: Sequence[tuple[datetime, datetime]],
    *,
    timeout: float = 60.0,
) -> ExperimentSummary:
    """Sequential (mSPRT) analysis over growing windows [first start, end_k) for the p-value path,
    then one fixed-horizon analysis over the whole span for the final table."""
    start = spans[0][0]
    path: list[PathPoint] = []
    for _, end in spans:
        try:
            reply = stub.AnalyzeExperiment(
                drift_pb2.AnalyzeExperimentRequest(
                    model=model, experiment=experiment, window=_window(start, end), sequential=True
                ),
                timeout=timeout,
            )
        except grpc.RpcError:
            continue  # e.g. no traffic yet in the first windows: the path starts later
        for r in reply.results:
            p = r.always_valid_p_value if r.HasField("always_valid_p_value") else None
            path.append(PathPoint(end, r.metric, r.treatment_variant, p, r.ci_low, r.ci_high, r.decision))
    try:
        final = stub.AnalyzeExperiment(
            drift_pb2.AnalyzeExperimentRequest(model=model, experiment=experiment, window=_window(start, spans[-1][1])),
            timeout=timeout,
        )
    except grpc.RpcError as error:
        return ExperimentSummary(experiment, path=tuple(path), error=_rpc_error(error))
    return ExperimentSummary(
        experiment,
        final=tuple(_metric_row(r) for r in final.results),
        path=tuple(path),
        srm_mismatch=final.srm.mismatch,
        srm_p_value=final.srm.p_value,
        variants=tuple((v.variant, v.units) for v in final.variants),
    )


def collect_report(
    stub: drift_pb2_grpc.DriftStub,
    model: str,
    *,
    experiment: str = "",
    minutes: int = 60,
    windows: int = 6,
    end: datetime | None = None,
    timeout: float = 60.0,
) -> Report:
    """Everything the report shows, for the `minutes` before `end` (default: now)."""
    stop = end or datetime.now(UTC)
    spans = split_windows(stop, minutes, windows)
    drift = collect_drift(stub, model, spans, timeout=timeout)
    summary = collect_experiment(stub, model, experiment, spans, timeout=timeout) if experiment else None
    return Report(model, spans[0][0], stop, tuple(drift), summary)


# ------------------------------------------------------------------------------------ formatting


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.{digits}g}"


def _clock(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%H:%M")


def feature_names(drift: Sequence[DriftWindow]) -> list[str]:
    """Every feature seen in any window, in first-seen order."""
    seen: dict[str, None] = {}
    for w in drift:
        for f in w.features:
            seen.setdefault(f.feature)
    return list(seen)


def window_errors(drift: Sequence[DriftWindow]) -> list[tuple[str, str]]:
    """(windows, error) once per distinct error: one missing profile should not repeat six times."""
    grouped: dict[str, list[DriftWindow]] = {}
    for w in drift:
        if w.error:
            grouped.setdefault(w.error, []).append(w)
    return [(f"{_clock(ws[0].start)}-{_clock(ws[-1].end)} ({len(ws)} windows)", err) for err, ws in grouped.items()]


def worst(statuses: Sequence[str]) -> str:
    order = {"ok": 0, "warn": 1, "alert": 2}
    known = [s for s in statuses if s in order]
    return max(known, key=order.__getitem__) if known else ""


# ------------------------------------------------------------------------------------ terminal


def print_report(report: Report, console: Console) -> None:
    """The readable summary: drift status per feature and window, then the experiment table."""
    console.print(
        f"[bold]mlmesh report[/bold] model [cyan]{escape(report.model)}[/cyan] "
        f"{report.start:%Y-%m-%d %H:%M} - {report.end:%H:%M} UTC"
    )
    drift = Table(title="Drift status per window (PSI)")
    drift.add_column("feature")
    for w in report.drift:
        drift.add_column(f"{_clock(w.start)}-{_clock(w.end)}", justify="center")
    for name in feature_names(report.drift):
        cells = []
        for w in report.drift:
            point = next((f for f in w.features if f.feature == name), None)
            if point is None:
                cells.append("-")
            else:
                style = RICH_STATUS.get(point.status, "")
                cells.append(f"[{style}]{escape(point.status)}[/] {_fmt(point.statistic, 2)}" if style else "-")
        drift.add_row(escape(name), *cells)
    drift.add_row("[dim]rows[/dim]", *[str(w.rows) if not w.error else "[red]error[/red]" for w in report.drift])
    console.print(drift)
    for span, error in window_errors(report.drift):
        console.print(f"[red]{escape(span)}[/red] {escape(error)}")
    exp = report.experiment
    if exp is None:
        return
    if exp.error:
        console.print(f"[red]experiment {escape(exp.experiment)}[/red]: {escape(exp.error)}")
        return
    table = Table(title=f"Experiment {escape(exp.experiment)} (fixed horizon; last always-valid p)")
    for column in ("metric", "variant", "control", "treatment", "effect", "95% CI", "p", "always-valid p", "decision"):
        table.add_column(column)
    last = _last_path(exp)
    for r in exp.final:
        seq = last.get((r.metric, r.treatment))
        table.add_row(
            escape(r.metric),
            escape(r.treatment),
            _fmt(r.control_value),
            _fmt(r.treatment_value),
            _fmt(r.estimate),
            f"[{_fmt(r.ci_low)}, {_fmt(r.ci_high)}]",
            _fmt(r.p_value),
            _fmt(seq.p_value if seq else None),
            escape(r.decision) + (" [red](SRM)[/red]" if r.srm_mismatch else ""),
        )
    console.print(table)
    if exp.srm_mismatch:
        console.print(f"[bold red]sample ratio mismatch[/bold red] (p = {_fmt(exp.srm_p_value)}): do not trust these")


def _last_path(exp: ExperimentSummary) -> dict[tuple[str, str], PathPoint]:
    last: dict[tuple[str, str], PathPoint] = {}
    for point in exp.path:
        last[point.metric, point.treatment] = point
    return last


# ------------------------------------------------------------------------------------ SVG plots


def _svg(width: int, height: int, body: list[str], label: str) -> str:
    return (
        f'<svg width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(label)}" '
        f'font-family="sans-serif" font-size="11">' + "".join(body) + "</svg>"
    )


def _text(x: float, y: float, text: str, anchor: str = "start", extra: str = "") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" {extra}>{html.escape(text)}</text>'


def svg_drift_heatmap(drift: Sequence[DriftWindow]) -> str:
    """Features x windows, coloured by status, PSI in the cell: where and when drift started."""
    names = feature_names(drift)
    cell_w, cell_h, left, top = 84, 24, 150, 30
    width, height = left + cell_w * max(len(drift), 1) + 10, top + cell_h * max(len(names), 1) + 10
    body = []
    for j, w in enumerate(drift):
        body.append(_text(left + j * cell_w + cell_w / 2, top - 10, f"{_clock(w.start)}-{_clock(w.end)}", "middle"))
    for i, name in enumerate(names):
        y = top + i * cell_h
        body.append(_text(left - 6, y + cell_h / 2 + 4, name, "end"))
        for j, w in enumerate(drift):
            point = next((f for f in w.features if f.feature == name), None)
            x = left + j * cell_w
            color = STATUS_COLORS.get(point.status, "#bdbdbd") if point else "#eeeeee"
            title = f"{name} {_clock(w.start)}-{_clock(w.end)}: " + (
                f"{point.status}, psi {_fmt(point.statistic)}" if point else (w.error or "no data")
            )
            body.append(
                f'<rect x="{x}" y="{y}" width="{cell_w - 2}" height="{cell_h - 2}" fill="{color}">'
                f"<title>{html.escape(title)}</title></rect>"
            )
            if point:
                body.append(
                    _text(
                        x + cell_w / 2,
                        y + cell_h / 2 + 4,
                        f"{point.status} {_fmt(point.statistic, 2)}",
                        "middle",
                        'fill="white"',
                    )
                )
    return _svg(width, height, body, "drift status per feature and window")


def _scale(lo: float, hi: float, a: float, b: float) -> Callable[[float], float]:
    span = hi - lo or 1.0
    return lambda v: a + (v - lo) / span * (b - a)


def svg_lines(
    x_labels: Sequence[str],
    series: dict[str, list[float | None]],
    *,
    label: str,
    y_label: str,
    hlines: Sequence[tuple[float, str, str]] = (),
    log_y: bool = False,
) -> str:
    """A small line chart: one line per series over the windows, with reference lines."""
    width, height, left, right, top, bottom = 640, 260, 60, 150, 20, 40
    tf = (lambda v: math.log10(max(v, 1e-12))) if log_y else (lambda v: v)
    values = [tf(v) for s in series.values() for v in s if v is not None and math.isfinite(v)]
    values += [tf(v) for v, _, _ in hlines if math.isfinite(v)]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    if not log_y:
        lo = min(lo, 0.0)
    if hi == lo:
        hi = lo + 1.0
    n = max(len(x_labels), 1)
    sx = _scale(0, max(n - 1, 1), left, width - right)
    sy = _scale(lo, hi, height - bottom, top)
    body = [
        f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="#333"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="#333"/>',
        _text(
            12,
            (top + height - bottom) / 2,
            y_label,
            "middle",
            f'transform="rotate(-90 12 {(top + height - bottom) / 2:.1f})"',
        ),
    ]
    for k in range(5):
        v = lo + (hi - lo) * k / 4
        shown = 10**v if log_y else v
        body.append(_text(left - 4, sy(v) + 4, _fmt(shown, 2), "end"))
    for i, x in enumerate(x_labels):
        body.append(_text(sx(i), height - bottom + 16, x, "middle"))
    for value, name, color in hlines:
        if math.isfinite(value):
            y = sy(tf(value))
            body.append(
                f'<line x1="{left}" y1="{y:.1f}" x2="{width - right}" y2="{y:.1f}" stroke="{color}" '
                'stroke-dasharray="4 3"/>'
            )
            body.append(_text(width - right + 4, y + 4, name, "start", f'fill="{color}"'))
    for k, (name, points) in enumerate(series.items()):
        color = SERIES_COLORS[k % len(SERIES_COLORS)]
        xy = [(sx(i), sy(tf(v))) for i, v in enumerate(points) if v is not None and math.isfinite(v)]
        if len(xy) > 1:
            coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in xy)
            body.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="2"/>')
        body.extend(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"/>' for x, y in xy)
        body.append(_text(width - right + 4, top + 14 * k + 40, name, "start", f'fill="{color}"'))
    return _svg(width, height, body, label)


def svg_drift_trend(drift: Sequence[DriftWindow]) -> str:
    """PSI per feature over the windows, against the warn/alert thresholds."""
    names = feature_names(drift)
    series: dict[str, list[float | None]] = {}
    warn = alert = math.nan
    for name in names:
        row: list[float | None] = []
        for w in drift:
            point = next((f for f in w.features if f.feature == name), None)
            row.append(point.statistic if point else None)
            if point and math.isfinite(point.alert):
                warn, alert = point.warn, point.alert
        series[name] = row
    return svg_lines(
        [_clock(w.end) for w in drift],
        series,
        label="PSI per feature over time",
        y_label="PSI",
        hlines=[(warn, "warn", STATUS_COLORS["warn"]), (alert, "alert", STATUS_COLORS["alert"])],
    )


def svg_forest(metric: str, rows: Sequence[tuple[str, float, float, float, str]]) -> str:
    """One metric's effects (treatment - control) with intervals; rows: (label, est, low, high, decision)."""
    width, left, right, top, row_h = 640, 230, 30, 24, 26
    height = top + row_h * max(len(rows), 1) + 30
    finite = [v for _, e, lo, hi, _ in rows for v in (e, lo, hi) if math.isfinite(v)]
    lo, hi = (min([*finite, 0.0]), max([*finite, 0.0])) if finite else (-1.0, 1.0)
    pad = (hi - lo) * 0.08 or 1.0
    sx = _scale(lo - pad, hi + pad, left, width - right)
    zero = sx(0.0)
    body = [
        _text(left, 14, f"{metric}: treatment - control", "start", 'font-weight="bold"'),
        f'<line x1="{zero:.1f}" y1="{top}" x2="{zero:.1f}" y2="{height - 24}" stroke="#555" stroke-dasharray="3 3"/>',
        _text(left, height - 8, _fmt(lo - pad, 3), "start"),
        _text(width - right, height - 8, _fmt(hi + pad, 3), "end"),
        _text(zero, height - 8, "0", "middle"),
    ]
    for i, (name, est, low, high, decision) in enumerate(rows):
        y = top + i * row_h + row_h / 2
        color = {"increase": "#d62728", "decrease": "#1f77b4"}.get(decision, "#555")
        body.append(_text(left - 8, y + 4, f"{name} ({decision})", "end"))
        if math.isfinite(low) and math.isfinite(high):
            body.append(
                f'<line x1="{sx(low):.1f}" y1="{y:.1f}" x2="{sx(high):.1f}" y2="{y:.1f}" stroke="{color}" '
                'stroke-width="2"/>'
            )
        if math.isfinite(est):
            body.append(
                f'<rect x="{sx(est) - 4:.1f}" y="{y - 4:.1f}" width="8" height="8" fill="{color}">'
                f"<title>{html.escape(f'{name}: {_fmt(est)} [{_fmt(low)}, {_fmt(high)}]')}</title></rect>"
            )
    return _svg(width, height, body, f"forest plot {metric}")


def forest_rows(exp: ExperimentSummary, metric: str) -> list[tuple[str, float, float, float, str]]:
    """Per treatment: the fixed-horizon CI and the latest confidence sequence (always valid, wider)."""
    last = _last_path(exp)
    rows = []
    for r in exp.final:
        if r.metric != metric:
            continue
        rows.append((f"{r.treatment} CI", r.estimate, r.ci_low, r.ci_high, r.decision))
        seq = last.get((metric, r.treatment))
        if seq is not None:
            rows.append((f"{r.treatment} conf. sequence", r.estimate, seq.ci_low, seq.ci_high, seq.decision))
    return rows


def svg_pvalue_path(exp: ExperimentSummary, alpha: float = 0.05) -> str:
    """Always-valid p-value per metric as the window grows: crossing alpha is a valid stop."""
    ends = sorted({p.end for p in exp.path})
    series: dict[str, list[float | None]] = {}
    for p in exp.path:
        key = p.metric if p.treatment in ("", "treatment") else f"{p.metric} ({p.treatment})"
        series.setdefault(key, [None] * len(ends))[ends.index(p.end)] = p.p_value
    return svg_lines(
        [_clock(e) for e in ends],
        series,
        label="always-valid p-value path",
        y_label="always-valid p (log)",
        hlines=[(alpha, f"alpha {alpha:g}", "#000")],
        log_y=True,
    )


# ------------------------------------------------------------------------------------ HTML

CSS = """
body { font-family: sans-serif; margin: 24px; color: #222; }
table { border-collapse: collapse; margin: 8px 0 16px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; font-size: 13px; }
.ok { color: #2e7d32; } .warn { color: #ef6c00; } .alert { color: #c62828; font-weight: bold; }
.error { color: #c62828; } figure { margin: 8px 0 20px; } figcaption { font-size: 12px; color: #555; }
"""


def _status_cell(status: str) -> str:
    return f'<td class="{html.escape(status)}">{html.escape(status or "-")}</td>'


def render_html(report: Report) -> str:
    """The whole report as one HTML string: inline CSS and SVG, every interpolated string escaped."""
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>mlmesh report: {e(report.model)}</title><style>{CSS}</style></head><body>",
        f"<h1>mlmesh report: {e(report.model)}</h1>",
        f"<p>{e(f'{report.start:%Y-%m-%d %H:%M} - {report.end:%Y-%m-%d %H:%M} UTC')}, "
        f"{len(report.drift)} windows; generated {e(f'{report.generated_at:%Y-%m-%d %H:%M:%S} UTC')}</p>",
        "<h2>Drift</h2>",
    ]
    names = feature_names(report.drift)
    latest = report.drift[-1] if report.drift else None
    parts.append("<table><tr><th>feature</th><th>latest status</th><th>latest PSI</th><th>worst over span</th></tr>")
    for name in names:
        points = [f for w in report.drift for f in w.features if f.feature == name]
        last = next((f for f in (latest.features if latest else ()) if f.feature == name), None)
        parts.append(
            f"<tr><td>{e(name)}</td>{_status_cell(last.status if last else '')}"
            f"<td>{e(_fmt(last.statistic if last else None))}</td>"
            f"{_status_cell(worst([p.status for p in points]))}</tr>"
        )
    parts.append("</table>")
    for span, error in window_errors(report.drift):
        parts.append(f'<p class="error">{e(span)}: {e(error)}</p>')
    if names:
        parts.append(
            f"<figure>{svg_drift_heatmap(report.drift)}<figcaption>Status per feature and window "
            "(worst of its checks; the number is PSI).</figcaption></figure>"
        )
        parts.append(
            f"<figure>{svg_drift_trend(report.drift)}<figcaption>PSI per feature over time.</figcaption></figure>"
        )
    exp = report.experiment
    if exp is not None:
        parts.append(f"<h2>Experiment {e(exp.experiment)}</h2>")
        if exp.error:
            parts.append(f'<p class="error">{e(exp.error)}</p>')
        if exp.variants:
            split = ", ".join(f"{v}: {n} units" for v, n in exp.variants)
            srm = "sample ratio mismatch: do not trust these results" if exp.srm_mismatch else "split as planned"
            parts.append(f"<p>{e(split)} ({e(srm)}, SRM p = {e(_fmt(exp.srm_p_value))})</p>")
        last = _last_path(exp)
        if exp.final:
            parts.append(
                "<table><tr><th>metric</th><th>variant</th><th>control</th><th>treatment</th><th>effect</th>"
                "<th>95% CI</th><th>p</th><th>always-valid p</th><th>decision</th></tr>"
            )
            for r in exp.final:
                seq = last.get((r.metric, r.treatment))
                decision = r.decision + (" (SRM)" if r.srm_mismatch else "")
                parts.append(
                    "<tr>"
                    + "".join(
                        f"<td>{e(v)}</td>"
                        for v in (
                            r.metric,
                            r.treatment,
                            _fmt(r.control_value),
                            _fmt(r.treatment_value),
                            _fmt(r.estimate),
                            f"[{_fmt(r.ci_low)}, {_fmt(r.ci_high)}]",
                            _fmt(r.p_value),
                            _fmt(seq.p_value if seq else None),
                        )
                    )
                    + f'<td class="decision">{e(decision)}</td></tr>'
                )
            parts.append("</table>")
        for metric in dict.fromkeys(r.metric for r in exp.final):
            parts.append(
                f"<figure>{svg_forest(metric, forest_rows(exp, metric))}<figcaption>{e(metric)}: "
                "estimate with its fixed-horizon CI and the (wider, always valid) confidence sequence."
                "</figcaption></figure>"
            )
        if exp.path:
            parts.append(
                f"<figure>{svg_pvalue_path(exp)}<figcaption>Always-valid (mSPRT) p-value over growing "
                "windows: stopping when it crosses alpha keeps the error rate.</figcaption></figure>"
            )
    parts.append("</body></html>")
    return "\n".join(parts)
