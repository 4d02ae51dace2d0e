"""Bad input under --tp is a clear error on rank 0 before any work (other ranks exit silently with
the same status); a rank that fails or hangs brings the group down with an error, not a hang."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from csd_compile.cli import main
from csd_compile.parallel import resolve_backend
from tests.parallel._spawn import free_port, launch_env

ROOT = Path(__file__).resolve().parents[2]


def _generate(capsys, *argv):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--tp", "--prompt", "hello", *argv])
    return exc.value.code, capsys.readouterr().err


@pytest.fixture
def rank_env(monkeypatch):
    def set_rank(rank: int, world: int):
        for key, value in launch_env(rank, world, 29999).items():
            monkeypatch.setenv(key, value)

    return set_rank


def test_tp_without_a_distributed_launch(capsys, monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    code, err = _generate(capsys)
    assert code == 2
    assert "--tp: tensor parallel needs a distributed launch" in err and "torchrun --nproc-per-node" in err


def test_nccl_on_a_cpu_only_machine(capsys, rank_env):
    rank_env(0, 2)
    code, err = _generate(capsys, "--tp-backend", "nccl")
    assert code == 2 and "'nccl' needs CUDA devices and this machine has none" in err
    with pytest.raises(ValueError, match="'mpi' is not supported; choose one of"):
        resolve_backend("mpi")


def test_tp_backend_without_tp(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--prompt", "hello", "--tp-backend", "gloo"])
    assert exc.value.code == 2 and "--tp-backend gloo: only with --tp" in capsys.readouterr().err


def test_world_size_that_cannot_shard_the_kv_heads(capsys, rank_env):
    rank_env(0, 4)  # the embedded model has 3 KV heads
    code, err = _generate(capsys)
    assert code == 2 and "over 4 ranks cannot shard 3 KV heads (9 query heads)" in err
    assert "tensor parallel: " not in err  # no process group was joined
    rank_env(1, 4)  # another rank: the same exit status, silently
    code, err = _generate(capsys)
    assert code == 2 and err == ""


def test_group_size_that_straddles_a_shard(capsys, rank_env):
    rank_env(0, 2)
    code, err = _generate(capsys, "-o", "bits=4", "-o", "group_size=128")
    assert code == 2 and "rank 1's o_proj shard has 192 input features" in err


@pytest.mark.parametrize("mode", ["raise", "hang"])
def test_a_failing_rank_brings_the_group_down(mode):
    port = free_port()
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-m", "tests.parallel._workers", str(r), mode], cwd=ROOT,
                              env=dict(os.environ, **launch_env(r, 2, port), PYTHONPATH=str(ROOT)),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        err0 = procs[0].communicate(timeout=240)[1]
    finally:
        procs[1].kill()
        procs[1].communicate()
    assert procs[0].returncode != 0
    expected = "Connection closed by peer" if mode == "raise" else "Timed out"
    assert expected in err0, err0[-2000:]
    assert time.perf_counter() - t0 < 200


def test_close_without_a_process_group_does_nothing():
    import torch.distributed as dist

    from csd_compile.parallel import close

    assert not dist.is_initialized()
    close()  # a single-process run that never joined a group: no error, no group made
    assert not dist.is_initialized()
