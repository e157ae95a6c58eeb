"""The evaluation run behind ``scripts/evaluate.py``: sample, grade, save per-sample JSONL, resume, summarise.

Output directory layout::

    run_config.json        model and sampling settings (a resumed run must match them)
    <benchmark>.jsonl      one line per sample: benchmark, problem_idx, sample_idx, prompt, answer, completion,
                           extracted, score, finish_reason, num_tokens, seed
    summary.json / .md     Avg@k, pass@k, maj@k with bootstrap CIs per benchmark and the macro average;
                           degeneration: length-limit hits, repetition loops (ssopd_verl.degeneration), mean tokens

Resume: samples already in ``<benchmark>.jsonl`` (by problem and sample index) are not generated again, so an
interrupted run continues where it stopped and a larger ``--n`` only draws the extra samples. Regrade: recompute
``extracted``/``score`` from the saved completions (after a grader change) without generating anything.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

from ssopd_verl.degeneration import degeneration_summary
from ssopd_verl.evaluation import benchmarks as bm
from ssopd_verl.evaluation.checkpoint import describe_evaluated, resolve_model
from ssopd_verl.evaluation.generate import Request, SamplingSettings, build_prompt
from ssopd_verl.evaluation.grading import grade
from ssopd_verl.evaluation.metrics import summarize

# Settings that change what a sample is: a resumed run must not mix samples drawn under different ones.
RUN_KEYS = ("model", "temperature", "top_p", "top_k", "max_new_tokens", "enable_thinking", "seed")


@dataclass
class EvalConfig:
    model: str
    out: str
    benchmarks: list = field(default_factory=lambda: list(bm.PAPER_BENCHMARKS))
    n: int = 12
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    enable_thinking: bool = True
    limit: Optional[int] = None
    seed: int = 0
    label: Optional[str] = None
    chunk_size: int = 1024  # samples generated between two JSONL flushes
    n_boot: int = 2000

    def run_config(self) -> dict:
        return {
            "model": self.model,
            "label": self.label or Path(self.model.rstrip("/")).name,
            "enable_thinking": self.enable_thinking,
            "seed": self.seed,
            **asdict(self.sampling),
        }


def sample_seed(seed: int, benchmark: str, problem_idx: int, sample_idx: int) -> int:
    """A stable per-sample seed (independent of batching and of which samples a resumed run still needs)."""
    digest = hashlib.sha256(f"{seed}/{benchmark}/{problem_idx}/{sample_idx}".encode()).hexdigest()
    return int(digest[:8], 16)


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file; a torn last line (killed mid-write) is dropped."""
    if not path.exists():
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def drop_torn_tail(path: Path) -> None:
    """Cut a last line left unfinished by a killed run, so that appended rows start on a line of their own."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def _append(path: Path, rows: Iterable[dict]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def check_run_config(out: Path, config: dict) -> None:
    path = out / "run_config.json"
    if path.exists():
        old = json.loads(path.read_text())
        diff = {k: (old.get(k), config.get(k)) for k in RUN_KEYS if old.get(k) != config.get(k)}
        # the weights loaded (recorded since the evaluated-model record exists; older folders are compared by path)
        old_hash, new_hash = (c.get("evaluated", {}).get("weights_sha256") for c in (old, config))
        if "evaluated" in old and old_hash != new_hash:
            diff["weights_sha256"] = (old_hash, new_hash)
        if diff:
            raise SystemExit(
                f"{out} holds samples drawn with other settings {diff} (old, new): use another --out, or the same "
                "settings to resume"
            )
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2) + "\n")


def generate_missing(cfg: EvalConfig, backend, log: Callable[[str], None] = print) -> dict[str, int]:
    """Draw every (benchmark, problem, sample < n) not yet in the output; returns the number drawn per benchmark.

    The missing samples of all benchmarks go to the backend together, ``cfg.chunk_size`` at a time: vLLM keeps its
    batch full across benchmarks, and each finished chunk is appended (and synced) before the next one starts.
    """
    out = Path(cfg.out)
    todo, problems_of, drawn = [], {}, {}
    for spec in cfg.benchmarks:
        name, problems = bm.load_benchmark(spec, cfg.limit)
        problems_of[name] = problems
        path = out / f"{name}.jsonl"
        drop_torn_tail(path)
        done = {(r["problem_idx"], r["sample_idx"]) for r in read_jsonl(path)}
        missing = [(name, p, s) for p in range(len(problems)) for s in range(cfg.n) if (p, s) not in done]
        log(f"{name}: {len(problems)} problems x n={cfg.n}: {len(done)} samples saved, {len(missing)} to draw")
        todo += missing
        drawn[name] = len(missing)
    prompts = {}
    for start in range(0, len(todo), cfg.chunk_size):
        chunk = todo[start : start + cfg.chunk_size]
        requests = []
        for name, p, s in chunk:
            if (name, p) not in prompts:
                problem = problems_of[name][p]
                prompts[name, p] = build_prompt(backend.tokenizer, problem.get("messages", problem["problem"]),
                                                cfg.enable_thinking)
            requests.append(Request(prompts[name, p], sample_seed(cfg.seed, name, p, s)))
        t0 = time.time()
        completions = backend.generate(requests, cfg.sampling)
        rows: dict[str, list] = {}
        for (name, p, s), req, comp in zip(chunk, requests, completions):
            answer = problems_of[name][p]["answer"]
            result = grade(comp.text, answer)
            rows.setdefault(name, []).append(
                {
                    "benchmark": name,
                    "problem_idx": p,
                    "sample_idx": s,
                    "prompt": req.prompt,
                    "answer": answer,
                    "completion": comp.text,
                    "extracted": result.extracted,
                    "score": result.score,
                    "finish_reason": comp.finish_reason,
                    "num_tokens": comp.num_tokens,
                    "seed": req.seed,
                }
            )
        for name, benchmark_rows in rows.items():
            _append(out / f"{name}.jsonl", benchmark_rows)
        log(f"{start + len(chunk)}/{len(todo)} samples drawn ({time.time() - t0:.1f}s for this chunk)")
    return drawn


def regrade(out: Path, log: Callable[[str], None] = print) -> int:
    """Recompute ``extracted``/``score`` of every saved sample; returns the number of scores that changed."""
    changed = 0
    for path in sorted(Path(out).glob("*.jsonl")):
        rows = read_jsonl(path)
        for row in rows:
            result = grade(row["completion"], row["answer"])
            changed += result.score != row.get("score")
            row["extracted"], row["score"] = result.extracted, result.score
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        tmp.replace(path)  # atomic: a crash leaves either the old or the new file
        log(f"{path.name}: regraded {len(rows)} samples")
    return changed


def collect(out: Path, benchmarks: list[str], n: int, limit: Optional[int] = None) -> dict:
    """Per benchmark, the first n samples of each problem, as ``{"scores": [[...]], "answers": [[...]]}``."""
    data = {}
    for spec in benchmarks:
        name, problems = bm.load_benchmark(spec, limit)
        by_problem: dict[int, dict[int, dict]] = {}
        for row in read_jsonl(Path(out) / f"{name}.jsonl"):
            if row["problem_idx"] < len(problems) and row["sample_idx"] < n:
                by_problem.setdefault(row["problem_idx"], {})[row["sample_idx"]] = row
        missing = [p for p in range(len(problems)) if len(by_problem.get(p, {})) < n]
        if missing:
            raise ValueError(f"{name}: problems {missing[:10]} have fewer than n={n} samples; run the generation")
        rows = [[by_problem[p][s] for s in range(n)] for p in range(len(problems))]
        flat = [r for rs in rows for r in rs]
        # degeneration of the decoded completions (ssopd_verl.degeneration: text rule, bounded by its window):
        # length-limit hits as the engine reported them, terminal repetition loops, empty completions
        degeneration = degeneration_summary([r["completion"] for r in flat],
                                            truncated=[r["finish_reason"] == "length" for r in flat])  # fmt: skip
        data[name] = {
            "scores": [[r["score"] for r in rs] for rs in rows],
            "answers": [[r["extracted"] for r in rs] for rs in rows],
            "truncated": sum(r["finish_reason"] == "length" for r in flat) / len(flat),
            "repetition_loop": degeneration["repetition_loop_frac"],
            "empty": degeneration["empty"],
            "mean_tokens": sum(r["num_tokens"] for r in flat) / len(flat),
        }
    return data


def write_summary(out: Path, benchmarks: list[str], n: int, limit: Optional[int] = None, n_boot: int = 2000) -> dict:
    out = Path(out)
    data = collect(out, benchmarks, n, limit)
    summary = summarize(data, n_boot=n_boot)
    for name, entry in summary["benchmarks"].items():
        entry["truncated_frac"] = data[name]["truncated"]
        entry["repetition_loop_frac"] = data[name]["repetition_loop"]
        entry["empty_completions"] = data[name]["empty"]
        entry["mean_tokens"] = data[name]["mean_tokens"]
    run_config = out / "run_config.json"
    summary["run"] = json.loads(run_config.read_text()) if run_config.exists() else {}
    summary["n"] = n
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(summary_markdown(summary))
    return summary


def _cell(metric: dict) -> str:
    lo, hi = metric["ci"]
    return f"{metric['value']:.1f} [{lo:.1f}, {hi:.1f}]"


def summary_markdown(summary: dict) -> str:
    n = summary["n"]
    names = [f"avg@{n}", f"pass@{n}", f"maj@{n}"]
    run = summary.get("run", {})
    lines = [
        f"# {run.get('label', 'evaluation')}",
        "",
        f"evaluated: {describe_evaluated(run['evaluated'])}" if run.get("evaluated") else "",
        "",
        f"model `{run.get('model')}`, n = {n}, temperature {run.get('temperature')}, top-p {run.get('top_p')}, "
        f"max new tokens {run.get('max_new_tokens')}, thinking {'on' if run.get('enable_thinking') else 'off'}; "
        f"{100 * summary['ci_level']:.0f}% bootstrap CIs over problems ({summary['n_boot']} resamples).",
        "",
        "| benchmark | problems | " + " | ".join(names) + " | truncated | loop | mean tokens |",
        "|---|---:|" + "---:|" * len(names) + "---:|---:|---:|",
    ]
    for name, e in summary["benchmarks"].items():
        cells = [_cell(e[m]) for m in names]
        loop = e.get("repetition_loop_frac", math.nan)  # a summary.json written before the column: "–"
        lines.append(
            f"| {name} | {e['num_problems']} | " + " | ".join(cells) + f" | {100 * e['truncated_frac']:.1f}% "
            f"| {'–' if math.isnan(loop) else f'{100 * loop:.1f}%'} | {e['mean_tokens']:.0f} |"
        )
    macro = summary["macro"]
    if names[0] in macro:
        lines.append("| **macro** | | " + " | ".join(_cell(macro[m]) for m in names) + " | | | |")
    lines += ["", "truncated: share of samples that stopped at the length limit; loop: share that end in (or are cut "
              "inside) a repetition loop, at least 3 exact copies of a unit of up to 1,024 characters covering at "
              "least 64 (`ssopd_verl.degeneration`, text rule)."]  # fmt: skip
    return "\n".join(lines) + "\n"


def run(cfg: EvalConfig, backend_factory: Callable[[str], object], regrade_only: bool = False, log=print) -> dict:
    """Resume/generate, grade, summarise. ``backend_factory(model_path)`` is called only if samples are missing."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if regrade_only:
        changed = regrade(out, log)
        log(f"regrade: {changed} scores changed")
    else:
        # Resolved before anything is drawn: a resumed run must load the same weights (their hash is a run key).
        evaluated = resolve_model(cfg.model, out, log)
        config = {**cfg.run_config(), "evaluated": evaluated.as_dict()}
        check_run_config(out, config)
        log(f"evaluating {describe_evaluated(evaluated)}")
        missing = _count_missing(cfg)
        if missing:
            backend = backend_factory(evaluated.path)
            generate_missing(cfg, backend, log)
        else:
            log("all samples already saved: nothing to generate")
    summary = write_summary(out, cfg.benchmarks, cfg.n, cfg.limit, cfg.n_boot)
    log((out / "summary.md").read_text())
    return summary


def _count_missing(cfg: EvalConfig) -> int:
    missing = 0
    for spec in cfg.benchmarks:
        name, problems = bm.load_benchmark(spec, cfg.limit)
        done = {(r["problem_idx"], r["sample_idx"]) for r in read_jsonl(Path(cfg.out) / f"{name}.jsonl")}
        missing += sum((p, s) not in done for p in range(len(problems)) for s in range(cfg.n))
    return missing
