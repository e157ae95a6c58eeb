"""``python -m ssopd_verl.tiny_default [--cache-dir D] [--force] [--seed S] [--task T] [--ship]``: build the tiny
default (once, cached) and print where it is, how it measured and whether it equals the shipped copy.

The regenerate command: ``+tiny=default`` uses the copy shipped in the package (``shipped/``), which this builds
again on this machine; ``--ship`` then copies the build into the package, replacing the shipped copy (add
``--force`` for a fresh build rather than the cached one)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from ssopd_verl.tiny_default.build import (
    SHIPPED_DIR,
    build_tiny_default,
    default_cache_dir,
    ship_tiny_default,
    shipped_tiny_default,
)
from ssopd_verl.tiny_default.spec import DEFAULT_TASK, TinyDefaultSpec
from ssopd_verl.tiny_default.tasks import TASKS


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ssopd_verl.tiny_default",
        description="Build (once, cached) the embedded tiny default: a compact-vocabulary Qwen3 warm-started into "
        "the frontier of its task (default: 2-digit addition; --task addition3: 3-digit addition), plus verl "
        "train/val parquet files.",
    )
    parser.add_argument("--cache-dir", default=None, help=f"build directory (default: {default_cache_dir()})")
    parser.add_argument("--force", action="store_true", help="rebuild even if a finished build is cached")
    parser.add_argument("--seed", type=int, default=None, help="seed (non-default seeds get their own directory)")
    parser.add_argument(
        "--task",
        default=DEFAULT_TASK,
        choices=sorted(TASKS),
        help="task, built with its preset TinyDefaultSpec.for_task(task) (other tasks get their own directory)",
    )
    parser.add_argument(
        "--ship",
        action="store_true",
        help=f"copy the build into the package, replacing the shipped copy ({SHIPPED_DIR}); default spec only",
    )
    args = parser.parse_args(argv)
    # the task's preset (its operand range, warm-start mix and targets): for the default task the default spec
    spec = TinyDefaultSpec.for_task(args.task, **({} if args.seed is None else {"seed": args.seed}))
    if args.ship and spec != TinyDefaultSpec():
        parser.error("--ship: only the default spec (no --seed, the default --task) is shipped")

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    result = build_tiny_default(args.cache_dir, force=args.force, spec=spec, progress=progress)
    m = result.manifest
    print(f"model_path: {result.model_path}")
    print(f"train_file: {result.train_file}")
    print(f"val_file:   {result.val_file}")
    h = result.heldout
    if h:
        print(
            f"held out ({h['problems']} val problems x {h['samples']} samples, temperature 1, seed {h['seed']}): "
            f"student {h['student_accuracy']:.3f}, teacher prompt {h['teacher_accuracy']:.3f}; greedy student "
            f"{h['student_greedy_accuracy']:.3f}"
        )
    print(
        f"sampled accuracy {result.accuracy:.3f} (teacher prompt {result.teacher_accuracy:.3f}) after {result.steps} "
        "warm-start steps; "
        f"{m.get('parameters')} parameters, vocabulary {m.get('vocab_size')}; "
        f"built in {m.get('build_seconds')}s ({time.perf_counter() - t0:.1f}s this call)"
    )
    print(f"data_source: {result.data_source}   data.apply_chat_template_kwargs: {result.chat_template_kwargs}")
    if args.ship:
        shipped = ship_tiny_default(result)
        print(f"shipped: copied into {Path(shipped.cache_dir)}")
    elif spec == TinyDefaultSpec():
        print(f"shipped copy ({SHIPPED_DIR}, what +tiny=default uses): {_compare_with_shipped(result)}")
    return 0


def _compare_with_shipped(result) -> str:
    """Whether this build's files equal the shipped copy's (a build on another CPU is usually another model)."""
    try:
        shipped = shipped_tiny_default()
    except RuntimeError as e:
        return f"unusable ({e})"
    ours, theirs = result.manifest["files"], shipped.manifest["files"]
    if ours == theirs:
        return "identical files"
    h = shipped.heldout
    differ = ", ".join(k for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k))
    return (
        f"differs ({differ}); the shipped one stopped after {shipped.steps} steps, held out: student "
        f"{h['student_accuracy']:.3f}, teacher prompt {h['teacher_accuracy']:.3f}, "
        f"greedy {h['student_greedy_accuracy']:.3f}"
    )


if __name__ == "__main__":
    sys.exit(main())
