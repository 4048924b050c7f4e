"""transformers integration: `AutoModelForCausalLM.from_pretrained(PACKED)` after `import duogpt`.

`register` runs as soon as transformers has executed its quantizer registry (transformers_hook.py),
so this module imports only what that registry has already imported.

transformers reads `quantization_config.quant_method == "duogpt"` from config.json and hands the
model skeleton (on `meta`) to `DuoGPTQuantizer`, which replaces the seven projections of every
layer by `SparseLinear` modules sized from the safetensors headers; transformers then loads the
packed tensors into them. After loading, every packed weight is validated and nothing may be left
unloaded: a checkpoint missing a tensor, or with a corrupted one, raises ValueError instead of
returning a model with random weights (what transformers does with an unregistered
`quant_method`: it loads the folder as dense and leaves the projections randomly initialised).
"""

from __future__ import annotations

import torch
from safetensors import safe_open
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer  # `transformers.quantizers` may still be importing
from transformers.utils.quantization_config import QuantizationConfigMixin

from duogpt.engine.packing import QUANT_METHOD
from duogpt.engine.sparse_linear import PACKED_KEYS, SparseLinear, sparse_projections
from duogpt.formats.bitmap import FORMAT_VERSION
from duogpt.models import layer_map
from duogpt.sparsity import ActivationSparsity

_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I32": torch.int32, "I64": torch.int64}


class DuoGPTConfig(QuantizationConfigMixin):
    """The `quantization_config` of a packed folder (written by `duogpt.engine.pack_checkpoint`).

    Args:
        format: "bitmap" (docs/format.md).
        format_version: the bitmap format version; unknown versions are refused.
        activation_sparsity: `{"fraction": p_a, "rule": "topk" | "threshold"}`; the threshold
            rule's per-projection thresholds are stored beside each packed weight.
    """

    def __init__(self, format: str = "bitmap", format_version: int = FORMAT_VERSION,
                 activation_sparsity: dict | None = None, **kwargs):
        if format != "bitmap" or format_version != FORMAT_VERSION:
            raise ValueError(f"packed format {format!r} version {format_version} is not supported by "
                             f"this duogpt (it reads 'bitmap' version {FORMAT_VERSION}); upgrade duogpt")
        self.quant_method = QUANT_METHOD
        self.format, self.format_version = format, format_version
        self.activation_sparsity = dict(activation_sparsity or {"fraction": 0.0, "rule": "topk"})

    def sparsity(self) -> ActivationSparsity:
        """The activation rule (thresholds, for that rule, are loaded as module buffers)."""
        return ActivationSparsity(self.activation_sparsity["fraction"], self.activation_sparsity["rule"])


def _header(checkpoint_files: list[str]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """`{tensor name: (shape, dtype)}` over all checkpoint files, read without loading data."""
    header = {}
    for file in checkpoint_files:
        with safe_open(file, "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                view = f.get_slice(key)
                header[key] = (tuple(view.get_shape()), _SAFETENSORS_DTYPES.get(view.get_dtype()))
    return header


class DuoGPTQuantizer(HfQuantizer):
    """Loads packed duogpt checkpoints (pre-packed only: transformers cannot prune on load)."""

    requires_calibration = True

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        header = _header(checkpoint_files or [])
        lm = layer_map(model)
        for name, linear in lm.named_projections().items():
            for key in PACKED_KEYS:
                if f"{name}.{key}" not in header:
                    raise ValueError(f"packed checkpoint has no {name}.{key}: it is incomplete or "
                                     f"not a duogpt packed folder; re-create it with `duogpt pack`")
            module = SparseLinear(linear.in_features, linear.out_features,
                                  header[f"{name}.weight"][0][0], dtype=header[f"{name}.weight"][1],
                                  bias=linear.bias is not None, device="meta")
            for key in (*PACKED_KEYS, "bias", "threshold"):  # adopt the stored shapes and dtypes
                if f"{name}.{key}" in header:
                    shape, dtype = header[f"{name}.{key}"]
                    setattr(module, key, torch.empty(shape, dtype=dtype, device="meta"))
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module)
        tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
        missing = sorted(k for k in model.state_dict() if k not in header and k not in tied)
        if missing:
            raise ValueError(f"packed checkpoint is missing {len(missing)} tensors (first: "
                             f"{missing[:3]}); it is incomplete: re-create it with `duogpt pack`")
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        sparsity = self.quantization_config.sparsity()
        for name, module in sparse_projections(model).items():
            for key, tensor in module.named_buffers(recurse=False):
                if tensor.is_meta:
                    raise ValueError(f"{name}.{key} was not loaded from the packed checkpoint")
            try:
                module.packed()  # validates bitmap, offsets and the value count against each other
            except ValueError as err:
                raise ValueError(f"packed checkpoint is corrupted at {name}: {err}") from None
            if sparsity.rule == "threshold" and sparsity.active:
                if module.threshold is None:
                    raise ValueError(f"{name} has no stored threshold for the threshold rule")
                module.topk_fraction = None
            else:
                module.set_activation_rule(sparsity, name)
        return model

    def is_serializable(self):
        return False

    @property
    def is_trainable(self):
        return False

    @property
    def is_compileable(self):
        return True


def register() -> None:
    """Register the `duogpt` quant_method with transformers (idempotent; see transformers_hook.py)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(DuoGPTConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(DuoGPTQuantizer)
