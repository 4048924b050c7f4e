"""`import duogpt` registers the `duogpt` quant_method with transformers without importing it.

Importing transformers' model code takes seconds (on a 2-core VM `import duogpt` took 5-6 s with it
and 1.4-1.9 s without), and the kernels, the bitmap format and `duogpt env` never need it. Yet after `import duogpt`,
`AutoModelForCausalLM.from_pretrained(PACKED)` must find duogpt's quantizer, and transformers skips
a quant_method it does not know. So `quantizer.register` runs when transformers has executed its
quantizer registry, `transformers.quantizers.auto`: at once if it already has, otherwise right after
it does, from an import hook that removes itself at its first use.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

REGISTRY = "transformers.quantizers.auto"


def _register() -> None:
    from duogpt.engine.quantizer import register

    register()


class _AfterRegistry(importlib.abc.MetaPathFinder):
    """Finds the registry as the other finders would, and registers once it has executed."""

    def find_spec(self, fullname, path, target=None):
        if fullname != REGISTRY:
            return None
        sys.meta_path.remove(self)  # first: the lookup below goes through sys.meta_path again
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisterAfter(spec.loader)
        return spec


class _RegisterAfter:
    """Stands in for the registry's loader while it executes the module, then hands the module back.

    A wrapper rather than a patched `exec_module` on the loader itself: loaders of some
    environments (frozen or compiled applications) take no new attributes.
    """

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = module.__spec__.loader = self.loader  # leave no trace of the wrapper
        self.loader.exec_module(module)
        _register()


def register_with_transformers() -> None:
    """Register now if transformers has its quantizer registry, else as soon as it loads it."""
    if REGISTRY in sys.modules:
        _register()
    elif not any(isinstance(finder, _AfterRegistry) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterRegistry())
