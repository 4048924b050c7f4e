"""Packed checkpoints: a pruned checkpoint whose seven projections per layer are bitmap-packed.

Layout (docs/engine.md): the Hugging Face folder of `duogpt.checkpoint` where each projection `P`
is stored as `P.weight` (the `[nnz]` values), `P.bitmap`, `P.offsets`, `P.shape` and, for the
threshold rule, `P.threshold`; every other tensor as before. `config.json` carries a
`quantization_config` with `quant_method: "duogpt"`, which `import duogpt` registers with
transformers (duogpt/engine/quantizer.py), and duogpt.json says `"format": "bitmap"`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from duogpt.checkpoint import (
    METADATA_FILE,
    THRESHOLDS_FILE,
    atomic_folder,
    created_parents,
    read_activation_sparsity,
    read_json,
    read_metadata,
    reading_weights,
    save_pruned,
    write_metadata,
)
from duogpt.formats import BitmapWeight
from duogpt.formats.bitmap import FORMAT_VERSION
from duogpt.models import PROJECTIONS
from duogpt.sparsity import ActivationSparsity

QUANT_METHOD = "duogpt"
CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
_PROJECTION_WEIGHT = re.compile(
    r"^(model\.layers\.\d+\.(?:" + "|".join(re.escape(p) for p in PROJECTIONS) + r"))\.weight$")


def quantization_config(sparsity: ActivationSparsity) -> dict:
    """The `quantization_config` entry of a packed folder's config.json."""
    return {"quant_method": QUANT_METHOD, "format": "bitmap", "format_version": FORMAT_VERSION,
            "activation_sparsity": sparsity.to_json()}


def weight_files(folder: Path) -> list[str]:
    """Names of the safetensors files of a checkpoint folder (sharded or not)."""
    if (folder / INDEX_FILE).is_file():
        return sorted(set(read_json(folder / INDEX_FILE)["weight_map"].values()))
    if (folder / "model.safetensors").is_file():
        return ["model.safetensors"]
    raise ValueError(f"{folder} has no model.safetensors (nor {INDEX_FILE}); duogpt reads "
                     f"safetensors checkpoints only")


def _expected_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """The tensor shapes of the model that `folder`'s config.json describes (built on `meta`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    return {key: tuple(t.shape) for key, t in model.state_dict().items()}


def _pack_file(src: Path, dst: Path, dtype: torch.dtype | None, sparsity: ActivationSparsity,
               expected: dict[str, tuple[int, ...]]) -> tuple[dict[str, str], int, int]:
    """Pack one safetensors file; returns ({key: file name}, packed bytes, dense bytes of the
    projections). Tensors must have the shapes `expected` gives (those of config.json's model):
    the loader would refuse a packed folder that does not fit its config.json, so none is
    written."""
    out: dict[str, torch.Tensor] = {}
    packed_bytes = dense_bytes = 0
    with safe_open(str(src), "pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
            tensor = f.get_tensor(key)
            match = _PROJECTION_WEIGHT.match(key)
            if match and key not in expected:
                raise ValueError(f"{src}: config.json's model has no tensor {key}; config.json does "
                                 f"not belong to these weights")
            if key in expected and tuple(tensor.shape) != expected[key]:
                raise ValueError(f"{src}: {key} is {tuple(tensor.shape)} but config.json makes it "
                                 f"{expected[key]}; config.json does not belong to these weights")
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            if match is None:
                out[key] = tensor
                continue
            module = match.group(1)
            packed = BitmapWeight.from_dense(tensor)
            state = packed.state_dict(prefix=f"{module}.")
            state[f"{module}.weight"] = state.pop(f"{module}.values")
            threshold = sparsity.threshold(module, tensor.shape[1])
            if threshold is not None:
                state[f"{module}.threshold"] = threshold.float().contiguous()
            out.update(state)
            packed_bytes += packed.nbytes
            dense_bytes += tensor.numel() * tensor.element_size()
    save_file(out, str(dst / src.name), metadata={"format": "pt"})
    return dict.fromkeys(out, src.name), packed_bytes, dense_bytes


def pack_checkpoint(src: str | os.PathLike, out: str | os.PathLike, *, dtype: torch.dtype | None = None,
                    overwrite: bool = False) -> Path:
    """Write a packed copy of the pruned (dense-format) checkpoint `src` to `out`, atomically.

    Args:
        src: a folder written by `duogpt.checkpoint.save_pruned` (`duogpt prune`).
        out: the packed folder to create.
        dtype: cast every floating tensor (packed values included) to this storage dtype; None
            keeps the checkpoint's dtypes.
        overwrite: replace an existing `out` that is a duogpt checkpoint (holds duogpt.json).

    Raises:
        ValueError: `src` is no duogpt checkpoint, is already packed, has no safetensors, has
            tensors or thresholds that do not fit its config.json, or is `out`, inside it or
            around it.
        FileExistsError: `out` exists and `overwrite` is False, or it is no duogpt checkpoint.
    """
    src = Path(src)
    meta = read_metadata(src)
    # Nested either way, the pack would write into the source folder, or `--overwrite` would
    # delete the source along with the folder it replaces.
    src_path, out_path = src.resolve(), Path(out).resolve()
    if src_path.is_relative_to(out_path) or out_path.is_relative_to(src_path):
        raise ValueError(f"--out {out} is, holds or lies inside the checkpoint being packed ({src}); "
                         f"write the packed copy to a folder outside it")
    if meta.get("format") == "bitmap":
        raise ValueError(f"{src} is already packed (duogpt.json format 'bitmap')")
    sparsity = read_activation_sparsity(src, meta)
    files = weight_files(src)
    config = read_json(src / CONFIG_FILE)
    expected = _expected_shapes(src)
    rewritten = {CONFIG_FILE, METADATA_FILE, THRESHOLDS_FILE, INDEX_FILE, *files}
    with atomic_folder(out, overwrite=overwrite) as staging:
        for item in src.iterdir():
            if item.is_file() and item.name not in rewritten:
                shutil.copy2(item, staging / item.name)
        weight_map, packed_bytes, dense_bytes = {}, 0, 0
        for name in files:
            with reading_weights(src / name):
                keys, packed, dense = _pack_file(src / name, staging, dtype, sparsity, expected)
            weight_map |= keys
            packed_bytes, dense_bytes = packed_bytes + packed, dense_bytes + dense
        if packed_bytes == 0:
            raise ValueError(f"{src} holds no projection weights named model.layers.N.<proj>.weight "
                             f"for <proj> in {', '.join(PROJECTIONS)}")
        if (src / INDEX_FILE).is_file():
            index = read_json(src / INDEX_FILE)
            index["weight_map"] = weight_map
            (staging / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        config["quantization_config"] = quantization_config(sparsity)
        if dtype is not None:
            config["dtype"] = str(dtype).removeprefix("torch.")
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        meta |= {"format": "bitmap",
                 "packing": {"storage_dtype": config.get("dtype", config.get("torch_dtype")),
                             "projection_bytes_packed": packed_bytes,
                             "projection_bytes_dense": dense_bytes}}
        write_metadata(staging, meta, sparsity)
    return Path(out)


def save_packed(model: torch.nn.Module, tokenizer, out_dir: str | os.PathLike, metadata: dict,
                sparsity: ActivationSparsity, *, dtype: torch.dtype | None = None,
                overwrite: bool = False) -> Path:
    """`duogpt.checkpoint.save_pruned`, then `pack_checkpoint`: a packed folder straight from a
    pruned model. The dense intermediate lives in a temporary folder beside `out_dir`."""
    out = Path(out_dir).resolve()
    with created_parents(out), tempfile.TemporaryDirectory(prefix=".duogpt-dense-", dir=out.parent) as tmp:
        dense = save_pruned(model, tokenizer, Path(tmp) / "dense", dict(metadata, format="dense"), sparsity)
        return pack_checkpoint(dense, out_dir, dtype=dtype, overwrite=overwrite)
