"""Solver wall time: the native fused block loop against the pure-PyTorch reference, same inputs.

For every input-sharing group of one decoder layer of a model (`[q, k, v]`, `[o]`, `[gate, up]`,
`[down]`) this builds DuoGPT statistics from synthetic two-stream inputs (correlated channels with
outliers; the sparse stream is the per-token top-k of the dense one), then prunes the group's
weights twice from the same statistics: with `torch.ops.duogpt.obs_prune_block` and with
`duogpt.ops.reference.obs_prune_block`. It reports the time of each solve (factorisation included:
it is the same for both) and the largest difference between the two results, and extrapolates to
the whole model.

    python bench/solver.py --shapes smollm2-135m --device cpu
    python bench/solver.py --shapes llama2-7b --device cuda
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from duogpt.ops import reference
from duogpt.solver import OBSSolver, WeightSparsity

# (hidden, intermediate, query heads x head_dim, kv heads x head_dim, layers)
SHAPES = {
    "smollm2-135m": (576, 1536, 576, 192, 30),
    "llama2-7b": (4096, 11008, 4096, 4096, 32),
}


def groups(hidden: int, intermediate: int, q: int, kv: int) -> dict[str, tuple[int, list[int]]]:
    """`{group: (in_features, [out_features of each projection])}` of one decoder layer."""
    return {"q,k,v": (hidden, [q, kv, kv]), "o": (q, [hidden]),
            "gate,up": (hidden, [intermediate, intermediate]), "down": (intermediate, [hidden])}


def synthetic_streams(k: int, tokens: int, p_a: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    mix = torch.randn(k, k, device=device) / k**0.5 + torch.eye(k, device=device)
    X_tilde = torch.randn(tokens, k, device=device) @ mix * (1 + 3 * torch.rand(k, device=device))
    return reference.sparsify(X_tilde, topk_fraction=p_a), X_tilde


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def solve(kernel, k: int, X_hat, X_tilde, weights, args) -> tuple[float, list]:
    """Seconds to factorise and prune every weight of the group, and the pruned weights."""
    device = X_hat.device
    solver = OBSSolver(k, WeightSparsity.of(0.5), two_stream=True, alpha=args.alpha,
                       device=device, block_kernel=kernel)
    for xh, xt in zip(X_hat.split(2048), X_tilde.split(2048), strict=True):
        solver.add_batch(xh, xt)
    _sync(device)
    start = time.perf_counter()
    pruned = [solver.prune(W).weight for W in weights]
    _sync(device)
    return time.perf_counter() - start, pruned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", choices=SHAPES, default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=4096, help="calibration tokens per group")
    parser.add_argument("--alpha", type=float, default=0.125)
    parser.add_argument("--repeats", type=int, default=3, help="best of N solves")
    args = parser.parse_args()
    device = torch.device(args.device)
    hidden, intermediate, q, kv, layers = SHAPES[args.shapes]
    torch.manual_seed(0)

    print(f"# OBS solver: native vs reference, {args.shapes} layer shapes on {device}\n")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(f"device: {name or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {args.tokens} calibration tokens per group, "
          f"p_w 0.5 unstructured, p_a 0.5 top-k, alpha {args.alpha}, blocksize 128, act_order\n")
    print("| group | k | n per projection | native s | reference s | speed-up | max abs diff | "
          "mask agreement |")
    print("|---|---|---|---|---|---|---|---|")
    total = {"native": 0.0, "reference": 0.0}
    for group, (k, outs) in groups(hidden, intermediate, q, kv).items():
        X_hat, X_tilde = synthetic_streams(k, args.tokens, 0.5, device)
        weights = [torch.randn(n, k, device=device) / k**0.5 for n in outs]
        times, results = {}, {}
        for label, kernel in (("native", torch.ops.duogpt.obs_prune_block),
                              ("reference", reference.obs_prune_block)):
            runs = [solve(kernel, k, X_hat, X_tilde, weights, args) for _ in range(args.repeats)]
            times[label] = min(r[0] for r in runs)
            results[label] = runs[0][1]
            total[label] += times[label]
        pairs = list(zip(results["native"], results["reference"], strict=True))
        diff = max((a - b).abs().max().item() for a, b in pairs)
        agree = sum(((a == 0) == (b == 0)).float().mean().item() for a, b in pairs) / len(pairs)
        if agree != 1.0 or diff > 1e-3:  # a wrong kernel must not post a time
            raise SystemExit(f"{group}: the native kernel disagrees with the reference (masks agree "
                             f"on {agree:.6f}, largest difference {diff:.2e})")
        print(f"| {group} | {k} | {', '.join(map(str, outs))} | {times['native']:.3f} | "
              f"{times['reference']:.3f} | {times['reference'] / times['native']:.1f}x | {diff:.2e} | "
              f"{agree:.6f} |")
    print(f"| **layer** | | | {total['native']:.3f} | {total['reference']:.3f} | "
          f"{total['reference'] / total['native']:.1f}x | | |")
    print(f"\nWhole model ({layers} layers), solver only: native {total['native'] * layers:.1f} s, "
          f"reference {total['reference'] * layers:.1f} s.")


if __name__ == "__main__":
    main()
