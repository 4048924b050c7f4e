"""Running calibration data one decoder layer at a time (docs/pruning.md, Pipeline steps 2-4).

`capture_layer_inputs` records what enters decoder layer 0 (hidden states plus the keyword
arguments the model passes every layer: rotary `position_embeddings`, the attention mask,
`position_ids`), so later layers can be run on their own. `module_inputs` runs a layer only as far
as the projections asked for and returns their inputs.
"""

from __future__ import annotations

import torch
from torch import nn

from duogpt.models import LayerMap


class _StopForward(Exception):
    """Raised by a capture hook to end a forward pass once the wanted input is recorded."""


def device_of(module: nn.Module) -> torch.device:
    """Where `module`'s first parameter (else buffer) lives; CPU for a module with neither."""
    tensor = next(module.parameters(), None)
    tensor = tensor if tensor is not None else next(module.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def check_uniform_layers(model: nn.Module, seqlen: int) -> None:
    """Refuse models whose layers get different attention masks at this sequence length.

    The pipeline reuses layer 0's arguments for every layer, which is exact when all layers use
    the same attention, or when the sliding window covers the whole calibration sequence.
    """
    config = model.config
    types = set(getattr(config, "layer_types", None) or ())
    window = getattr(config, "sliding_window", None)
    if len(types) > 1 and window is not None and seqlen > window:
        raise ValueError(f"the model mixes attention types {sorted(types)} and --seqlen {seqlen} "
                         f"exceeds its sliding window {window}; use --seqlen {window} or less")


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, lm: LayerMap, input_ids: torch.Tensor,
                         device: torch.device) -> tuple[torch.Tensor, dict]:
    """The hidden states entering decoder layer 0 and the keyword arguments every layer gets.

    Only the embedding and the rotary module run, on `device`, and go back where they were.

    Args:
        model: the causal LM (its layers may stay on any device).
        lm: its LayerMap.
        input_ids: `[n, T]` int64 calibration windows.
        device: where the embedding runs.

    Returns:
        `(hidden [n, T, hidden] in the embedding's dtype on CPU, kwargs)`: the kwargs (for one
        window, identical for all windows of length T) live on `device`.
    """
    records = []

    def catch(_module, args, kwargs):
        records.append((args[0] if args else kwargs["hidden_states"], kwargs))
        raise _StopForward

    homes = [(m, device_of(m)) for m in (lm.embed_tokens, lm.rotary_emb)]
    handle = lm.layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    hidden = None
    try:
        for m, _ in homes:
            m.to(device)
        for s in range(input_ids.shape[0]):
            try:
                model(input_ids[s:s + 1].to(device), use_cache=False)
            except _StopForward:
                pass
            x, kwargs = records.pop()
            if hidden is None:
                hidden = torch.empty(input_ids.shape[0], *x.shape[1:], dtype=x.dtype)
            hidden[s] = x[0]
    finally:
        handle.remove()
        for m, home in homes:
            m.to(home)
    kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
    return hidden, kwargs


def layer_forward(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """`layer(hidden, **kwargs)` as a tensor (some transformers versions return a tuple)."""
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def module_inputs(layer: nn.Module, modules: list[nn.Module], hidden: torch.Tensor, kwargs: dict, *,
                  before_hooks: bool = False) -> list[torch.Tensor]:
    """The inputs of `modules` (submodules of `layer`, in any order) when `hidden` enters `layer`.

    The forward stops once the last of them is reached, so nothing after it runs.

    Args:
        before_hooks: record each input before the module's other forward pre-hooks (for example
            the activation sparsifier) change it; by default it is recorded after them.

    Returns:
        one tensor per module, in the order of `modules`.
    """
    captured: dict[int, torch.Tensor] = {}

    def catcher(i: int):
        def catch(_module, args):
            captured[i] = args[0]
            if len(captured) == len(modules):
                raise _StopForward
        return catch

    handles = [m.register_forward_pre_hook(catcher(i), prepend=before_hooks)
               for i, m in enumerate(modules)]
    try:
        layer(hidden, **kwargs)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [type(m).__name__ for i, m in enumerate(modules) if i not in captured]
    if missing:
        raise RuntimeError(f"{type(layer).__name__} never called {', '.join(missing)}; the decoder "
                           f"layer does not use the LLaMA projections")
    return [captured[i] for i in range(len(modules))]
