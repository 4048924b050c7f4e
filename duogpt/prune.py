"""`duogpt.prune`: prune a LLaMA-layout causal LM in memory with DuoGPT or a baseline.

    import duogpt
    from duogpt.models import load_model
    from duogpt.checkpoint import save_pruned

    model, tokenizer = load_model("smollm2-135m")
    report = duogpt.prune(model, tokenizer, "notes.txt", weight_sparsity=0.5,
                          activation_sparsity=0.5, nsamples=64, seqlen=512)
    save_pruned(model, tokenizer, "out", report.metadata("smollm2-135m"), report.activation_sparsity)

Methods (docs/algorithm.md, docs/pruning.md): `duogpt` (two streams, activation-sparse
calibration, asymmetric OBS), `sparsegpt` (one stream, OBS), `wanda` (|W|·||X||, per row),
`magnitude` (|W|, per matrix).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import math
import os
import platform
import time
import warnings

import torch
from torch import nn

from duogpt.calibration.data import calibration_ids, check_windows, describe
from duogpt.engine.sparse_linear import sparse_projections
from duogpt.env import check_device
from duogpt.models import layer_map
from duogpt.models.adapters import warn_past_context
from duogpt.solver.masks import WeightSparsity
from duogpt.solver.resume import LayerStore, weights_fingerprint
from duogpt.solver.sequential import Pipeline
from duogpt.sparsity import ActivationSparsity

METHODS = ("duogpt", "sparsegpt", "wanda", "magnitude")


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclasses.dataclass(frozen=True)
class PruneConfig:
    """Every setting of a pruning run (the hyperparameters recorded in duogpt.json).

    Attributes:
        method: one of METHODS.
        weight_sparsity: `p_w`: a fraction (unstructured) or an `(n, m)` pair (N:M, e.g. `(2, 4)`).
        activation_sparsity: `p_a` in [0, 1) on the inputs of the 7 projections of every layer.
        activation_rule: "topk" (per token, the paper's) or "threshold" (TEAL-style, calibrated).
        alpha: DuoGPT's residual scale (the paper's parent GPTAQ used 0.25).
        percdamp: initial dampening of H as a fraction of mean(diag H); escalated x10 on failure.
        blocksize: columns per block of the OBS column loop.
        act_order: process columns by descending diag H; None = on, except for N:M (where it
            would form the groups in permuted order).
        true_sequential: calibrate and prune a layer's input-sharing groups one after another,
            each on the inputs that the earlier, already pruned groups produce (SparseGPT's
            `--true-sequential`); None = on for DuoGPT (its flow, docs/pruning.md), off for the
            baselines, whose originals gather all of a layer's inputs in one pass. DuoGPT needs
            it: its sparse stream reaches each group through the earlier groups' sparsity.
        nsamples, seqlen, seed: calibration windows (seqlen is bounded on purpose: memory and
            time grow with it, and the model's maximum context is never needed).
        device: where each layer is pruned ("cuda" when available).
    """

    method: str = "duogpt"
    weight_sparsity: float | tuple[int, int] = 0.5
    activation_sparsity: float = 0.5
    activation_rule: str = "topk"
    alpha: float = 0.125
    percdamp: float = 0.01
    blocksize: int = 128
    act_order: bool | None = None
    true_sequential: bool | None = None
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    device: str = dataclasses.field(default_factory=_default_device)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        weight = WeightSparsity.of(self.weight_sparsity)
        object.__setattr__(self, "weight_sparsity", weight.spec())  # (n, m) lists become tuples
        ActivationSparsity(self.activation_sparsity, self.activation_rule)  # validates both
        if self.activation_rule == "threshold" and self.activation_sparsity == 0:
            raise ValueError(f"activation rule {self.activation_rule!r} needs --activation-sparsity > 0")
        if weight.is_nm and self.act_order:
            raise ValueError("act_order forms N:M groups in permuted order; leave it off for N:M")
        if self.method == "duogpt" and self.true_sequential is False:
            raise ValueError("DuoGPT prunes a layer's groups one after another (each group's sparse "
                             "inputs come through the earlier groups' pruning); "
                             "true_sequential=False is for the baselines")
        if weight.is_nm and self.blocksize % weight.m:
            raise ValueError(f"blocksize {self.blocksize} must be a multiple of M = {weight.m}")
        for name in ("blocksize", "nsamples", "seqlen"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        check_device(self.device)
        if not 0 <= self.seed < 2**64:  # torch's generators take an unsigned 64-bit seed
            raise ValueError(f"seed must be in [0, 2**64), got {self.seed}")
        if not (0 <= self.alpha < math.inf and 0 < self.percdamp < math.inf):
            raise ValueError(f"need a finite alpha >= 0 and percdamp > 0, got {self.alpha} and "
                             f"{self.percdamp}")
        if self.method == "duogpt" and self.alpha > 1:
            # alpha = 1 is the full correction; past it the residual terms are over-weighted.
            warnings.warn(f"alpha = {self.alpha} is above 1, the full correction toward the dense "
                          f"outputs: accuracy falls steeply past the default 0.125 (perplexity "
                          f"2.6x higher already at alpha = 1 on SmolLM2, "
                          f"bench/results/cpu-alpha-smollm2-2026-11-24.md)", stacklevel=3)

    @property
    def weight(self) -> WeightSparsity:
        return WeightSparsity.of(self.weight_sparsity)

    @property
    def use_act_order(self) -> bool:
        return not self.weight.is_nm if self.act_order is None else self.act_order

    @property
    def use_true_sequential(self) -> bool:
        return self.method == "duogpt" if self.true_sequential is None else self.true_sequential

    @property
    def uses_inputs(self) -> bool:
        """Whether the method's masks depend on calibration inputs (all but magnitude)."""
        return self.method != "magnitude"

    @property
    def needs_calibration(self) -> bool:
        """Whether calibration data must run through the model (also for threshold calibration)."""
        return self.uses_inputs or self.activation_rule == "threshold"

    def hyperparameters(self) -> dict:
        """The knobs that shaped the result (the OBS knobs only for the OBS methods)."""
        knobs = {"device": self.device}
        if self.needs_calibration:
            knobs["true_sequential"] = self.use_true_sequential
        if self.method in ("duogpt", "sparsegpt"):
            knobs.update(percdamp=self.percdamp, blocksize=self.blocksize, act_order=self.use_act_order)
        if self.method == "duogpt":
            knobs["alpha"] = self.alpha
        return knobs


@dataclasses.dataclass(frozen=True)
class PruneReport:
    """What `prune` did.

    Attributes:
        config: the settings.
        activation_sparsity: the rule to run the pruned model with (thresholds included).
        calibration: `{source, nsamples, seqlen, seed, tokens, sha256}` (source None: no data).
        layers: `{full module name: {"sparsity", "seconds", "shape"[, "damping"]}}`: achieved
            weight sparsity, solve time and final percdamp of every pruned projection.
        timings: `{total_s, calibration_data_s, capture_s, streams_s, solve_s}` of this call.
        resumed_layers: the layers loaded from `work_dir`, pruned by an earlier, interrupted call
            (in `layers`, with their solve seconds, but not in `timings`).
    """

    config: PruneConfig
    activation_sparsity: ActivationSparsity
    calibration: dict
    layers: dict[str, dict]
    timings: dict[str, float]
    resumed_layers: list[int]

    @property
    def weight_sparsity(self) -> float:
        """Achieved weight sparsity over all pruned projections."""
        numel = {name: r["shape"][0] * r["shape"][1] for name, r in self.layers.items()}
        return sum(r["sparsity"] * numel[n] for n, r in self.layers.items()) / sum(numel.values())

    def metadata(self, base_model: str) -> dict:
        """The duogpt.json record (`write_metadata` adds format_version and the activation rule)."""
        from duogpt import __version__  # the package defines it after importing this module

        return {
            "method": self.config.method,
            "base_model": base_model,
            "weight_sparsity": self.config.weight.to_json(),
            "hyperparameters": self.config.hyperparameters(),
            "calibration": self.calibration,
            "layers": self.layers,
            "timings": self.timings,
            "resumed_layers": self.resumed_layers,
            "versions": {"duogpt": __version__, "torch": torch.__version__,
                         "transformers": importlib.metadata.version("transformers"),
                         "python": platform.python_version()},
            "format": "dense",
        }


def prune(model: nn.Module, tokenizer, calib: str | torch.Tensor = "c4",
          config: PruneConfig | None = None, *, work_dir: str | os.PathLike | None = None,
          progress: bool = True, **options) -> PruneReport:
    """Prune the 7 decoder projections of every layer of `model` in place.

    Embeddings and lm_head stay dense. Each decoder layer visits `config.device` in turn and
    returns to where it was.

    Args:
        model: a Hugging Face causal LM with the LLaMA decoder layout (LLaMA, Mistral, Qwen2/3,
            SmolLM2), typically on CPU.
        tokenizer: its tokenizer (used to read text and to start `self` samples).
        calib: `c4`, `wikitext2`, a text file or folder of `.txt` files, `self`, or ready
            calibration windows: a `[nsamples, seqlen]` integer tensor of token ids, used whole
            (`nsamples` and `seqlen` then do not apply).
        config: the settings; `options` override its fields, e.g. `method="wanda"`,
            `weight_sparsity=(2, 4)`, `activation_sparsity=0.5`, `alpha=0.25`, `nsamples=64`.
        work_dir: finished layers are saved there; layers found there from an interrupted run
            with the same settings are loaded instead of pruned again.
        progress: tqdm progress bars on stderr.

    Raises:
        ValueError: an unsupported architecture, bad settings, or unreachable calibration data.
    """
    config = dataclasses.replace(config or PruneConfig(), **options)
    start = time.perf_counter()
    if sparse_projections(model):
        raise ValueError("the model's projections are already packed (SparseLinear, from "
                         "duogpt.load); prune the dense model, or its pruned Hugging Face folder")
    layer_map(model)  # an unsupported architecture fails before any data is read
    input_ids, calibration = None, {"source": None, "nsamples": 0, "seqlen": 0, "seed": config.seed,
                                    "tokens": 0}
    if config.needs_calibration:
        if isinstance(calib, torch.Tensor):
            input_ids, source = check_windows(calib, model.config.vocab_size), "tensor"
        elif not isinstance(calib, (str, os.PathLike)):
            raise TypeError(f"calib must be a source name, a path, or a [nsamples, seqlen] tensor "
                            f"of token ids, got {type(calib).__name__}")
        else:
            input_ids, source = calibration_ids(str(calib), tokenizer, nsamples=config.nsamples,
                                                seqlen=config.seqlen, seed=config.seed,
                                                model=model), str(calib)
        warn_past_context(model, input_ids.shape[1], "a calibration window")
        calibration = describe(source, input_ids, config.seed)
    data_s = time.perf_counter() - start
    store = None
    if work_dir is not None:
        # The config without the path the model was loaded from: `./m` and `m` are one model, and
        # the weights' fingerprint tells models apart.
        model_config = {k: v for k, v in model.config.to_dict().items() if k != "_name_or_path"}
        store = LayerStore(work_dir, {"config": dataclasses.asdict(config), "calibration": calibration,
                                      "model": model_config, "weights": weights_fingerprint(model)})
    result = Pipeline(model, config, input_ids, store=store, progress=progress).run()
    sparsity = ActivationSparsity(config.activation_sparsity, config.activation_rule,
                                  result.thresholds)
    timings = {"total_s": time.perf_counter() - start, "calibration_data_s": data_s, **result.timings}
    return PruneReport(config, sparsity, calibration, result.layers,
                       {k: round(v, 3) for k, v in timings.items()}, result.resumed)
