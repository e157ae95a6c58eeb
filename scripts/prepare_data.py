#!/usr/bin/env python
"""Write the verl parquet files of the reproduction (run on a machine that can reach the Hugging Face Hub).

  python scripts/prepare_data.py all --out-dir ~/data/ssopd     # everything below
  python scripts/prepare_data.py openthoughts   # open-r1/OpenThoughts-114k-math: answers + reference solutions
  python scripts/prepare_data.py dapo           # BytedTsinghua-SIA/DAPO-Math-17k: verifiable answers only
  python scripts/prepare_data.py math           # DigitalLearningGmbH/MATH-lighteval: answers + solutions
  python scripts/prepare_data.py eval           # the shipped AIME24/AIME25/HMMT25/AMC23/MATH500 sets (offline)

Output: <out-dir>/<name>/train.parquet and <out-dir>/eval/<benchmark>.parquet, rows in verl's RL format
(data_source, prompt = [user message], ability, reward_model = {style: rule, ground_truth}, extra_info =
{split, index, problem, solution?}). Every prompt ends with the evaluation sets' instruction ("Please reason step
by step, and put your final answer within \\boxed{}."), so training and evaluation prompts have the same format.
The OPSD baseline reads each row's reference solution from extra_info.solution (openthoughts, math); DAPO has none.

--source takes a local copy instead of the hub id (a .parquet/.jsonl/.json file or a directory of .parquet files,
e.g. a `git clone` of the dataset repo), for offline machines and tests.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Iterable, Iterator, Optional

from ssopd_verl.evaluation.benchmarks import BENCHMARKS, load_benchmark, verl_row, with_instruction
from ssopd_verl.evaluation.grading import last_boxed

# DAPO-Math-17k wraps each problem in an "Answer: $Answer" instruction; we strip it and use the boxed one instead.
DAPO_PREFIX = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
)
DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'

DATASETS = {
    # name: (hub id, config, split, data_source written to the parquet)
    "dapo": ("BytedTsinghua-SIA/DAPO-Math-17k", None, "train", "dapo_math_17k"),
    "openthoughts": ("open-r1/OpenThoughts-114k-math", None, "train", "openthoughts_math"),
    "math": ("DigitalLearningGmbH/MATH-lighteval", "default", "train", "math"),
}


class DownloadError(RuntimeError):
    pass


def load_rows(source: str, config: Optional[str], split: str, columns: Optional[list] = None) -> Iterator[dict]:
    """Rows of a local file/directory, or of a hub dataset (downloaded with `datasets.load_dataset`)."""
    path = Path(source).expanduser()
    if path.exists():
        import pandas as pd

        files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
        if not files:
            raise DownloadError(f"no .parquet files under {path}")
        for file in files:
            if file.suffix == ".parquet":
                frame = pd.read_parquet(file)
            elif file.suffix in (".jsonl", ".json"):
                frame = pd.read_json(file, lines=file.suffix == ".jsonl")
            else:
                raise DownloadError(f"unsupported local source {file} (.parquet, .jsonl or .json)")
            yield from frame.to_dict("records")
        return
    if "/" not in source:
        raise DownloadError(f"--source {source!r} is neither an existing path nor a hub id (owner/name)")
    try:
        import datasets

        ds = datasets.load_dataset(source, config, split=split)
    except Exception as e:  # connection errors, offline mode, missing cache: all mean "could not get it"
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
        raise DownloadError(
            f"could not load {source!r} from the Hugging Face Hub{' (offline mode is set)' if offline else ''}: "
            f"{type(e).__name__}: {str(e)[:300]}\n"
            "This script downloads the training sets: run it on a machine that can reach huggingface.co (or set "
            "HF_ENDPOINT to a mirror), or download the dataset elsewhere and pass --source /path/to/copy "
            "(.parquet/.jsonl file or a directory of .parquet files). The evaluation sets need no network: "
            "`prepare_data.py eval`."
        ) from e
    if columns:
        ds = ds.select_columns([c for c in columns if c in ds.column_names])  # skip the large trace columns
    yield from ds


def _user_content(prompt) -> str:
    """The problem text of a row's prompt: a string, or chat messages (the last user turn)."""
    if isinstance(prompt, str):
        return prompt
    users = [m for m in list(prompt) if m["role"] == "user"]
    if not users:
        raise ValueError("prompt has no user message")
    return users[-1]["content"]


def _strip_dapo(text: str) -> str:
    text = text[len(DAPO_PREFIX) :] if text.startswith(DAPO_PREFIX) else text
    return text[: -len(DAPO_SUFFIX)] if text.endswith(DAPO_SUFFIX) else text


def convert_dapo(rows: Iterable[dict], data_source: str) -> list[dict]:
    """DAPO-Math-17k: problem from the chat prompt (its instruction replaced), answer from reward_model.

    The hub file repeats each problem many times; rows are deduplicated by problem text.
    """
    out, seen = [], set()
    for row in rows:
        if "prompt" in row:
            problem = _strip_dapo(_user_content(row["prompt"]).strip())
        else:
            problem = str(row["problem"]).strip()
        if "reward_model" in row:
            answer = row["reward_model"]["ground_truth"]
        else:
            answer = row.get("answer", row.get("solution"))
        if not problem or answer is None or problem in seen:
            continue
        seen.add(problem)
        info = {"problem": problem}
        out.append(verl_row(data_source, with_instruction(problem), str(answer).strip(), "train", len(out), info))
    return out


def convert_with_solutions(
    rows: Iterable[dict], data_source: str, max_answer_chars: int = 64, problem_key="problem", solution_key="solution"
) -> list[dict]:
    """Datasets with a worked reference solution (OpenThoughts math, MATH): the answer is its last \\boxed{}.

    Rows whose solution has no boxed answer, or a long one (proofs, multi-part answers that a verifier cannot
    grade reliably), are dropped; so are repeated problems.
    """
    out, seen = [], set()
    for row in rows:
        problem = str(row.get(problem_key) or "").strip()
        solution = str(row.get(solution_key) or "").strip()
        answer = last_boxed(solution)
        if not problem or not answer or len(answer) > max_answer_chars or problem in seen:
            continue
        seen.add(problem)
        info = {"problem": problem, "solution": solution}
        if row.get("source") is not None:
            info["source"] = str(row["source"])
        out.append(verl_row(data_source, with_instruction(problem), answer, "train", len(out), info))
    return out


def write_parquet(rows: list[dict], path: Path) -> Path:
    import pandas as pd

    if not rows:
        raise SystemExit(f"no rows to write to {path}: check --source")
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(path, index=False)
    print(f"wrote {len(rows)} rows to {path}")
    return path


def prepare_train(name: str, args) -> Path:
    hub_id, config, split, data_source = DATASETS[name]
    source = args.source or hub_id
    columns = ["prompt", "reward_model", "problem", "answer"] if name == "dapo" else ["problem", "solution", "source"]
    rows = load_rows(source, config if source == hub_id else None, split, columns)
    if name == "dapo":
        out = convert_dapo(rows, data_source)
    else:
        out = convert_with_solutions(rows, data_source, args.max_answer_chars)
    if args.max_samples:
        out = out[: args.max_samples]
    return write_parquet(out, Path(args.out_dir).expanduser() / f"{data_source}/train.parquet")


def prepare_eval(args) -> list[Path]:
    """The shipped evaluation sets as verl validation parquet files (data_source = benchmark name)."""
    paths = []
    for spec in args.benchmarks.split(","):
        name, problems = load_benchmark(spec.strip())
        rows = [
            verl_row(name, p["problem"], p["answer"], "test", i, {"problem": p["problem"]})
            for i, p in enumerate(problems)
        ]
        paths.append(write_parquet(rows, Path(args.out_dir).expanduser() / f"eval/{name}.parquet"))
    return paths


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (hub_id, *_rest) in DATASETS.items():
        p = sub.add_parser(name, help=f"training set from {hub_id}")
        p.add_argument("--source", default=None, help=f"hub id or local copy (default: {hub_id})")
        p.add_argument("--max-samples", type=int, default=None, help="keep the first N problems")
        p.add_argument("--max-answer-chars", type=int, default=64, help="drop rows with longer boxed answers")
    p = sub.add_parser("eval", help="the shipped evaluation sets (no network)")
    p.add_argument("--benchmarks", default=",".join(BENCHMARKS), help="comma-separated benchmark names")
    p = sub.add_parser("all", help="openthoughts + dapo + math + eval, all from the hub")
    p.add_argument("--benchmarks", default=",".join(BENCHMARKS), help=argparse.SUPPRESS)
    for p in sub.choices.values():
        p.add_argument("--out-dir", default="~/data/ssopd", help="output root (default: ~/data/ssopd)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "eval":
            prepare_eval(args)
        elif args.command == "all":
            prepare_eval(args)
            for name in ("openthoughts", "dapo", "math"):  # each from its hub id, with the defaults
                prepare_train(name, parse_args([name, "--out-dir", args.out_dir]))
        else:
            prepare_train(args.command, args)
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
