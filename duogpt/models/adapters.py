"""Where the parts of a LLaMA-layout decoder live: architectures are data, not code.

Every supported model has `model.model.embed_tokens`, `model.model.layers[i]` with
`self_attn.{q,k,v,o}_proj` and `mlp.{gate,up,down}_proj`, `model.model.norm`,
`model.model.rotary_emb` (rotary `position_embeddings` passed to each layer) and `model.lm_head`.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging

from torch import nn

# The seven projections whose weights are pruned and whose inputs are sparsified, in the
# input-sharing groups the solver processes in order (docs/pruning.md, Pipeline step 4).
GROUPS: tuple[tuple[str, ...], ...] = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
PROJECTIONS: tuple[str, ...] = tuple(name for group in GROUPS for name in group)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclasses.dataclass(frozen=True)
class LayerMap:
    """Handles on the parts of one loaded model that the layer-by-layer pipeline needs."""

    embed_tokens: nn.Module
    layers: nn.ModuleList
    norm: nn.Module
    rotary_emb: nn.Module
    lm_head: nn.Module
    groups: tuple[tuple[str, ...], ...] = GROUPS

    def projections(self, layer_index: int) -> dict[str, nn.Linear]:
        """`{"self_attn.q_proj": Linear, ...}` for one decoder layer, in PROJECTIONS order."""
        layer = self.layers[layer_index]
        return {name: layer.get_submodule(name) for name in PROJECTIONS}

    def named_projections(self) -> dict[str, nn.Linear]:
        """Every projection of the model by its full module name (`model.layers.3.mlp.up_proj`)."""
        return {f"model.layers.{i}.{name}": lin for i in range(len(self.layers))
                for name, lin in self.projections(i).items()}


def cache_argument(model: nn.Module) -> str:
    """The keyword under which `model`'s forward takes its KV cache, and the key of the cache in its
    output: `cache` in transformers 5.24 and later, which deprecate `past_key_values` (to be removed
    in 5.40); `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def warn_past_context(model: nn.Module, tokens: int, what: str) -> None:
    """Log a warning when `tokens` exceeds the model's trained context (`max_position_embeddings`):
    the run works, but past it the model's outputs, and what is measured on them, degrade."""
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if context is not None and tokens > context:
        logging.getLogger("duogpt").warning("%s of %d tokens exceeds the model's context of %d "
                                            "(max_position_embeddings)", what, tokens, context)


def layer_map(model: nn.Module) -> LayerMap:
    """The LayerMap of a Hugging Face causal LM with the LLaMA decoder layout.

    Raises:
        ValueError: naming what is missing, for architectures without that layout.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    try:
        inner = model.get_submodule("model")
        lm = LayerMap(inner.embed_tokens, inner.layers, inner.norm, inner.rotary_emb,
                      model.get_submodule("lm_head"))
        problem = next((f"{name} is a {type(lin).__name__}, not nn.Linear"
                        for name, lin in lm.projections(0).items() if not isinstance(lin, nn.Linear)),
                       None)
    except AttributeError as err:
        problem = str(err)
    if problem is not None:
        raise ValueError(
            f"model type {model_type!r} does not have the LLaMA decoder layout duogpt prunes "
            f"(model.embed_tokens, model.layers[i].self_attn.{{q,k,v,o}}_proj, "
            f"mlp.{{gate,up,down}}_proj, model.norm, model.rotary_emb, lm_head): {problem}. "
            f"Supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}."
        )
    return lm

