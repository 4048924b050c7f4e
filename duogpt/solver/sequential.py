"""The layer-by-layer pruning pipeline (docs/pruning.md, Pipeline), shared by every method.

Decoder layers visit the compute device one at a time; the calibration hidden states stay on
CPU and stream through sample by sample, so device memory holds about one layer plus one group's
statistics. Two streams enter each layer:

* sparse (`X̂`): the model as pruned so far, with activation sparsity on for DuoGPT (off for the
  baselines, which calibrate like the originals and meet activation sparsity only at evaluation);
* dense (`X̃`, DuoGPT only): the original model, no activation sparsity.

Per layer: one dense pass caches the inputs of the four input-sharing groups (one tensor per
group, never one per projection) and advances the dense stream. Then, true-sequential (DuoGPT,
or a baseline asked to), for each group in order `[q, k, v]`, `[o]`, `[gate, up]`, `[down]`:
(threshold rule: calibrate the group's activation threshold), run the sparse stream up to the
group with the earlier groups already pruned, accumulate the group's statistics, prune its
projections. Otherwise (the baselines, like their originals) one pass of the sparse stream
gathers all four groups' statistics before any is pruned. Finally the sparse stream advances
through the pruned layer.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from duogpt.calibration.capture import (
    capture_layer_inputs,
    check_uniform_layers,
    device_of,
    layer_forward,
    module_inputs,
)
from duogpt.models import layer_map
from duogpt.models.adapters import GROUPS, PROJECTIONS
from duogpt.solver.baselines import MagnitudePruner, WandaPruner
from duogpt.solver.obs import OBSSolver
from duogpt.solver.resume import LayerStore
from duogpt.sparsity import ActivationSparsity, ThresholdHistogram, sparsified_inputs

if TYPE_CHECKING:
    from duogpt.prune import PruneConfig

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class PipelineResult:
    """What the pipeline measured.

    Attributes:
        layers: `{full module name: {"sparsity", "seconds", "shape"[, "damping"]}}`.
        thresholds: `{full module name: [in] float32}` for the threshold rule, else empty.
        timings: seconds spent capturing, running the streams, and solving.
        resumed: indices of the layers loaded from the store, pruned by an earlier run (their
            solve time is in `layers`, not in `timings`).
    """

    layers: dict[str, dict]
    thresholds: dict[str, torch.Tensor]
    timings: dict[str, float]
    resumed: list[int]


def make_pruner(config: PruneConfig, columns: int, device: torch.device, label: str):
    """The pruner of one input-sharing group for `config.method`."""
    if config.method in ("duogpt", "sparsegpt"):
        return OBSSolver(columns, config.weight, two_stream=config.method == "duogpt",
                         alpha=config.alpha, percdamp=config.percdamp, blocksize=config.blocksize,
                         act_order=config.use_act_order, device=device, label=label)
    if config.method == "wanda":
        return WandaPruner(columns, config.weight, device=device)
    return MagnitudePruner(config.weight)


def _bar(progress: bool, **kwargs) -> tqdm:
    # Passing disable only when quiet lets TQDM_DISABLE and the other TQDM_* variables apply.
    return tqdm(**kwargs) if progress else tqdm(disable=True, **kwargs)


class Pipeline:
    """Prunes `model`'s decoder projections in place, layer by layer.

    Args:
        model: a LLaMA-layout causal LM (anywhere; each layer returns to where it was).
        config: the run's settings.
        input_ids: `[n, T]` int64 calibration windows, or None when the method needs no data.
        store: finished layers are saved there and, when already there, loaded instead of pruned.
        progress: show tqdm bars on stderr.
    """

    def __init__(self, model: nn.Module, config: PruneConfig, input_ids: torch.Tensor | None, *,
                 store: LayerStore | None = None, progress: bool = True):
        self.model, self.config, self.input_ids = model, config, input_ids
        self.lm = layer_map(model)
        self.device = torch.device(config.device)
        self.store, self.progress = store, progress
        self.two_stream = config.method == "duogpt"
        self.timings = {"capture_s": 0.0, "streams_s": 0.0, "solve_s": 0.0}
        self.sparse: torch.Tensor | None = None  # [n, T, hidden] on CPU: X̂'s stream
        self.dense: torch.Tensor | None = None  # [n, T, hidden] on CPU: X̃'s stream
        self.kwargs: dict = {}

    @torch.no_grad()
    def run(self) -> PipelineResult:
        layers, thresholds = {}, {}
        if self.input_ids is not None:
            check_uniform_layers(self.model, self.input_ids.shape[1])
            start = time.perf_counter()
            self.sparse, self.kwargs = capture_layer_inputs(self.model, self.lm, self.input_ids,
                                                            self.device)
            self.dense = self.sparse.clone() if self.two_stream else None
            self.timings["capture_s"] = time.perf_counter() - start
        count = len(self.lm.layers)
        resumed = [] if self.store is None else [i for i in range(count) if i in self.store]
        for i in _bar(self.progress, iterable=range(count), desc="pruning", unit="layer"):
            start = time.perf_counter()
            layer_reports, layer_thresholds = self._layer(i)
            layers.update(layer_reports)
            thresholds.update(layer_thresholds)
            zeros = sum(r["sparsity"] * r["shape"][0] * r["shape"][1] for r in layer_reports.values())
            numel = sum(r["shape"][0] * r["shape"][1] for r in layer_reports.values())
            logger.info("layer %d/%d: weight sparsity %.4f, %.1f s", i + 1, count, zeros / numel,
                        time.perf_counter() - start)
        return PipelineResult(layers, thresholds, self.timings, resumed)

    def _layer(self, i: int) -> tuple[dict, dict]:
        layer = self.lm.layers[i]
        home = device_of(layer)
        layer.to(self.device)
        prefix = f"model.layers.{i}."
        modules = {prefix + name: layer.get_submodule(name) for name in PROJECTIONS}
        finished = self.store is not None and i in self.store
        per_stage = (self.config.activation_rule == "threshold") + self.config.uses_inputs
        passes = self.two_stream + 1 + (0 if finished else len(self._stages()) * per_stage)
        samples = 0 if self.sparse is None else self.sparse.shape[0]
        bar = _bar(self.progress, total=passes * samples, desc=f"layer {i + 1}/{len(self.lm.layers)}",
                   leave=False)
        with bar:
            dense_inputs = self._dense_pass(layer, bar, cache=not finished)
            if finished:
                with_thresholds = self.config.activation_rule == "threshold"
                shapes = {name + ".weight": m.weight.shape for name, m in modules.items()}
                shapes |= {name: (m.in_features,) for name, m in modules.items() if with_thresholds}
                weights, thresholds, reports = self.store.load(i, shapes)
                for name, module in modules.items():
                    module.weight.copy_(weights[name + ".weight"])
            else:
                thresholds, reports = self._prune_groups(layer, prefix, modules, dense_inputs, bar)
                if self.store is not None:
                    self.store.save(i, {n + ".weight": m.weight for n, m in modules.items()},
                                    thresholds, reports)
            self._advance_sparse(layer, modules, thresholds, bar)
        layer.to(home)
        return reports, thresholds

    def _calibration_sparsity(self, thresholds: dict[str, torch.Tensor]) -> ActivationSparsity:
        """The sparsifier of the sparse stream: the final rule for DuoGPT, none for baselines."""
        if not self.two_stream:
            return ActivationSparsity()
        return ActivationSparsity(self.config.activation_sparsity, self.config.activation_rule,
                                  thresholds)

    def _samples(self, stream: torch.Tensor, bar: tqdm):
        for s in range(stream.shape[0]):
            yield s, stream[s:s + 1].to(self.device)
            bar.update()

    def _dense_pass(self, layer: nn.Module, bar: tqdm, *, cache: bool) -> list[torch.Tensor] | None:
        """Advance the dense stream through the unpruned layer; with `cache`, return the inputs
        `[n, T, k]` (CPU) of each group's first projection."""
        if self.dense is None:
            return None
        start = time.perf_counter()
        caches: list[torch.Tensor | None] = [None] * len(GROUPS)
        s = 0

        def recorder(g: int):
            def record(_module, args):
                x = args[0][0]  # [T, k] of sample s, the sample being run
                if caches[g] is None:
                    caches[g] = torch.empty(self.dense.shape[0], *x.shape, dtype=x.dtype)
                caches[g][s] = x
            return record

        handles = [layer.get_submodule(group[0]).register_forward_pre_hook(recorder(g))
                   for g, group in enumerate(GROUPS)] if cache else []
        try:
            for s, x in self._samples(self.dense, bar):
                self.dense[s] = layer_forward(layer, x, self.kwargs)[0]
        finally:
            for h in handles:
                h.remove()
        self.timings["streams_s"] += time.perf_counter() - start
        return caches if cache else None

    def _stages(self) -> list[tuple[int, ...]]:
        """The groups (indices into GROUPS) calibrated and pruned together: one at a time when
        true-sequential, else all four from one pass of the sparse stream."""
        if self.config.use_true_sequential:
            return [(g,) for g in range(len(GROUPS))]
        return [tuple(range(len(GROUPS)))]

    def _prune_groups(self, layer: nn.Module, prefix: str, modules: dict[str, nn.Module],
                      dense_inputs: list[torch.Tensor] | None, bar: tqdm) -> tuple[dict, dict]:
        thresholds, reports = {}, {}
        for stage in self._stages():
            firsts = [layer.get_submodule(GROUPS[g][0]) for g in stage]
            if self.config.activation_rule == "threshold":
                found = self._calibrate_thresholds(layer, firsts, modules, thresholds, bar)
                for g, first, t in zip(stage, firsts, found):
                    thresholds.update({prefix + name: torch.full((first.in_features,), t)
                                       for name in GROUPS[g]})
            pruners = [make_pruner(self.config, first.in_features, self.device,
                                   ", ".join(prefix + name for name in GROUPS[g]))
                       for g, first in zip(stage, firsts)]
            if self.config.uses_inputs:
                start = time.perf_counter()
                with sparsified_inputs(modules, self._calibration_sparsity(thresholds)):
                    for s, x in self._samples(self.sparse, bar):
                        inputs = module_inputs(layer, firsts, x, self.kwargs)
                        for g, pruner, X_hat in zip(stage, pruners, inputs):
                            X_tilde = None if dense_inputs is None else dense_inputs[g][s:s + 1].to(self.device)
                            pruner.add_batch(X_hat, X_tilde)
                self.timings["streams_s"] += time.perf_counter() - start
            for g, pruner in zip(stage, pruners):
                for name in GROUPS[g]:
                    reports[prefix + name] = self._prune_module(modules[prefix + name], pruner)
                pruner.free()
        return thresholds, reports

    def _prune_module(self, module: nn.Module, pruner) -> dict:
        """Prune `module.weight` in place with its group's pruner; its report."""
        start = time.perf_counter()
        weight, percdamp = pruner.prune(module.weight)
        module.weight.copy_(weight)
        seconds = time.perf_counter() - start
        self.timings["solve_s"] += seconds
        report = {"sparsity": (module.weight == 0).float().mean().item(),
                  "seconds": round(seconds, 4), "shape": list(weight.shape)}
        if percdamp is not None:
            report["damping"] = percdamp
        return report

    def _calibrate_thresholds(self, layer: nn.Module, firsts: list[nn.Module],
                              modules: dict[str, nn.Module], thresholds: dict[str, torch.Tensor],
                              bar: tqdm) -> list[float]:
        """The activation threshold of each group (by its first module) from its raw inputs on the
        sparse stream (what the pruned model feeds it, earlier groups already sparsified for
        DuoGPT)."""
        start = time.perf_counter()
        histograms = [ThresholdHistogram() for _ in firsts]
        with sparsified_inputs(modules, self._calibration_sparsity(thresholds)):
            for _, x in self._samples(self.sparse, bar):
                inputs = module_inputs(layer, firsts, x, self.kwargs, before_hooks=True)
                for histogram, X in zip(histograms, inputs):
                    histogram.add(X)
        self.timings["streams_s"] += time.perf_counter() - start
        return [h.threshold(self.config.activation_sparsity) for h in histograms]

    def _advance_sparse(self, layer: nn.Module, modules: dict[str, nn.Module],
                        thresholds: dict[str, torch.Tensor], bar: tqdm) -> None:
        if self.sparse is None:
            return
        start = time.perf_counter()
        with sparsified_inputs(modules, self._calibration_sparsity(thresholds)):
            for s, x in self._samples(self.sparse, bar):
                self.sparse[s] = layer_forward(layer, x, self.kwargs)[0]
        self.timings["streams_s"] += time.perf_counter() - start
