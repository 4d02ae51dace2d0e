"""Run Triton kernel checks interpreted on CPU.

Triton picks interpreter or compiler when a kernel is decorated (at import), and the interpreter
only replaces Triton's library functions (``tl.max``, ``tl.sum``, ...) when ``TRITON_INTERPRET=1``
is set before triton is imported. So checks run in a child Python started that way, unless this
process already imported the kernel interpreted.
"""

import importlib
import os
import subprocess
import sys


def kernel_is_interpreted(module: str, kernel: str) -> bool:
    if module not in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(getattr(importlib.import_module(module), kernel), InterpretedFunction)


def run_interpreted(test_file: str, module: str, kernel: str, checks) -> None:
    """Call ``checks`` (functions defined at the top level of ``test_file``) with ``module.kernel``
    interpreted: here if it already is, else in a child Python (by name)."""
    if kernel_is_interpreted(module, kernel):
        for check in checks:
            check()
        return
    env = dict(os.environ, TRITON_INTERPRET="1")
    code = (
        "import importlib.util, sys;"
        f"spec = importlib.util.spec_from_file_location('interpreted_checks', {test_file!r});"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m);"
        "from tests.interpreted import kernel_is_interpreted;"
        f"assert kernel_is_interpreted({module!r}, {kernel!r}), 'kernel not interpreted';"
        + "".join(f"m.{check.__name__}();" for check in checks)
        + "print('ok')"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600, cwd=root)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout[-4000:] + r.stderr[-4000:]
