"""Calibration windows: `nsamples` token sequences of `seqlen` tokens drawn with a fixed seed.

Sources: `c4` and `wikitext2` (through the `datasets` package, like SparseGPT/Wanda), a text file
or a folder of `.txt` files, or `self` (sequences sampled from the model itself, for machines
with no data). Text is tokenized with `add_special_tokens=False` and windows start at uniformly
random offsets; every source returns the same `[nsamples, seqlen]` int64 tensor.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from torch import nn

from duogpt.models.adapters import cache_argument

HUB_SOURCES = ("c4", "wikitext2")
_ALTERNATIVES = ("a local text file or a folder of .txt files (--calib PATH), or 'self' "
                 "(sequences sampled from the model itself)")
_C4_SHARD = "en/c4-train.00000-of-01024.json.gz"  # the shard SparseGPT, Wanda and GPTAQ sample
# Documents drawn per C4 window at most: SparseGPT draws until one is longer than seqlen, which
# never ends where none is; a thousand draws per window still find rare long documents.
_C4_DRAWS_PER_WINDOW = 1000
_log = logging.getLogger(__name__)


def describe(source: str, input_ids: torch.Tensor, seed: int) -> dict:
    """The `calibration` record of duogpt.json."""
    nsamples, seqlen = input_ids.shape
    return {"source": source, "nsamples": nsamples, "seqlen": seqlen, "seed": seed,
            "tokens": nsamples * seqlen,
            "sha256": hashlib.sha256(input_ids.numpy().tobytes()).hexdigest()}


def check_windows(input_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Ready calibration windows given as a tensor, as `[nsamples, seqlen]` int64 on CPU.

    Raises:
        ValueError: not a non-empty 2-D integer tensor of ids in `[0, vocab_size)`.
    """
    if input_ids.dim() != 2 or input_ids.numel() == 0:
        raise ValueError(f"calibration windows must be a non-empty [nsamples, seqlen] tensor of "
                         f"token ids, got shape {tuple(input_ids.shape)}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise ValueError(f"calibration windows must hold integer token ids, got {input_ids.dtype}")
    input_ids = input_ids.to("cpu", torch.int64)
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"calibration windows hold token ids in [{low}, {high}], outside the "
                         f"model's vocabulary [0, {vocab_size})")
    return input_ids


def calibration_ids(source: str, tokenizer, *, nsamples: int, seqlen: int, seed: int,
                    model: nn.Module | None = None) -> torch.Tensor:
    """`[nsamples, seqlen]` int64 calibration windows (CPU) from `source`.

    Args:
        source: `c4`, `wikitext2`, `self`, or the path of a text file or a folder of `.txt` files.
        tokenizer: the model's tokenizer.
        model: needed for `self`.

    Raises:
        ValueError: the source is unreachable or too short; the message lists the alternatives.
    """
    if tokenizer is None:
        raise ValueError(f"--calib {source} is read through the model's tokenizer; pass it, or "
                         f"give ready windows as a [nsamples, seqlen] tensor of token ids")
    generator = torch.Generator().manual_seed(seed)
    if source == "self":
        if model is None:
            raise ValueError("--calib self samples from the model, so it needs the model")
        return sample_from_model(model, tokenizer, nsamples, seqlen, generator)
    if source == "c4":
        return _c4_windows(_hub_dataset(source), tokenizer, nsamples, seqlen, generator)
    if source == "wikitext2":
        text = "\n\n".join(_hub_dataset(source)["text"])
        return random_windows(_tokenize(tokenizer, text), nsamples, seqlen, generator, source)
    return random_windows(_tokenize(tokenizer, _source_text(source)), nsamples, seqlen, generator,
                          source)


def check_source(source: str) -> None:
    """Raise ValueError, listing the alternatives, unless `source` is `self`, a file or a folder
    holding `.txt` files, or a hub source that loads: callers check before loading a model that
    takes minutes. A hub source is read here (`datasets` caches it, so the later read is local)."""
    if source in HUB_SOURCES:
        _hub_dataset(source)
    elif source != "self":
        _source_text(source)


def _source_text(source: str) -> str:
    """The text of a file or folder source; ValueError, listing the alternatives, if there is
    none."""
    path = Path(source)
    if not path.exists():
        raise ValueError(f"--calib {source!r} is neither a file, a folder, nor one of "
                         f"{', '.join(HUB_SOURCES + ('self',))}; use {_ALTERNATIVES}")
    text = read_text(path)
    if not text.strip():
        raise ValueError(f"--calib {source} holds no text; use {_ALTERNATIVES}")
    return text


def _text_files(path: Path) -> list[Path]:
    files = sorted(f for f in path.glob("*.txt") if f.is_file()) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"{path} has no .txt files; use {_ALTERNATIVES}")
    return files


def _read_utf8(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{file} is not UTF-8 text ({err.reason} at byte {err.start}); give a "
                         f"UTF-8 text file") from None


def read_text(path: Path) -> str:
    """A text file, or every `.txt` file of a folder (sorted, joined by blank lines); CRLF -> LF."""
    return "\n\n".join(_read_utf8(f).replace("\r\n", "\n") for f in _text_files(path))


def _tokenize(tokenizer, text: str) -> torch.Tensor:
    """`[T]` int64 token ids of `text`, without special tokens."""
    return torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"],
                        dtype=torch.int64)


def random_windows(tokens: torch.Tensor, nsamples: int, seqlen: int, generator: torch.Generator,
                   source: str) -> torch.Tensor:
    """`nsamples` windows of `tokens [T]` starting at uniformly random offsets."""
    if tokens.numel() < seqlen:
        raise ValueError(f"--calib {source} has {tokens.numel()} tokens, fewer than one window of "
                         f"--seqlen {seqlen}; lower --seqlen or give more text")
    if tokens.numel() < nsamples * seqlen:
        _log.warning("--calib %s has %d tokens, fewer than the %d x %d of the windows: they overlap, "
                     "so the calibration sees repeated text; give more text or fewer samples",
                     source, tokens.numel(), nsamples, seqlen)
    starts = torch.randint(0, tokens.numel() - seqlen + 1, (nsamples,), generator=generator)
    return torch.stack([tokens[s:s + seqlen] for s in starts.tolist()])


def _datasets(source: str):
    """The `datasets` module, which hub source `source` needs."""
    try:
        import datasets
    except ImportError:
        raise ValueError(f"--calib {source} needs the `datasets` package (pip install datasets) "
                         f"and network access; without them use {_ALTERNATIVES}") from None
    return datasets


def _hub_dataset(source: str):
    """The train split of hub source `source` (`c4`: SparseGPT's shard), as `datasets` loads it."""
    datasets = _datasets(source)
    try:
        if source == "c4":
            return datasets.load_dataset("allenai/c4", data_files={"train": _C4_SHARD}, split="train")
        return datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="train")
    except Exception as err:  # noqa: BLE001  (network, hub and cache errors all mean "unreachable")
        raise ValueError(f"--calib {source} is unreachable ({type(err).__name__}: {err}); use "
                         f"{_ALTERNATIVES}") from None


def _c4_windows(dataset, tokenizer, nsamples: int, seqlen: int,
                generator: torch.Generator) -> torch.Tensor:
    """SparseGPT's C4 sampling: a random document longer than `seqlen`, then a random window.

    Raises:
        ValueError: fewer than one in `_C4_DRAWS_PER_WINDOW` drawn documents is long enough.
    """
    windows = []
    for _ in range(_C4_DRAWS_PER_WINDOW * nsamples):
        if len(windows) == nsamples:
            break
        doc = int(torch.randint(0, len(dataset), (1,), generator=generator))
        tokens = _tokenize(tokenizer, dataset[doc]["text"])
        if tokens.numel() > seqlen:
            windows.append(random_windows(tokens, 1, seqlen, generator, "c4")[0])
    if len(windows) < nsamples:
        raise ValueError(f"--calib c4: {len(windows)} of {_C4_DRAWS_PER_WINDOW * nsamples} documents "
                         f"drawn were longer than --seqlen {seqlen} tokens, {nsamples} were needed; "
                         f"lower --seqlen")
    return torch.stack(windows)


@torch.no_grad()
def sample_from_model(model: nn.Module, tokenizer, nsamples: int, seqlen: int,
                      generator: torch.Generator, batch: int = 8) -> torch.Tensor:
    """`[nsamples, seqlen]` sequences sampled from the model at temperature 1 (CPU int64): the
    `self` source of calibration (`--calib self`) and of fidelity (`duogpt eval --ppl self`).

    Each starts at the BOS token, else at EOS (a document boundary for tokenizers without BOS),
    else at a random token, and is sampled on the model's device, `batch` sequences at a time with
    a KV cache. `generator` is a CPU generator, which makes the draws independent of the device.
    """
    device = next(model.parameters()).device
    vocab = model.get_output_embeddings().weight.shape[0]
    first = next((t for t in (getattr(tokenizer, "bos_token_id", None),
                              getattr(tokenizer, "eos_token_id", None)) if t is not None), None)
    out = torch.empty(nsamples, seqlen, dtype=torch.int64)
    key = cache_argument(model)
    for b0 in range(0, nsamples, batch):
        b = min(batch, nsamples - b0)
        token = (torch.full((b, 1), first, dtype=torch.int64) if first is not None
                 else torch.randint(0, vocab, (b, 1), generator=generator))
        out[b0:b0 + b, 0:1] = token
        past = None
        for t in range(1, seqlen):
            step = model(token.to(device), use_cache=True, **{key: past})
            past = step[key]
            probs = torch.softmax(step.logits[:, -1].float(), dim=-1).cpu()
            token = torch.multinomial(probs, 1, generator=generator)
            out[b0:b0 + b, t:t + 1] = token
    return out
