"""Reports: results.json, summary.txt and timeline.svg.

The timeline is plain SVG text (no plotting dependency): latency of every
completed operation over time on a log scale, coloured by outcome, with the
fault windows shaded and labelled, and below it completions per second.
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

__all__ = ["count_ops", "write_results", "write_summary", "timeline_svg", "write_timeline"]

COLORS = {"ok": "#2ca02c", "fail": "#1f77b4", "info": "#d62728"}
FAULT_COLORS = {"kill": "#d62728", "pause": "#9467bd", "partition": "#ff7f0e", "clock": "#8c564b"}
#: Points drawn at most: beyond this, ok points are thinned (fail/info are always drawn).
POINTS_MAX = 20_000


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
                 markers: Sequence[tuple[int, str]] = (), title: str = "") -> str:
    width, left, right = 1200, 70, 20
    top, lat_h, gap, thr_h, bottom = 50, 340, 40, 140, 40
    height = top + lat_h + gap + thr_h + bottom
    plot_w = width - left - right
    done = [op for op in ops if op.complete_time is not None]
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
    # Points: thin ok ones if there are too many (outliers and failures always stay).
    thin = max(1, math.ceil(len(done) / POINTS_MAX))
    for i, op in enumerate(done):
        if op.type == "ok" and thin > 1 and i % thin:
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
