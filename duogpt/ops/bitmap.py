"""Bitmap packing ops (docs/format.md): dense `[n, k]` weight <-> (bitmap, values, offsets)."""

from __future__ import annotations

import torch

from duogpt import _native
from duogpt.ops._checks import FLOAT_DTYPES, check_same_device, check_tensor, require
from duogpt.ops._library import define
from duogpt.ops.reference import TILE_ROWS, WORD_BITS


def packed_sizes(n: int, k: int) -> tuple[int, int]:
    """`(bitmap words per channel, offset tiles per channel)` of an `[n, k]` weight."""
    return -(-n // WORD_BITS), -(-n // TILE_ROWS)


def _check_pack(w: torch.Tensor) -> None:
    check_tensor(w, "w", dtypes=FLOAT_DTYPES, dim=2)


def _check_unpack(bitmap, values, offsets, out_features: int) -> None:
    check_tensor(bitmap, "bitmap", dtypes=(torch.int32,), dim=2)
    check_tensor(values, "values", dtypes=FLOAT_DTYPES, dim=1)
    check_tensor(offsets, "offsets", dtypes=(torch.int32,), dim=1)
    check_same_device(("bitmap", bitmap), ("values", values), ("offsets", offsets))
    k = bitmap.shape[0]
    words, tiles = packed_sizes(out_features, k)
    require(out_features > 0, lambda: f"out_features must be positive, got {out_features}")
    require(bitmap.shape[1] == words, lambda: f"bitmap has {bitmap.shape[1]} words per "
            f"channel but out_features={out_features} needs {words}")
    require(offsets.shape[0] == k * tiles + 1, lambda: f"offsets has {offsets.shape[0]} "
            f"entries, expected in_features * tiles + 1 = {k * tiles + 1}")


def _pack_fake(w):
    _check_pack(w)
    n, k = w.shape
    words, tiles = packed_sizes(n, k)
    nnz = torch.library.get_ctx().new_dynamic_size()
    return (w.new_empty(k, words, dtype=torch.int32), w.new_empty(nnz),
            w.new_empty(k * tiles + 1, dtype=torch.int32))


def _pack(w, index, fill):
    """Two passes: `index` writes bitmap and offsets and returns nnz, `fill` copies the values."""
    n, k = w.shape
    words, tiles = packed_sizes(n, k)
    bitmap = w.new_empty(k, words, dtype=torch.int32)
    offsets = w.new_empty(k * tiles + 1, dtype=torch.int32)
    nnz = index(bitmap, offsets)
    values = w.new_empty(nnz)
    fill(offsets, values)
    return bitmap, values, offsets


def _pack_cpu(w):
    _check_pack(w)
    C, code = _native.lib(), _native.dtype_code(w)
    n, k = w.shape
    return _pack(
        w,
        lambda bitmap, offsets: C.bitmap_index_cpu(w.data_ptr(), code, n, k, bitmap.data_ptr(),
                                                   offsets.data_ptr()),
        lambda offsets, values: C.bitmap_fill_cpu(w.data_ptr(), code, n, k, offsets.data_ptr(),
                                                  values.data_ptr()),
    )


def _pack_cuda(w):
    _check_pack(w)
    C, code = _native.cuda_lib(w.device), _native.dtype_code(w)
    n, k = w.shape
    with torch.cuda.device(w.device):
        s = _native.stream(w)

        def index(bitmap, offsets):
            nnz = torch.empty(1, dtype=torch.int64, device=w.device)
            C.bitmap_index_cuda(w.data_ptr(), code, n, k, bitmap.data_ptr(), offsets.data_ptr(),
                                nnz.data_ptr(), s)
            count = int(nnz.item())  # the value count sizes the output: one host sync
            require(count < 2**31, lambda: f"the weight has {count} non-zeros; the "
                    "bitmap format's int32 offsets hold fewer than 2^31: split the matrix")
            return count

        return _pack(
            w, index,
            lambda offsets, values: C.bitmap_fill_cuda(w.data_ptr(), code, n, k, offsets.data_ptr(),
                                                       values.numel(), values.data_ptr(), s),
        )


def _unpack_fake(bitmap, values, offsets, out_features):
    _check_unpack(bitmap, values, offsets, out_features)
    return values.new_empty(out_features, bitmap.shape[0])


def _unpack_cpu(bitmap, values, offsets, out_features):
    _check_unpack(bitmap, values, offsets, out_features)
    w = values.new_empty(out_features, bitmap.shape[0])
    _native.lib().bitmap_unpack_cpu(bitmap.data_ptr(), values.data_ptr(), offsets.data_ptr(),
                                    _native.dtype_code(values), out_features, bitmap.shape[0],
                                    values.numel(), w.data_ptr())
    return w


def _unpack_cuda(bitmap, values, offsets, out_features):
    _check_unpack(bitmap, values, offsets, out_features)
    C = _native.cuda_lib(values.device)
    w = values.new_empty(out_features, bitmap.shape[0])
    with torch.cuda.device(values.device):
        C.bitmap_unpack_cuda(bitmap.data_ptr(), values.data_ptr(), offsets.data_ptr(),
                             _native.dtype_code(values), out_features, bitmap.shape[0],
                             values.numel(), w.data_ptr(), _native.stream(values))
    return w


define("bitmap_pack(Tensor w) -> (Tensor bitmap, Tensor values, Tensor offsets)",
       fake=_pack_fake, cpu=_pack_cpu, cuda=_pack_cuda)
define("bitmap_unpack(Tensor bitmap, Tensor values, Tensor offsets, int out_features) -> Tensor",
       fake=_unpack_fake, cpu=_unpack_cpu, cuda=_unpack_cuda)
