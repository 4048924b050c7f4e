"""Evaluation text: WikiText-2 test from the shared data folder, or any local text file.

No dataset hub is used: `wikitext2` resolves to `wikitext-2-raw/wiki.test.raw` in `$DUOGPT_DATA`
or, for an editable install, in the `shared/data` folder beside the source checkout. Text is
tokenized without added special tokens, as in GPTQ/SparseGPT/Wanda; the shared `wiki.test.raw`
has its blank lines dropped, unlike their text (see `duogpt.eval.perplexity` for what that means).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from duogpt.calibration.data import read_text

WIKITEXT2 = Path("wikitext-2-raw") / "wiki.test.raw"
NAMED = ("wikitext2", "c4")


def data_dir() -> Path | None:
    """`$DUOGPT_DATA`, else `shared/data` beside the repository holding this package, if present."""
    env = os.environ.get("DUOGPT_DATA")
    candidate = Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "data"
    return candidate if candidate.is_dir() else None


def wikitext2_path() -> Path | None:
    """The local WikiText-2 test text (`wiki.test.raw` under `data_dir()`), if present."""
    folder = data_dir()
    return folder / WIKITEXT2 if folder is not None and (folder / WIKITEXT2).is_file() else None


def eval_text_file(source: str, instead: str = "--ppl FILE or --ppl self") -> Path:
    """The file behind `wikitext2`, `c4` or a text file path, without reading it (callers check
    before loading a model). `instead` names the calling command's other choices for WikiText-2.

    Raises:
        ValueError: the named set is not available offline, or the file does not exist.
    """
    if source == "wikitext2":
        path = wikitext2_path()
        if path is None:
            raise ValueError(f"WikiText-2 test text not found: set DUOGPT_DATA to a folder holding "
                             f"{WIKITEXT2}, or pass {instead}")
        return path
    if source == "c4":
        raise ValueError("C4 needs a dataset hub, which duogpt does not use; save C4 validation text "
                         "to a file and pass --ppl FILE, or use --ppl wikitext2 or --ppl self")
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"--ppl {source!r} is neither one of {NAMED + ('self',)} nor a text file")
    return path.resolve()


def eval_text(source: str) -> tuple[str, str]:
    """`(text, resolved source)` for `wikitext2`, `c4` or a text file path (see `eval_text_file`)."""
    path = eval_text_file(source)
    return read_text(path), str(path)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """`[1, T]` int64 token ids of `text`, no special tokens added."""
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
