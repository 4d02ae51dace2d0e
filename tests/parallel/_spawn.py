"""Run a function on N local ranks (gloo), each in its own process, and collect what each returns."""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env(rank: int, world: int, port: int) -> dict[str, str]:
    """The variables torchrun sets for one rank."""
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def _entry(rank: int, fn, world: int, port: int, out_dir: str, args: tuple) -> None:
    import torch

    os.environ.update(launch_env(rank, world, port))
    torch.set_num_threads(1)  # the ranks share the machine's cores
    from csd_compile import parallel

    result = fn(rank, *args)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    # Leaving: the group is closed together (a barrier, then destroy), and the process ends without
    # the interpreter's teardown (its result is written). Twice in CI a rank died of SIGABRT with
    # "terminate called without an active exception", what a thread destroyed while still running
    # prints, as gloo's can be at exit under a peer; the second time the group was destroyed before
    # exiting, but with no barrier.
    parallel.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(fn, *args, world: int = 2) -> list:
    """``fn(rank, *args)`` on ``world`` spawned ranks; their JSON-able results, in rank order.
    A rank that raises fails the call (``mp.spawn`` raises and stops the others)."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_entry, args=(fn, world, free_port(), out_dir, args), nprocs=world, join=True)
        results = []
        for r in range(world):
            with open(os.path.join(out_dir, f"rank{r}.json")) as f:
                results.append(json.load(f))
    return results
