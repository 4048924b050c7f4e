"""duogpt: dual sparsity (pruned weights x sparse activations) for LLM decoding.

Data path: model -> calibration (two streams) -> solver -> checkpoint -> engine -> eval / bench.
"""

from duogpt import ops
from duogpt.engine import load  # also registers the `duogpt` quant_method with transformers
from duogpt.formats import BitmapWeight
from duogpt.prune import prune

__version__ = "0.1.0"

__all__ = ["BitmapWeight", "__version__", "load", "ops", "prune"]
