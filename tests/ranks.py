"""Run a Python script as N torch.distributed ranks (separate processes, gloo on localhost) and collect what each
prints after ``RESULT`` (JSON). Shared by the data-parallel and sequence-parallel tests.

The ranks are forked from a server that has imported verl (tests/forked.py): ~15 s of imports per rank saved;
each rank is still a process of its own with its own environment."""

import json
import os
import socket
import subprocess

import forked


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(script: str, args_per_rank: list[list[str]], timeout: float = 600) -> list[dict]:
    """Start one process per entry of ``args_per_rank`` (world size = its length); each must print
    ``RESULT <json>``. Raises with the rank's stderr if one fails; a rank out of step hangs until ``timeout``."""
    port, world = free_port(), len(args_per_rank)
    script_path = forked.FORK_DIR / f"rank_script_{port}.py"
    script_path.write_text(script)
    procs = []
    for rank, args in enumerate(args_per_rank):
        env = forked.environment({**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                                  "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                                  "LOCAL_WORLD_SIZE": str(world)})  # fmt: skip
        procs.append(subprocess.Popen(forked.command(str(script_path), *args), env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))  # fmt: skip
    try:
        outputs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for rank, (p, (_, err)) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{err[-4000:]}"
    return [json.loads(out.split("RESULT", 1)[1]) for out, _ in outputs]
