"""Ray workers forked from a process that has imported verl once: CPU runs start their actors in ~1 s, not ~15 s.

Every Ray actor of a verl run is a fresh Python process that imports torch, transformers, tensordict, vLLM and
verl (with its plugins) before it does anything: ~13-15 s of one core, and a run of the tiny default starts 8-11
of them (TaskRunner, trainer ranks, rollout servers, agent-loop, reward and load-balancer workers, TransferQueue).
On a 2-core machine that is most of a short run. This module is a fork server for Ray's documented
``py_executable`` hook (``ray_init.runtime_env.py_executable``, "a custom Python interpreter", applied to every
worker of the job): :mod:`ssopd_verl.cpu.fork_client` is that executable; it sends the worker's command line,
environment, working directory and standard streams here, and this server forks a child that becomes the worker
(``default_worker.py`` run as ``__main__``, with the client's environment, streams and arguments). The worker code
that runs is unchanged; only the imports are inherited instead of repeated.

What a forked worker shares with the server is what the server imported with *its* environment: modules that read
an environment variable at import time see the server's value. The server is therefore started by the first worker
of its Ray instance, with that worker's environment (the job's: the CPU overlay's ``VERL_PLATFORM=cpu``,
``OMP_NUM_THREADS=1``, Ray's job id and raylet pid), and keyed by those values (``fork_client.server_address``);
per-worker variables (ranks, Ray's addresses) are read at run time, from the client's environment.
The server holds no thread when it forks (checked: a fork with threads running is refused).

For CPU runs only (tests, the study): a GPU worker must initialise CUDA in its own process.
"""

from __future__ import annotations

import array
import io
import json
import os
import runpy
import signal
import socket
import struct
import sys
import threading
from pathlib import Path

from ssopd_verl.cpu.fork_client import DIR_ENV, owner_pid

# What every worker of a CPU run imports, in the order the plugin needs (verl first: it loads our plugin)
PRELOAD = ("ray", "torch", "transformers", "verl", "verl.single_controller.ray.base", "verl.workers.engine_workers",
           "verl.experimental.agent_loop", "verl.experimental.reward_loop", "transfer_queue",
           # imported later by every worker (profiled with py-spy, a launch script's run): Ray's serializers on the
           # first deserialisation, torch's dynamo on the first forward (torch._disable_dynamo), FSDP's checkpoint
           "pydantic.v1", "torch._dynamo", "torch.distributed.checkpoint", "ray.dag")  # fmt: skip


def py_executable() -> str:
    """The ``runtime_env.py_executable`` that starts Ray workers through the fork servers in $SSOPD_FORK_DIR."""
    return f"{sys.executable} -S -E {Path(__file__).with_name('fork_client.py')}"


def preload() -> None:
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    # verl's get_hf_auto_model_class looks the model's config up in this mapping, which imports every
    # image-text-to-text model's configuration on first use (~1.4 s in each trainer rank)
    from transformers import AutoModelForImageTextToText

    AutoModelForImageTextToText._model_mapping.keys()


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    fds = array.array("i")
    data, ancillary, _flags, _addr = conn.recvmsg((1 << 20) + 8, socket.CMSG_LEN(3 * fds.itemsize))
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    (size,) = struct.unpack("!Q", data[:8])
    body = data[8:]
    while len(body) < size:
        chunk = conn.recv(size - len(body))
        if not chunk:
            raise ConnectionError("the client went away mid-request")
        body += chunk
    return json.loads(body), list(fds)


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
    listener.bind(address)
    listener.listen(64)
    clients: dict[int, socket.socket] = {}
    listener.settimeout(0.2)
    while _alive(owner):
        _reap(clients)
        try:
            conn, _ = listener.accept()
        except socket.timeout:
            continue
        conn.settimeout(None)
        try:
            request, fds = _receive(conn)
        except (OSError, ValueError, ConnectionError) as error:
            print(f"fork server: bad request: {error!r}", file=sys.stderr, flush=True)
            conn.close()
            continue
        pid = os.fork()
        if pid == 0:
            listener.close()
            for other in clients.values():
                other.close()
            try:
                _become_worker(request, fds, conn)
            except SystemExit as done:
                code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
                if not isinstance(done.code, (int, type(None))):  # as the interpreter does: the message to stderr
                    print(done.code, file=sys.stderr)
                _flush()
                os._exit(code)
            except BaseException:  # noqa: BLE001 - the worker's own traceback goes to its stderr
                import traceback

                traceback.print_exc()
                _flush()
                os._exit(1)
        for fd in fds:
            os.close(fd)
        conn.sendall(f"{pid}\n".encode())
        clients[pid] = conn


def _flush() -> None:
    """What the worker wrote, out before ``os._exit`` (a script may have closed its streams itself)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (ValueError, OSError):
            pass


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
            print(f"fork server: worker {pid} exited with {code}", file=sys.stderr, flush=True)
        if conn is not None:
            try:
                conn.sendall(f"{code}\n".encode())
            except OSError:
                pass
            conn.close()


def runtime_env_overrides(directory: Path) -> list[str]:
    """The Hydra overrides that start a CPU run's Ray workers through fork servers kept in ``directory``."""
    return [f"++ray_kwargs.ray_init.runtime_env.py_executable='{py_executable()}'",
            f"++ray_kwargs.ray_init.runtime_env.env_vars.{DIR_ENV}={directory}"]  # fmt: skip


if __name__ == "__main__":
    serve(sys.argv[1])
