"""Greedy decoding with a static KV cache, the decode step compiled once (gpt-fast style).

The model's own forward runs every step (so any supported LLaMA-layout family works), against a
transformers `StaticCache` whose buffers never move: the one-token step then has fixed shapes and
addresses, which is what CUDA-graph capture needs. On a GPU the step is compiled with
`torch.compile(mode="reduce-overhead", fullgraph=True)` (Inductor + CUDA graphs), for the sparse
and the dense engine alike, so a benchmark measures kernels rather than Python. Prefill always runs
eagerly; sampling is an on-device argmax, so no step waits for the host.
"""

from __future__ import annotations

import dataclasses
import time

import torch
from torch import nn
from transformers import StaticCache

from duogpt.models.adapters import cache_argument, warn_past_context


@dataclasses.dataclass(frozen=True)
class Generation:
    """Result of `Decoder.generate`.

    Attributes:
        tokens: `[batch, new_tokens]` int64 on CPU: the generated tokens.
        prefill_s: seconds for the prompt (the first generated token included).
        decode_s: seconds for the remaining `new_tokens - 1` one-token steps.
    """

    tokens: torch.Tensor
    prefill_s: float
    decode_s: float

    @property
    def decode_tokens_per_s(self) -> float:
        """Generated tokens per second over the decode steps, all sequences of the batch counted."""
        batch, new = self.tokens.shape
        return batch * (new - 1) / self.decode_s if new > 1 and self.decode_s > 0 else float("nan")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Decoder:
    """Greedy decoding of one model with a static cache of `max_seq_len` positions.

    The cache takes its batch size from the first prompt; use one Decoder per batch size.

    Args:
        model: a causal LM in eval mode (SparseLinear, dense or mixed projections).
        max_seq_len: prompt plus generated tokens, at most.
        compile: compile the decode step, with CUDA graphs on a GPU ("reduce-overhead") and
            Inductor's C++ backend on CPU. The first generation pays the compilation.
    """

    def __init__(self, model: nn.Module, max_seq_len: int, *, compile: bool = False):
        self.model = model
        self.device = next(model.parameters()).device
        self.max_seq_len = max_seq_len
        warn_past_context(model, max_seq_len, "a generation (prompt plus new tokens)")
        self.cache = StaticCache(config=model.config, max_cache_len=max_seq_len)
        self._cache_key = cache_argument(model)
        self._decode = self._step
        if compile:
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            self._decode = torch.compile(self._step, mode=mode, fullgraph=True)

    @torch.no_grad()
    def _step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed `tokens [B, S]` at the cache's current position; returns the argmax of the last
        position, `[B, 1]` int64 on the model's device."""
        logits = self.model(input_ids=tokens, use_cache=True, logits_to_keep=1,
                            **{self._cache_key: self.cache}).logits  # [B, 1, vocab]
        return logits[:, -1].argmax(dim=-1, keepdim=True)

    def decode_one(self, token: torch.Tensor) -> torch.Tensor:
        """One decode step: `token [B, 1]` -> next token `[B, 1]` (a fresh tensor)."""
        if self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        return self._decode(token).clone()  # a CUDA graph overwrites its output on replay

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int) -> Generation:
        """Greedy continuation of `prompt [B, S]` int64 by `max_new_tokens` tokens.

        Raises:
            ValueError: the prompt plus the new tokens exceed `max_seq_len`.
        """
        length = prompt.shape[1]
        if length + max_new_tokens > self.max_seq_len:
            raise ValueError(f"{length} prompt + {max_new_tokens} new tokens exceed the cache of "
                             f"{self.max_seq_len} positions; raise max_seq_len")
        self.cache.reset()
        _sync(self.device)
        start = time.perf_counter()
        token = self._step(prompt.to(self.device))
        _sync(self.device)
        prefilled = time.perf_counter()
        tokens = [token]
        for _ in range(max_new_tokens - 1):
            token = self.decode_one(token)
            tokens.append(token)
        _sync(self.device)
        done = time.perf_counter()
        return Generation(torch.cat(tokens, dim=1).cpu(), prefilled - start, done - prefilled)
