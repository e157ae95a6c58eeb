"""Commands that run ``python <script> args`` or ``python -m <module> args`` in a process forked from a server that
has imported verl (ssopd_verl.cpu.fork_server), owned by this pytest process: ~15 s of imports saved per process.

For tests of what a command does, not of what a fresh interpreter does on import (the plugin's registration and
its argv checks, the platform's selection): those start ``sys.executable`` as users do."""

import os
import sys
import tempfile
from pathlib import Path

from ssopd_verl.cpu import fork_client

FORK_DIR = Path(tempfile.gettempdir()) / f"ssopd-test-fork-{os.getpid()}"


def command(*argv: str) -> list[str]:
    """Use in place of ``[sys.executable, *argv]``."""
    FORK_DIR.mkdir(exist_ok=True)
    return [sys.executable, "-S", "-E", fork_client.__file__, *argv]


def environment(base: dict | None = None) -> dict:
    """``base`` (default: this process's environment) plus what the forked processes share: the server's folder
    and owner, and the values its imports read (one server for every test: the CPU platform, 1 OpenMP thread)."""
    return {**(os.environ if base is None else base), "VERL_PLATFORM": "cpu", "OMP_NUM_THREADS": "1",
            fork_client.DIR_ENV: str(FORK_DIR), fork_client.OWNER_ENV: str(os.getpid())}  # fmt: skip
