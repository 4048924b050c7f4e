"""`--ppl self`: fidelity to the dense model, measured on text the dense model wrote itself.

Sequences are sampled from the dense reference (`duogpt.calibration.data.sample_from_model`:
temperature 1, no truncation, seeded), so the measure needs no data set. On them the evaluated
model gets a perplexity, its top-1 agreement with the reference (fraction of positions where both
argmaxes agree) and the mean per-token KL(reference || evaluated) in nats.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from duogpt.eval.perplexity import exp_nll


@torch.no_grad()
def fidelity(model: nn.Module, reference: nn.Module, sequences: torch.Tensor) -> dict[str, float]:
    """Perplexity of `model` on `sequences [n, T]`, and its top-1 agreement and mean KL against
    `reference` over the `T - 1` predicted positions of each sequence (one sequence at a time)."""
    nll = kl = agree = 0.0
    count = 0
    for seq in sequences:
        ids = seq[None].to(next(model.parameters()).device)  # [1, T]
        logp = model(ids, use_cache=False).logits[0, :-1].float().log_softmax(-1)
        ref = reference(ids.to(next(reference.parameters()).device), use_cache=False)
        ref_logp = ref.logits[0, :-1].float().log_softmax(-1).to(logp.device)
        nll += F.nll_loss(logp, ids[0, 1:], reduction="sum").item()
        kl += F.kl_div(logp, ref_logp, log_target=True, reduction="sum").item()
        agree += (logp.argmax(-1) == ref_logp.argmax(-1)).sum().item()
        count += ids.shape[1] - 1
    return {"ppl": exp_nll(nll / count), "top1_agreement": agree / count, "mean_kl": kl / count,
            "tokens": count}
