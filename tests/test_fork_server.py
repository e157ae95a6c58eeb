"""tests/fork_server.py, tests/fork_client.py: a process forked from a server that has imported verl behaves as the
process the client stands for (arguments, environment, directory, streams, exit status, signals, lifetime), and
only this user's processes can have the server run anything, none of them able to hold it up.

One server serves this module and the other forked test processes (tests/forked.py; owned by this pytest process,
it ends with it)."""

import array
import json
import os
import selectors
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import fork_client
import fork_server
import forked
import pytest

SCRIPT = """
import atexit, json, os, sys, time
atexit.register(print, "at exit", file=sys.stderr, flush=True)
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


@pytest.fixture(scope="module")
def server_address(start_forked) -> str:
    """The socket of the server that serves ``forked``'s commands, running (started by a first command)."""
    first = start_forked("exit", "0")
    assert first.wait(timeout=300) == 0, first.stderr.read()
    with mock.patch.dict(os.environ, forked.environment()):
        return fork_client.server_address(str(forked.FORK_DIR))


def test_worker_gets_arguments_environment_directory_streams_and_exit_status(start_forked, tmp_path):
    client = start_forked("exit", "3", cwd=tmp_path)
    out, err = client.communicate(timeout=300)
    assert client.returncode == 3, err
    seen = json.loads(out)
    assert seen["argv"][1:] == ["exit", "3"] and seen["cwd"] == str(tmp_path) and seen["flavour"] == "umami"
    assert seen["verl_imported"]  # forked from the server: verl was imported before the script ran
    assert seen["pid"] != client.pid and seen["session"] == seen["pid"]  # a process group of its own, as Ray's
    assert "to stderr" in err and err.rstrip().endswith("at exit")  # its atexit handlers ran, as Python's do


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
    proc = subprocess.run(forked.command(str(script), "exit", "0"), env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0 and not json.loads(proc.stdout)["verl_imported"]
    assert "starting the process unforked" in proc.stderr  # said, not silent


def test_a_client_that_sends_nothing_or_half_a_request_holds_up_no_other(start_forked, server_address):
    """The server reads every connection as its bytes come: one silent client, one that stopped mid-request, and a
    third is still served (before, the server waited on the first for ever, and every later worker with it)."""
    silent, half = socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX)
    try:
        silent.connect(server_address)
        half.connect(server_address)
        half.sendall(struct.pack("!Q", 1000) + b'{"argv": ["-c"')
        client = start_forked("exit", "5")
        out, err = client.communicate(timeout=300)
        assert client.returncode == 5 and json.loads(out)["verl_imported"], err
    finally:
        silent.close(), half.close()


def test_the_folder_is_private_and_the_socket_is_this_users_alone(server_address):
    folder = os.stat(forked.FORK_DIR)
    assert forked.FORK_DIR.name != f"ssopd-test-fork-{os.getpid()}"  # mkdtemp's name, not a guessable one
    assert stat.S_IMODE(folder.st_mode) == 0o700 and folder.st_uid == os.getuid()
    sock = os.stat(server_address)
    assert stat.S_ISSOCK(sock.st_mode) and stat.S_IMODE(sock.st_mode) == 0o600 and sock.st_uid == os.getuid()


def test_a_folder_others_can_enter_is_refused_by_client_and_server(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)  # not the umask's: a folder that others may enter
    with pytest.raises(SystemExit, match="not a private folder .* mode drwxr-xr-x"):
        fork_client.private_directory(str(shared))
    env = {**forked.environment(), fork_client.DIR_ENV: str(shared)}
    script = tmp_path / "worker.py"
    script.write_text("print('ran')")
    proc = subprocess.run(forked.command(str(script)), env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "ran" not in proc.stdout and "refusing to use it" in proc.stderr
    assert os.listdir(shared) == []  # no server started, no lock file
    with pytest.raises(SystemExit, match="not a private folder"):
        fork_server.serve(str(shared / "fork.sock"))  # checked before the imports, so this is cheap
    made = tmp_path / "made" / "here"
    assert fork_client.private_directory(str(made)) == str(made)
    assert stat.S_IMODE(os.stat(made).st_mode) == 0o700


def test_only_processes_of_the_servers_uid_are_answered():
    assert fork_server.refusal(os.getuid()) is None
    assert "uid 4242" in fork_server.refusal(4242) and os.getuid() != 4242
    mine, theirs = socket.socketpair(socket.AF_UNIX)
    with mine, theirs:
        assert fork_server.peer_uid(mine) == os.getuid()  # the kernel's credentials (SO_PEERCRED)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to start a process of another uid")
def test_a_connection_from_another_uid_is_closed_unread():
    """The accept path with a real process of uid 65534 at the other end (the server's own folder would not even
    let it reach the socket: this listener's, in a folder of /tmp, is open to all)."""
    folder = tempfile.TemporaryDirectory(dir="/tmp")
    os.chmod(folder.name, 0o755)
    address = os.path.join(folder.name, "open.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(address)
    os.chmod(address, 0o666)
    listener.listen(4)
    listener.settimeout(60)  # a child that could not connect fails the test instead of hanging it
    selector = selectors.DefaultSelector()
    with folder, listener, selector:
        other = _connect_as(65534, address)
        fork_server._accept(listener, selector)
        assert os.waitpid(other, 0)[1] == 0  # the other end saw its connection closed without a byte
        assert selector.get_map() == {}
        mine = socket.socket(socket.AF_UNIX)
        mine.connect(address)
        fork_server._accept(listener, selector)
        (key,) = selector.get_map().values()
        assert isinstance(key.data, fork_server.Pending)
        key.data.close(), mine.close()


def _connect_as(uid: int, address: str) -> int:
    """A child process that becomes ``uid`` (no exec: the venv's interpreter may be out of its reach), connects to
    ``address`` and exits with 0 once the connection is closed without a byte."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([]), os.setgid(uid), os.setuid(uid)
            conn = socket.socket(socket.AF_UNIX)
            conn.connect(address)
            os._exit(0 if conn.recv(1) == b"" else 3)
        except BaseException:  # noqa: BLE001 - the parent sees the status
            os._exit(2)
    return pid


def _send_part(conn: socket.socket, data: bytes, fds: list[int] = ()) -> None:
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    conn.sendmsg([data], ancillary)


def test_a_request_is_assembled_from_pieces_and_an_unfinished_one_is_dropped_at_its_deadline():
    request = json.dumps({"argv": ["x.py"], "env": {"A": "1"}, "cwd": "/"}).encode()
    message = struct.pack("!Q", len(request)) + request
    read_end, write_end = os.pipe()
    client, server = socket.socketpair(socket.AF_UNIX)
    with client, server:
        pending = fork_server.Pending(server, deadline=10.0)
        assert pending.read() is None  # nothing yet: no wait
        _send_part(client, message[:5], [read_end, write_end, write_end])
        assert pending.read() is None and len(pending.fds) == 3
        _send_part(client, message[5:])
        assert pending.read() == {"argv": ["x.py"], "env": {"A": "1"}, "cwd": "/"}
        received = list(pending.fds)
        pending.close()
        for fd in received:  # the server's copies are closed with the connection
            with pytest.raises(OSError):
                os.fstat(fd)
    os.close(read_end), os.close(write_end)

    client, server = socket.socketpair(socket.AF_UNIX)
    with client, server, selectors.DefaultSelector() as selector:
        pending = fork_server.Pending(server, deadline=10.0)
        selector.register(server, selectors.EVENT_READ, pending)
        _send_part(client, message[:20])
        assert pending.read() is None
        assert fork_server._drop_expired(selector, now=9.0) == []
        assert fork_server._drop_expired(selector, now=10.0) == [pending]
        assert selector.get_map() == {} and client.recv(1) == b""  # closed: the client sees the end


def _message(body: bytes) -> bytes:
    return struct.pack("!Q", len(body)) + body


@pytest.mark.parametrize("message, fds, error", [
    (struct.pack("!Q", fork_server.MAX_REQUEST_BYTES + 1), 3, "at most"),
    (_message(b"{}"), 3, "not a request"),
    (_message(b'{"argv": [], "env": {}, "cwd": "/"}'), 3, "not a request"),
    (_message(b'{"argv": ["x"], "env": {"A": 1}, "cwd": "/"}'), 3, "not a request"),
    (_message(b'{"argv": ["x"], "env": {}, "cwd": "/"}'), 1, "1 file descriptors"),
    (struct.pack("!Q", 1) + b"{}", 3, "1 bytes"),
], ids=["too long", "empty", "no argv", "env not str", "one stream", "more than announced"])  # fmt: skip
def test_a_malformed_request_is_refused(message, fds, error):
    client, server = socket.socketpair(socket.AF_UNIX)
    with client, server:
        pending = fork_server.Pending(server, deadline=10.0)
        _send_part(client, message, [0] * fds)
        with pytest.raises(ValueError, match=error):
            pending.read()
        pending.close()


def test_a_client_gone_mid_request_is_an_error():
    client, server = socket.socketpair(socket.AF_UNIX)
    with server:
        pending = fork_server.Pending(server, deadline=10.0)
        client.sendall(struct.pack("!Q", 100))
        client.close()
        assert pending.read() is None
        with pytest.raises(ConnectionError, match="after 8 bytes"):
            pending.read()
        pending.close()


def test_ray_runs_the_client_from_this_checkout(tmp_path):
    """Ray splices ``py_executable`` into ``bash -c``: the client by its absolute path, wherever the clone is."""
    executable, folder = fork_client.runtime_env_overrides(tmp_path / "fork")
    client = Path(__file__).with_name("fork_client.py").resolve()
    assert executable == f"++ray_kwargs.ray_init.runtime_env.py_executable='{sys.executable} -S -E {client}'"
    assert folder == f"++ray_kwargs.ray_init.runtime_env.env_vars.{fork_client.DIR_ENV}={tmp_path / 'fork'}"
    with mock.patch.object(fork_client, "__file__", "/a clone/tests/fork_client.py"):
        with pytest.raises(ValueError, match="run the tests from a path without them"):
            fork_client.runtime_env_overrides(tmp_path)
