"""Perplexity over non-overlapping windows: the WikiText-2 protocol of GPTQ/SparseGPT/Wanda.

The token stream is cut into `T // seqlen` windows of `seqlen` tokens (the tail is dropped); each
window is scored independently (no context carried over) and the perplexity is
`exp(mean next-token negative log-likelihood)` over all `seqlen - 1` predictions of all windows.

The protocol is theirs, the text is not quite: `wikitext2` scores the shared `wiki.test.raw`, whose
blank lines are dropped, where they score the Hugging Face test rows, blank ones included, joined by
two newlines. Absolute values are therefore not directly comparable with published WikiText-2
figures (SmolLM2-135M over 8 windows of 512: about 3 % apart from an approximate rebuild of their
text); they compare models and methods within duogpt.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from duogpt.models.adapters import warn_past_context


def check_windows(seqlen: int, max_windows: int | None = None) -> None:
    """Refuse windows (or sampled sequences) that predict nothing.

    Raises:
        ValueError: `seqlen < 2` (no token to predict from another) or `max_windows < 1`.
    """
    if seqlen < 2 or (max_windows is not None and max_windows < 1):
        raise ValueError(f"need seqlen >= 2 and at least one window, got seqlen {seqlen} and "
                         f"max_windows {max_windows}")


def num_windows(tokens: int, seqlen: int, max_windows: int | None = None) -> int:
    """How many windows `tokens` tokens give: `tokens // seqlen`, at most `max_windows`.

    Raises:
        ValueError: see `check_windows`, or not one whole window.
    """
    check_windows(seqlen, max_windows)
    n = tokens // seqlen
    if n < 1:
        raise ValueError(f"{tokens} tokens make no window of {seqlen}; use shorter windows or more text")
    return n if max_windows is None else min(n, max_windows)


@torch.no_grad()
def window_nlls(model: nn.Module, input_ids: torch.Tensor, seqlen: int,
                max_windows: int | None = None) -> torch.Tensor:
    """Per-window summed next-token NLL.

    Args:
        model: a causal LM returning `.logits [1, seqlen, vocab]`.
        input_ids: `[1, T]` int64 tokens (CPU or the model's device).
        seqlen: window length in tokens.
        max_windows: score only the first K windows (quick checks); None = all.

    Returns:
        `[n_windows]` float64 on CPU: the summed NLL (nats) of the `seqlen - 1` predictions of each
        window.

    Raises:
        ValueError: the stream is shorter than one window (see `num_windows`).
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be [1, T], got {tuple(input_ids.shape)}")
    n = num_windows(input_ids.shape[1], seqlen, max_windows)
    warn_past_context(model, seqlen, "a perplexity window")
    device = next(model.parameters()).device
    nlls = torch.empty(n, dtype=torch.float64)
    for i in range(n):
        window = input_ids[:, i * seqlen:(i + 1) * seqlen].to(device)
        logits = model(window, use_cache=False).logits[0, :-1].float()
        nlls[i] = F.cross_entropy(logits, window[0, 1:], reduction="sum").double().cpu()
    return nlls


def perplexity(model: nn.Module, input_ids: torch.Tensor, seqlen: int,
               max_windows: int | None = None) -> float:
    """Perplexity of `model` on `input_ids [1, T]` over non-overlapping `seqlen` windows
    (see `window_nlls` for the arguments)."""
    nlls = window_nlls(model, input_ids, seqlen, max_windows)
    return exp_nll(nlls.sum().item() / (nlls.numel() * (seqlen - 1)))


def exp_nll(mean_nll: float) -> float:
    """`exp(mean_nll)`: a perplexity, `inf` past the float range (a diverged model, mean NLL above
    about 709.8 nats) where `math.exp` would raise OverflowError and lose the rest of the report."""
    try:
        return math.exp(mean_nll)
    except OverflowError:
        return math.inf
