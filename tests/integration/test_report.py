"""`mlmesh report` against the REAL drift service (hosted next to the real logger, as in
test_drift_service): six 10-minute windows of a model whose input[0] shifts halfway through, and
an experiment whose treatment is 3 ms slower. The report must show the alert, the decision, a plot
per section, and stay self-contained."""

from __future__ import annotations

import argparse
import asyncio
import re
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from rich.console import Console

from services.cli.report_command import add_report_command
from services.common.api import drift_pb2, drift_pb2_grpc
from services.drift.report import collect_report, print_report, render_html
from tests.integration.test_drift_service import T0, Env, env, insert_predictions, window  # noqa: F401

pytestmark = pytest.mark.integration

HOUR = T0 + timedelta(hours=3)  # after the hours test_drift_service uses; other models anyway
MODEL = "reported"


async def test_report_shows_drift_and_experiment(env: Env) -> None:  # noqa: F811
    await asyncio.to_thread(insert_predictions, env.client, model=MODEL, n=6000, start=T0, seed="rep-ref")
    created = await env.stub.CreateReferenceProfile(
        drift_pb2.CreateReferenceProfileRequest(model=MODEL, window=window(T0))
    )
    assert created.rows == 6000
    for i in range(6):  # 3000 predictions per window; input[0] shifted by 0.5 sd in the last three
        await asyncio.to_thread(
            insert_predictions,
            env.client,
            model=MODEL,
            n=3000,
            start=HOUR + timedelta(minutes=10 * i),
            seed=f"rep-{i}",
            shifts=(0.5 if i >= 3 else 0.0, 0.0, 0.0),
            experiment="faster",
            variant="if(cityHash64(number, 'rep-assign') % 2 = 0, 'control', 'treatment')",
            latency="if(v = 'treatment', 13, 10)",
        )

    def collect() -> object:
        with grpc.insecure_channel(env.drift.address) as channel:
            return collect_report(
                drift_pb2_grpc.DriftStub(channel),
                MODEL,
                experiment="faster",
                minutes=60,
                windows=6,
                end=HOUR + timedelta(minutes=60),
            )

    report = await asyncio.to_thread(collect)
    assert [w.error for w in report.drift] == [""] * 6
    status = [{f.feature: f.status for f in w.features} for w in report.drift]
    assert [s["input[0]"] for s in status] == ["ok"] * 3 + ["alert"] * 3
    assert all(s["input[1]"] == "ok" for s in status)
    exp = report.experiment
    assert exp is not None and not exp.error and not exp.srm_mismatch
    final = {r.metric: r for r in exp.final}
    assert final["mean_latency_ms"].decision == "increase"
    assert final["mean_latency_ms"].ci_low < 3 < final["mean_latency_ms"].ci_high
    path = [p for p in exp.path if p.metric == "mean_latency_ms"]
    assert len(path) == 6 and path[-1].p_value is not None and path[-1].p_value < 0.05

    page = render_html(report)
    assert re.search(r"<td>input\[0\]</td><td class=\"alert\">alert</td>", page)
    assert '<td class="decision">increase</td>' in page
    # heatmap + PSI trend, a forest plot per metric, the p-value path
    assert page.count("<svg") == 2 + len(final) + 1
    assert page.count("</svg>") == page.count("<svg")
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert "<script" not in page and "<link" not in page

    console = Console(record=True, width=160)
    print_report(report, console)
    text = console.export_text()
    assert "alert" in text and "increase" in text


async def test_cli_writes_a_report_for_an_empty_look_back(env: Env, tmp_path: Path) -> None:  # noqa: F811
    """The wiring: `report` parses its flags, and a model without a profile or traffic still gets a
    page that says why (once, not per window), with exit status 1."""
    parser = argparse.ArgumentParser(prog="mlmesh")
    add_report_command(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "r.html"
    args = parser.parse_args(
        [
            "report",
            "--model",
            "unprofiled",
            "--experiment",
            "faster",
            "--minutes",
            "30",
            "--windows",
            "3",
            "--out",
            str(out),
            "--drift",
            env.drift.address,
        ]
    )
    assert (args.minutes, args.windows) == (30, 3)
    code = await asyncio.to_thread(args.func, args)
    page = out.read_text()
    assert code == 1
    assert page.startswith("<!DOCTYPE html>") and "mlmesh report: unprofiled" in page
    assert page.count("no reference profile yet") == 1 and "(3 windows)" in page
    assert "no predictions of model &#x27;unprofiled&#x27;" in page and "<svg" not in page
