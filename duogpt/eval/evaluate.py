"""`duogpt eval`: perplexity, dense-fidelity and zero-shot tasks of a checkpoint or a plain model,
with its activation sparsity active, reported as one JSON-able dict."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import torch
from torch import nn

from duogpt.calibration.data import sample_from_model
from duogpt.checkpoint import METADATA_FILE, read_metadata
from duogpt.engine import load
from duogpt.env import environment
from duogpt.eval.data import eval_text, eval_text_file, tokenize
from duogpt.eval.fidelity import fidelity
from duogpt.eval.harness import check_tasks, zero_shot
from duogpt.eval.perplexity import check_windows, num_windows, perplexity
from duogpt.models import layer_map, load_model, load_tokenizer
from duogpt.sparsity import ActivationSparsity, sparsified_inputs

SELF_SEQUENCES = 4  # `--ppl self` default number of sampled sequences


def checkpoint_summary(meta: dict) -> dict:
    """duogpt.json without the per-module table."""
    return {k: v for k, v in meta.items() if k != "layers"}


def activation_rule(model: nn.Module, sparsity: ActivationSparsity) -> contextlib.AbstractContextManager:
    """Within the block, a plain Hugging Face `model` (not loaded by the duogpt engine, which
    applies its own rule) runs the 7 projections of every layer with `sparsity` (forward hooks)."""
    return sparsified_inputs(layer_map(model).named_projections(), sparsity)


@dataclasses.dataclass(frozen=True)
class PerplexityText:
    """Evaluation text tokenized once, to score several models (e.g. before and after pruning).

    Attributes:
        dataset: `wikitext2` or a text file, as asked for.
        source: the file read.
        input_ids: `[1, T]` int64 on CPU, no special tokens added.
        seqlen: tokens per window.
        windows: windows scored: `T // seqlen`, capped by `max_windows` of `load`.
    """

    dataset: str
    source: str
    input_ids: torch.Tensor
    seqlen: int
    windows: int

    @classmethod
    def load(cls, dataset: str, tokenizer, seqlen: int, max_windows: int | None = None) -> PerplexityText:
        """Read and tokenize `wikitext2` or a text file (see `duogpt.eval.data.eval_text`).

        Raises:
            ValueError: the text is not found, or makes no window of `seqlen` tokens.
        """
        text, source = eval_text(dataset)
        ids = tokenize(tokenizer, text)
        try:
            windows = num_windows(ids.shape[1], seqlen, max_windows)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None
        return cls(dataset, source, ids, seqlen, windows)

    def score(self, model: nn.Module) -> float:
        """Perplexity of `model` over the windows (the activation rule is the caller's business)."""
        return perplexity(model, self.input_ids, self.seqlen, self.windows)

    def describe(self) -> dict:
        """`{dataset, source, seqlen, windows, tokens}`, JSON-able."""
        return {"dataset": self.dataset, "source": self.source, "seqlen": self.seqlen,
                "windows": self.windows, "tokens": self.windows * self.seqlen}


def evaluate(model_ref: str, *, ppl: str | None = "wikitext2", seqlen: int = 2048,
             max_windows: int | None = None, activation_sparsity: float | None = None,
             tasks: tuple[str, ...] = (), reference: str | None = None, device: str = "cpu",
             dtype: torch.dtype | None = None, batch_size: int = 1, limit: int | None = None,
             include_path: str | None = None, seed: int = 0) -> dict:
    """Evaluate a duogpt checkpoint (run by the sparse engine) or a plain model.

    Args:
        model_ref: a duogpt checkpoint folder (packed or dense format), or any model
            `duogpt.models.load_model` accepts (hub id, folder, `smollm2-135m`).
        ppl: `wikitext2`, `c4`, a text file, `self` (fidelity to the dense reference) or None.
        seqlen: window (or sampled sequence) length in tokens.
        max_windows: perplexity windows (for `self`: sampled sequences, default 4) at most.
        activation_sparsity: top-k fraction to run with; None = the rule in duogpt.json, or dense
            activations for a plain model.
        tasks: lm-eval task names, run zero-shot.
        reference: the model `self` compares with, run with dense activations: default
            duogpt.json's `base_model`, or the plain model itself; a dense-format checkpoint
            (not a packed one) compares with the same pruned weights.
        device, dtype: where and in which dtype to run (None = as stored).
        batch_size, limit, include_path: passed to lm-eval (see `duogpt.eval.harness.zero_shot`).
        seed: seed of the `self` sampling.

    Returns:
        `{"model", "metrics": {"perplexity"?, "fidelity"?, "tasks"?}, "settings", "checkpoint",
        "versions"}`; `settings` holds lm-eval's `task_versions` when tasks ran.

    Raises:
        ValueError: `seqlen < 2` or `max_windows < 1`, a missing text file, an unknown task,
            tasks without lm-eval, or a `reference` that is a packed checkpoint; all checked
            before any model loads.
    """
    # Checked before the model loads, so that a bad argument does not cost a load or another metric
    if ppl is not None:
        check_windows(seqlen, max_windows)
    if ppl not in (None, "self"):
        eval_text_file(ppl)
    manager = check_tasks(list(tasks), include_path) if tasks else None
    if (ppl == "self" and reference is not None and (Path(reference) / METADATA_FILE).is_file()
            and read_metadata(reference).get("format") == "bitmap"):
        # Loaded as a reference, a packed folder runs its activation rule (its config.json's
        # quantization_config), so the fidelity figures would compare two sparse models.
        raise ValueError(f"--reference {reference} is a packed checkpoint, which runs its activation "
                         f"rule; give the dense model (duogpt.json's base_model) or a dense-format "
                         f"checkpoint, which loads with dense activations")
    is_checkpoint = (Path(model_ref) / METADATA_FILE).is_file()
    override = None if activation_sparsity is None else ActivationSparsity(activation_sparsity)
    if is_checkpoint:
        meta = read_metadata(model_ref)
        tokenizer = load_tokenizer(model_ref)  # first: it fails in a second, the model load takes longer
        model = load(model_ref, device=device, dtype=dtype, activation_sparsity=override)
        rule = override.to_json() if override else dict(meta["activation_sparsity"])
        active = contextlib.nullcontext()
    else:
        meta = None
        model, tokenizer = load_model(model_ref, dtype=dtype or "auto", device=device)
        sparsity = override or ActivationSparsity()
        rule = sparsity.to_json()
        active = activation_rule(model, sparsity)
    metrics: dict = {}
    task_versions = None
    with active:
        if ppl == "self":
            ref_name = reference or (meta["base_model"] if meta else model_ref)
            ref_model, _ = load_model(ref_name, dtype=dtype or "auto", device=device)
            sequences = sample_from_model(ref_model, tokenizer, max_windows or SELF_SEQUENCES, seqlen,
                                          torch.Generator().manual_seed(seed))
            metrics["fidelity"] = dict(fidelity(model, ref_model, sequences), reference=ref_name,
                                       sequences=sequences.shape[0])
        elif ppl is not None:
            text = PerplexityText.load(ppl, tokenizer, seqlen, max_windows)
            metrics["perplexity"] = dict(text.describe(), value=text.score(model))
        if tasks:
            metrics["tasks"], task_versions = zero_shot(model, tokenizer, list(tasks), manager,
                                                        batch_size=batch_size, limit=limit)
    settings = {"ppl": ppl, "seqlen": seqlen, "max_windows": max_windows, "activation_sparsity": rule,
                "activation_sparsity_source": ("--activation-sparsity" if override else
                                               "duogpt.json" if meta else "none"),
                "engine": "sparse" if is_checkpoint else "dense", "tasks": list(tasks),
                "num_fewshot": 0, "limit": limit, "batch_size": batch_size if tasks else None,
                "task_versions": task_versions,
                "seed": seed if ppl == "self" else None, "device": device,
                "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
    return {"model": model_ref, "metrics": metrics, "settings": settings,
            "checkpoint": checkpoint_summary(meta) if meta else None, "versions": environment()}
