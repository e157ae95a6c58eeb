#!/usr/bin/env python
"""Do two runs agree? Compare verl tracker files (JSONL) value by value, step by step.

  python scripts/compare_trackers.py RUN_A.jsonl RUN_B.jsonl     # two files
  python scripts/compare_trackers.py DIR_A DIR_B                 # every <arm>-s<seed>.jsonl the folders share

Prints, per pair, the first step where a value differs (and how many differ there), or that all are equal; keys
that measure time or memory (``timing``, ``perf/``, ``time_share``, ...) are not compared. Exit status 1 when any
pair differs or a folder pair shares no file.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ssopd_verl.reporting import load_tracker

IGNORED = ("timing", "time_share", "time_per", "perf/", "throughput", "memory", "mfu")


def differences(a: Path, b: Path) -> dict[int, list[str]]:
    """{step: [keys whose values differ, or that only one run logged]}, compared keys only."""
    sa, sb = load_tracker(a), load_tracker(b)
    out: dict[int, list[str]] = {}
    for key in sorted(set(sa) | set(sb)):
        if any(word in key for word in IGNORED):
            continue
        va, vb = dict(sa.get(key, [])), dict(sb.get(key, []))
        for step in sorted(set(va) | set(vb)):
            if va.get(step) != vb.get(step):
                out.setdefault(step, []).append(key)
    return dict(sorted(out.items()))


def main(argv=None) -> int:
    a, b = map(Path, argv if argv is not None else sys.argv[1:])
    pairs = [(a, b)] if a.is_file() else [(p, b / p.name) for p in sorted(a.glob("*-s*.jsonl")) if (b / p.name).exists()]
    if not pairs:
        print(f"no tracker files in common between {a} and {b}")
        return 1
    bad = 0
    for x, y in pairs:
        diff = differences(x, y)
        if diff:
            step, keys = next(iter(diff.items()))
            bad += 1
            more = ", ..." if len(keys) > 5 else ""
            print(f"{x.name}: differs from step {step} ({len(keys)} values there: {', '.join(keys[:5])}{more})")
        else:
            steps = {s for points in load_tracker(x).values() for s, _ in points}
            print(f"{x.name}: equal ({len(steps)} steps)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
