"""A/B of the nested weights' scale/zero layout in the C++ kernel: column-major (as stored) against
row-major (gathered), same build, same process.

    python -m benchmarks.scale_layout_ab [--bits 4 8] [--isas avx512vnni avx2] [--pool-mib 512 0.5]
        [--seconds 4] [--threads 2]

For each shape (the call shapes of the embedded model's decode step at M = 1: grouped q/k/v, o,
grouped gate/up, down, the LM head), bit-width, kernel path and pool size, two pools of copies of
one random weight (equal codes; scales and zeros row-major in one, column-major in the other) are
called in turn, one call of each alternately (which goes first alternates too), for ``--seconds``:
a machine whose memory bandwidth drifts from one moment to the next (a shared host) hits both
sides alike. A pool far above the last-level cache streams the weights from memory; a small one
(0.5 MiB) keeps them in cache and times the kernel's arithmetic. Prints the median time per call of
each side, weight GB/s and the ratio (column-major / row-major: below 1 is faster). Both sides'
outputs are checked equal first.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from csd_compile.kernels import native
from csd_compile.kernels import qlinear as _qlinear  # noqa: F401  (registers the ops)
from csd_compile.quant.nested import column_major, quantize

SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576))
GROUP = 32


def _pair(n, k, pool_bytes):
    w = quantize(torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)) * 0.05, GROUP)
    per = sum(t.numel() * t.element_size() for t in w)
    copies = max(2, int(pool_bytes // per))
    rows = [(w.qdata.clone(), w.scale.contiguous(), w.zero.contiguous()) for _ in range(copies)]
    cols = [(w.qdata.clone(), column_major(w.scale), column_major(w.zero)) for _ in range(copies)]
    return rows, cols


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--isas", nargs="+", default=None, help="kernel paths (default: every one but scalar)")
    ap.add_argument("--pool-mib", type=float, nargs="+", default=[512.0, 0.5])
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shapes", nargs="+", default=None, help="NxK shapes (default: the decode step's calls)")
    args = ap.parse_args(argv)
    if not native.load():
        raise SystemExit("the C++ kernels did not build; nothing to compare")
    isas = args.isas or [i for i in native.supported_isas() if i != "scalar"]
    bad = [i for i in isas if i not in native.supported_isas()]
    if bad or any(b not in (2, 3, 4, 8) for b in args.bits) or args.seconds <= 0 or args.threads < 1:
        raise SystemExit(f"--isas must be among {native.supported_isas()} (got {bad}), --bits among 2 3 4 8, "
                         "--seconds > 0, --threads >= 1")
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes] if args.shapes else SHAPES
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {args.threads}, kernel paths {isas}, group {GROUP}, one bf16 row")
    f = native.direct_qlinear
    clock = time.perf_counter
    with torch.inference_mode():
        for pool_mib in args.pool_mib:
            for n, k in shapes:
                rows, cols = _pair(n, k, pool_mib * 2**20)
                x = torch.randn(1, k, generator=torch.Generator().manual_seed(k)).to(torch.bfloat16)
                for bits in args.bits:
                    b = torch.tensor(bits)
                    nbytes = n * k * (1 if bits == 8 else 0.5) + 8 * n * k // GROUP
                    for isa in isas:
                        with native.use_isa(isa):
                            if not torch.equal(f(x, *rows[0], b), f(x, *cols[0], b)):
                                raise SystemExit(f"{n}x{k} bits={bits} {isa}: the layouts disagree")
                            times = {"row": [], "col": []}
                            end, i = clock() + args.seconds, 0
                            while clock() < end:
                                j = i % len(rows)
                                for side in (("row", "col") if i % 2 else ("col", "row")):
                                    w = rows[j] if side == "row" else cols[j]
                                    t = clock()
                                    f(x, *w, b)
                                    times[side].append(clock() - t)
                                i += 1
                        r, c = (statistics.median(times[s]) for s in ("row", "col"))
                        print(f"pool {pool_mib:>6g} MiB {n:>5}x{k:<5} bits {bits} {isa:<11} row-major {r * 1e6:8.1f} us "
                              f"({nbytes / r / 1e9:5.1f} GB/s)  column-major {c * 1e6:8.1f} us "
                              f"({nbytes / c / 1e9:5.1f} GB/s)  ratio {c / r:.3f}  ({i} pairs)", flush=True)


if __name__ == "__main__":
    main()
