"""The Python executable of a process forked by ``tests/fork_server.py`` (Ray's ``py_executable``, tests/forked.py).

Ray runs ``<py_executable> default_worker.py <args>`` for every worker; with ``py_executable`` set to
``python -S -E <this file>``, this process (standard library only: it starts in ~20 ms) hands its command line,
environment, working directory and standard streams to the fork server of its Ray instance, which forks a worker
that has verl imported already. This process then stands in for the worker: it forwards the signals it gets to it
and exits with its exit status; if this process dies, the worker sees its connection close and exits too.

The first worker of a Ray instance starts that instance's server (one per raylet and job: what Ray's C++ config
reads from the environment at import, such as the job id and the raylet's pid, is the same for all its workers),
with its own environment, and waits for its imports; the server ends when the raylet does. Outside Ray (the
tests' commands and torch.distributed ranks), $SSOPD_FORK_OWNER_PID names the process whose end ends the server.
The server runs whatever a client sends, so its folder ($SSOPD_FORK_DIR) must be this user's alone (mode 0700,
checked here and by the server) and the server answers only processes of this user (fork_server.py).
Without $SSOPD_FORK_DIR it says so on stderr and runs the process itself (``exec`` of this Python): slower,
never different.

Test code only (the tests and tests/e2e_runs.py): a GPU worker must initialise CUDA in its own process.
"""

import array
import fcntl
import json
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
import zlib

DIR_ENV = "SSOPD_FORK_DIR"  # where the servers' sockets and logs live
OWNER_ENV = "SSOPD_FORK_OWNER_PID"  # outside Ray: the process whose end ends the server (Ray: the raylet)
START_TIMEOUT_S = 300.0
# What a server's imports read from the environment and its workers share: a worker is forked only from a server
# started with the same values (the rest of a worker's environment is its own, read at run time)
IMPORT_TIME_ENV = ("RAY_RAYLET_PID", "RAY_JOB_ID", "RAY_AUTH_MODE", "VERL_PLATFORM", "OMP_NUM_THREADS")
SERVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fork_server.py")


def owner_pid():
    return int(os.environ.get("RAY_RAYLET_PID") or os.environ[OWNER_ENV])


def server_address(directory):
    key = zlib.crc32("\0".join(os.environ.get(k, "") for k in IMPORT_TIME_ENV).encode())
    return os.path.join(directory, f"fork-{owner_pid()}-{key:08x}.sock")


def private_directory(directory):
    """``directory``, made (mode 0700) if it is missing; refused unless it is a folder of this user that no one else
    may enter: whoever can reach a server's socket has it run any command."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    info = os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise SystemExit(f"fork server: {directory} is not a private folder of uid {os.getuid()} (owner uid "
                         f"{info.st_uid}, mode {stat.filemode(info.st_mode)}): refusing to use it")  # fmt: skip
    return directory


def connect(address):
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(address)
        return conn
    except OSError:
        conn.close()
        return None


def _tail(path, size=4000):
    with open(path, "rb") as log:
        log.seek(max(0, os.path.getsize(path) - size))
        return log.read().decode(errors="replace")


def connect_or_start(directory):
    """A connection to this Ray instance's server, started here (under a lock) if it is not running."""
    address = server_address(private_directory(directory))
    conn = connect(address)
    if conn is not None:
        return conn
    with open(address + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        conn = connect(address)
        if conn is not None:
            return conn
        log = open(address[: -len(".sock")] + ".log", "ab")
        # a script, not `-m`: this folder need not be importable (a fresh clone anywhere, Ray's worker directory).
        # Its own session, and not this process's child for long: Ray ends a worker's children with it
        server = subprocess.Popen([sys.executable, SERVER, address], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                  start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        while conn is None:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the fork server did not start; its log ({log.name}) ends:\n{_tail(log.name)}")
            time.sleep(0.05)
            conn = connect(address)
        return conn


def run_unforked(argv):
    sys.stderr.write(f"ssopd fork client: ${DIR_ENV} or the owner's pid (${OWNER_ENV}, or Ray's raylet) is "
                     "not set; starting the process unforked\n")
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *argv])


def main(argv):
    directory = os.environ.get(DIR_ENV)
    if not directory or not (os.environ.get("RAY_RAYLET_PID") or os.environ.get(OWNER_ENV)):
        run_unforked(argv)
    conn = connect_or_start(directory)
    request = json.dumps({"argv": argv, "env": dict(os.environ), "cwd": os.getcwd()}).encode()
    fds = array.array("i", [0, 1, 2])
    conn.sendmsg([struct.pack("!Q", len(request)), request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
    reply = conn.makefile("rb")
    line = reply.readline()
    if not line.strip():  # the server closed the connection: it refused this request (its log says why)
        sys.exit(f"ssopd fork client: the fork server in {directory} refused the request (see its log there)")
    pid = int(line)

    def forward(signum, _frame):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, forward)
    line = reply.readline()  # the worker's exit status; empty if the server went away
    status = int(line) if line.strip() else 1
    sys.exit(status if status >= 0 else 128 - status)


# What Ray's `bash -c` would split or expand in py_executable (it splices it in unquoted), and Hydra's quote
SHELL_SPECIAL = set("'\"\\ $`;&|<>()*?[]{}!#~\n\t")


def py_executable():
    """The ``runtime_env.py_executable`` that starts Ray workers through the fork servers in $SSOPD_FORK_DIR."""
    paths = (sys.executable, os.path.abspath(__file__))
    for path in paths:
        if SHELL_SPECIAL & set(path):
            raise ValueError(f"{path!r} has characters {sorted(SHELL_SPECIAL & set(path))} that Ray's `bash -c` "
                             "would split or expand in py_executable: run the tests from a path without them")
    return f"{paths[0]} -S -E {paths[1]}"


def runtime_env_overrides(directory):
    """The Hydra overrides that start a CPU run's Ray workers through fork servers kept in ``directory``."""
    return [f"++ray_kwargs.ray_init.runtime_env.py_executable='{py_executable()}'",
            f"++ray_kwargs.ray_init.runtime_env.env_vars.{DIR_ENV}={directory}"]  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
