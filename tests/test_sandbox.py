"""Hostile model-written code in the pass@1 sandbox: contained, and scored as failed."""

import os
import socket
import threading
import time
import uuid

import pytest

from benchmarks.sandbox import run_sandboxed


def test_writes_outside_its_folder_fail_and_leave_nothing(tmp_path):
    victim = tmp_path / f"victim-{uuid.uuid4().hex}"
    victim.write_text("keep me")
    home_file = os.path.expanduser(f"~/pwned-{uuid.uuid4().hex}")
    prog = (f"import os\nfor p in ({str(tmp_path / 'new.txt')!r}, {home_file!r}, '/tmp/pwned-{uuid.uuid4().hex}'):\n"
            "    try:\n        open(p, 'w').write('x')\n    except OSError:\n        pass\n"
            f"try:\n    os.remove({str(victim)!r})\nexcept OSError:\n    pass\n"
            "open('mine.txt', 'w').write('fine here')\n")
    res = run_sandboxed(prog)
    assert res["passed"] and res["isolated"]  # it ran to its end; only its own folder took the write
    assert victim.read_text() == "keep me" and not (tmp_path / "new.txt").exists() and not os.path.exists(home_file)


def test_no_network_even_to_a_local_listener():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(3)
    got = []

    def accept():
        try:
            conn, _ = srv.accept()
            got.append(conn.recv(100))
        except OSError:
            pass

    t = threading.Thread(target=accept)
    t.start()
    port = srv.getsockname()[1]
    res = run_sandboxed(f"import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {port}))\ns.send(b'secret')\n")
    t.join()
    srv.close()
    assert not res["passed"] and got == []


def _sandboxed_processes() -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
        except OSError:
            continue
        if any(arg.endswith(b"wrapper.py") for arg in cmd) and b"-I" in cmd:
            pids.append(int(entry))
    return pids


def test_a_forked_grandchild_does_not_outlive_the_timeout():
    assert _sandboxed_processes() == []
    prog = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n    os._exit(0)\ntime.sleep(60)\n"
    res = run_sandboxed(prog, timeout=1.0)
    assert res["timeout"] and not res["passed"]
    deadline = time.time() + 5
    while _sandboxed_processes() and time.time() < deadline:
        time.sleep(0.1)
    assert _sandboxed_processes() == []  # the session-leader grandchild died with the namespace


@pytest.mark.parametrize("exit_call", ["import sys\nsys.exit(0)", "import os\nos._exit(0)", "print('passed')\nraise SystemExit"])
def test_exiting_early_after_a_wrong_answer_is_a_failure(exit_call):
    res = run_sandboxed(f"answer = 2 + 2\n{exit_call}\nassert answer == 5\n")
    assert not res["passed"]


def test_output_is_capped():
    res = run_sandboxed("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n", timeout=10.0)
    assert not res["passed"] and not res["timeout"]  # killed at the 1 MiB cap, not by the clock
