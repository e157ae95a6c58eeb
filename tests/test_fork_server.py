"""ssopd_verl.cpu.fork_server / fork_client: a process forked from a server that has imported verl behaves as the
process the client stands for (arguments, environment, directory, streams, exit status, signals, lifetime).

One server serves this module and the other forked test processes (tests/forked.py; owned by this pytest process,
it ends with it)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import forked
from ssopd_verl.cpu import fork_client

CLIENT = Path(fork_client.__file__)
SCRIPT = """
import json, os, sys, time
print(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "flavour": os.environ.get("FLAVOUR"), "pid": os.getpid(),
                  "session": os.getsid(0), "verl_imported": "verl" in sys.modules}), flush=True)
print("to stderr", file=sys.stderr, flush=True)
if sys.argv[1] == "sleep":
    time.sleep(600)
sys.exit(int(sys.argv[2]) if sys.argv[2].isdigit() else sys.argv[2])
"""


@pytest.fixture(scope="module")
def start_forked(tmp_path_factory):
    root = tmp_path_factory.mktemp("fork")
    script = root / "worker.py"
    script.write_text(SCRIPT)
    env = forked.environment({**os.environ, "FLAVOUR": "umami"})

    def start(*args, cwd=root):
        return subprocess.Popen(forked.command(str(script), *args), env=env, cwd=cwd, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip

    return start


def test_worker_gets_arguments_environment_directory_streams_and_exit_status(start_forked, tmp_path):
    client = start_forked("exit", "3", cwd=tmp_path)
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


def test_an_exit_message_is_printed_and_exits_with_one_as_python_does(start_forked):
    client = start_forked("exit", "refusing to start: a message")
    _, err = client.communicate(timeout=300)
    assert client.returncode == 1 and "refusing to start: a message" in err


def test_signals_reach_the_worker_and_its_status_comes_back(start_forked):
    client = start_forked("sleep", "0")
    pid = json.loads(client.stdout.readline())["pid"]
    client.send_signal(signal.SIGTERM)
    assert client.wait(timeout=30) == 128 + signal.SIGTERM
    assert _wait_gone(pid)


def test_worker_ends_when_its_client_is_killed(start_forked):
    client = start_forked("sleep", "0")
    pid = json.loads(client.stdout.readline())["pid"]
    client.kill()  # what Ray does to a worker it gives up on: no signal to forward
    client.wait(timeout=30)
    assert _wait_gone(pid)


def test_a_module_runs_as_with_python_dash_m(tmp_path):
    proc = subprocess.run(forked.command("-m", "json.tool", "--sort-keys"), input='{"b": 1, "a": 2}',
                          env=forked.environment(), cwd=tmp_path, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.index('"a"') < proc.stdout.index('"b"')


def test_without_a_server_directory_the_process_runs_unforked(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != fork_client.DIR_ENV}
    proc = subprocess.run([sys.executable, "-S", "-E", str(CLIENT), str(script), "exit", "0"], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0 and not json.loads(proc.stdout)["verl_imported"]
    assert "starting the process unforked" in proc.stderr  # said, not silent
