"""Processes forked from a server that has imported verl once: the tests' commands and CPU runs' Ray workers start
in ~1 s, not ~15 s.

Every Ray actor of a verl run is a fresh Python process that imports torch, transformers, tensordict, vLLM and
verl (with its plugins) before it does anything: ~13-15 s of one core, and a run of the tiny default starts 8-11
of them (TaskRunner, trainer ranks, rollout servers, agent-loop, reward and load-balancer workers, TransferQueue).
On a 2-core machine that is most of a short run. This is a fork server for Ray's documented ``py_executable`` hook
(``ray_init.runtime_env.py_executable``, "a custom Python interpreter", applied to every worker of the job):
``tests/fork_client.py`` is that executable; it sends the worker's command line, environment, working directory
and standard streams here, and this server forks a child that becomes the worker (``default_worker.py`` run as
``__main__``, with the client's environment, streams and arguments). The worker code that runs is unchanged; only
the imports are inherited instead of repeated. tests/forked.py starts the tests' own commands the same way.

What a forked worker shares with the server is what the server imported with *its* environment: modules that read
an environment variable at import time see the server's value. The server is therefore started by the first worker
of its Ray instance, with that worker's environment (the job's: the CPU overlay's ``VERL_PLATFORM=cpu``,
``OMP_NUM_THREADS=1``, Ray's job id and raylet pid), and keyed by those values (``fork_client.server_address``);
per-worker variables (ranks, Ray's addresses) are read at run time, from the client's environment.
The server holds no thread when it forks (checked: a fork with threads running is refused).

It runs whatever command a client sends, so only this user may send one: its socket (mode 0600) lies in a folder
of this user's alone (mode 0700, ``fork_client.private_directory``), and a connection from a process of another
uid is closed unread (SO_PEERCRED). Requests are read as they arrive, from all clients at once: a client that
connects and sends nothing, or half a request, holds up no other and is dropped after ``RECEIVE_TIMEOUT_S``.

Test code (the tests and tests/e2e_runs.py), for CPU runs only: a GPU worker must initialise CUDA in its own process.
"""

from __future__ import annotations

import array
import io
import json
import os
import runpy
import selectors
import signal
import socket
import struct
import sys
import threading
import time
from pathlib import Path

from fork_client import owner_pid, private_directory

# What every worker of a CPU run imports, in the order the plugin needs (verl first: it loads our plugin)
PRELOAD = ("ray", "torch", "transformers", "verl", "verl.single_controller.ray.base", "verl.workers.engine_workers",
           "verl.experimental.agent_loop", "verl.experimental.reward_loop", "transfer_queue",
           # imported later by every worker (profiled with py-spy, a launch script's run): Ray's serializers on the
           # first deserialisation, torch's dynamo on the first forward (torch._disable_dynamo), FSDP's checkpoint
           "pydantic.v1", "torch._dynamo", "torch.distributed.checkpoint", "ray.dag")  # fmt: skip
# A client sends its whole request right after it connects; one that has not within this is stuck or not a client
RECEIVE_TIMEOUT_S = 60.0
MAX_REQUEST_BYTES = 64 << 20  # an environment and a command line: far less; more is not a client's request
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def preload() -> None:
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    # verl's get_hf_auto_model_class looks the model's config up in this mapping, which imports every
    # image-text-to-text model's configuration on first use (~1.4 s in each trainer rank)
    from transformers import AutoModelForImageTextToText

    AutoModelForImageTextToText._model_mapping.keys()


def refusal(peer_uid: int) -> str | None:
    """Why a process of uid ``peer_uid`` may not use this server (None: it may). Only this server's own user: what
    a request runs, it runs with this user's rights."""
    if peer_uid != os.getuid():
        return f"a process of uid {peer_uid}, not this server's uid {os.getuid()}"
    return None


def peer_uid(conn: socket.socket) -> int:
    """The uid of the process at the other end of the Unix socket ``conn`` (the kernel's, not what it claims)."""
    _pid, uid, _gid = _PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    return uid


class Pending:
    """A connection whose request has not fully arrived: read as it comes (never waited on), dropped at
    ``deadline`` (``time.monotonic``). A request is an 8-byte length, that many bytes of JSON (argv, env, cwd), and
    the client's three standard streams as file descriptors (SCM_RIGHTS)."""

    def __init__(self, conn: socket.socket, deadline: float):
        conn.setblocking(False)
        self.conn, self.deadline, self.data, self.fds = conn, deadline, bytearray(), []

    def read(self) -> dict | None:
        """What has arrived; the request once complete, else None. Raises on a closed or malformed request."""
        fds = array.array("i")
        try:
            data, ancillary, _flags, _addr = self.conn.recvmsg(1 << 20, socket.CMSG_SPACE(3 * fds.itemsize))
        except BlockingIOError:
            return None
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        self.fds.extend(fds)  # owned from here on: closed by close() unless handed to the worker
        if not data:
            raise ConnectionError(f"the client went away after {len(self.data)} bytes of its request")
        self.data += data
        if len(self.data) < 8:
            return None
        (size,) = struct.unpack("!Q", self.data[:8])
        if size > MAX_REQUEST_BYTES or len(self.data) > 8 + size:
            raise ValueError(f"a request of {size} bytes ({len(self.data) - 8} sent; at most {MAX_REQUEST_BYTES})")
        if len(self.data) < 8 + size:
            return None
        request = json.loads(self.data[8:])
        if len(self.fds) != 3 or not _well_formed(request):
            raise ValueError(f"not a request: {len(self.fds)} file descriptors, fields {sorted(request)[:5]}")
        return request

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        self.conn.close()


def _well_formed(request) -> bool:
    return (isinstance(request, dict) and isinstance(request.get("cwd"), str)
            and isinstance(request.get("argv"), list) and len(request["argv"]) > 0
            and all(isinstance(a, str) for a in request["argv"]) and isinstance(request.get("env"), dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in request["env"].items()))  # fmt: skip


def _become_worker(request: dict, fds: list[int], conn: socket.socket) -> None:
    """In the forked child: the client's streams, environment, directory and arguments; then the worker's main."""
    # a process group of its own, as Ray gives each worker it starts: Ray ends an exiting worker's whole group
    os.setsid()
    for target, fd in enumerate(fds[:3]):
        os.dup2(fd, target)
        os.close(fd)
    for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_DFL)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    argv = request["argv"]
    module = argv[1] if argv[0] == "-m" else None  # `python -m module args` as well as `python script args`
    sys.argv = [module, *argv[2:]] if module else list(argv)
    # what `python` puts first on sys.path: the script's directory, or the working directory for -m
    sys.path[0] = os.getcwd() if module else os.path.dirname(os.path.abspath(argv[0]))
    # `python -u` (Ray starts its workers unbuffered): text streams straight onto the new fds 1 and 2
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True, line_buffering=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True, line_buffering=True)
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))

    def exit_with_client():
        # the client never writes after its request: end of stream means it is gone (killed by Ray, say)
        while conn.recv(1 << 10):
            pass
        print("fork server: the worker's client went away; exiting", file=sys.stderr, flush=True)
        os._exit(1)

    import faulthandler

    faulthandler.enable()  # a crash in native code leaves its Python stack in the worker's log
    threading.Thread(target=exit_with_client, daemon=True, name="fork-client-watch").start()
    if module:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        runpy.run_path(argv[0], run_name="__main__")
    sys.exit(0)


def serve(address: str) -> None:
    """Accept requests on the Unix socket ``address``; fork one worker per request. Ends with the raylet whose
    workers it serves ($RAY_RAYLET_PID, from the environment of the worker that started it), or outside Ray with
    the process named by $SSOPD_FORK_OWNER_PID."""
    private_directory(os.path.dirname(os.path.abspath(address)))
    owner = owner_pid()
    preload()
    tasks = {int(t): Path(f"/proc/self/task/{t}/comm").read_text().strip() for t in os.listdir("/proc/self/task")}
    # jemalloc's background thread (a library's allocator) is fork-safe: jemalloc's own fork handlers
    others = [name for tid, name in tasks.items() if tid != os.getpid() and name != "jemalloc_bg_thd"]
    if threading.active_count() != 1 or others:
        raise SystemExit(
            f"fork server: threads are running after the imports ({list(tasks.values())}): refusing to fork")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if os.path.exists(address):
        os.unlink(address)
    umask = os.umask(0o177)  # the socket file is made with mode 0600: only this user may connect
    try:
        listener.bind(address)
    finally:
        os.umask(umask)
    listener.listen(64)
    listener.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    clients: dict[int, socket.socket] = {}  # worker pid -> its client's connection (for its exit status)
    while _alive(owner):
        _reap(clients)
        for key, _events in selector.select(timeout=0.2):
            if key.fileobj is listener:
                _accept(listener, selector)
                continue
            pending: Pending = key.data
            try:
                request = pending.read()
            except (OSError, ValueError, ConnectionError) as error:
                _log(f"bad request: {error!r}")
                selector.unregister(pending.conn)
                pending.close()
                continue
            if request is not None:
                selector.unregister(pending.conn)
                _fork(request, pending, listener, selector, clients)
        _drop_expired(selector, time.monotonic())


def _accept(listener: socket.socket, selector: selectors.BaseSelector) -> None:
    try:
        conn, _ = listener.accept()
    except BlockingIOError:  # another wake-up took it
        return
    why = refusal(peer_uid(conn))
    if why is not None:
        _log(f"refused {why}")
        conn.close()
        return
    selector.register(conn, selectors.EVENT_READ, Pending(conn, time.monotonic() + RECEIVE_TIMEOUT_S))


def _drop_expired(selector: selectors.BaseSelector, now: float) -> list[Pending]:
    """Close the connections whose request is not complete by their deadline (they hold file descriptors)."""
    expired = [key.data for key in list(selector.get_map().values())
               if isinstance(key.data, Pending) and key.data.deadline <= now]  # fmt: skip
    for pending in expired:
        _log(f"no complete request within {RECEIVE_TIMEOUT_S:.0f} s ({len(pending.data)} bytes): dropped")
        selector.unregister(pending.conn)
        pending.close()
    return expired


def _fork(request: dict, pending: Pending, listener, selector: selectors.BaseSelector, clients: dict) -> None:
    conn, fds = pending.conn, pending.fds
    conn.setblocking(True)  # the worker waits on it for its client's end; here it carries two short lines
    pid = os.fork()
    if pid == 0:
        others = [key.data.conn for key in selector.get_map().values() if isinstance(key.data, Pending)]
        for other in [listener, *others, *clients.values()]:
            other.close()
        selector.close()
        try:
            _become_worker(request, fds, conn)
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
            if not isinstance(done.code, (int, type(None))):  # as the interpreter does: the message to stderr
                print(done.code, file=sys.stderr)
            _exit(code)
        except BaseException:  # noqa: BLE001 - the worker's own traceback goes to its stderr
            import traceback

            traceback.print_exc()
            _exit(1)
    for fd in fds:
        os.close(fd)
    pending.fds = []
    conn.sendall(f"{pid}\n".encode())
    clients[pid] = conn


def _log(message: str) -> None:
    print(f"fork server: {message}", file=sys.stderr, flush=True)


def _exit(code: int) -> None:
    """End the worker as the interpreter ends: its ``atexit`` handlers (a test's temporary folder, say), then what
    it wrote, out (a script may have closed its streams itself); ``os._exit``: nothing of the server's to undo."""
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (ValueError, OSError):
            pass
    os._exit(code)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def _reap(clients: dict[int, socket.socket]) -> None:
    while clients:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = clients.pop(pid, None)
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            _log(f"worker {pid} exited with {code}")
        if conn is not None:
            try:
                conn.sendall(f"{code}\n".encode())
            except OSError:
                pass
            conn.close()


if __name__ == "__main__":
    serve(sys.argv[1])
