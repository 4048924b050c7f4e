"""`duogpt.load`: a pruned checkpoint as a model whose projections are `SparseLinear`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from duogpt.checkpoint import read_activation_sparsity, read_metadata, reading_weights
from duogpt.engine.dense import set_engine_head
from duogpt.engine.packing import CONFIG_FILE, QUANT_METHOD
from duogpt.engine.sparse_linear import convert_for_runtime, set_activation_sparsity
from duogpt.sparsity import ActivationSparsity

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def load(path: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
         activation_sparsity: ActivationSparsity | None = None) -> PreTrainedModel:
    """Load a duogpt checkpoint for inference, in eval mode.

    A packed folder (`duogpt pack`) is read through transformers and the registered `duogpt`
    quantizer, so only the packed weights are ever resident; a dense-format checkpoint
    (`duogpt prune`) is loaded and packed in memory, one projection at a time.

    Args:
        path: the checkpoint folder (it must hold duogpt.json).
        device: where the model runs.
        dtype: dtype of the non-projection parameters and of the activations; None = as stored.
            Packed values keep their stored dtype (a dense checkpoint is packed in this dtype).
        activation_sparsity: overrides the activation rule recorded in duogpt.json.

    Raises:
        ValueError: not a duogpt checkpoint, or a packed folder that is incomplete or corrupted.
    """
    from transformers import AutoModelForCausalLM  # registers the quantizer (transformers_hook.py)

    meta = read_metadata(path)
    packed = meta.get("format") == "bitmap"
    if packed and _quant_method(path) != QUANT_METHOD:
        # Checked before the load: without our quantizer transformers fails on the packed shapes.
        raise ValueError(f"{path}: duogpt.json says 'bitmap' but config.json has no duogpt "
                         f"quantization_config; re-create the folder with `duogpt pack`")
    # duogpt.json's rule, which eval reports, also for a packed folder: its quantization_config
    # (what a plain transformers load applies) is written from it, but may have been edited since.
    sparsity = read_activation_sparsity(path, meta) if activation_sparsity is None else activation_sparsity
    with reading_weights(path):
        model = AutoModelForCausalLM.from_pretrained(path, dtype="auto" if dtype is None else dtype)
    if packed:
        set_activation_sparsity(model, sparsity)
    else:
        convert_for_runtime(model, sparsity)
    model = model.to(device).eval()
    set_engine_head(model)
    return model


def _quant_method(path: str | os.PathLike) -> str | None:
    """`quantization_config.quant_method` of the folder's config.json, or None."""
    config = json.loads((Path(path) / CONFIG_FILE).read_text(encoding="utf-8"))
    return (config.get("quantization_config") or {}).get("quant_method")
