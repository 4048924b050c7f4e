"""Models: loading (hub id, local folder, or the embedded SmolLM2 alias) and the LLaMA layer map."""

from duogpt.models.adapters import PROJECTIONS, LayerMap, layer_map
from duogpt.models.loading import DEFAULT_MODEL, load_model, load_tokenizer

__all__ = ["DEFAULT_MODEL", "PROJECTIONS", "LayerMap", "layer_map", "load_model", "load_tokenizer"]
