"""The sparse inference engine: packed checkpoints, `SparseLinear`, loading and the decode loop."""

from duogpt.engine.loading import load
from duogpt.engine.packing import pack_checkpoint, save_packed
from duogpt.engine.sparse_linear import SparseLinear, convert_for_runtime, set_activation_sparsity
from duogpt.engine.transformers_hook import register_with_transformers

register_with_transformers()

__all__ = ["SparseLinear", "convert_for_runtime", "load", "pack_checkpoint", "save_packed",
           "set_activation_sparsity"]
