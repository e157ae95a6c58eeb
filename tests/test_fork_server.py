"""ssopd_verl.cpu.fork_server / fork_client: a process forked from a server that has imported verl behaves as the
process the client stands for (arguments, environment, directory, streams, exit status, signals, lifetime).

One server serves this module and tests/ranks.py's ranks (owned by this pytest process: it ends with it)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ranks import FORK_DIR
from ssopd_verl.cpu import fork_client

CLIENT = Path(fork_client.__file__)
SCRIPT = """
import json, os, sys, time
print(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "flavour": os.environ.get("FLAVOUR"), "pid": os.getpid(),
                  "session": os.getsid(0), "verl_imported": "verl" in sys.modules}), flush=True)
print("to stderr", file=sys.stderr, flush=True)
if sys.argv[1] == "sleep":
    time.sleep(600)
sys.exit(int(sys.argv[2]))
"""


@pytest.fixture(scope="module")
def forked(tmp_path_factory):
    root = tmp_path_factory.mktemp("fork")
    FORK_DIR.mkdir(exist_ok=True)
    script = root / "worker.py"
    script.write_text(SCRIPT)
    env = {**os.environ, fork_client.DIR_ENV: str(FORK_DIR), fork_client.OWNER_ENV: str(os.getpid()),
           "OMP_NUM_THREADS": "1", "VERL_PLATFORM": "cpu", "FLAVOUR": "umami"}  # fmt: skip

    def start(*args, cwd=root):
        return subprocess.Popen([sys.executable, "-S", "-E", str(CLIENT), str(script), *args], env=env, cwd=cwd,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip

    return start


def test_worker_gets_arguments_environment_directory_streams_and_exit_status(forked, tmp_path):
    client = forked("exit", "3", cwd=tmp_path)
    out, err = client.communicate(timeout=300)
    assert client.returncode == 3, err
    seen = json.loads(out)
    assert seen["argv"][1:] == ["exit", "3"] and seen["cwd"] == str(tmp_path) and seen["flavour"] == "umami"
    assert seen["verl_imported"]  # forked from the server: verl was imported before the script ran
    assert seen["pid"] != client.pid and seen["session"] == seen["pid"]  # a process group of its own, as Ray's
    assert "to stderr" in err


def _wait_gone(pid: int, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_signals_reach_the_worker_and_its_status_comes_back(forked):
    client = forked("sleep", "0")
    pid = json.loads(client.stdout.readline())["pid"]
    client.send_signal(signal.SIGTERM)
    assert client.wait(timeout=30) == 128 + signal.SIGTERM
    assert _wait_gone(pid)


def test_worker_ends_when_its_client_is_killed(forked):
    client = forked("sleep", "0")
    pid = json.loads(client.stdout.readline())["pid"]
    client.kill()  # what Ray does to a worker it gives up on: no signal to forward
    client.wait(timeout=30)
    assert _wait_gone(pid)


def test_without_a_server_directory_the_process_runs_unforked(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != fork_client.DIR_ENV}
    proc = subprocess.run([sys.executable, "-S", "-E", str(CLIENT), str(script), "exit", "0"], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0 and not json.loads(proc.stdout)["verl_imported"]
    assert "starting the process unforked" in proc.stderr  # said, not silent
