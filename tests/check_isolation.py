"""Every test file on its own: ``python tests/check_isolation.py`` runs ``pytest --setup-plan tests/<file>`` for each
``tests/test_*.py`` alone, two at a time, and fails listing the files that do not pass alone.

``--setup-plan`` is pytest's collection (the file's imports and module-level code, conftest's hooks,
parametrization) plus the resolution of every test's fixtures, without running them: what a file takes from
whichever file ran before it at import, or a fixture it uses but does not reach (defined in another file), fails
here. It does not run test bodies: state that one test leaves for another is kept out by design instead (helpers
such as tests/forked.py set up what they offer on import, not on first use). Each pytest is forked from a server
that has imported verl (tests/forked.py), so a file costs its own imports, not ~15 s of verl's: the whole check
takes well under a minute on 2 cores, where running every file alone would take the suite's time again.
"""

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import forked

TESTS = Path(__file__).resolve().parent
PARALLEL = 2


def check(path: Path) -> tuple[Path, int, str, float]:
    start = time.monotonic()
    proc = subprocess.run(forked.command("-m", "pytest", "-q", "--setup-plan", str(path)), env=forked.environment(),
                          cwd=TESTS.parent, capture_output=True, text=True, timeout=600)  # fmt: skip
    return path, proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start


def main() -> int:
    files = sorted(TESTS.glob("test_*.py"))
    start = time.monotonic()
    with ThreadPoolExecutor(PARALLEL) as pool:
        results = list(pool.map(check, files))
    failed = [(path, code, output) for path, code, output, _ in results if code != 0]
    for path, code, output in failed:
        print(f"--- {path.name} alone: exit {code}\n{output[-3000:]}", file=sys.stderr)
    slowest = max(results, key=lambda r: r[3])
    print(f"{len(files) - len(failed)}/{len(files)} test files pass `pytest --setup-plan` alone "
          f"({time.monotonic() - start:.0f} s; slowest {slowest[0].name}, {slowest[3]:.1f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
