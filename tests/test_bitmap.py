"""The bitmap format (docs/format.md): packing, unpacking, validation and BitmapWeight."""

from __future__ import annotations

import pytest
import torch

from duogpt import BitmapWeight
from duogpt.ops import reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 1), (1, 77), (31, 5), (33, 64), (1023, 3), (1025, 17), (2100, 9)]


def random_sparse(n: int, k: int, sparsity: float, dtype=torch.float32) -> torch.Tensor:
    w = torch.randn(n, k)
    w[torch.rand(n, k) < sparsity] = 0
    return w.to(dtype)


def test_golden_matrix_worked_by_hand():
    w = torch.tensor([[1.0, 0.0],
                      [0.0, 2.0],
                      [3.0, 4.0]])
    bw = BitmapWeight.from_dense(w)
    # channel 0 holds rows 0 and 2 (bits 0b101), channel 1 rows 1 and 2 (0b110)
    assert bw.bitmap.tolist() == [[0b101], [0b110]]
    assert bw.values.tolist() == [1.0, 3.0, 2.0, 4.0]
    assert bw.offsets.tolist() == [0, 2, 4]
    assert bw.shape == (3, 2) and bw.density == 4 / 6
    assert bw.nbytes == 2 * 4 + 4 * 4 + 3 * 4  # bitmap words, fp32 values, offsets


def test_offsets_are_per_1024_row_tile():
    w = torch.zeros(2049, 1)
    w[[0, 1023, 1024, 2048], 0] = 1.0
    bw = BitmapWeight.from_dense(w)
    assert bw.offsets.tolist() == [0, 2, 3, 4]  # tiles [0,1024) [1024,2048) [2048,2049)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
def test_pack_matches_reference_and_round_trips(shape, dtype, sparsity):
    w = random_sparse(*shape, sparsity, dtype)
    bw = BitmapWeight.from_dense(w)
    for got, want in zip((bw.bitmap, bw.values, bw.offsets), reference.bitmap_pack(w)):
        assert torch.equal(got, want)
    assert torch.equal(bw.to_dense(), w)
    assert torch.equal(reference.bitmap_unpack(bw.bitmap, bw.values, bw.offsets, shape[0]), w)
    assert bw.dtype == dtype and bw.values.numel() == int((w != 0).sum())


def test_signed_zero_is_not_stored_and_nan_is():
    w = torch.tensor([[-0.0, float("nan")], [1.0, 0.0]])
    bw = BitmapWeight.from_dense(w)
    assert bw.values.numel() == 2
    back = bw.to_dense()
    assert back[0, 1].isnan() and back[1, 0] == 1 and back[0, 0] == 0 and back[1, 1] == 0


def test_values_dtype_is_chosen_at_pack_time():
    w = random_sparse(64, 48, 0.5)
    bw = BitmapWeight.from_dense(w, dtype=torch.bfloat16)
    assert bw.dtype == torch.bfloat16
    assert torch.equal(bw.to_dense(), w.to(torch.bfloat16))


def test_half_precision_at_50_percent_costs_at_most_1_14_bytes_per_weight():
    w = random_sparse(4096, 512, 0.5, torch.float16)
    bw = BitmapWeight.from_dense(w)
    assert bw.nbytes / w.numel() <= 1.14
    assert abs(bw.density - 0.5) < 0.01


@pytest.mark.parametrize("shape", [(100, 30), (2100, 9)], ids=["one-tile", "three-tiles"])
def test_state_dict_round_trip(shape):
    w = random_sparse(*shape, 0.5, torch.float16)
    bw = BitmapWeight.from_dense(w)
    back = BitmapWeight.from_state_dict(bw.state_dict("layer."), "layer.", format_version=1)  # docs/format.md
    assert back.shape == bw.shape and torch.equal(back.to_dense(), w)
    assert back.to("cpu").nbytes == bw.nbytes


def test_a_state_dict_of_strided_tensors_is_read():
    bw = BitmapWeight.from_dense(random_sparse(70, 20, 0.5))
    strided = {key: torch.stack([t, t], -1)[..., 0] if t.dim() else t for key, t in bw.state_dict().items()}
    assert not strided["bitmap"].is_contiguous()
    assert torch.equal(BitmapWeight.from_state_dict(strided).to_dense(), bw.to_dense())


def test_packing_keeps_no_autograd_graph():
    w = random_sparse(40, 8, 0.5).requires_grad_()
    assert not BitmapWeight.from_dense(w).values.requires_grad


@pytest.mark.parametrize("corrupt, message", [
    (lambda sd: sd.update(values=sd["values"][:-1]), "offsets end at"),
    (lambda sd: sd["offsets"].__setitem__(1, sd["offsets"][1] + 1), "but the bits before it count"),
    (lambda sd: sd["bitmap"].__setitem__((0, -1), -1), "past row"),
    (lambda sd: sd.update(bitmap=sd["bitmap"][:, :1]), "bitmap is"),
    (lambda sd: sd.pop("offsets"), "missing tensor"),
    (lambda sd: sd.update(values=sd["values"].int()), "values must be 1-D float"),
    (lambda sd: sd.update(values=sd["values"][:, None]), "values must be 1-D float"),
], ids=["truncated-values", "offset-mismatch", "padding-bits", "bitmap-shape", "missing", "int-values",
        "2-D-values"])
def test_corrupted_state_dict_is_rejected(corrupt, message):
    sd = BitmapWeight.from_dense(random_sparse(70, 20, 0.5)).state_dict()
    corrupt(sd)
    with pytest.raises(ValueError, match=message):
        BitmapWeight.from_state_dict(sd)


def test_torch_save_and_load_round_trip_under_weights_only(tmp_path):
    """torch.load's default (weights_only=True) reads a saved BitmapWeight, alone or in a dict."""
    w = random_sparse(100, 30, 0.5, torch.bfloat16)
    torch.save({"w": BitmapWeight.from_dense(w)}, tmp_path / "w.pt")
    back = torch.load(tmp_path / "w.pt", weights_only=True)["w"]
    assert isinstance(back, BitmapWeight) and back.dtype == torch.bfloat16
    assert torch.equal(back.to_dense(), w)


def test_a_loaded_pickle_is_validated_before_any_kernel_reads_it(tmp_path):
    bw = BitmapWeight.from_dense(random_sparse(70, 20, 0.5))
    corrupt = BitmapWeight(bw.bitmap, bw.values[:-1], bw.offsets, bw.shape)  # no checks on this path
    torch.save(corrupt, tmp_path / "w.pt")
    with pytest.raises(ValueError, match="offsets end at"):
        torch.load(tmp_path / "w.pt")


def test_offsets_that_wrapped_past_int32_are_rejected():
    """2^32 set bits with no values: the offsets' int32 prefix sums wrap back to 0 at the end, so
    tile-by-tile differences agree with the popcounts (512 MiB of bitmap)."""
    k = 2**22  # 1024 rows a channel, every bit set
    offsets = (torch.arange(k + 1, dtype=torch.int64) * 1024).remainder(2**32)
    offsets = torch.where(offsets >= 2**31, offsets - 2**32, offsets).to(torch.int32)
    sd = {"bitmap": torch.full((k, 32), -1, dtype=torch.int32), "offsets": offsets,
          "values": torch.empty(0, dtype=torch.float16), "shape": torch.tensor([1024, k])}
    with pytest.raises(ValueError, match="starts at value -2147483648 but the bits before it count 2147483648"):
        BitmapWeight.from_state_dict(sd)


def test_unknown_format_version_is_rejected():
    sd = BitmapWeight.from_dense(random_sparse(8, 8, 0.5)).state_dict()
    with pytest.raises(ValueError, match="version 2"):
        BitmapWeight.from_state_dict(sd, format_version=2)


def test_bad_inputs_get_clear_errors():
    with pytest.raises(ValueError, match="2-D"):
        BitmapWeight.from_dense(torch.zeros(3, 4, 5))
    with pytest.raises(ValueError, match="values dtype"):
        BitmapWeight.from_dense(torch.zeros(3, 4, dtype=torch.int32))
    with pytest.raises(TypeError, match="w must have dtype"):
        torch.ops.duogpt.bitmap_pack(torch.zeros(3, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="contiguous"):
        torch.ops.duogpt.bitmap_pack(torch.zeros(4, 3).t())


@pytest.mark.parametrize("args, error, message", [
    (lambda bw: (bw.bitmap, bw.values, bw.offsets, 40), ValueError, "out_features=40 needs 2"),
    (lambda bw: (bw.bitmap[:, :0], bw.values, bw.offsets[:1], 0), ValueError,
     "out_features must be positive, got 0"),
    (lambda bw: (bw.bitmap.float(), bw.values, bw.offsets, 70), TypeError, "bitmap must have dtype"),
    (lambda bw: (bw.bitmap, bw.values.double(), bw.offsets, 70), TypeError, "values must have dtype"),
    (lambda bw: (bw.bitmap, bw.values, bw.offsets.long(), 70), TypeError, "offsets must have dtype"),
    (lambda bw: (bw.bitmap, bw.values, bw.offsets[:, None], 70), ValueError, "offsets must be 1-D"),
    (lambda bw: (bw.bitmap, bw.values, bw.offsets[:-1], 70), ValueError, "offsets has"),
], ids=["bitmap-words", "no-rows", "bitmap-dtype", "values-dtype", "offsets-dtype", "2-D-offsets",
        "offsets-count"])
def test_unpack_rejects_packed_tensors_of_the_wrong_kind_or_size(args, error, message):
    """The raw op states its contract before the kernel reads anything."""
    bw = BitmapWeight.from_dense(random_sparse(70, 20, 0.5))
    with pytest.raises(error, match=message):
        torch.ops.duogpt.bitmap_unpack(*args(bw))


def test_packed_tensors_on_two_devices_are_refused():
    """The meta device stands in for a second device."""
    bw = BitmapWeight.from_dense(random_sparse(70, 20, 0.5))
    with pytest.raises(ValueError, match="values is on meta but bitmap is on cpu"):
        torch.ops.duogpt.bitmap_unpack(bw.bitmap, bw.values.to("meta"), bw.offsets, 70)


def test_the_fake_kernels_refuse_what_the_cpu_kernels_refuse():
    """torch.compile traces the ops through their fake kernels (run here on the meta device)."""
    meta = BitmapWeight.from_dense(random_sparse(70, 20, 0.5)).to("meta")
    with pytest.raises(ValueError, match="out_features=40 needs 2"):
        torch.ops.duogpt.bitmap_unpack(meta.bitmap, meta.values, meta.offsets, 40)
    with pytest.raises(TypeError, match="w must have dtype"):
        torch.ops.duogpt.bitmap_pack(torch.zeros(3, 4, dtype=torch.float64, device="meta"))


def test_to_takes_a_device_and_keeps_the_values_dtype():
    w = BitmapWeight.from_dense(random_sparse(40, 12, 0.5))
    assert torch.equal(w.to("cpu").to_dense(), w.to_dense())
    with pytest.raises(TypeError, match=r"repack: BitmapWeight.from_dense\(w.to_dense\(\), torch.float16\)"):
        w.to(torch.float16)


def test_weights_compare_by_identity():
    w = BitmapWeight.from_dense(random_sparse(40, 12, 0.5))
    twin = BitmapWeight.from_dense(w.to_dense())
    assert w != twin and len({w, w, twin}) == 2


def test_non_contiguous_weight_is_packed_from_a_copy():
    w = random_sparse(12, 40, 0.5).t()
    assert torch.equal(BitmapWeight.from_dense(w).to_dense(), w)


def test_opcheck():
    w = random_sparse(40, 12, 0.5)
    bitmap, values, offsets = torch.ops.duogpt.bitmap_pack(w)
    torch.library.opcheck(torch.ops.duogpt.bitmap_unpack, (bitmap, values, offsets, 40))
    torch.library.opcheck(torch.ops.duogpt.bitmap_pack, (w,),
                          test_utils=("test_schema", "test_autograd_registration"))
