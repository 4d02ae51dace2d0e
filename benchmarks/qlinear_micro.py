"""Microbenchmark of the CPU qlinear kernels on the embedded model's linear shapes.

    python -m benchmarks.qlinear_micro [--rows 1 5] [--bits 4 8] [--repeats 15] [--pool-mib 384] [--json PATH]

For every shape (N x K) and activation row count M, times side by side, interleaved (one sample
of each candidate in turn, ``--repeats`` rounds, medians reported):

- ``native/<isa>``: ``csd::qlinear_cpu_native`` forced onto each path this CPU can run, float
  activations, called as a decode step calls it: the direct entry (``native.direct_qlinear``, what
  Inductor's wrapper and a replayed CPU graph call), not through the dispatcher (about 2-3 us a call
  from Python, which until the twenty-seventh session was counted in every native row); ``native/<isa>/i8`` the same path with int8 activations
  (``native.use_activations("int8")``; ``avx512`` and ``avx2`` run the same vpmaddubsw loops there);
- ``native/<isa>/packed``: each path with the scales and zeros in the packed layout
  (``nested.pack_scale_zero``), which ``QLinear`` hands the kernel on CPU since the twenty-second
  session: the rows that match what a decode step runs on ``quantize``'s grids (the others read the
  column-major pair); ``native/<isa>/fp16``: the same in float16 (``pack_scale_zero(fp16=True)``:
  the 4-bit rung's pair, 4 B per group), the layout a GGUF Q4_0 / Q4_1 model's linears get
  (twenty-fifth session; the values are this weight's pair rounded to fp16, which changes no timing);
- ``native/<isa>/row-major``: the best path with the scales and zeros row-major instead of
  column-major (as stored since the sixteenth session): the kernel gathers them;
- ``pytorch``: ``csd::qlinear_cpu``, the pure-PyTorch fallback;
- ``dense bf16`` / ``dense fp32``: ``F.linear`` on an unquantized weight of the same shape.

Activations are bf16 (the model's dtype), group size 32. Each candidate cycles through a pool of
weight copies (``--pool-mib``; the native paths share one, read round-robin), so that weights come
from memory as in a real decode step rather than from a cache that holds one small layer. ``GB/s``
is weight bytes per second (0.5 B per weight at 4 bits, 1 at 8, plus 8 B of scale/zero per group,
4 in fp16; 2 / 4 B for dense) and ``%bw`` relates it to a streaming read (``torch.sum`` of a 1 GiB fp32
tensor, same threads) measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from csd_compile.kernels import native
from csd_compile.kernels import qlinear as _qlinear  # noqa: F401  (registers csd::qlinear_cpu)
from csd_compile.quant.nested import pack_scale_zero, quantize

SHAPES = ((576, 576), (192, 576), (1536, 576), (576, 1536))
GROUP = 32


def _stream_gbs(buf: torch.Tensor) -> float:
    t = time.perf_counter()
    buf.sum()
    return buf.numel() * buf.element_size() / (time.perf_counter() - t) / 1e9


class _Pool:
    """Copies of one weight, handed out round-robin: the copy used next is the least recently used."""

    def __init__(self, items):
        self.items, self.i = items, 0

    def next(self):
        self.i = (self.i + 1) % len(self.items)
        return self.items[self.i]


class _Candidate:
    """One timed thing: ``fn(i)`` runs it on pool copy i; ``nbytes`` weight bytes per call."""

    def __init__(self, name, bits, nbytes, pool, fn, isa=None, act="float"):
        self.name, self.bits, self.nbytes, self.isa, self.act = name, bits, nbytes, isa, act
        self.pool = pool  # a _Pool, maybe shared: its cursor moves on whoever reads it
        self.fn = fn
        self.samples: list[float] = []
        self.inner = 1

    def _run(self, calls: int) -> float:
        ctx = native.use_isa(self.isa) if self.isa else _nullcontext()
        with ctx, native.use_activations(self.act):
            t = time.perf_counter()
            for _ in range(calls):
                self.fn(self.pool.next())
            return time.perf_counter() - t

    def warm(self, target_s: float) -> None:
        self._run(len(self.pool.items))  # first touches (the fallback builds its int4 operands per copy)
        per = self._run(3) / 3
        self.inner = max(1, int(target_s / max(per, 1e-7)))

    def sample(self) -> None:
        self.samples.append(self._run(self.inner) / self.inner)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def _candidates(n, k, m, bits_list, pool_bytes):
    g = torch.Generator().manual_seed(n * 7 + k)
    w = torch.randn(n, k, generator=g) * 0.05
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    nw = quantize(w, GROUP)
    # nested planes hold both nibbles whatever the rung: a copy is the whole nested weight
    nested_bytes = sum(t.numel() * t.element_size() for t in nw)

    def pool(make, copy_bytes):
        return _Pool([make() for _ in range(max(1, min(4096, -(-pool_bytes // copy_bytes))))])

    shared = pool(lambda: tuple(t.clone() for t in nw), nested_bytes)  # every native candidate's
    direct = native.direct_qlinear
    out = []
    for bits in bits_list:
        b = torch.tensor(bits)
        nbytes = n * k * bits // 8 + n * (k // GROUP) * 8
        for isa in native.supported_isas():
            for act in native.ACTIVATIONS:
                out.append(_Candidate(f"native/{isa}" + ("/i8" if act == "int8" else ""), bits, nbytes, shared,
                                      lambda t, b=b: direct(x, *t, b), isa, act))

        # quantize's grids pack in float32 ("auto" finds no float16 pair in them); fp16=True rounds them
        for suffix, fp16, group_bytes in (("packed", False, 8), ("fp16", True, 4)):

            def packed_copy(fp16=fp16):
                sz = pack_scale_zero(nw.scale, nw.zero, fp16=fp16)
                return nw.qdata.clone(), sz, sz

            packed = pool(packed_copy, nested_bytes)
            packed_bytes = n * k * bits // 8 + n * (k // GROUP) * group_bytes
            for isa in native.supported_isas():
                out.append(_Candidate(f"native/{isa}/{suffix}", bits, packed_bytes, packed,
                                      lambda t, b=b: direct(x, *t, b), isa))
        rm = pool(lambda: (nw.qdata.clone(), nw.scale.contiguous(), nw.zero.contiguous()), nested_bytes)
        out.append(_Candidate(f"native/{native.supported_isas()[-1]}/row-major", bits, nbytes, rm,
                              lambda t, b=b: direct(x, *t, b), native.supported_isas()[-1]))
        # its own copies: the fallback caches repacked operands per weight and rung
        out.append(_Candidate("pytorch", bits, nbytes, pool(lambda: tuple(t.clone() for t in nw), nested_bytes),
                              lambda t, b=b: torch.ops.csd.qlinear_cpu(x, *t, b)))
    for dtype, name in ((torch.bfloat16, "dense bf16"), (torch.float32, "dense fp32")):
        xd = x.to(dtype)
        wd = w.to(dtype)
        nbytes = n * k * wd.element_size()
        out.append(_Candidate(name, None, nbytes, pool(lambda wd=wd: wd.clone(), nbytes),
                              lambda t, xd=xd: F.linear(xd, t)))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--pool-mib", type=int, default=384, help="size of each pool of weight copies, MiB")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--shapes", nargs="+", default=None, help="NxK shapes (default: the embedded model's)")
    ap.add_argument("--sample-ms", type=float, default=3.0, help="length of one timing sample")
    ap.add_argument("--json", help="also write the bandwidth and every row here (JSON)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes] if args.shapes else SHAPES
    if not native.load():
        raise SystemExit("the C++ kernels did not build; nothing to compare")
    stream_buf = torch.ones(256 * 1024 * 1024)  # 1 GiB fp32
    streams = []
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, kernel paths {native.supported_isas()}, "
          f"pools of {args.pool_mib} MiB, group {GROUP}, bf16 activations")
    rows = []
    with torch.inference_mode():
        for n, k in shapes:
            for m in args.rows:
                cands = _candidates(n, k, m, args.bits, args.pool_mib << 20)
                for c in cands:
                    c.warm(args.sample_ms / 1e3)
                for _ in range(args.repeats):
                    streams.append(_stream_gbs(stream_buf))
                    for c in cands:
                        c.sample()
                rows.append((n, k, m, cands))
                del cands
    bw = statistics.median(streams)
    print(f"streaming read (torch.sum, 1 GiB fp32): median {bw:.1f} GB/s over {len(streams)} samples\n")
    print(f"{'N x K':>11} {'M':>2} {'bits':>4}  {'kernel':<18} {'us':>9} {'GB/s':>7} {'%bw':>5}  {'vs bf16':>7}")
    table = []
    for n, k, m, cands in rows:
        dense_bf16 = statistics.median(next(c for c in cands if c.name == "dense bf16").samples)
        for c in sorted(cands, key=lambda c: (c.bits or 99, c.name)):
            t = statistics.median(c.samples)
            gbs = c.nbytes / t / 1e9
            print(f"{n:>5}x{k:<5} {m:>2} {c.bits or '-':>4}  {c.name:<18} {t * 1e6:>9.1f} {gbs:>7.2f} "
                  f"{100 * gbs / bw:>5.0f}  {dense_bf16 / t:>6.2f}x")
            table.append({"n": n, "k": k, "m": m, "bits": c.bits, "kernel": c.name, "us": t * 1e6, "bytes": c.nbytes,
                          "gb_s": gbs, "of_bandwidth": gbs / bw, "vs_dense_bf16": dense_bf16 / t})
        print()
    if args.json:
        report = {"bandwidth_gb_s": bw, "bandwidth_samples": streams, "threads": torch.get_num_threads(),
                  "kernel_paths": native.supported_isas(), "default_path": native.isa(), "rows": table}
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
