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
        tokens: `[batch, new_tokens]` int64 on CPU: the generated tokens (fewer than asked where
            every sequence reached an end-of-sequence token; a finished sequence repeats it).
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
        self._batch: int | None = None  # the cache's, fixed by the first prompt
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
    def generate(self, prompt: torch.Tensor, max_new_tokens: int,
                 eos_token_id: int | list[int] | None = None) -> Generation:
        """Greedy continuation of `prompt [B, S]` int64 by up to `max_new_tokens` tokens.

        Args:
            eos_token_id: end-of-sequence token(s): generation stops once every sequence has
                produced one (a check that waits for the device each step; benchmarks leave it
                None and decode the full length).

        Raises:
            ValueError: `max_new_tokens < 1`, the prompt plus the new tokens exceed `max_seq_len`,
                or a batch size other than the one the cache was made for.
        """
        batch, length = prompt.shape
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if length + max_new_tokens > self.max_seq_len:
            raise ValueError(f"{length} prompt + {max_new_tokens} new tokens exceed the cache of "
                             f"{self.max_seq_len} positions; raise max_seq_len")
        if self._batch not in (None, batch):
            raise ValueError(f"this Decoder's cache holds {self._batch} sequences, the prompt has "
                             f"{batch}; make one Decoder per batch size")
        self._batch = batch
        eos = None if eos_token_id is None else torch.tensor(eos_token_id, device=self.device).reshape(-1)
        self.cache.reset()
        _sync(self.device)
        start = time.perf_counter()
        token = self._step(prompt.to(self.device))
        _sync(self.device)
        prefilled = time.perf_counter()
        tokens = [token]
        finished = None if eos is None else torch.isin(token, eos)
        for _ in range(max_new_tokens - 1):
            if finished is not None and bool(finished.all()):
                break
            token = self.decode_one(token)
            if finished is not None:
                token = torch.where(finished, tokens[-1], token)  # a finished sequence repeats its end
                finished |= torch.isin(token, eos)
            tokens.append(token)
        _sync(self.device)
        done = time.perf_counter()
        return Generation(torch.cat(tokens, dim=1).cpu(), prefilled - start, done - prefilled)
