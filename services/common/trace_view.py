"""Prints a request's trace as a waterfall from the file exporter's JSON lines.

    python -m services.common.trace_view spans.jsonl            # the most recent trace
    python -m services.common.trace_view spans.jsonl --trace 4bf9...  # one trace
    python -m services.common.trace_view spans.jsonl --list     # traces in the file

Each span is a row: indentation follows parent links across services, the bar shows when it ran
within the trace, and its events (engine events on the worker span) follow as marked sub-rows.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Iterable, TextIO

BAR = 40
SHOWN_ATTRIBUTES = ("switchyard.tier", "switchyard.route", "switchyard.cache.result",
                    "gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens",
                    "gen_ai.response.finish_reasons", "switchyard.slo.met")


def load_spans(path: Path) -> list[dict]:
    spans = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            spans.append(json.loads(line))
    return spans


def traces(spans: Iterable[dict]) -> dict[str, list[dict]]:
    by_trace: dict[str, list[dict]] = defaultdict(list)
    for s in spans:
        by_trace[s["trace_id"]].append(s)
    return by_trace


def _bar(start: int, end: int, t0: int, total: int) -> str:
    a = int((start - t0) / total * BAR)
    b = max(a + 1, int((end - t0) / total * BAR))
    return " " * a + "█" * (b - a) + " " * (BAR - b)


def render(spans: list[dict], out: TextIO) -> None:
    """Writes the waterfall of one trace's spans."""
    t0 = min(s["start_ns"] for s in spans)
    total = max(1, max(s["end_ns"] for s in spans) - t0)
    ids = {s["span_id"] for s in spans}
    children: dict[str | None, list[dict]] = defaultdict(list)
    for s in spans:
        parent = s["parent_id"] if s["parent_id"] in ids else None
        children[parent].append(s)
    out.write(f"trace {spans[0]['trace_id']}  {total / 1e6:.1f} ms, {len(spans)} spans\n")

    def walk(parent: str | None, depth: int) -> None:
        for s in sorted(children[parent], key=lambda x: x["start_ns"]):
            label = f"{'  ' * depth}{s['service']}: {s['name']}"
            dur = (s["end_ns"] - s["start_ns"]) / 1e6
            start = (s["start_ns"] - t0) / 1e6
            status = "" if s["status"] in ("UNSET", "OK") else f"  [{s['status']}]"
            out.write(f"{label:<44.44} |{_bar(s['start_ns'], s['end_ns'], t0, total)}| "
                      f"+{start:8.1f} ms {dur:8.1f} ms{status}\n")
            attrs = [f"{k.split('.')[-1]}={s['attributes'][k]}" for k in SHOWN_ATTRIBUTES
                     if k in s["attributes"]]
            if attrs:
                out.write(f"{'  ' * depth}    {' '.join(attrs)}\n")
            for e in s["events"]:
                at = (e["time_ns"] - t0) / 1e6
                detail = " ".join(f"{k}={v}" for k, v in e["attributes"].items())
                out.write(f"{'  ' * depth}    · {e['name']:<14} +{at:8.1f} ms  {detail}\n")
            walk(s["span_id"], depth + 1)

    walk(None, 0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("file", type=Path, help="JSON-lines span file (tracing exporter 'file')")
    p.add_argument("--trace", help="trace id (default: the trace that started last)")
    p.add_argument("--list", action="store_true", help="list trace ids with span counts")
    args = p.parse_args(argv)
    by_trace = traces(load_spans(args.file))
    if not by_trace:
        print(f"no spans in {args.file}", file=sys.stderr)
        return 1
    if args.list:
        for tid, spans in sorted(by_trace.items(), key=lambda kv: min(s["start_ns"] for s in kv[1])):
            roots = [s["name"] for s in spans if s["parent_id"] is None]
            print(f"{tid}  {len(spans):3d} spans  {', '.join(roots)}")
        return 0
    tid = args.trace or max(by_trace, key=lambda t: min(s["start_ns"] for s in by_trace[t]))
    if tid not in by_trace:
        print(f"trace {tid} not in {args.file}", file=sys.stderr)
        return 1
    render(by_trace[tid], sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
