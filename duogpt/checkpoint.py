"""Pruned checkpoints: a Hugging Face folder (exact zeros in safetensors) plus `duogpt.json`.

Plain transformers loads the folder as a dense model. `duogpt.json` records how it was made and
the activation rule to run it with; for the threshold rule the per-projection thresholds sit in
`duogpt_thresholds.safetensors`. Never a compressed-tensors `sparsity_config`:
compressed-tensors dropped its sparse formats in 2026, and vLLM refuses any checkpoint whose
`sparsity_config` has targets.

Writes go to a temporary sibling folder that is renamed into place at the end, so an interrupted
save never leaves a half-written checkpoint at the destination.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from duogpt.sparsity import ActivationSparsity

METADATA_FILE = "duogpt.json"
THRESHOLDS_FILE = "duogpt_thresholds.safetensors"
FORMAT_VERSION = 1


def replace_atomically(path: str | os.PathLike, write) -> None:
    """`write(tmp)` a file beside `path`, then rename it over `path`: no reader sees a partial file.

    If `write` raises, `path` is left as it was and the partial `tmp` is removed.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def new_folder_beside(path: Path) -> Path:
    """A new empty folder `.{name}.tmp-XXXXXXXX` beside `path`, made with the umask's permissions:
    `tempfile.mkdtemp`'s are 0700, which the final rename would carry to the output."""
    while True:
        folder = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
        with contextlib.suppress(FileExistsError):
            folder.mkdir()
            return folder


@contextlib.contextmanager
def created_parents(path: Path) -> Iterator[None]:
    """Create the missing folders above `path`; if the body raises, remove again those of them that
    are still empty, so that a command that fails leaves no trace (`--out new/run/x`)."""
    missing = list(itertools.takewhile(lambda folder: not folder.exists(), path.parents))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield
    except BaseException:
        for folder in missing:  # deepest first
            try:
                folder.rmdir()
            except OSError:  # not empty: what the run left there is kept (a run to resume)
                break
        raise


def check_out_dir(out: Path, *, overwrite: bool = False) -> None:
    """Raise FileExistsError unless `atomic_folder(out, overwrite=overwrite)` may write `out`;
    callers with minutes of work before the save check first (a dangling link counts as there).
    """
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise FileExistsError(f"{out} already exists; choose another --out or remove it first")
        if out.is_symlink() or not (out / METADATA_FILE).is_file():
            raise FileExistsError(f"{out} is not a duogpt checkpoint (it has no {METADATA_FILE}), "
                                  f"so --overwrite does not replace it; choose another --out")


@contextlib.contextmanager
def atomic_folder(out_dir: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to `out_dir`; on success it replaces `out_dir`.

    Args:
        overwrite: replace an existing `out_dir`, which must then be a duogpt checkpoint (hold a
            duogpt.json): an earlier output, never an arbitrary folder (`--out ~ --overwrite`).

    Raises:
        FileExistsError: `out_dir` exists and `overwrite` is False, or it is no duogpt checkpoint.
    """
    out = Path(out_dir)
    check_out_dir(out, overwrite=overwrite)
    with created_parents(out):
        staging = new_folder_beside(out)
        retired = staging.with_name(staging.name + "-old")
        try:
            yield staging
            if out.exists():  # moved aside, and deleted only once the new folder is in place
                out.rename(retired)
            try:
                staging.rename(out)
            except OSError:
                if retired.exists():
                    retired.rename(out)
                raise
        finally:
            for leftover in (staging, retired):
                if leftover.exists():
                    shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def reading_weights(path: str | os.PathLike) -> Iterator[None]:
    """Re-raise a safetensors read failure under `path`, or transformers' refusal of weights whose
    sizes differ from config.json's, as a ValueError that names it."""
    try:
        yield
    except SafetensorError as err:
        raise ValueError(f"{path}: a safetensors file cannot be read ({err}); the checkpoint is "
                         f"truncated or corrupted") from None
    except RuntimeError as err:
        # transformers' message names the flag that would load them anyway, as random weights.
        if "ignore_mismatched_sizes" not in str(err):
            raise
        raise ValueError(f"{path}: the weights do not have the sizes config.json gives them (see "
                         f"the load report above); config.json does not belong to these "
                         f"weights") from None


def read_json(file: Path):
    """The content of a JSON file; one that is not JSON raises a ValueError that names it."""
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not valid JSON ({err}); the file is corrupted") from None


def write_metadata(folder: Path, metadata: dict, sparsity: ActivationSparsity) -> None:
    """Write `duogpt.json` (and the thresholds file for the threshold rule) into `folder`."""
    meta = dict(metadata, format_version=FORMAT_VERSION,
                activation_sparsity=sparsity.to_json())
    if sparsity.rule == "threshold" and sparsity.active:
        save_file({k: v.float().contiguous().cpu() for k, v in sparsity.thresholds.items()},
                  folder / THRESHOLDS_FILE)
        meta["activation_sparsity"]["thresholds_file"] = THRESHOLDS_FILE
    (folder / METADATA_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def read_metadata(path: str | os.PathLike) -> dict:
    """`duogpt.json` of a checkpoint folder.

    Raises:
        ValueError: the folder has no duogpt.json, or one that is not JSON, of an unknown format
            version, or without its activation rule.
    """
    file = Path(path) / METADATA_FILE
    if not file.is_file():
        raise ValueError(f"{path} has no {METADATA_FILE}: it is not a duogpt checkpoint "
                         f"(create one with `duogpt prune`)")
    meta = read_json(file)
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if version != FORMAT_VERSION:
        raise ValueError(f"{file} has format_version {version}; this duogpt reads version "
                         f"{FORMAT_VERSION}")
    rule = meta.get("activation_sparsity")
    if not (isinstance(rule, dict) and {"fraction", "rule"} <= rule.keys()):
        raise ValueError(f"{file} has no activation_sparsity {{fraction, rule}}; the checkpoint is "
                         f"corrupted, re-create it with `duogpt prune`")
    return meta


def read_activation_sparsity(path: str | os.PathLike, metadata: dict | None = None) -> ActivationSparsity:
    """The activation rule a checkpoint was pruned for (thresholds loaded for the threshold rule)."""
    meta = read_metadata(path) if metadata is None else metadata
    spec = meta["activation_sparsity"]
    thresholds = {}
    if spec.get("thresholds_file"):
        file = Path(path) / spec["thresholds_file"]
        with reading_weights(file):
            thresholds = load_file(str(file))
    sparsity = ActivationSparsity(fraction=spec["fraction"], rule=spec["rule"], thresholds=thresholds)
    if sparsity.rule == "threshold" and sparsity.active and not thresholds:
        raise ValueError(f"{path}: duogpt.json sets the threshold rule but names no thresholds "
                         f"file; the checkpoint is incomplete, re-create it with `duogpt prune`")
    return sparsity


def save_pruned(model: torch.nn.Module, tokenizer, out_dir: str | os.PathLike, metadata: dict,
                sparsity: ActivationSparsity, *, overwrite: bool = False) -> Path:
    """Save a pruned model as a plain Hugging Face folder plus duogpt.json, atomically."""
    with atomic_folder(out_dir, overwrite=overwrite) as staging:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        write_metadata(staging, metadata, sparsity)
    return Path(out_dir)
