"""Decode GEMVs through the Python ops against torch's dense matmul, on CPU, in one run.

Times `duogpt.ops.spmspv` (50 % unstructured weight sparsity, fp16 values, activation sparsity 0 or
50 % by the top-k rule), `duogpt.ops.dense_gemv` (fp16) and torch's `x @ W.T` with fp16 and fp32
weights, for (out, in) = (4096, 4096), (11008, 4096), (4096, 11008) and b = 1, 2, 4, 8 tokens. Each
case rotates over copies of its weights totalling at least 256 MiB, so weights come from DRAM as
they do in decoding, and over 16 activation batches. Speedups are against `dense_gemv` of the same
shape and b. Prints a table, then the results as JSON.

    python bench/gemv_torch.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import time

import torch

import duogpt
from duogpt import BitmapWeight, ops
from duogpt.ops import reference

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (out, in)
BATCHES = [1, 2, 4, 8]
ROTATE_BYTES = 256 << 20
ACTIVATION_SETS = 16


def copies_for(nbytes: int) -> int:
    return max(2, math.ceil(ROTATE_BYTES / nbytes))


def rotating(fn, xs: list, ws: list):
    """`(call, len(ws))`: call `i` runs `fn(xs[i % len(xs)], ws[i % len(ws)])`."""
    return (lambda i: fn(xs[i % len(xs)], ws[i % len(ws)])), len(ws)


def time_calls(fn, warmup: int, min_reps: int, max_reps: int, min_seconds: float) -> list[float]:
    """Per-call seconds of `fn(i)` after `warmup` untimed calls, sorted."""
    for i in range(warmup):
        fn(i)
    times, start = [], time.perf_counter()
    for rep in range(max_reps):
        t0 = time.perf_counter()
        fn(warmup + rep)
        t1 = time.perf_counter()
        times.append(t1 - t0)
        if rep + 1 >= min_reps and t1 - start >= min_seconds:
            break
    return sorted(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions (smoke test)")
    parser.add_argument("--json", help="also write the JSON results to this file")
    args = parser.parse_args()
    reps = {"min_reps": 5, "max_reps": 20, "min_seconds": 0.0} if args.quick else \
        {"min_reps": 50, "max_reps": 1000, "min_seconds": 0.5}
    torch.manual_seed(0)
    C = duogpt._native.lib()
    rows, results = [], []

    for n, k in SHAPES:
        w = torch.randn(n, k) * 0.02
        w[torch.rand(n, k) < 0.5] = 0
        w16 = w.half()
        packed = BitmapWeight.from_dense(w16)
        packed_bytes = sum(t.numel() * t.element_size() for t in (packed.bitmap, packed.values, packed.offsets))
        sparse_w = [BitmapWeight(packed.bitmap.clone(), packed.values.clone(), packed.offsets.clone(), packed.shape)
                    for _ in range(copies_for(packed_bytes))]
        dense16 = [w16.clone() for _ in range(copies_for(w16.numel() * 2))]
        dense32 = [w.clone() for _ in range(copies_for(w.numel() * 4))]

        for b in BATCHES:
            xs = [torch.randn(b, k).half() for _ in range(ACTIVATION_SETS)]
            xs32 = [x.float() for x in xs]
            cases = {
                ("dense_gemv fp16", 0.0): rotating(ops.dense_gemv, xs, dense16),
                ("torch x@W.T fp16", 0.0): rotating(torch.matmul, xs, [w.t() for w in dense16]),
                ("torch x@W.T fp32", 0.0): rotating(torch.matmul, xs32, [w.t() for w in dense32]),
                ("spmspv fp16", 0.0): rotating(ops.spmspv, xs, sparse_w),
                ("spmspv fp16", 0.5): rotating(functools.partial(ops.spmspv, topk_fraction=0.5), xs,
                                               sparse_w),
            }
            with torch.inference_mode():
                for act in (0.0, 0.5):  # both spmspv cases against dense_gemv on the kept activations
                    fraction = act or None
                    want = ops.dense_gemv(reference.sparsify(xs[0], topk_fraction=fraction), w16).float()
                    got = ops.spmspv(xs[0], packed, topk_fraction=fraction).float()
                    err = (got - want).abs().max().item() / want.abs().max().item()
                    if err > 4e-3:
                        raise SystemExit(f"spmspv disagrees with dense_gemv at {n}x{k} b={b}, activation "
                                         f"sparsity {act}: rel err {err:.3g}")
                dense_median = None
                for (name, act), (fn, copies) in cases.items():
                    t = time_calls(fn, warmup=copies + 2, **reps)
                    med = statistics.median(t)
                    if name == "dense_gemv fp16":
                        dense_median = med
                    r = {"out": n, "in": k, "b": b, "act_sparsity": act, "kernel": name, "reps": len(t),
                         "min_us": t[0] * 1e6, "median_us": med * 1e6,
                         "speedup_vs_dense_gemv": dense_median / med}
                    results.append(r)
                    rows.append(f"{n:>5}x{k:<5} {b:>2} {100 * act:>5.0f}% {name:<17} {r['min_us']:>10.1f} "
                                f"{r['median_us']:>10.1f} {r['speedup_vs_dense_gemv']:>7.2f}x")

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, duogpt isa {C.cpu_isa()}")
    print(f"{'out x in':<11} {'b':>2} {'act_sp':>6} {'kernel':<17} {'min_us':>10} {'median_us':>10} {'speedup':>8}")
    print("\n".join(rows))
    doc = {"torch": torch.__version__, "threads": torch.get_num_threads(), "isa": C.cpu_isa(),
           "weight_sparsity": 0.5, "cases": results}
    print(json.dumps(doc, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
