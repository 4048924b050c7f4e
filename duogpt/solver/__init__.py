"""Pruning solvers and the layer-by-layer pipeline that drives them.

`OBSSolver` (DuoGPT, and SparseGPT with one stream), `WandaPruner` and `MagnitudePruner` share one
interface: `add_batch(X_hat, X_tilde=None)`, `prune(W) -> Pruned`, `free()`.
"""

from duogpt.solver.baselines import MagnitudePruner, WandaPruner
from duogpt.solver.masks import WeightSparsity
from duogpt.solver.obs import OBSSolver, Pruned

__all__ = ["MagnitudePruner", "OBSSolver", "Pruned", "WandaPruner", "WeightSparsity"]
