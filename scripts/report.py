#!/usr/bin/env python
"""Paper-style results table (markdown + CSV) from evaluation outputs, and training curves (PNG) from verl's
tracker files.

  python scripts/report.py --out reports/qwen3_8b \
      --eval "GRPO=evals/qwen3_8b_grpo" "OPSD=evals/qwen3_8b_opsd" "SSOPD=evals/qwen3_8b_ssopd" --paper \
      --tracker "GRPO=logs/ssopd/qwen3_8b_grpo.jsonl" "SSOPD=logs/ssopd/qwen3_8b_ssopd.jsonl"

--eval takes directories written by scripts/evaluate.py (or their summary.json); --tracker takes the JSONL that
verl's `file` logger writes to $LOG_DIR/<project>/<experiment>.jsonl. Either may be given as LABEL=PATH; without
a label, rows use the evaluation's --label and curves the file name. Writes results.md, results.csv and
training_curves.png into --out.
"""

import argparse
import sys
from pathlib import Path

from ssopd_verl.evaluation.benchmarks import PAPER_BENCHMARKS
from ssopd_verl.reporting import csv_table, load_summary, markdown_table, plot_training_curves, table_rows


def _labelled(spec: str):
    label, sep, path = spec.partition("=")
    return (label, path) if sep and not Path(spec).exists() else (None, spec)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--eval", nargs="*", default=[], metavar="[LABEL=]DIR", help="evaluation output dirs")
    p.add_argument("--tracker", nargs="*", default=[], metavar="[LABEL=]JSONL", help="verl file-logger JSONL files")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--benchmarks", default=",".join(PAPER_BENCHMARKS), help="table columns (macro = their mean)")
    p.add_argument("--no-ci", action="store_true", help="values only, no confidence intervals in the markdown")
    p.add_argument("--paper", action="store_true", help="add the paper's reported Qwen3-8B macro Avg@12 rows")
    p.add_argument("--title", default=None, help="title of the curves figure")
    args = p.parse_args(argv)
    if not args.eval and not args.tracker:
        p.error("give --eval and/or --tracker")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.eval:
        benchmarks = [b.strip() for b in args.benchmarks.split(",") if b.strip()]
        summaries = [(label, load_summary(path)) for label, path in map(_labelled, args.eval)]
        rows = table_rows(summaries, benchmarks)
        md = markdown_table(rows, benchmarks, ci=not args.no_ci, paper=args.paper)
        (out / "results.md").write_text(md)
        (out / "results.csv").write_text(csv_table(rows, benchmarks))
        print(md)
        print(f"wrote {out / 'results.md'} and {out / 'results.csv'}")
    if args.tracker:
        runs = [(label or Path(path).stem, path) for label, path in map(_labelled, args.tracker)]
        drawn = plot_training_curves(runs, out / "training_curves.png", title=args.title)
        missing = [panel for panel, series in drawn.items() if not series]
        print(f"wrote {out / 'training_curves.png'}" + (f" (not logged: {', '.join(missing)})" if missing else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
