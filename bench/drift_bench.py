"""Analytics-plane benchmark: drift and A/B analysis over 10 million logged predictions in chdb.

    .venv/bin/python -m bench.drift_bench                       # 10M rows (~3 min, most of it setup)
    .venv/bin/python -m bench.drift_bench --store /tmp/drift-store   # keep the data; later runs reuse it
    .venv/bin/python -m bench.drift_bench --rows 1000000 --repeat 2  # quick

Setup (not timed as analysis): a chdb store with the logger's migrations (the real `predictions`
schema), then rows generated INSIDE ClickHouse with SQL (numbers() + rand*() functions, nothing
from Python): a reference hour of --reference-rows and a current hour of --rows predictions of one
model, 10 FP32 input features of different shapes (normal, lognormal, exponential, uniform,
counts, a mixture, heavy tails...), three of which drift in the current hour; 1M users split
50/50 by a hash into control/treatment, with 2 % vs 2.2 % errors and latency 10 + Exp(5) ms
(+0.2 ms in treatment). Then OPTIMIZE ... FINAL (the steady state after background merges); the
same analyses are also timed once BEFORE it, over the freshly inserted parts, where FINAL has to
merge them on read.

Timed, side by side in the same run:
1. drift of the current hour over the 10 features against a reference profile (PSI, JS, KS,
   Wasserstein per feature): DriftService.compute_drift, i.e. one SQL pass returning bin and grid
   counts, vs pulling the 10 feature columns of the 10M rows into numpy (clickhouse-connect
   query_np, the same client) and computing the same statistics with the core's raw-sample
   functions (numpy bincount for PSI/JS, scipy ks_2samp and wasserstein_distance);
2. the experiment (error rate, mean latency, p95 latency, SRM; users as the unit):
   DriftService.analyze_experiment with expected weights 1:1 (as the rollout gate gives them, so
   the variant list comes from the weights and the sums pass checks it) vs pulling (variant, user,
   error, latency) of the 10M rows into pandas (query_df), groupby per user, and the same
   estimators (core's ratio_welch, quantile_difference on numpy quantiles, sample_ratio_mismatch).
Floors: each chdb analysis under 2 s. Prints a table; writes bench/results/drift-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table
from scipy import stats

from services.common.clickhouse import Client, make_client
from services.drift.queries import Scope
from services.drift.service import DriftReport, DriftService, ExperimentReport
from services.drift.settings import DriftSettings
from services.drift.statistics import (
    NumericProfile,
    js_from_profile,
    ks_from_profile,
    psi_from_profile,
    sample_ratio_mismatch,
    wasserstein_from_profile,
)
from services.drift.statistics.pushdown import RatioMoments, order_statistic_levels, quantile_difference, ratio_welch
from services.logger.migrate import migrate
from services.logger.settings import RetentionSettings

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MODEL = "bench-drift"
EXPERIMENT = "bench-exp"
FLOOR_S = 2.0
USERS = 1_000_000


def feature_sql(current: bool) -> str:
    """10 FP32 values per row; the current hour shifts f0, rescales f3 and reweights the f6 mixture."""
    k = iter(range(1000))  # distinct arguments: ClickHouse evaluates identical rand calls once per row

    def r(fn: str, *args: float) -> str:
        text = [str(a) if fn == "randPoisson" else repr(float(a)) for a in args]  # Float64 arguments
        return f"{fn}({', '.join(text)}, {next(k)})"

    shift, scale, weight = (0.3, 1.2, 0.5) if current else (0.0, 1.0, 0.3)
    values = [
        f"{r('randNormal', 0, 1)} + {shift}",
        r("randNormal", 5, 2),
        r("randLogNormal", 0, 0.5),
        f"{r('randExponential', 1)} * {scale}",
        r("randUniform", 0, 1),
        f"toFloat64({r('randPoisson', 3)})",
        f"if({r('randUniform', 0, 1)} < {weight}, {r('randNormal', 3, 0.5)}, {r('randNormal', -1, 1)})",
        r("randNormal", 100, 15),
        f"pow({r('randUniform', 0, 1)}, 2)",
        f"{r('randNormal', 0, 1)} / sqrt({r('randUniform', 0.05, 1)})",
    ]
    return "[" + ", ".join(f"toFloat64(toFloat32({v}))" for v in values) + "]"


def generate(client: Client, start: datetime, rows: int, current: bool) -> None:
    step_us = max(1, int(3_600_000_000 / rows))  # the rows fill one hour
    client.command(
        f"""
        INSERT INTO predictions (prediction_id, request_id, tenant, unit_id, rpc, model, model_version, experiment,
            variant, shadow, started_at, latency_ms, status_code, input_tensors, input_sizes, input_values,
            output_tensors, output_sizes, output_values, schema_version)
        SELECT toString(generateUUIDv4(number)), '', 'bench', concat('user-', toString(u)), 'Predict', '{MODEL}',
            '1', '{EXPERIMENT}', if(cityHash64(u) % 2 = 0, 'control', 'treatment') AS v, false,
            toDateTime64('{start:%Y-%m-%d %H:%M:%S}', 6, 'UTC') + toIntervalMicrosecond(number * {step_us}),
            10 + randExponential(0.2, 1) + if(v = 'treatment', 0.2, 0),
            if(randUniform(0, 1, 2) < if(v = 'treatment', 0.022, 0.02), 'INTERNAL', 'OK'),
            ['input'], [10], {feature_sql(current)}, ['probabilities'], [2], [0.4, 0.6], 1
        FROM (SELECT number, (number * 7919) % {USERS} AS u FROM numbers({rows}))
        """,
        settings={
            "max_insert_threads": 2,
            "optimize_on_insert": 0,
            "min_insert_block_size_rows": 5_000_000,
            "max_block_size": 1_000_000,
            "max_execution_time": 3600,
        },
    )


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # chdb runs in this process: its threads count
    return usage.ru_utime + usage.ru_stime


def system_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    ticks = os.sysconf("SC_CLK_TCK")
    return (sum(values[:8]) - idle) / ticks, sum(values[:8]) / ticks


def timed(fn: Callable[[], Any], repeat: int) -> tuple[Any, dict[str, Any]]:
    """Runs fn `repeat` times; wall and CPU of each, and the CPU other processes used meanwhile."""
    walls, cpus, foreign = [], [], []
    result = None
    for _ in range(repeat):
        busy0, _ = system_busy()
        c0, t0 = cpu_seconds(), time.perf_counter()
        result = fn()
        wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
        busy1, _ = system_busy()
        walls.append(wall)
        cpus.append(cpu)
        foreign.append(max(0.0, (busy1 - busy0 - cpu) / wall))
    return result, {
        "wall_s": walls,
        "cpu_s": cpus,
        "best_wall_s": min(walls),
        "median_wall_s": statistics.median(walls),
        "foreign_cores": foreign,
    }


# ------------------------------------------------------------------------------------- baselines


def pandas_drift(client: Client, scope: Scope, profiles: dict[str, NumericProfile]) -> dict[str, Any]:
    where, params = scope.where()
    t0 = time.perf_counter()
    # Positional columns: the cheapest pull there is (no array decoding on the Python side).
    cols = ", ".join(f"input_values[{k + 1}] AS f{k}" for k in range(len(profiles)))
    data = client.query_np(f"SELECT {cols} FROM {scope.table()} WHERE {where}", parameters=params)
    pulled = time.perf_counter() - t0
    out: dict[str, dict[str, float]] = {}
    for k, (key, profile) in enumerate(profiles.items()):
        x = np.ascontiguousarray(data[:, k], dtype=np.float64)
        counts = profile.bin_counts(x)
        psi, js = psi_from_profile(profile, counts), js_from_profile(profile, counts)
        ks, ws = ks_from_profile(profile, x), wasserstein_from_profile(profile, x)
        out[key] = {"psi": psi.psi, "js": js.divergence, "ks": ks.statistic, "wasserstein": ws.normalized}
    return {"rows": int(data.shape[0]), "pull_s": pulled, "compute_s": time.perf_counter() - t0 - pulled, "stats": out}


def pandas_experiment(client: Client, scope: Scope, alpha: float = 0.05) -> dict[str, Any]:
    where, params = scope.where()
    t0 = time.perf_counter()
    df = client.query_df(
        f"SELECT toString(variant) AS v, unit_id AS u, toUInt8(status_code != 'OK') AS e, latency_ms AS l "
        f"FROM {scope.table()} WHERE {where}",
        parameters=params,
    )
    pulled = time.perf_counter() - t0
    per_unit = df.groupby(["v", "u"], sort=False, observed=True).agg(n=("e", "size"), e=("e", "sum"), l=("l", "sum"))
    moments: dict[str, dict[str, RatioMoments]] = {}
    for variant, g in per_unit.groupby(level="v"):
        n, e, lat = (g[c].to_numpy(dtype=np.float64) for c in ("n", "e", "l"))
        moments[str(variant)] = {
            name: RatioMoments(len(g), n.sum(), y.sum(), (n * n).sum(), (y * y).sum(), (n * y).sum())
            for name, y in (("error_rate", e), ("mean_latency_ms", lat))
        }
    results = {
        name: ratio_welch(moments["control"][name], moments["treatment"][name], alpha=alpha, metric=name)
        for name in ("error_rate", "mean_latency_ms")
    }
    z = float(stats.norm.ppf(1 - alpha / 2))
    arms = {}
    for variant, lat in df.groupby("v", observed=True)["l"]:
        x = lat.to_numpy()
        lo, hi = order_statistic_levels(0.95, x.size, z)
        q = np.quantile(x, [0.95, lo, hi], method="inverted_cdf")
        arms[str(variant)] = (x.size, float(q[0]), float(q[1]), float(q[2]))
    results["p95_latency_ms"] = quantile_difference(arms["control"], arms["treatment"], quantile=0.95, alpha=alpha)
    srm = sample_ratio_mismatch([moments[v]["error_rate"].n for v in ("control", "treatment")], [0.5, 0.5])
    return {
        "rows": len(df),
        "pull_s": pulled,
        "compute_s": time.perf_counter() - t0 - pulled,
        "results": {k: r.to_dict() for k, r in results.items()},
        "srm_p_value": srm.p_value,
        "units": {v: m["error_rate"].n for v, m in moments.items()},
    }


def drift_stats(report: DriftReport) -> dict[str, dict[str, float]]:
    names = {"psi": "psi", "jensen_shannon": "js", "ks": "ks", "wasserstein": "wasserstein"}
    out: dict[str, dict[str, float]] = {}
    for check in report.checks:
        out.setdefault(f"{check.source}/{check.feature}", {})[names.get(check.method, check.method)] = check.statistic
    return out


def experiment_stats(report: ExperimentReport) -> dict[str, Any]:
    return {
        "results": {m.result.metric: m.result.to_dict() for m in report.results},
        "srm_p_value": report.srm.p_value,
        "units": {v.variant: v.units for v in report.variants},
    }


# ------------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000, help="predictions in the analysed hour")
    parser.add_argument("--reference-rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=5, help="timed runs of each chdb analysis")
    parser.add_argument("--store", type=Path, help="chdb directory to keep and reuse (default: a temp dir)")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--sample-rows", type=int, default=2_000_000, help="drift_sample_rows of the sampled run")
    args = parser.parse_args()
    console = Console(width=150)
    workdir = args.store or Path(tempfile.mkdtemp(prefix="mlmesh-bench-drift-"))
    client = make_client(f"chdb://{workdir.resolve()}")
    record: dict[str, Any] = {
        "benchmark": "drift",
        "started_at": datetime.now(UTC).isoformat(),
        "host": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg_at_start": os.getloadavg(),
        },
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "store": str(workdir),
    }
    try:
        migrate(client, RetentionSettings())
        # Reference and current hours: recent (the table's TTL drops old rows), fixed per store.
        found = client.query(f"SELECT min(started_at), count() FROM predictions WHERE model = '{MODEL}'").result_rows[0]
        if found[1] == args.rows + args.reference_rows:
            ref_start = found[0].replace(tzinfo=UTC)
            console.print(f"reusing {found[1]:,} rows in {workdir}")
            setup = {"reused": True}
        else:
            client.command("TRUNCATE TABLE predictions")
            client.command("DROP TABLE IF EXISTS drift_profiles")
            ref_start = (datetime.now(UTC) - timedelta(hours=3)).replace(minute=0, second=0, microsecond=0)
            console.print(f"generating {args.reference_rows:,} + {args.rows:,} rows in ClickHouse (SQL) ...")
            t0 = time.perf_counter()
            generate(client, ref_start, args.reference_rows, current=False)
            generate(client, ref_start + timedelta(hours=1), args.rows, current=True)
            setup = {"reused": False, "insert_s": time.perf_counter() - t0}
            console.print(f"  inserted in {setup['insert_s']:.0f} s")
        cur_start = ref_start + timedelta(hours=1)
        cur_end = cur_start + timedelta(hours=1)
        parts = client.query("SELECT count() FROM system.parts WHERE active AND table = 'predictions'").result_rows[0][
            0
        ]
        setup["parts_before_optimize"] = int(parts)

        service = DriftService(client, DriftSettings())
        service.ensure_schema()
        console.print("reference profile from the reference hour ...")
        created, t_profile = timed(
            lambda: service.create_profile_from_window(MODEL, "", ref_start, cur_start, description="bench"), 1
        )
        profile_id = created.stored.profile_id

        def drift() -> DriftReport:
            return service.compute_drift(MODEL, "", cur_start, cur_end, profile_id)

        def experiment() -> ExperimentReport:
            return service.analyze_experiment(
                MODEL, EXPERIMENT, cur_start, cur_end, expected_weights={"control": 1, "treatment": 1}
            )

        unmerged: dict[str, Any] = {}
        if parts > 1:
            console.print(f"timing once over the {parts} freshly inserted parts (FINAL merges on read) ...")
            _, unmerged["drift"] = timed(drift, 1)
            _, unmerged["experiment"] = timed(experiment, 1)
            console.print("OPTIMIZE TABLE predictions FINAL (steady state after merges) ...")
            t0 = time.perf_counter()
            client.command("OPTIMIZE TABLE predictions FINAL", settings={"max_execution_time": 3600})
            setup["optimize_s"] = time.perf_counter() - t0
        # The values column as the timed passes read it (the codec is set by migration 005; parts
        # written before it keep theirs until merged).
        sizes = client.query(
            "SELECT sum(data_compressed_bytes), sum(data_uncompressed_bytes), any(compression_codec) "
            "FROM system.columns WHERE database = currentDatabase() AND table = 'predictions' "
            "AND name = 'input_values'"
        ).result_rows[0]
        setup["input_values_bytes"] = [int(s) for s in sizes[:2]]
        setup["input_values_codec"] = sizes[2] or "the engine's default"
        console.print(f"timing the chdb analyses ({args.repeat} runs each) ...")
        drift_report, t_drift = timed(drift, args.repeat)
        exp_report, t_exp = timed(experiment, args.repeat)
        sampler = DriftService(client, DriftSettings(drift_sample_rows=args.sample_rows))
        sampled_report, t_sampled = timed(
            lambda: sampler.compute_drift(MODEL, "", cur_start, cur_end, profile_id), args.repeat
        )
        no_final = DriftService(client, DriftSettings(read_final=False))
        _, t_drift_nofinal = timed(
            lambda: no_final.compute_drift(MODEL, "", cur_start, cur_end, profile_id), max(1, args.repeat // 2)
        )
        _, t_exp_nofinal = timed(
            lambda: no_final.analyze_experiment(MODEL, EXPERIMENT, cur_start, cur_end), max(1, args.repeat // 2)
        )

        baseline: dict[str, Any] = {}
        if not args.skip_baseline:
            scope = Scope(MODEL, "", cur_start, cur_end, final=True)
            stored = service.profile(MODEL, "", profile_id).profile
            console.print("baseline: pull the rows into numpy / pandas and compute with numpy / scipy ...")
            (baseline["drift"], t_base_drift) = timed(lambda: pandas_drift(client, scope, dict(stored.numeric)), 1)
            (baseline["experiment"], t_base_exp) = timed(
                lambda: pandas_experiment(client, Scope(MODEL, "", cur_start, cur_end, EXPERIMENT, True)), 1
            )
            baseline["drift_timing"], baseline["experiment_timing"] = t_base_drift, t_base_exp
    finally:
        client.close()
        if args.store is None:
            shutil.rmtree(workdir, ignore_errors=True)

    # ---- comparison and report --------------------------------------------------------------
    sql_drift = drift_stats(drift_report)
    sql_exp = experiment_stats(exp_report)
    diffs: dict[str, float] = {}
    if baseline:
        for stat in ("psi", "js", "ks", "wasserstein"):
            diffs[f"drift.{stat}"] = max(
                abs(sql_drift[key][stat] - values[stat]) for key, values in baseline["drift"]["stats"].items()
            )
        for metric, res in baseline["experiment"]["results"].items():
            mine = sql_exp["results"][metric]
            diffs[f"experiment.{metric}.estimate"] = abs(mine["estimate"] - res["estimate"])
            diffs[f"experiment.{metric}.p_value"] = abs(mine["p_value"] - res["p_value"])
        diffs["experiment.srm_p_value"] = abs(sql_exp["srm_p_value"] - baseline["experiment"]["srm_p_value"])

    table = Table(
        title=f"drift / A-B analysis over {drift_report.rows:,} logged predictions (chdb, {os.cpu_count()} cores)"
    )
    for column, justify in (
        ("analysis", "left"),
        ("chdb pushdown", "right"),
        ("pandas/scipy (pull + compute)", "right"),
        ("pull", "right"),
        ("compute", "right"),
        ("speedup", "right"),
        ("floor < 2 s", "left"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]

    def row(name: str, timing: dict[str, Any], base: dict[str, Any] | None, base_timing: dict[str, Any] | None) -> None:
        best = timing["best_wall_s"]
        ok = best < FLOOR_S
        cells = [name, f"{best:.2f} s (median {timing['median_wall_s']:.2f}, cpu {min(timing['cpu_s']):.2f})"]
        if base and base_timing:
            total = base_timing["best_wall_s"]
            cells += [f"{total:.1f} s", f"{base['pull_s']:.1f} s", f"{base['compute_s']:.1f} s", f"{total / best:.0f}x"]
        else:
            cells += ["-", "-", "-", "-"]
        cells.append("[green]PASS[/]" if ok else "[red]FAIL[/]")
        table.add_row(*cells)

    row("drift: 10 features (PSI, JS, KS, Wasserstein)", t_drift, baseline.get("drift"), baseline.get("drift_timing"))
    row(f"drift, sampled: ~{args.sample_rows:,} rows by prediction-id range", t_sampled, None, None)
    row(
        "experiment: error rate, mean + p95 latency, SRM",
        t_exp,
        baseline.get("experiment"),
        baseline.get("experiment_timing"),
    )
    console.print(table)
    foreign = max(t_drift["foreign_cores"] + t_exp["foreign_cores"])
    console.print(
        f"other processes used up to {foreign:.2f} cores during the chdb runs (> 0.15: disturbed); "
        f"reads use FINAL on {1 if parts > 1 else parts} part(s) after OPTIMIZE"
    )
    console.print(
        f"without FINAL: drift {t_drift_nofinal['best_wall_s']:.2f} s, experiment {t_exp_nofinal['best_wall_s']:.2f} s"
        + (
            f"; FINAL over {parts} unmerged parts: drift {unmerged['drift']['best_wall_s']:.2f} s, "
            f"experiment {unmerged['experiment']['best_wall_s']:.2f} s"
            if unmerged
            else ""
        )
    )
    console.print(f"reference profile of {created.stored.rows:,} rows built in {t_profile['best_wall_s']:.2f} s")
    stored_bytes = setup["input_values_bytes"]
    console.print(
        f"input_values: {stored_bytes[0] / 1e6:,.0f} MB stored, {stored_bytes[1] / 1e6:,.0f} MB uncompressed "
        f"({setup['input_values_codec']})"
    )
    if diffs:
        console.print("largest differences chdb vs baseline: " + ", ".join(f"{k} {v:.2g}" for k, v in diffs.items()))
    res = sql_exp["results"]
    console.print(
        "experiment: "
        + "; ".join(
            f"{k} {r['estimate']:+.4g} [{r['ci_low']:+.4g}, {r['ci_high']:+.4g}] p={r['p_value']:.2g} {r['decision']}"
            for k, r in res.items()
        )
        + f"; SRM p={sql_exp['srm_p_value']:.2g}"
    )
    console.print("drift: " + ", ".join(f"{f.feature} {f.status}" for f in drift_report.features))
    sampled_stats = drift_stats(sampled_report)
    sample_diffs = {
        stat: max(abs(sampled_stats[k][stat] - v[stat]) for k, v in sql_drift.items()) for stat in ("psi", "ks")
    }
    console.print(
        f"sampled drift ({sampled_report.sampled_fraction:.1%} of the rows): "
        + ", ".join(f"{f.feature} {f.status}" for f in sampled_report.features)
        + f"; largest difference to the full pass: psi {sample_diffs['psi']:.2g}, ks {sample_diffs['ks']:.2g}"
    )

    record.update(
        {
            "setup": setup,
            "rows": drift_report.rows,
            "profile": {"profile_id": profile_id, "rows": created.stored.rows, "timing": t_profile},
            "chdb": {
                "drift": t_drift,
                "experiment": t_exp,
                "drift_sampled": t_sampled,
                "drift_sampled_fraction": sampled_report.sampled_fraction,
                "drift_sampled_max_abs_differences": sample_diffs,
                "drift_without_final": t_drift_nofinal,
                "experiment_without_final": t_exp_nofinal,
                "unmerged_parts": unmerged,
            },
            "baseline": baseline,
            "results": {"drift": sql_drift, "drift_status": drift_report.status, "experiment": sql_exp},
            "max_abs_differences": diffs,
            "floors": {
                "drift_under_2s": t_drift["best_wall_s"] < FLOOR_S,
                "drift_sampled_under_2s": t_sampled["best_wall_s"] < FLOOR_S,
                "experiment_under_2s": t_exp["best_wall_s"] < FLOOR_S,
            },
            "loadavg_at_end": os.getloadavg(),
        }
    )
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"drift-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(record, indent=2, default=str))
    console.print(f"results: {out}")


if __name__ == "__main__":
    main()
