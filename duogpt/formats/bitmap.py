"""`BitmapWeight`: a pruned `[out, in]` weight in the bitmap format of docs/format.md."""

from __future__ import annotations

import dataclasses

import torch

from duogpt import _native
from duogpt.ops._checks import FLOAT_DTYPES
from duogpt.ops.bitmap import packed_sizes

FORMAT_VERSION = 1


# eq=False: equality of tensors is elementwise, so two weights compare by identity.
@dataclasses.dataclass(frozen=True, eq=False)
class BitmapWeight:
    """A pruned linear weight, stored input-channel-major so zero activations skip whole columns.

    Attributes:
        bitmap: `[in, ceil(out/32)]` int32 words; bit `r % 32` of word `r // 32` of channel j is
            set iff `W[r, j] != 0`.
        values: `[nnz]` float16/bfloat16/float32 non-zeros, channel by channel, rows ascending.
        offsets: `[in * ceil(out/1024) + 1]` int32 start of each (channel, 1024-row tile) in values.
        shape: `(out, in)` of the dense weight.
    """

    bitmap: torch.Tensor
    values: torch.Tensor
    offsets: torch.Tensor
    shape: tuple[int, int]

    @classmethod
    def from_dense(cls, w: torch.Tensor, dtype: torch.dtype | None = None) -> BitmapWeight:
        """Pack a dense `[out, in]` weight (CPU or CUDA); values are stored in `dtype`, default
        `w.dtype`. Zeros are decided after the cast, so a weight that underflows is not stored."""
        if w.dim() != 2:
            raise ValueError(f"expected a 2-D [out, in] weight, got shape {tuple(w.shape)}")
        dtype = w.dtype if dtype is None else dtype
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"values dtype must be one of {FLOAT_DTYPES}, got {dtype}")
        bitmap, values, offsets = torch.ops.duogpt.bitmap_pack(w.detach().to(dtype).contiguous())
        return cls(bitmap, values, offsets, (w.shape[0], w.shape[1]))

    def to_dense(self) -> torch.Tensor:
        """The dense `[out, in]` weight in `self.dtype`, on `self.device` (exact round trip)."""
        return torch.ops.duogpt.bitmap_unpack(self.bitmap, self.values, self.offsets, self.shape[0])

    def to(self, device: torch.device | str) -> BitmapWeight:
        """The same weight on `device`. The values dtype is fixed at packing time."""
        if isinstance(device, torch.dtype):
            raise TypeError(f"BitmapWeight.to takes a device, not a dtype ({device}); to store the "
                            f"values in another dtype, repack: BitmapWeight.from_dense(w.to_dense(), "
                            f"{device})")
        return BitmapWeight(self.bitmap.to(device), self.values.to(device),
                            self.offsets.to(device), self.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def nbytes(self) -> int:
        """Bytes of the packed representation (bitmap + values + offsets)."""
        return sum(t.numel() * t.element_size() for t in (self.bitmap, self.values, self.offsets))

    @property
    def density(self) -> float:
        """Fraction of non-zero weights."""
        return self.values.numel() / (self.shape[0] * self.shape[1])

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Tensors for a checkpoint: `{prefix}bitmap`, `values`, `offsets` and `shape` (int64 [2])."""
        return {f"{prefix}bitmap": self.bitmap, f"{prefix}values": self.values,
                f"{prefix}offsets": self.offsets,
                f"{prefix}shape": torch.tensor(self.shape, dtype=torch.int64)}

    def __reduce__(self):
        # torch.save pickles the state_dict, and torch.load rebuilds it through from_state_dict:
        # its default weights_only unpickler accepts that (registered below), and the tensors of
        # an untrusted file are validated like a checkpoint's before any kernel reads them.
        return _from_pickle, (self.state_dict(), FORMAT_VERSION)

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], prefix: str = "",
                        format_version: int = FORMAT_VERSION) -> BitmapWeight:
        """Rebuild from `state_dict()` output, validating every size and offset (a corrupted or
        truncated checkpoint raises ValueError rather than feeding garbage to a kernel)."""
        if format_version != FORMAT_VERSION:
            raise ValueError(f"bitmap format version {format_version} is not supported by this "
                             f"duogpt (it reads version {FORMAT_VERSION}); upgrade duogpt")
        try:
            bitmap, values, offsets, shape = (tensors[prefix + key] for key in
                                              ("bitmap", "values", "offsets", "shape"))
        except KeyError as err:
            raise ValueError(f"packed weight {prefix!r} is missing tensor {err.args[0]!r}") from None
        n, k = (int(s) for s in shape.tolist())
        words, tiles = packed_sizes(n, k)
        expected = {"bitmap": ((k, words), torch.int32), "offsets": ((k * tiles + 1,), torch.int32)}
        for key, t in (("bitmap", bitmap), ("offsets", offsets)):
            want_shape, want_dtype = expected[key]
            if tuple(t.shape) != want_shape or t.dtype != want_dtype:
                raise ValueError(f"packed weight {prefix!r}: {key} is {t.dtype} "
                                 f"{tuple(t.shape)}, expected {want_dtype} {want_shape}")
        if values.dim() != 1 or values.dtype not in FLOAT_DTYPES:
            raise ValueError(f"packed weight {prefix!r}: values must be 1-D float, got "
                             f"{values.dtype} {tuple(values.shape)}")
        bitmap, offsets = bitmap.contiguous(), offsets.contiguous()
        bitmap_cpu, offsets_cpu = bitmap.cpu(), offsets.cpu()  # named: they must outlive the call
        _native.lib().bitmap_validate_cpu(bitmap_cpu.data_ptr(), offsets_cpu.data_ptr(), n, k,
                                          values.numel())
        return cls(bitmap, values.contiguous(), offsets, (n, k))


def _from_pickle(tensors: dict[str, torch.Tensor], format_version: int) -> BitmapWeight:
    return BitmapWeight.from_state_dict(tensors, format_version=format_version)


torch.serialization.add_safe_globals([_from_pickle])
