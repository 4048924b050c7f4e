"""Finished layers of a pruning run, kept so an interrupted run resumes from its last one.

The folder holds `layer-00012.safetensors` per finished layer (its pruned projection weights and,
for the threshold rule, their activation thresholds) and `progress.json` (the run's settings and
the per-module reports of the finished layers). A layer counts as finished once `progress.json`
lists it; both files are replaced atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from duogpt.checkpoint import read_json, reading_weights, replace_atomically

PROGRESS_FILE = "progress.json"
_THRESHOLD = "threshold:"


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """The dotted keys (`config.alpha`) at which two JSON-like dicts differ."""
    keys = []
    for k in sorted(a | b):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            keys += _differences(x, y, f"{prefix}{k}.")
        elif x != y:
            keys.append(prefix + k)
    return keys


def weights_fingerprint(model: torch.nn.Module, edge: int = 1024) -> str:
    """sha256 over each parameter's name, dtype, shape and first and last `edge` values: tells
    apart two models of one config (a run resumes only on the model it started with) without
    reading every weight of a large model."""
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        digest.update(f"{name} {p.dtype} {tuple(p.shape)}".encode())
        for part in (flat[:edge], flat[-edge:]):
            digest.update(part.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class LayerStore:
    """Per-layer results of one run.

    Args:
        folder: created, with the missing folders above it, when the first layer is saved: a run
            stopped before that leaves nothing behind.
        settings: JSON-able description of the run (config, calibration data, model); a folder
            left by a run with other settings is refused.
    """

    def __init__(self, folder: str | os.PathLike, settings: dict):
        self.folder = Path(folder)
        self.settings = json.loads(json.dumps(settings))  # normalised as it will be read back
        progress = self.folder / PROGRESS_FILE
        self.layers: dict[str, dict] = {}
        if progress.exists():
            saved = read_json(progress)
            if not (isinstance(saved, dict) and {"settings", "layers"} <= saved.keys()):
                raise ValueError(f"{progress} lacks the run's settings and layers; the folder is "
                                 f"damaged: remove {self.folder} to start over")
            if saved["settings"] != self.settings:
                changed = _differences(self.settings, saved["settings"])
                raise ValueError(f"{self.folder} holds a run with other settings ({', '.join(changed)} "
                                 f"differ); rerun with the same settings or remove the folder")
            self.layers = saved["layers"]

    def __contains__(self, index: int) -> bool:
        return str(index) in self.layers

    def __len__(self) -> int:
        return len(self.layers)

    def load(self, index: int, shapes: dict[str, tuple[int, ...]]
             ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
        """`(weights, thresholds, reports)` of a finished layer, keyed by full parameter/module name.

        Args:
            shapes: the shape of every tensor the layer must hold: its weights by parameter name,
                its thresholds (if the run has them) by module name.

        Raises:
            ValueError: the layer's file is unreadable or holds other tensors.
        """
        file = self.folder / f"layer-{index:05d}.safetensors"
        with reading_weights(file):
            tensors = load_file(str(file))
        weights = {k: v for k, v in tensors.items() if not k.startswith(_THRESHOLD)}
        thresholds = {k[len(_THRESHOLD):]: v for k, v in tensors.items() if k.startswith(_THRESHOLD)}
        changed = _differences({k: tuple(v.shape) for k, v in (weights | thresholds).items()},
                               {k: tuple(v) for k, v in shapes.items()})
        if changed:
            raise ValueError(f"{file} does not hold this layer's tensors ({', '.join(changed)} "
                             f"differ); the folder is damaged: remove {self.folder} to start over")
        return weights, thresholds, self.layers[str(index)]

    def save(self, index: int, weights: dict[str, torch.Tensor], thresholds: dict[str, torch.Tensor],
             reports: dict) -> None:
        """Record layer `index` as finished."""
        tensors = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
        tensors.update({_THRESHOLD + k: v.cpu().contiguous() for k, v in thresholds.items()})
        self.folder.mkdir(parents=True, exist_ok=True)
        replace_atomically(self.folder / f"layer-{index:05d}.safetensors",
                           lambda p: save_file(tensors, str(p)))
        self.layers[str(index)] = reports
        text = json.dumps({"settings": self.settings, "layers": self.layers}, indent=1)
        replace_atomically(self.folder / PROGRESS_FILE, lambda p: p.write_text(text))
