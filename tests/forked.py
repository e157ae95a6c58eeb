"""Commands that run ``python <script> args`` or ``python -m <module> args`` in a process forked from a server that
has imported verl (tests/fork_server.py), owned by this pytest process: ~15 s of imports saved per process.

For tests of what a command does, not of what a fresh interpreter does on import (the plugin's registration and
its argv checks, the platform's selection): those start ``sys.executable`` as users do."""

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import fork_client

# "<pid>:<folder>" of the process that made the folder: pytest may import this module twice (as `forked`, and as
# `tests.forked` for `from tests import forked`), and both must use one folder, so one server
_FOLDER_ENV = "SSOPD_TEST_FORK_FOLDER"


def _private_folder() -> Path:
    """This process's folder for the server's socket, its log and the ranks' scripts: made on import (tests may
    write into it before their first command), by ``mkdtemp`` (an unpredictable name, mode 0700), removed at exit."""
    owner, _, folder = os.environ.get(_FOLDER_ENV, "").partition(":")
    if owner != str(os.getpid()):  # unset, or inherited from the process that started this one
        folder = tempfile.mkdtemp(prefix="ssopd-test-fork-")
        os.environ[_FOLDER_ENV] = f"{os.getpid()}:{folder}"
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return Path(folder)


FORK_DIR = _private_folder()
CLIENT = str(Path(fork_client.__file__).resolve())


def command(*argv: str) -> list[str]:
    """Use in place of ``[sys.executable, *argv]``."""
    return [sys.executable, "-S", "-E", CLIENT, *argv]


def environment(base: dict | None = None) -> dict:
    """``base`` (default: this process's environment) plus what the forked processes share: the server's folder
    and owner, and the values its imports read (one server for every test: the CPU platform, 1 OpenMP thread)."""
    return {**(os.environ if base is None else base), "VERL_PLATFORM": "cpu", "OMP_NUM_THREADS": "1",
            fork_client.DIR_ENV: str(FORK_DIR), fork_client.OWNER_ENV: str(os.getpid())}  # fmt: skip
