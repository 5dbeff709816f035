"""Reports: results.json, summary.txt, timeline.svg and report.html.

The timeline is plain SVG text (no plotting dependency): latency of every
completed operation over time on a log scale, coloured by outcome, with the
fault windows shaded and labelled, and below it completions per second.
``report.html`` is one self-contained page (inline SVG, no scripts): the
verdict, seed and replay command, the operations of every process on lanes
over time, the latency/throughput plot, every checker's result and the faults.
Watch streams are long-lived (one op per stream): they appear on the lanes,
not in the latency plot.
"""

from __future__ import annotations

import html
import json
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .history import Op

__all__ = ["count_ops", "write_results", "write_summary", "timeline_svg", "write_timeline", "latency_summary",
           "unavailability", "lanes_svg", "report_html", "write_html"]

COLORS = {"ok": "#2ca02c", "fail": "#1f77b4", "info": "#d62728"}
FAULT_COLORS = {"kill": "#d62728", "pause": "#9467bd", "partition": "#ff7f0e", "clock": "#8c564b",
                "membership": "#17becf"}
LANE_COLORS = {**COLORS, "stream": "#98df8a"}
#: Operations that are streams, not requests: no latency, not counted as throughput.
STREAM_OPS = frozenset(("watch",))
#: Points drawn at most: beyond this, ok points are thinned (fail/info are always drawn).
POINTS_MAX = 20_000
#: The same in report.html, which also holds the lanes: keeps the page of a long run to a few MB.
HTML_POINTS_MAX = 6_000


def count_ops(ops: Sequence[Op]) -> dict[str, Any]:
    per: dict[str, dict[str, Counter[str]]] = defaultdict(lambda: defaultdict(Counter))
    totals: Counter[str] = Counter()
    for op in ops:
        per[op.workload][op.f][op.type] += 1
        totals[op.type] += 1
    return {
        "total": sum(totals.values()),
        **{t: totals[t] for t in ("ok", "fail", "info")},
        "by_workload": {w: {f: dict(c) for f, c in fs.items()} for w, fs in sorted(per.items())},
    }


def write_results(path: Path, results: dict[str, Any]) -> None:
    path.write_text(json.dumps(results, indent=2, sort_keys=False, default=str) + "\n")


def write_summary(path: Path, results: dict[str, Any]) -> None:
    if results.get("scenario"):
        setup = f"scenario {results['scenario']}"
    else:
        setup = (f"time limit {results['time_limit_s']}s, workloads {','.join(results['workloads'])}, "
                 f"nemesis {','.join(results['nemeses']) or 'none'}")
    lines = [
        f"jepsen-lite: valid = {results['valid']}",
        f"seed {results['seed']}, target {results['target']}, {setup}",
    ]
    counts = results.get("counts", {})
    if counts:
        lines.append(f"operations: {counts.get('total', 0)} (ok {counts.get('ok', 0)}, fail {counts.get('fail', 0)}, "
                     f"info {counts.get('info', 0)})")
    unavailable = results.get("unavailability")
    if unavailable:
        lines.append(f"unavailable: {unavailable['count']} window(s) >= {unavailable['threshold_s']}s without an ok "
                     f"response, {unavailable['total_s']}s in all, longest {unavailable['longest_s']}s; "
                     f"{results.get('latency_ms', {}).get('ok_per_s', '?')} ok/s")
    for name, res in results.get("checkers", {}).items():
        detail = ""
        violations = [k for k, v in res.items() if isinstance(v, dict) and "count" in v]
        if violations:
            detail = " -- " + ", ".join(f"{k}: {res[k]['count']}" for k in violations)
        if name == "linearizable-register":
            bad = [k for k, v in res.get("keys", {}).items() if v.get("valid") is not True]
            detail = f" -- keys not linearizable/unknown: {', '.join(bad)}" if bad else ""
        lines.append(f"  {name}: {res.get('valid')}{detail}")
    faults = results.get("faults", [])
    if faults:
        lines.append("faults:")
        for w in faults:
            where = w.get("nodes") or w.get("drops") or []
            extra = f" x{w['rate']}" if w.get("rate") else ""
            lines.append(f"  {w.get('start_s', '?'):>7}s +{w.get('duration_s', '?')}s {w['kind']} {w['target']}"
                         f"{extra}: {', '.join(map(str, where))}")
    for note in results.get("notes", []):
        lines.append(f"note: {note}")
    if results.get("error"):
        lines.append(f"error: {results['error']}")
    lines.append(f"replay: {results.get('replay', '')}")
    path.write_text("\n".join(lines) + "\n")


def _nice_step(span: float, target_ticks: int = 10) -> float:
    raw = max(span / target_ticks, 1e-9)
    power: float = 10.0 ** math.floor(math.log10(raw))
    for mult in (1, 2, 5, 10):
        if raw <= mult * power:
            return mult * power
    return 10 * power


def timeline_svg(ops: Sequence[Op], faults: Sequence[dict[str, Any]], t0_ns: int, *,
                 markers: Sequence[tuple[int, str]] = (), title: str = "", points_max: int = POINTS_MAX,
                 thin_failures: bool = False) -> str:
    width, left, right = 1200, 70, 20
    top, lat_h, gap, thr_h, bottom = 50, 340, 40, 140, 40
    height = top + lat_h + gap + thr_h + bottom
    plot_w = width - left - right
    done = [op for op in ops if op.complete_time is not None and op.f not in STREAM_OPS]
    end_ns = max([op.complete_time or op.invoke_time for op in ops] + [w.get("end_ns", t0_ns) for w in faults]
                 + [t0_ns + 1_000_000_000])
    span_s: float = max((end_ns - t0_ns) / 1e9, 1.0)
    min_s: float = min(0.0, min(((op.invoke_time - t0_ns) / 1e9 for op in ops), default=0.0))
    span_s -= min_s

    def x(t_ns: float) -> float:
        return left + ((t_ns - t0_ns) / 1e9 - min_s) / span_s * plot_w

    latencies = [(op.latency_ns or 1) / 1e6 for op in done]
    lat_lo = 0.1
    lat_hi = max([10.0, *latencies]) * 1.2
    log_lo, log_hi = math.log10(lat_lo), math.log10(lat_hi)

    def y(ms: float) -> float:
        v = math.log10(max(ms, lat_lo))
        return top + lat_h - (v - log_lo) / (log_hi - log_lo) * lat_h

    out: list[str] = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{left}" y="20" font-size="14">{html.escape(title)}</text>',
    ]
    # Fault windows across both panels.
    for w in faults:
        start = w.get("start_ns")
        if start is None:
            continue
        stop = w.get("end_ns", end_ns)
        color = FAULT_COLORS.get(w.get("kind", ""), "#7f7f7f")
        x0, x1 = x(start), max(x(stop), x(start) + 1)
        out.append(f'<rect x="{x0:.1f}" y="{top}" width="{x1 - x0:.1f}" height="{lat_h + gap + thr_h}" '
                   f'fill="{color}" fill-opacity="0.13"/>')
        label = f"{w.get('kind')} {w.get('target')}"
        if w.get("nodes"):
            label += " " + ",".join(w["nodes"])
        if len(faults) <= 30 or x1 - x0 >= 6 * len(label):  # a long run's labels would overlap
            out.append(f'<text x="{x0 + 2:.1f}" y="{top - 4}" fill="{color}">{html.escape(label)}</text>')
    # Axes and grid.
    out.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{lat_h}" fill="none" stroke="#333"/>')
    thr_top = top + lat_h + gap
    out.append(f'<rect x="{left}" y="{thr_top}" width="{plot_w}" height="{thr_h}" fill="none" stroke="#333"/>')
    step = _nice_step(span_s)
    tick = math.ceil(min_s / step) * step
    while tick <= min_s + span_s + 1e-9:
        px = left + (tick - min_s) / span_s * plot_w
        out.append(f'<line x1="{px:.1f}" y1="{top}" x2="{px:.1f}" y2="{thr_top + thr_h}" stroke="#eee"/>')
        out.append(f'<text x="{px:.1f}" y="{thr_top + thr_h + 14}" text-anchor="middle">{tick:g}</text>')
        tick += step
    out.append(f'<text x="{left + plot_w / 2}" y="{height - 6}" text-anchor="middle">seconds since start</text>')
    decade = math.floor(log_lo)
    while decade <= log_hi:
        ms = 10.0**decade
        if ms >= lat_lo:
            py = y(ms)
            out.append(f'<line x1="{left}" y1="{py:.1f}" x2="{left + plot_w}" y2="{py:.1f}" stroke="#eee"/>')
            out.append(f'<text x="{left - 6}" y="{py + 4:.1f}" text-anchor="end">{ms:g}</text>')
        decade += 1
    out.append(f'<text x="14" y="{top + lat_h / 2}" transform="rotate(-90 14 {top + lat_h / 2})" '
               f'text-anchor="middle">latency (ms, log)</text>')
    for n, (when, label) in enumerate(markers):
        px = x(when)
        out.append(f'<line x1="{px:.1f}" y1="{top}" x2="{px:.1f}" y2="{thr_top + thr_h}" stroke="#555" '
                   f'stroke-dasharray="4 3"/>')
        out.append(f'<text x="{px - 3:.1f}" y="{top + 12 + 13 * n}" fill="#555" text-anchor="end">'
                   f'{html.escape(label)}</text>')
    # Points: thin ok ones if there are too many (outliers and failures always stay, unless thin_failures).
    thin = max(1, math.ceil(len(done) / points_max))
    for i, op in enumerate(done):
        if (op.type == "ok" or thin_failures) and thin > 1 and i % thin:
            continue
        ms = (op.latency_ns or 1) / 1e6
        out.append(f'<circle cx="{x(op.complete_time or 0):.1f}" cy="{y(ms):.1f}" r="1.6" '
                   f'fill="{COLORS.get(op.type, "#000")}" fill-opacity="0.7"/>')
    # Completions per second, stacked by outcome.
    bins: dict[int, Counter[str]] = defaultdict(Counter)
    for op in done:
        bins[math.floor(((op.complete_time or 0) - t0_ns) / 1e9)][op.type] += 1
    peak = max((sum(c.values()) for c in bins.values()), default=1)
    bar_w = plot_w / span_s
    for second, counter in bins.items():
        base = float(thr_top + thr_h)
        for kind in ("ok", "fail", "info"):
            n = counter[kind]
            if not n:
                continue
            h = n / peak * (thr_h - 4)
            base -= h
            bar_x = x(t0_ns + second * 1e9)
            bar_width = max(min(bar_w, left + plot_w - bar_x) - 1, 1)
            out.append(f'<rect x="{bar_x:.1f}" y="{base:.1f}" width="{bar_width:.1f}" '
                       f'height="{h:.1f}" fill="{COLORS[kind]}" fill-opacity="0.8"/>')
    out.append(f'<text x="{left - 6}" y="{thr_top + 10}" text-anchor="end">{peak}</text>')
    out.append(f'<text x="14" y="{thr_top + thr_h / 2}" transform="rotate(-90 14 {thr_top + thr_h / 2})" '
               f'text-anchor="middle">ops/s</text>')
    # Legend.
    lx = width - right - 260
    for i, kind in enumerate(("ok", "fail", "info")):
        out.append(f'<circle cx="{lx + i * 80}" cy="16" r="4" fill="{COLORS[kind]}"/>')
        out.append(f'<text x="{lx + i * 80 + 8}" y="20">{kind}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def write_timeline(path: Path, ops: Sequence[Op], faults: Sequence[dict[str, Any]], t0_ns: int, *,
                   markers: Sequence[tuple[int, str]] = (), title: str = "") -> None:
    path.write_text(timeline_svg(ops, faults, t0_ns, markers=markers, title=title))


# ---------------------------------------------------------------------------------------------- numbers


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))]


def latency_summary(ops: Sequence[Op], t0_ns: int, t_end_ns: int | None = None) -> dict[str, Any]:
    """Latency percentiles (ms) of ok requests per workload/op, and throughput over the run."""
    per: dict[str, list[float]] = defaultdict(list)
    every: list[float] = []
    for op in ops:
        if op.type != "ok" or op.complete_time is None or op.f in STREAM_OPS:
            continue
        ms = (op.complete_time - op.invoke_time) / 1e6
        per[f"{op.workload}/{op.f}"].append(ms)
        every.append(ms)

    def stats(values: list[float]) -> dict[str, Any]:
        values.sort()
        return {"n": len(values), "p50": round(_percentile(values, 0.5), 2),
                "p95": round(_percentile(values, 0.95), 2), "p99": round(_percentile(values, 0.99), 2),
                "max": round(values[-1], 2) if values else 0.0}

    end = t_end_ns or max((op.complete_time or op.invoke_time for op in ops), default=t0_ns)
    span_s = max((end - t0_ns) / 1e9, 1e-9)
    in_run = sum(1 for op in ops if op.type == "ok" and op.f not in STREAM_OPS and op.complete_time is not None
                 and op.complete_time <= end)
    return {"all": stats(every), "by_op": {k: stats(v) for k, v in sorted(per.items())},
            "ok_per_s": round(in_run / span_s, 1), "span_s": round(span_s, 1)}


def unavailability(ops: Sequence[Op], t0_ns: int, t_end_ns: int, threshold_s: float = 1.0) -> dict[str, Any]:
    """Windows of at least ``threshold_s`` during the run in which no request completed ok."""
    times = sorted(op.complete_time for op in ops if op.type == "ok" and op.complete_time is not None
                   and op.f not in STREAM_OPS and t0_ns <= op.complete_time <= t_end_ns)
    windows = []
    previous = t0_ns
    for t in [*times, t_end_ns]:
        if (t - previous) / 1e9 >= threshold_s:
            windows.append({"start_s": round((previous - t0_ns) / 1e9, 3),
                            "duration_s": round((t - previous) / 1e9, 3)})
        previous = max(previous, t)
    return {"threshold_s": threshold_s, "count": len(windows),
            "total_s": round(sum(w["duration_s"] for w in windows), 3),
            "longest_s": max((w["duration_s"] for w in windows), default=0.0), "windows": windows}


# ---------------------------------------------------------------------------------------------- html


def _lanes(ops: Sequence[Op]) -> list[tuple[str, list[Op]]]:
    """Put processes on lanes per workload: a process (a fresh id after every info) takes the first
    lane of its workload that is free when it starts, so lanes stay about as many as the clients."""
    spans: dict[tuple[str, Any], list[Op]] = defaultdict(list)
    for op in ops:
        spans[(op.workload, op.process)].append(op)
    lanes: dict[str, list[tuple[int, list[Op]]]] = defaultdict(list)
    for (workload, _), pops in sorted(spans.items(), key=lambda kv: kv[1][0].invoke_time):
        first = pops[0].invoke_time
        last = max(o.complete_time if o.complete_time is not None else o.invoke_time for o in pops)
        for i, (free_at, lane_ops) in enumerate(lanes[workload]):
            if free_at <= first:
                lane_ops.extend(pops)
                lanes[workload][i] = (last, lane_ops)
                break
        else:
            lanes[workload].append((last, list(pops)))
    return [(workload, lane_ops) for workload in sorted(lanes) for _, lane_ops in lanes[workload]]


def lanes_svg(ops: Sequence[Op], faults: Sequence[dict[str, Any]], t0_ns: int, end_ns: int) -> str:
    """Every operation as a bar from invocation to completion, one lane per client process, by workload.

    Bars closer than a pixel with the same outcome are merged, so a long, busy run stays small.
    An ``info`` op without completion runs to the end.
    """
    lanes = _lanes(ops)
    width, left, right, top, lane_h = 1200, 110, 20, 30, 9
    plot_w = width - left - right
    height = top + max(1, len(lanes)) * lane_h + 30
    span = max(end_ns - t0_ns, 1)

    def x(t: float) -> float:
        return left + (t - t0_ns) / span * plot_w

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
           'font-family="sans-serif" font-size="10">', f'<rect width="{width}" height="{height}" fill="white"/>']
    for w in faults:
        if w.get("start_ns") is None:
            continue
        x0, x1 = x(w["start_ns"]), x(w.get("end_ns", end_ns))
        color = FAULT_COLORS.get(w.get("kind", ""), "#7f7f7f")
        out.append(f'<rect x="{x0:.1f}" y="{top}" width="{max(x1 - x0, 1):.1f}" height="{height - top - 30}" '
                   f'fill="{color}" fill-opacity="0.13"/>')
        # A band above the lanes, since busy lanes hide the shading.
        out.append(f'<rect x="{x0:.1f}" y="4" width="{max(x1 - x0, 1):.1f}" height="{top - 8}" fill="{color}">'
                   f'<title>{html.escape(_fault_label(w))}</title></rect>')
        if x1 - x0 > 7 * len(str(w.get("kind"))):
            out.append(f'<text x="{x0 + 2:.1f}" y="{top - 11}" fill="white">{html.escape(str(w.get("kind")))}</text>')
    out.append(f'<text x="4" y="{top - 11}">faults</text>')
    previous = None
    for n, (workload, lane_ops) in enumerate(lanes):
        y = top + n * lane_h
        if workload != previous:
            out.append(f'<line x1="0" y1="{y}" x2="{width}" y2="{y}" stroke="#bbb"/>')
            out.append(f'<text x="4" y="{y + 8}">{html.escape(workload)}</text>')
            previous = workload
        runs: list[list[Any]] = []  # [type, x0, x1, count]
        for op in sorted(lane_ops, key=lambda o: o.invoke_time):
            x0 = x(op.invoke_time)
            x1 = max(x(op.complete_time if op.complete_time is not None else end_ns), x0 + 0.6)
            kind = "stream" if op.f in STREAM_OPS and op.type == "ok" else op.type
            if runs and runs[-1][0] == kind and x0 <= runs[-1][2] + 1.5:
                runs[-1][2] = max(runs[-1][2], x1)
                runs[-1][3] += 1
            else:
                runs.append([kind, x0, x1, 1])
        for kind, x0, x1, count in sorted(runs, key=lambda r: r[0] in ("ok", "stream"), reverse=True):
            tip = "" if kind in ("ok", "stream") else f"<title>{count} {kind}</title>"
            out.append(f'<rect x="{x0:.1f}" y="{y + 1}" width="{x1 - x0:.1f}" height="{lane_h - 2}" '
                       f'fill="{LANE_COLORS.get(kind, "#000")}">{tip}</rect>')
    step = _nice_step(span / 1e9)
    tick = 0.0
    while tick <= span / 1e9 + 1e-9:
        px = x(t0_ns + tick * 1e9)
        out.append(f'<text x="{px:.1f}" y="{height - 16}" text-anchor="middle">{tick:g}</text>')
        tick += step
    out.append(f'<text x="{left + plot_w / 2}" y="{height - 3}" text-anchor="middle">seconds since start '
               '(lanes: client processes; green ok, blue fail, red info, light green a watch stream)</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _fault_label(w: dict[str, Any]) -> str:
    label = f"{w.get('kind')} {w.get('target')}"
    if w.get("nodes"):
        label += " " + ",".join(map(str, w["nodes"]))
    if w.get("rate"):
        label += f" x{w['rate']}"
    return label


def _checker_rows(checkers: dict[str, Any]) -> str:
    rows = []
    for name, res in checkers.items():
        valid = res.get("valid")
        color = {True: "#2ca02c", False: "#d62728"}.get(valid, "#ff7f0e") if isinstance(valid, bool) else "#ff7f0e"
        violations = {k: v for k, v in res.items() if isinstance(v, dict) and "count" in v and "examples" in v}
        summary = ", ".join(f"{k}: {v['count']}" for k, v in violations.items())
        if name == "linearizable-register":
            keys = res.get("keys", {})
            summary = summary or ", ".join(f"{k} {v.get('valid')} ({v.get('ops')} ops)" for k, v in keys.items())
        elif "counts" in res:
            counts = {k: v for k, v in res["counts"].items() if not isinstance(v, (list, dict))}
            summary = (summary + "; " if summary else "") + ", ".join(f"{k} {v}" for k, v in counts.items())
        detail = json.dumps(res, indent=1, default=str)
        if len(detail) > 20_000:
            detail = detail[:20_000] + "\n... (truncated; see results.json)"
        rows.append(f'<tr><td>{html.escape(name)}</td><td style="color:{color};font-weight:bold">{valid}</td>'
                    f'<td>{html.escape(summary)}<details><summary>details</summary><pre>{html.escape(detail)}</pre>'
                    '</details></td></tr>')
    return "\n".join(rows)


def report_html(results: dict[str, Any], ops: Sequence[Op], faults: Sequence[dict[str, Any]], t0_ns: int, *,
                markers: Sequence[tuple[int, str]] = (), title: str = "") -> str:
    """The whole run on one page (pure: text in, text out)."""
    end_ns = max([op.complete_time or op.invoke_time for op in ops] + [w.get("end_ns", t0_ns) for w in faults]
                 + [t0_ns + 1_000_000_000])
    valid = results.get("valid")
    color = "#2ca02c" if valid is True else "#d62728" if valid is False else "#ff7f0e"
    counts = results.get("counts", {})
    unavailable = results.get("unavailability", {})
    latency = results.get("latency_ms", {})
    fault_rows = []
    for w in results.get("faults", []):
        where = ", ".join(map(str, w.get("nodes") or w.get("drops") or []))
        if w.get("rate"):
            where += f" x{w['rate']}"
        if w.get("error"):
            where += f" error: {w['error']}"
        fault_rows.append(f"<tr><td>{w.get('start_s', '')}</td><td>{w.get('duration_s', '')}</td>"
                          f"<td>{html.escape(str(w.get('kind')))}</td><td>{html.escape(str(w.get('target')))}</td>"
                          f"<td>{html.escape(where)}</td></tr>")
    skipped = results.get("skipped_nemeses") or {}
    nemeses = ", ".join(results.get("nemeses", [])) or "none"
    if skipped:
        nemeses += f" (skipped: {', '.join(skipped)})"
    op_rows = "\n".join(
        f"<tr><td>{html.escape(name)}</td><td>{v['n']}</td><td>{v['p50']}</td><td>{v['p95']}</td><td>{v['p99']}</td>"
        f"<td>{v['max']}</td></tr>" for name, v in latency.get("by_op", {}).items())
    notes = "".join(f"<li>{html.escape(str(n))}</li>" for n in results.get("notes", []))
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>jepsen-lite: valid {html.escape(str(valid))}, seed {results.get('seed')}</title>",
        "<style>body{font-family:sans-serif;margin:1.5em;max-width:1250px}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:left;vertical-align:top}"
        "pre{background:#f6f6f6;padding:6px;overflow:auto;max-height:400px}</style></head><body>",
        f'<h1>jepsen-lite run: <span style="color:{color}">valid = {html.escape(str(valid))}</span></h1>',
        f"<p>{html.escape(title)}</p>",
        "<table>",
        f"<tr><th>seed</th><td>{results.get('seed')}</td></tr>",
        f"<tr><th>target</th><td>{html.escape(str(results.get('target')))}</td></tr>",
        f"<tr><th>workloads</th><td>{html.escape(', '.join(results.get('workloads', [])))}</td></tr>",
        f"<tr><th>nemeses</th><td>{html.escape(nemeses)}</td></tr>",
        f"<tr><th>time limit</th><td>{results.get('time_limit_s')} s (whole run {results.get('elapsed_s')} s)"
        "</td></tr>",
        f"<tr><th>operations</th><td>{counts.get('total', 0)} (ok {counts.get('ok', 0)}, fail {counts.get('fail', 0)}, "
        f"info {counts.get('info', 0)}); {latency.get('ok_per_s', '')} ok/s</td></tr>",
        f"<tr><th>faults</th><td>{len(results.get('faults', []))}</td></tr>",
        f"<tr><th>unavailable</th><td>{unavailable.get('count', 0)} window(s) of at least "
        f"{unavailable.get('threshold_s', '')} s without an ok response, {unavailable.get('total_s', 0)} s in all, "
        f"longest {unavailable.get('longest_s', 0)} s</td></tr>",
        f"<tr><th>recovered after healing</th><td>{results.get('recovered')} "
        f"({results.get('recovered_after_s')} s)</td></tr>",
    ]
    if results.get("unsafe"):
        parts.append(f"<tr><th>unsafe node mode</th><td>{html.escape(str(results['unsafe']))} "
                     "(deliberately broken: this run must be invalid)</td></tr>")
    if results.get("error"):
        parts.append(f"<tr><th>error</th><td>{html.escape(str(results['error']))}</td></tr>")
    parts += [
        "</table>",
        f"<h2>Replay</h2><pre>{html.escape(str(results.get('replay', '')))}</pre>",
        "<h2>Checkers</h2><table><tr><th>checker</th><th>valid</th><th>result</th></tr>",
        _checker_rows(results.get("checkers", {})),
        "</table>",
        "<h2>Operations per process</h2>",
        lanes_svg(ops, faults, t0_ns, end_ns),
        "<h2>Latency and throughput</h2>",
        timeline_svg(ops, faults, t0_ns, markers=markers, title=title, points_max=HTML_POINTS_MAX,
                     thin_failures=True),
        "<h3>Latency of ok requests (ms)</h3><table><tr><th>op</th><th>n</th><th>p50</th><th>p95</th><th>p99</th>"
        f"<th>max</th></tr>{op_rows}</table>",
        "<h2>Faults</h2><table><tr><th>start (s)</th><th>duration (s)</th><th>kind</th><th>target</th><th>nodes</th>"
        f"</tr>{''.join(fault_rows)}</table>",
    ]
    if unavailable.get("windows"):
        parts.append("<h3>Unavailability windows</h3><table><tr><th>start (s)</th><th>duration (s)</th></tr>"
                     + "".join(f"<tr><td>{w['start_s']}</td><td>{w['duration_s']}</td></tr>"
                               for w in unavailable["windows"]) + "</table>")
    if notes:
        parts.append(f"<h2>Notes</h2><ul>{notes}</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_html(path: Path, results: dict[str, Any], ops: Sequence[Op], faults: Sequence[dict[str, Any]], t0_ns: int,
               *, markers: Sequence[tuple[int, str]] = (), title: str = "") -> None:
    path.write_text(report_html(results, ops, faults, t0_ns, markers=markers, title=title))
