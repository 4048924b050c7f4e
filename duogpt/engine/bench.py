"""`duogpt bench decode`: decode tokens/s of the sparse and the dense engine on the same model.

Both engines run the same decode loop (`Decoder`: static cache, greedy, the step compiled with
CUDA graphs on a GPU) on the same weights in the same storage dtype with the same threads; the
dense engine holds the unpacked weights and runs no activation rule (duogpt/engine/dense.py). The
compile and warm-up run is left out of every timing.
"""

from __future__ import annotations

import dataclasses
import time

import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

from duogpt.engine.dense import set_engine_head, to_dense_engine
from duogpt.engine.generate import Decoder
from duogpt.engine.loading import load
from duogpt.engine.sparse_linear import convert_for_runtime
from duogpt.models import layer_map
from duogpt.ops.gemv import MAX_TOKENS
from duogpt.sparsity import ActivationSparsity

# Random-weight models of published shapes, for kernels-only speed measurements: `random:NAME`.
RANDOM_SHAPES = {
    "llama2-7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000},
    "smollm2-135m": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
                     "tie_word_embeddings": True},
}


@dataclasses.dataclass(frozen=True)
class DecodeRun:
    """One (engine, batch) measurement."""

    engine: str
    batch: int
    tokens_per_s: float
    ms_per_step: float
    weight_bytes: int
    peak_gpu_bytes: int | None


def random_pruned(name: str, *, device: str, dtype: torch.dtype, weight_sparsity: float = 0.5,
                  activation_sparsity: float = 0.5, seed: int = 0) -> nn.Module:
    """A random-weight LLaMA of the `RANDOM_SHAPES[name]` shapes, every projection pruned to
    `weight_sparsity` at random, converted to SparseLinear with the top-k rule."""
    if name not in RANDOM_SHAPES:
        raise ValueError(f"unknown random model {name!r}; choose one of {sorted(RANDOM_SHAPES)}")
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**RANDOM_SHAPES[name]), dtype=dtype).eval()
    with torch.no_grad():
        for linear in layer_map(model).named_projections().values():
            drop = torch.rand_like(linear.weight, dtype=torch.float32) < weight_sparsity
            linear.weight.masked_fill_(drop, 0)
    convert_for_runtime(model, ActivationSparsity(activation_sparsity))
    set_engine_head(model)
    return model


def weight_bytes(model: nn.Module) -> int:
    """Resident bytes of all parameters and buffers (tied tensors counted once)."""
    tensors = {t.data_ptr(): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _measure(model: nn.Module, engine: str, batch: int, prompt_len: int, new_tokens: int,
             compile: bool) -> DecodeRun:
    device = next(model.parameters()).device
    if compile:  # every Decoder compiles its own step: start each from an empty Dynamo cache so
        torch._dynamo.reset()  # the recompile limit never sends a later run back to eager
    decoder = Decoder(model, prompt_len + new_tokens, compile=compile)
    prompt = torch.randint(0, model.config.vocab_size, (batch, prompt_len),
                           generator=torch.Generator().manual_seed(batch))
    decoder.generate(prompt, new_tokens)  # warm-up: compilation, graph recording, caches
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result = decoder.generate(prompt, new_tokens)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    steps = new_tokens - 1
    return DecodeRun(engine, batch, result.decode_tokens_per_s, result.decode_s / steps * 1e3,
                     weight_bytes(model), peak)


def bench_decode(model_ref: str, *, device: str = "cpu", dtype: torch.dtype | None = None,
                 batches: tuple[int, ...] = (1, 2, 4, 8), prompt_len: int = 32, new_tokens: int = 64,
                 dense_kernels: tuple[str, ...] = ("torch", "duogpt"),
                 compile: bool | None = None) -> dict:
    """Measure decode speed of the sparse engine and the dense engine(s).

    Args:
        model_ref: a duogpt checkpoint folder, or `random:NAME` (see RANDOM_SHAPES; 50 % random
            weight sparsity, top-k 50 % activations).
        device: where to run; dtype: storage and activation dtype (None = as stored; `random:`
            defaults to float16 on a GPU, bfloat16 on CPU).
        batches: batch sizes (sequences decoded together, at most 8).
        prompt_len, new_tokens: random prompt length and tokens generated per sequence.
        dense_kernels: the dense projection kernels to measure (`torch`, `duogpt`).
        compile: compile the decode step (default: on a GPU, where it is CUDA-graph captured).

    Returns:
        `{"runs": [DecodeRun as dict], "speedup": {batch: sparse / best dense}, "best_dense":
        {batch: kernel}, "settings": {...}}`.
    """
    if not all(1 <= b <= MAX_TOKENS for b in batches):
        raise ValueError(f"batch sizes must be 1 to {MAX_TOKENS}, the decode kernels' token "
                         f"counts, got {batches}")
    if new_tokens < 2:
        raise ValueError(f"new_tokens must be at least 2 (one decode step after the prefill's "
                         f"token), got {new_tokens}")
    on_gpu = torch.device(device).type == "cuda"
    compile = on_gpu if compile is None else compile
    if model_ref.startswith("random:"):
        dtype = dtype or (torch.float16 if on_gpu else torch.bfloat16)

    def build() -> nn.Module:
        if model_ref.startswith("random:"):
            return random_pruned(model_ref.removeprefix("random:"), device=device, dtype=dtype)
        # A packed folder keeps its values' dtype on load; here both engines store `dtype`.
        model = load(model_ref, device=device, dtype=dtype)
        return model if dtype is None else model.to(dtype)

    runs = []
    for engine in ("sparse", *(f"dense-{k}" for k in dense_kernels)):
        model = build()
        if engine != "sparse":
            to_dense_engine(model, engine.removeprefix("dense-"))
        runs += [_measure(model, engine, b, prompt_len, new_tokens, compile) for b in batches]
        stored = str(next(model.parameters()).dtype).removeprefix("torch.")
        del model
    speedup, best = {}, {}
    for b in batches:
        sparse = next(r for r in runs if r.engine == "sparse" and r.batch == b)
        dense = max((r for r in runs if r.engine != "sparse" and r.batch == b), key=lambda r: r.tokens_per_s)
        speedup[b], best[b] = sparse.tokens_per_s / dense.tokens_per_s, dense.engine
    settings = {"model": model_ref, "device": device, "dtype": stored, "prompt_len": prompt_len,
                "new_tokens": new_tokens, "compile": compile, "threads": torch.get_num_threads(),
                "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S")}
    return {"runs": [dataclasses.asdict(r) for r in runs], "speedup": speedup, "best_dense": best,
            "settings": settings}


def markdown(report: dict) -> str:
    """The runs as a markdown table, with the speed-up over the best dense engine per batch."""
    lines = ["| engine | batch | tokens/s | ms/step | weights MiB | peak GPU MiB | speed-up vs best dense |",
             "|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        peak = "-" if r["peak_gpu_bytes"] is None else f"{r['peak_gpu_bytes'] / 2**20:.0f}"
        ratio = f"{report['speedup'][r['batch']]:.2f}x" if r["engine"] == "sparse" else ""
        lines.append(f"| {r['engine']} | {r['batch']} | {r['tokens_per_s']:.1f} | {r['ms_per_step']:.2f} "
                     f"| {r['weight_bytes'] / 2**20:.1f} | {peak} | {ratio} |")
    return "\n".join(lines)
