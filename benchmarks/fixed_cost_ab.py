"""In-process A/B of one fixed-cost lever of the decode step, on the embedded model.

    python -m benchmarks.fixed_cost_ab --lever size_asserts|guards|direct_qlinear [--options bits=auto] [--rounds 7]

Two ``GreedyDecoder`` s decode the same 53-token prompt, one with the lever as shipped and one with
it undone, in alternating rounds of one process (the machine's drift hits both alike):

- ``size_asserts``: the backend's ``WRAPPER_CONFIG`` (Inductor's ``size_asserts`` off) against a
  backend compiled with it on (a second registered backend, so each decoder has its own graph);
- ``guards``: ``csd_compile.stance.GuardedOnce`` (guards checked at a call's first step only)
  against checking them at every step (one decoder, the stance disabled in alternate rounds);
- ``direct_qlinear``: the Python wrapper calling the C++ kernel as a plain function
  (``csd_compile.kernels.native.direct_qlinear``) against calling ``torch.ops.csd.qlinear_cpu_native``
  through the dispatcher (a second backend compiling without that codegen, Inductor's caches off).

Decode-only ms/token = (time of a 97-token call - time of a 1-token call) / 96; medians, the ratio
and whether both produced the same tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import time

import torch


def _ms_per_token(dec, ids, tokens: int) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    out = dec(ids, max_new_tokens=tokens + 1, eos_token_id=[])
    a = time.perf_counter() - t0
    t0 = time.perf_counter()
    dec(ids, max_new_tokens=1, eos_token_id=[])
    return (a - (time.perf_counter() - t0)) / tokens * 1e3, out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lever", required=True, choices=["size_asserts", "guards", "direct_qlinear"])
    ap.add_argument("--options", default="bits=auto", help="backend options, k=v[,k=v]")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.threads < 1:
        raise SystemExit("--rounds and --threads must be >= 1")

    import csd_compile.backend as backend
    import csd_compile.models.greedy as greedy
    from benchmarks.llama_cpp_decode import _parse_options
    from csd_compile.models.loader import load_model

    torch.set_num_threads(args.threads)
    options = _parse_options(args.options)
    ids = torch.tensor([[random.Random(0).randrange(100, 20000) for _ in range(53)]])
    shipped = f"{args.lever} as shipped"
    undone = f"{args.lever} undone"

    if args.lever in ("size_asserts", "direct_qlinear"):
        from torch._dynamo import register_backend

        @contextlib.contextmanager
        def size_asserts_on():
            backend.WRAPPER_CONFIG["size_asserts"] = True
            try:
                yield
            finally:
                backend.WRAPPER_CONFIG["size_asserts"] = False

        @contextlib.contextmanager
        def qlinear_as_op():
            from torch._inductor.codegen.custom_extern_kernel_codegen import CUSTOM_EXTERN_KERNEL_CODEGEN

            key = "torch.ops.csd.qlinear_cpu_native.default"
            entry = CUSTOM_EXTERN_KERNEL_CODEGEN.pop(key)
            try:  # the caches' keys do not see the codegen: compile afresh
                with torch._inductor.config.patch(fx_graph_cache=False), \
                        torch._functorch.config.patch(enable_autograd_cache=False):
                    yield
            finally:
                CUSTOM_EXTERN_KERNEL_CODEGEN[key] = entry

        lever_undone = {"size_asserts": size_asserts_on, "direct_qlinear": qlinear_as_op}[args.lever]

        @register_backend
        def csd_lever_undone(gm, example_inputs, **kw):
            with lever_undone():
                return backend.csd_backend(gm, example_inputs, **kw)

        decoders = {shipped: greedy.GreedyDecoder(load_model(dtype="bf16")[0], backend="csd", options=options),
                    undone: greedy.GreedyDecoder(load_model(dtype="bf16")[0], backend="csd_lever_undone",
                                                 options=options)}
        settings = {shipped: contextlib.nullcontext, undone: contextlib.nullcontext}
    else:
        dec = greedy.GreedyDecoder(load_model(dtype="bf16")[0], backend="csd", options=options)
        decoders = {shipped: dec, undone: dec}

        @contextlib.contextmanager
        def every_step_guarded():
            real = greedy.GuardedOnce
            greedy.GuardedOnce = lambda compiled: real(False)  # never skips
            try:
                yield
            finally:
                greedy.GuardedOnce = real

        settings = {shipped: contextlib.nullcontext, undone: every_step_guarded}

    for name, dec in decoders.items():
        t = time.perf_counter()
        dec.warm_up(ids, max_new_tokens=97)
        print(f"{name}: warm-up {time.perf_counter() - t:.1f} s", flush=True)
    res: dict[str, list[float]] = {name: [] for name in decoders}
    outs = {}
    for _ in range(args.rounds):
        for name, dec in decoders.items():
            with settings[name]():
                ms, outs[name] = _ms_per_token(dec, ids, 96)
            res[name].append(ms)
    for name, v in res.items():
        print(f"{name}: median {statistics.median(v):.2f} ms/token  {[round(x, 2) for x in v]}")
    ratio = statistics.median(res[undone]) / statistics.median(res[shipped])
    print(f"speed-up of the lever: {ratio:.3f}x; same tokens: {torch.equal(outs[shipped], outs[undone])}")


if __name__ == "__main__":
    main()
