"""Run model-written code where it can do no harm, and score it in a way it cannot forge.

:func:`run_sandboxed` runs a program (e.g. a HumanEval completion with its tests) in Linux
namespaces made with ``unshare`` (util-linux) as an unprivileged user:

* **no network**: a new network namespace (only a loopback that is down);
* **nothing writable but its own scratch folder**: a new mount namespace where every mount is
  remounted read-only and an empty 64 MiB tmpfs is the working directory; the user's home, ``/root``,
  ``/home`` and the caller's working directory are hidden under empty read-only tmpfs mounts (all
  but those holding the Python interpreter or its packages, which the program needs);
* **nothing outlives it**: a new PID namespace whose init is killed with ``unshare`` at the
  timeout, which takes every forked descendant with it;
* **bounded output and resources**: stdout/stderr go to files capped at 1 MiB (``RLIMIT_FSIZE``:
  a larger write kills the program), CPU time and address space are limited;
* **an unforgeable verdict**: a trusted wrapper reads a random nonce from a pipe before the
  program runs and writes it to a second pipe only if the program ran to its end without raising
  or exiting; ``sys.exit(0)`` or ``os._exit(0)`` after a wrong answer, or printing "passed", earn
  nothing. (The nonce lives in the wrapper's frame: code that deliberately introspects the
  harness could find it; a completion that merely exits early cannot.)

Where namespaces are unavailable :func:`run_sandboxed` refuses to run anything and says why,
unless ``unsafe_exec=True`` (``csd_eval --unsafe-exec``) accepts running the code with the user's
rights (resource limits and a temporary folder only).
"""

from __future__ import annotations

import functools
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["SandboxUnavailable", "isolation_unavailable", "run_sandboxed"]

OUTPUT_CAP = 1 << 20

_WRAPPER = '''\
import os, sys
def _run(nonce_fd, verdict_fd):
    nonce = os.read(nonce_fd, 64)
    os.close(nonce_fd)
    with open("prog.py", encoding="utf-8") as f:
        code = compile(f.read(), "prog.py", "exec")
    def report(fd=verdict_fd, n=nonce):
        os.write(fd, n)
    del nonce
    exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
    sys.stdout.flush()
    report()
_run(int(sys.argv[1]), int(sys.argv[2]))
'''

# inside the new namespaces: every mount read-only, private homes hidden, a tmpfs to work in
_SETUP = r'''
set -e
d="$1"; shift
awk '{print $2}' /proc/self/mounts | sort -u | while read -r m; do
  mount -o remount,bind,ro "$m" 2>/dev/null || true
done
for h in $CSD_HIDE; do
  [ -d "$h" ] && mount -t tmpfs -o ro,size=4k tmpfs "$h" 2>/dev/null || true
done
mount -t tmpfs -o size=64m,mode=700 tmpfs "$d/work"
cp "$d/prog.py" "$d/wrapper.py" "$d/work/"
cd "$d/work"
exec "$@"
'''


class SandboxUnavailable(RuntimeError):
    """This machine cannot isolate model-written code (no unprivileged namespaces)."""


@functools.cache
def isolation_unavailable() -> str | None:
    """Why namespaces cannot be made here (``None`` when they can): probed once per process."""
    if shutil.which("unshare") is None:
        return "the `unshare` command (util-linux) is not installed"
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--net", "--pid", "--fork", "--mount",
                            "--mount-proc", "true"], capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        return f"unprivileged namespaces are not allowed here ({probe.stderr.strip()[:200]})"
    return None


def _hidden_dirs() -> list[str]:
    """The private folders to hide (home, /root, /home, the caller's working directory), except
    those holding the interpreter or its packages, which the program needs to start."""
    import site
    import sysconfig

    needed = {os.path.realpath(p) for p in (sys.executable, sys.prefix, sys.base_prefix, *site.getsitepackages(),
                                            sysconfig.get_paths()["stdlib"]) if p}
    out = []
    for h in {str(Path.home()), "/root", "/home", os.getcwd()}:
        real = os.path.realpath(h)
        if " " not in real and os.path.isdir(real) and not any(n == real or n.startswith(real + os.sep) for n in needed):
            out.append(real)
    return sorted(out)


def _limits(cpu_s: int, mem_bytes: int):
    def apply():  # in the child, before exec
        import resource

        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
        resource.setrlimit(resource.RLIMIT_AS, (mem_bytes, mem_bytes))
        resource.setrlimit(resource.RLIMIT_FSIZE, (OUTPUT_CAP, OUTPUT_CAP))

    return apply


def run_sandboxed(program: str, timeout: float = 10.0, mem_mb: int = 1024, *, unsafe_exec: bool = False) -> dict:
    """Run ``program`` (Python source) isolated as described in the module doc.

    Returns ``{"passed", "returncode", "timeout", "stderr", "isolated"}``: ``passed`` iff the
    program ran to its end within ``timeout`` seconds (the wrapper's nonce came back), whatever its
    exit status claims. Raises :class:`SandboxUnavailable` where isolation is impossible, unless
    ``unsafe_exec``.
    """
    if not isinstance(program, str):
        raise TypeError(f"program must be a str, got {type(program).__name__}")
    if not timeout > 0:
        raise ValueError(f"timeout={timeout!r} must be > 0 seconds")
    why = isolation_unavailable()
    if why is not None and not unsafe_exec:
        raise SandboxUnavailable(f"refusing to run model-written code without isolation: {why}; "
                                 "pass --unsafe-exec (unsafe_exec=True) to run it with your own rights")
    nonce = secrets.token_hex(16).encode()
    with tempfile.TemporaryDirectory(prefix="csd-sandbox-") as tmp:
        d = Path(tmp)
        (d / "prog.py").write_text(program, encoding="utf-8")
        (d / "wrapper.py").write_text(_WRAPPER, encoding="utf-8")
        (d / "work").mkdir()
        nonce_r, nonce_w = os.pipe()
        verdict_r, verdict_w = os.pipe()
        os.write(nonce_w, nonce)
        os.close(nonce_w)
        py = [sys.executable, "-I", "wrapper.py", str(nonce_r), str(verdict_w)]
        if why is None:
            cmd = ["unshare", "--user", "--map-root-user", "--net", "--pid", "--fork", "--kill-child", "--mount",
                   "--mount-proc", "sh", "-c", _SETUP, "sandbox", str(d), *py]
            cwd = d
        else:  # unsafe_exec: the user accepted running it with their rights
            shutil.copy(d / "prog.py", d / "work")
            shutil.copy(d / "wrapper.py", d / "work")
            cmd, cwd = py, d / "work"
        env = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "CSD_HIDE": " ".join(_hidden_dirs())}
        timed_out = False
        with open(d / "stdout", "wb") as out, open(d / "stderr", "wb") as err:
            proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    pass_fds=(nonce_r, verdict_w), start_new_session=True,
                                    preexec_fn=_limits(int(timeout) + 1, mem_mb << 20))
            os.close(nonce_r)
            os.close(verdict_w)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                try:  # the whole session: unshare, and with it the PID namespace and all it forked
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        verdict = b""
        os.set_blocking(verdict_r, False)
        try:
            verdict = os.read(verdict_r, 64)
        except BlockingIOError:
            pass
        os.close(verdict_r)
        stderr = (d / "stderr").read_bytes()[-500:].decode("utf-8", "replace")
    passed = not timed_out and verdict == nonce
    return {"passed": passed, "returncode": None if timed_out else proc.returncode, "timeout": timed_out,
            "stderr": stderr, "isolated": why is None}
