"""The evaluation sets shipped with the package, and verl's parquet row format.

``ssopd_verl/data/eval/<name>.jsonl``: one ``{"problem", "answer"}`` a line, the boxed-answer instruction already
appended to the problem. They ship inside the package so evaluation works offline.

A verl RL parquet file (``prompt`` chat messages, ``reward_model.ground_truth``; e.g. a run's ``data.val_files``) is
a benchmark too: its rows' messages are used as they are, so that ``scripts/evaluate.py`` scores a checkpoint on
exactly the prompts the trainer's validation used.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

# The instruction the shipped problems end with; training prompts get the same one, so the policy is trained on
# the format it is evaluated on and the grader (last \boxed{}) finds its answers.
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

# name -> file stem; the paper's table uses the first three.
BENCHMARKS = {
    "aime24": "aime24",
    "aime25": "aime25",
    "hmmt25_feb": "hmmt25_feb",
    "amc23": "amc2023",
    "math500": "math500",
}
PAPER_BENCHMARKS = ("aime24", "aime25", "hmmt25_feb")
ALIASES = {"amc2023": "amc23", "hmmt25": "hmmt25_feb"}


def eval_data_dir() -> Path:
    # Next to this package's code (ssopd_verl is a namespace package: importlib.resources cannot resolve it).
    return Path(__file__).resolve().parents[1] / "data" / "eval"


def resolve(name_or_path: str) -> tuple[str, Path]:
    """(benchmark name, jsonl path) for a shipped benchmark name or a path to a ``{"problem","answer"}`` jsonl."""
    name = ALIASES.get(name_or_path, name_or_path)
    if name in BENCHMARKS:
        return name, eval_data_dir() / f"{BENCHMARKS[name]}.jsonl"
    path = Path(name_or_path).expanduser()
    if path.suffix in (".jsonl", ".parquet") and path.exists():
        return path.stem, path
    raise ValueError(
        f"unknown benchmark {name_or_path!r}: use one of {sorted(BENCHMARKS)}, a .jsonl path or a verl .parquet path"
    )


def load_benchmark(name_or_path: str, limit: Optional[int] = None) -> tuple[str, list[dict]]:
    """(name, problems) where each problem is ``{"problem": str, "answer": str}`` (from a verl parquet file also
    ``"messages"``, the row's chat messages); ``limit`` keeps the first ones."""
    name, path = resolve(name_or_path)
    if path.suffix == ".parquet":
        problems = _parquet_problems(path)
    else:
        problems = []
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    problems.append({"problem": row["problem"], "answer": str(row["answer"])})
    return name, problems[:limit] if limit else problems


def _parquet_problems(path: Path) -> list[dict]:
    import pandas as pd

    frame = pd.read_parquet(path)
    missing = {"prompt", "reward_model"} - set(frame.columns)
    if missing:
        raise ValueError(f"{path}: not a verl RL parquet file (no column {sorted(missing)})")
    problems = []
    for i, (prompt, reward) in enumerate(zip(frame["prompt"], frame["reward_model"])):
        messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in list(prompt)]
        if not messages or not isinstance(reward, dict) or reward.get("ground_truth") is None:
            raise ValueError(f"{path}: row {i} has no chat messages or no reward_model.ground_truth")
        user = [m["content"] for m in messages if m["role"] == "user"]
        problems.append({"problem": user[-1] if user else messages[-1]["content"], "messages": messages,
                         "answer": str(reward["ground_truth"])})  # fmt: skip
    return problems


def with_instruction(problem: str) -> str:
    """The problem followed by the boxed-answer instruction (unchanged if it already ends with it)."""
    problem = problem.rstrip()
    return problem if problem.endswith(INSTRUCTION) else f"{problem}\n{INSTRUCTION}"


def verl_row(
    data_source: str,
    prompt: str,
    answer: str,
    split: str,
    index: int,
    extra_info: Optional[dict] = None,
) -> dict:
    """One row of a verl RL parquet file (``data_source, prompt, ability, reward_model, extra_info``).

    ``prompt`` is the user message (instruction included). ``extra_info`` is merged in: e.g. ``solution`` (the
    reference solution OPSD's teacher reads, at ``ssopd.reference_solution_key = extra_info.solution``).
    """
    return {
        "data_source": data_source,
        "prompt": [{"role": "user", "content": prompt}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": str(answer)},
        "extra_info": {"split": split, "index": int(index), **(extra_info or {})},
    }
