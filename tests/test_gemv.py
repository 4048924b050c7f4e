"""The decode GEMVs: `spmspv` (bitmap weight x sparsified activations) and `dense_gemv`, on every
CPU instruction set this machine supports, against the pure-PyTorch reference."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import types
from pathlib import Path

import pytest
import torch
from oracles import assert_close_to_exact, assert_dropped_channels_are_never_read
from test_package import run_python

from duogpt import BitmapWeight, _native, ops
from duogpt.ops import reference
from duogpt.ops.gemv import dense_gemv_validated, spmspv_validated

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 1), (1, 300), (7, 33), (33, 129), (257, 64), (1025, 40), (2049, 7)]  # (out, in)
RULES = {"none": {}, "topk50": {"topk_fraction": 0.5}, "topk0": {"topk_fraction": 0.0},
         "threshold": "threshold"}


@pytest.fixture(params=_native.lib().supported_cpu_isas())
def isa(request):
    """Run the test on one CPU code path (scalar, avx2, avx512: whichever this CPU has)."""
    C = _native.lib()
    before = C.cpu_isa()
    C.set_cpu_isa(request.param)
    yield request.param
    C.set_cpu_isa(before)


def sparse_weight(n, k, sparsity, dtype):
    w = torch.randn(n, k)
    w[torch.rand(n, k) < sparsity] = 0
    return w.to(dtype)


def rule_kwargs(rule, k):
    return {"threshold": torch.rand(k)} if rule == "threshold" else dict(rule)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("b", [1, 3, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_spmspv_matches_reference(isa, shape, dtype, b, sparsity, rule):
    n, k = shape
    w = sparse_weight(n, k, sparsity, dtype)
    x = torch.randn(b, k).to(dtype)
    kwargs = rule_kwargs(RULES[rule], k)
    bw = BitmapWeight.from_dense(w)
    got = ops.spmspv(x, bw, **kwargs)
    assert got.shape == (b, n) and got.dtype == dtype
    want = reference.spmspv(x, bw.bitmap, bw.values, bw.offsets, n, **kwargs)
    assert_close_to_exact(got, want, x, w, kwargs)


# The SIMD kernels are specialised per token count; 64 and more channels take them in groups.
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("b", range(1, 9))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(257, 64), (33, 129)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_spmspv_matches_reference_at_every_token_count(isa, shape, dtype, b, rule):
    n, k = shape
    w = sparse_weight(n, k, 0.5, dtype)
    x = torch.randn(b, k).to(dtype)
    kwargs = rule_kwargs(RULES[rule], k)
    bw = BitmapWeight.from_dense(w)
    want = reference.spmspv(x, bw.bitmap, bw.values, bw.offsets, n, **kwargs)
    assert_close_to_exact(ops.spmspv(x, bw, **kwargs), want, x, w, kwargs)


@pytest.mark.parametrize("b", [1, 5])
@pytest.mark.parametrize("w_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("x_dtype", DTYPES, ids=str)
def test_x_and_the_weight_may_have_different_dtypes(isa, x_dtype, w_dtype, b):
    w = sparse_weight(257, 64, 0.5, w_dtype)
    x = torch.randn(b, 64).to(x_dtype)
    bw = BitmapWeight.from_dense(w)
    got = ops.spmspv(x, bw, topk_fraction=0.5)
    assert got.dtype == x_dtype
    want = reference.spmspv(x, bw.bitmap, bw.values, bw.offsets, 257, topk_fraction=0.5)
    assert_close_to_exact(got, want, x, w, {"topk_fraction": 0.5})
    got = ops.dense_gemv(x, w)
    assert got.dtype == x_dtype
    assert_close_to_exact(got, reference.dense_gemv(x, w), x, w)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_topk_keeps_every_activation_tied_with_the_threshold(isa, dtype):
    # Small integers tie often: the kernels keep every |x| equal to the token's threshold, as the
    # reference does, so a tied token drops fewer than floor(in * p_a) entries.
    w = sparse_weight(257, 64, 0.5, dtype)
    x = torch.randint(-3, 4, (8, 64)).to(dtype)
    bw = BitmapWeight.from_dense(w)
    keep = reference.activation_keep_mask(x, topk_fraction=0.5)
    assert (keep.sum(1) > 32).any()  # ties are present and kept
    want = reference.spmspv(x, bw.bitmap, bw.values, bw.offsets, 257, topk_fraction=0.5)
    assert_close_to_exact(ops.spmspv(x, bw, topk_fraction=0.5), want, x, w, {"topk_fraction": 0.5})


def test_threshold_rule_drops_an_activation_equal_to_its_threshold(isa):
    # TEAL keeps |x| > threshold[j], strictly: a magnitude equal to its channel's threshold is
    # dropped, by the kernels as by the reference.
    w = torch.tensor([[1.0, 2.0, 4.0, 8.0]])
    x = torch.tensor([[0.5, -0.5, 0.25, -1.0]])
    threshold = torch.tensor([0.5, 0.25, 0.25, 0.5])
    assert reference.activation_keep_mask(x, threshold=threshold).tolist() == [[False, True, False, True]]
    assert ops.spmspv(x, BitmapWeight.from_dense(w), threshold=threshold).tolist() == [[-9.0]]


# Past 32 KiB of x in fp32 (here 2100 columns at b >= 4) the AVX2 kernel runs the tokens in
# pairs (odd b ends with one token) over blocks of 4 rows; 37 rows leave one row outside them.
@pytest.mark.parametrize("b", range(1, 9))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES + [(37, 2100)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_dense_gemv_matches_reference(isa, shape, dtype, b):
    w = torch.randn(*shape).to(dtype)
    x = torch.randn(b, shape[1]).to(dtype)
    got = ops.dense_gemv(x, w)
    assert got.dtype == dtype
    assert_close_to_exact(got, reference.dense_gemv(x, w), x, w)


NATIVE = Path(__file__).parent / "native"
EMULATION_HOST = {"avx2", "fma", "f16c", "bmi2", "popcnt"}


@pytest.mark.skipif(shutil.which("c++") is None, reason="needs a C++ compiler (c++ on PATH)")
@pytest.mark.skipif(not EMULATION_HOST <= set(_native.lib().cpu_features()),
                    reason="the emulation runs the AVX2/F16C/BMI2 instructions around the AVX-512 ones")
def test_avx512_kernels_match_the_scalar_ones_under_emulation(tmp_path):
    """CPUs without AVX-512 (CI's) check the AVX-512 kernels' logic: gemv_avx512.cpp is compiled
    against a scalar emulation of its AVX-512 intrinsics, with buffers as long as the kernels may
    read under AddressSanitizer, and compared with the scalar kernels (tests/native)."""
    exe = tmp_path / "gemv_avx512_emulated"
    cpu = NATIVE.parents[1] / "csrc"
    build = subprocess.run(
        ["c++", "-std=c++17", "-O2", "-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2", "-mpopcnt",
         "-Wno-psabi", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
         f"-I{cpu / 'include'}", f"-I{cpu / 'cpu'}", f"-I{NATIVE}", NATIVE / "gemv_avx512_emulated.cpp",
         cpu / "cpu" / "gemv_scalar.cpp", "-o", exe], capture_output=True, text=True, check=False)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([exe], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    assert re.fullmatch(r"\d+ cases, 0 mismatches\n", run.stdout)


def test_channels_without_kept_activations_are_never_read(isa):
    assert_dropped_channels_are_never_read("cpu", 300, 64)


def test_all_zero_activations_give_zeros(isa):
    bw = BitmapWeight.from_dense(sparse_weight(100, 50, 0.5, torch.float16))
    y = ops.spmspv(torch.zeros(3, 50, dtype=torch.float16), bw, topk_fraction=0.5)
    assert torch.equal(y, torch.zeros(3, 100, dtype=torch.float16))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_spmspv_gives_the_same_bits_on_every_call_at_one_thread_count(isa, threads):
    # The threads' slices and summation order depend only on the input and the thread count (a
    # different count sums in another order, so its last bits may differ).
    bw = BitmapWeight.from_dense(sparse_weight(1025, 2100, 0.5, torch.float32))
    x = torch.randn(4, 2100)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        first = ops.spmspv(x, bw, topk_fraction=0.5)
        assert all(torch.equal(ops.spmspv(x, bw, topk_fraction=0.5), first) for _ in range(5))
    finally:
        torch.set_num_threads(before)


def test_spmspv_is_right_when_openmp_gives_fewer_threads_than_asked():
    """OMP_THREAD_LIMIT (or OMP_DYNAMIC, or nesting) can give a smaller team than the kernel asks
    for: every slice and every row of y must still be done (run in a child: the limit is read
    when OpenMP starts)."""
    run = run_python("""
        import torch
        from duogpt import BitmapWeight, ops
        from duogpt.ops import reference
        torch.manual_seed(0)
        w = torch.randn(256, 512)
        w[torch.rand(256, 512) < 0.5] = 0
        bw = BitmapWeight.from_dense(w)
        for b, rule in ((1, {}), (5, {"topk_fraction": 0.5})):
            x = torch.randn(b, 512)
            want = reference.spmspv(x, bw.bitmap, bw.values, bw.offsets, 256, **rule)
            print((ops.spmspv(x, bw, **rule) - want).abs().max().item())
        """, OMP_NUM_THREADS="2", OMP_THREAD_LIMIT="1")
    assert run.returncode == 0, run.stderr
    assert all(float(err) < 1e-4 for err in run.stdout.split()), run.stdout


def test_topk_rule_drops_floor_of_in_times_fraction_per_token():
    x = torch.randn(5, 37)
    keep = reference.activation_keep_mask(x, topk_fraction=0.3)
    assert (keep.sum(1) == 37 - math.floor(37 * 0.3)).all()


def test_a_topk_fraction_below_one_over_in_drops_nothing(isa):
    # floor(64 * 0.015) = 0: every activation is kept, so y is that of no rule, bit for bit.
    bw = BitmapWeight.from_dense(sparse_weight(257, 64, 0.5, torch.float32))
    x = torch.randn(3, 64)
    assert reference.activation_keep_mask(x, topk_fraction=0.015).all()
    assert torch.equal(ops.spmspv(x, bw, topk_fraction=0.015), ops.spmspv(x, bw))


def test_non_finite_activations_propagate_through_non_zero_weights(isa):
    w = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    x = torch.tensor([[float("inf"), 1.0], [float("nan"), 1.0]])
    y = ops.spmspv(x, BitmapWeight.from_dense(w), topk_fraction=0.5)
    # the non-finite entry is the token's largest magnitude, so it is kept; rows whose weight in
    # channel 0 is zero stay finite (a dense matmul would give inf * 0 = nan there)
    assert y[0, 0] == float("inf") and y[0, 1] == 0.0 and y[0, 2] == float("inf")
    assert y[1, 0].isnan() and y[1, 1] == 0.0 and y[1, 2].isnan()
    assert torch.equal(y.isnan(), reference.spmspv(x, *reference.bitmap_pack(w), 3,
                                                   topk_fraction=0.5).isnan())


def test_the_reference_matches_the_kernels_around_a_non_finite_activation(isa):
    # A channel holding a non-finite activation is added weight by weight, its zero weights
    # skipped: the infinities keep their signs, and another token's finite activation in that
    # channel counts as usual (0.5 * -4 + 1 * 4 = 2).
    inf = float("inf")
    w = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-4.0, 4.0]])
    x = torch.tensor([[inf, 1.0], [0.5, 1.0]])
    want = [[inf, 2.0, -inf], [0.5, 2.0, 2.0]]
    bw = BitmapWeight.from_dense(w)
    assert ops.spmspv(x, bw).tolist() == want
    assert reference.spmspv(x, bw.bitmap, bw.values, bw.offsets, 3).tolist() == want


@pytest.mark.parametrize("rule", RULES)
def test_a_non_finite_activation_among_many_channels_reaches_only_its_non_zero_weights(isa, rule):
    # 64 channels make the kernels take channels in groups: the group holding the non-finite
    # channel must not multiply its zero weights by it either. Every rule keeps it: NaN ranks
    # with +inf, above any threshold.
    w = sparse_weight(100, 64, 0.5, torch.float32)
    x = torch.randn(2, 64)
    x[0, 37], x[1, 5] = float("inf"), float("nan")
    kwargs = rule_kwargs(RULES[rule], 64)
    y = ops.spmspv(x, BitmapWeight.from_dense(w), **kwargs)
    for t, j in [(0, 37), (1, 5)]:
        assert torch.equal(y[t].isfinite(), w[:, j] == 0)
    finite = y.isfinite()
    kept = reference.sparsify(x, **kwargs).nan_to_num(0.0, 0.0, 0.0)
    assert torch.allclose(y[finite], (kept @ w.t())[finite], atol=1e-4)


@pytest.mark.parametrize("b", range(1, 9))
def test_a_non_finite_activation_in_the_last_token_is_seen_at_every_token_count(isa, b):
    # the scan for non-finite activations is specialised per token count, like the kernels
    w = sparse_weight(100, 64, 0.5, torch.float32)
    x = torch.randn(b, 64)
    x[b - 1, 37] = float("inf")
    y = ops.spmspv(x, BitmapWeight.from_dense(w))
    assert torch.equal(y[b - 1].isfinite(), w[:, 37] == 0)
    assert y[: b - 1].isfinite().all()


@pytest.mark.parametrize("kwargs, error, message", [
    ({"topk_fraction": 1.0}, ValueError, r"\[0, 1\)"),
    ({"topk_fraction": -0.1}, ValueError, r"\[0, 1\)"),
    ({"threshold": torch.zeros(5)}, ValueError, "one per input channel"),
    ({"threshold": torch.zeros(8, dtype=torch.float16)}, TypeError, "threshold must have dtype"),
    ({"threshold": torch.zeros(8), "topk_fraction": 0.5}, ValueError, "not both"),
], ids=["fraction-1", "fraction-negative", "threshold-size", "threshold-dtype", "both-rules"])
def test_bad_activation_rules_are_rejected(kwargs, error, message):
    bw = BitmapWeight.from_dense(torch.randn(4, 8))
    with pytest.raises(error, match=message):
        ops.spmspv(torch.randn(1, 8), bw, **kwargs)
    with pytest.raises(error, match=message):  # SparseLinear's direct call checks its rule too
        spmspv_validated(torch.randn(1, 8), bw.bitmap, bw.values, bw.offsets, 4,
                         kwargs.get("threshold"), kwargs.get("topk_fraction"))


def test_a_threshold_with_one_entry_per_token_is_rejected():
    """The kernel reads one threshold per input channel: a threshold as long as the token count
    (here 2 of 8 channels) is refused, not read past its end."""
    bw = BitmapWeight.from_dense(torch.randn(4, 8))
    x, threshold = torch.randn(2, 8), torch.zeros(2)
    with pytest.raises(ValueError, match=r"threshold has 2 entries, expected one per input channel \(8\)"):
        ops.spmspv(x, bw, threshold=threshold)
    with pytest.raises(ValueError, match="one per input channel"):
        spmspv_validated(x, bw.bitmap, bw.values, bw.offsets, 4, threshold)


def test_tensors_on_two_devices_are_refused():
    """Every tensor of a call must be on x's device (the meta device stands in for a second one)."""
    w = torch.randn(4, 8)
    bw = BitmapWeight.from_dense(w)
    x, meta_x = torch.randn(1, 8), torch.randn(1, 8, device="meta")
    meta_threshold = torch.zeros(8, device="meta")
    with pytest.raises(ValueError, match="threshold is on meta but x is on cpu"):
        ops.spmspv(x, bw, threshold=meta_threshold)
    with pytest.raises(ValueError, match="threshold is on meta but x is on cpu"):
        spmspv_validated(x, bw.bitmap, bw.values, bw.offsets, 4, meta_threshold)
    with pytest.raises(ValueError, match="values is on cpu but x is on meta"):
        ops.spmspv(meta_x, bw)
    with pytest.raises(ValueError, match="w is on cpu but x is on meta"):
        ops.dense_gemv(meta_x, w)


def _meta(*shape, dtype=torch.float32):
    return torch.zeros(*shape, dtype=dtype, device="meta")


@pytest.mark.parametrize("call, error, message", [
    (lambda bw, w: torch.ops.duogpt.spmspv(_meta(2, 8), *bw, 4, _meta(8), 0.5), ValueError, "not both"),
    (lambda bw, w: torch.ops.duogpt.spmspv(_meta(2, 8), *bw, 4, None, 1.0), ValueError, r"\[0, 1\)"),
    (lambda bw, w: torch.ops.duogpt.spmspv(_meta(2, 7), *bw, 4, None, None), ValueError, "input channels"),
    (lambda bw, w: torch.ops.duogpt.dense_gemv(_meta(2, 7), w), ValueError, "input channels"),
    (lambda bw, w: torch.ops.duogpt.dense_gemv(_meta(9, 8), w), ValueError, "1 to 8 tokens"),
], ids=["spmspv-both-rules", "spmspv-fraction-1", "spmspv-in-mismatch", "dense-in-mismatch",
        "dense-too-many-tokens"])
def test_the_fake_kernels_refuse_what_the_cpu_kernels_refuse(call, error, message):
    """torch.compile traces the ops through their fake kernels (run here on the meta device): a
    bad call fails there as it does on the CPU, not later in a compiled graph."""
    packed = (_meta(8, 1, dtype=torch.int32), _meta(32), _meta(9, dtype=torch.int32))  # [4, 8] weight
    with pytest.raises(error, match=message):
        call(packed, _meta(4, 8))


@pytest.mark.parametrize("x, error, message", [
    (torch.randn(1, 9), ValueError, "input channels"),
    (torch.randn(9, 8), ValueError, "1 to 8 tokens"),
    (torch.randn(0, 8), ValueError, "1 to 8 tokens"),
    (torch.randn(8), ValueError, "2-D"),
    (torch.randn(8, 2).t(), ValueError, "contiguous"),
    (torch.randn(1, 8, dtype=torch.float64), TypeError, "x must have dtype"),
], ids=["in-mismatch", "too-many-tokens", "no-tokens", "1-D", "non-contiguous", "float64"])
def test_bad_activations_are_rejected(x, error, message):
    w = torch.randn(4, 8)
    bw = BitmapWeight.from_dense(w)
    with pytest.raises(error, match=message):
        ops.spmspv(x, bw)
    with pytest.raises(error, match=message):
        spmspv_validated(x, bw.bitmap, bw.values, bw.offsets, 4)
    with pytest.raises(error, match=message):
        ops.dense_gemv(x, w)
    with pytest.raises(error, match=message):
        dense_gemv_validated(x, w)


@pytest.mark.parametrize("args, error, message", [
    (lambda bw: (bw.bitmap, bw.values, bw.offsets, 40), ValueError, "out_features=40 needs 2"),
    (lambda bw: (bw.bitmap.float(), bw.values, bw.offsets, 300), TypeError, "bitmap must have dtype"),
    (lambda bw: (bw.bitmap, bw.values.double(), bw.offsets, 300), TypeError, "values must have dtype"),
    (lambda bw: (bw.bitmap, bw.values, bw.offsets[:-1], 300), ValueError, "offsets has"),
], ids=["bitmap-words", "bitmap-dtype", "values-dtype", "offsets-count"])
def test_packed_tensors_of_the_wrong_kind_or_size_are_rejected(args, error, message):
    bw = BitmapWeight.from_dense(sparse_weight(300, 70, 0.5, torch.float16))
    with pytest.raises(error, match=message):
        torch.ops.duogpt.spmspv(torch.randn(2, 70, dtype=torch.float16), *args(bw))


@pytest.mark.parametrize("w, error, message", [
    (torch.randn(70, 40).t(), ValueError, "w must be contiguous"),
    (torch.randn(40, 70, dtype=torch.float64), TypeError, "w must have dtype"),
    (torch.randn(40, 70, 1), ValueError, "w must be 2-D"),
], ids=["non-contiguous", "float64", "3-D"])
def test_a_bad_dense_weight_is_rejected(w, error, message):
    with pytest.raises(error, match=message):
        ops.dense_gemv(torch.randn(2, 70), w)


def _with_offsets(offsets, at, value):
    offsets = offsets.clone()
    offsets[at] = value
    return offsets


@pytest.mark.parametrize("corrupt, message", [
    (lambda bw: (bw.bitmap, bw.values[:-1], bw.offsets), "but values holds"),
    (lambda bw: (bw.bitmap, bw.values, _with_offsets(bw.offsets, -1, 10**8)), "but values holds"),
    (lambda bw: (bw.bitmap, bw.values, _with_offsets(bw.offsets, 0, 1)), "offsets run from 1"),
    (lambda bw: (bw.bitmap, bw.values, _with_offsets(bw.offsets, 3, 10**6)), "descend"),
], ids=["values-too-short", "offsets-past-values", "offsets-not-from-0", "offsets-descending"])
def test_packed_tensors_that_do_not_belong_together_are_rejected(isa, corrupt, message):
    """The raw op takes the packed tensors apart; offsets that do not run from 0 up to the length
    of values are refused before any value is read."""
    bw = BitmapWeight.from_dense(sparse_weight(300, 70, 0.5, torch.float16))
    with pytest.raises(ValueError, match=message):
        torch.ops.duogpt.spmspv(torch.randn(2, 70, dtype=torch.float16), *corrupt(bw), 300)


# The values end where an inaccessible page begins, so a read past them kills the process.
_GUARDED_SPMSPV = """
import ctypes, mmap, torch
from duogpt import BitmapWeight, _native
page = mmap.PAGESIZE
for isa in _native.lib().supported_cpu_isas():
    _native.lib().set_cpu_isa(isa)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        w = torch.randn(300, 70)
        w[torch.rand(300, 70) < 0.9] = 0
        bw = BitmapWeight.from_dense(w.to(dtype))
        nbytes = bw.values.numel() * bw.values.element_size()
        pages = -(-nbytes // page)
        buf = mmap.mmap(-1, (pages + 1) * page)
        start = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        assert ctypes.CDLL(None).mprotect(ctypes.c_void_p(start + pages * page), page, 0) == 0
        values = torch.frombuffer(buf, dtype=dtype, count=bw.values.numel(), offset=pages * page - nbytes)
        values.copy_(bw.values)
        every_bit = torch.full_like(bw.bitmap, -1)  # 320 bits a channel, about 30 values
        for b in (1, 3):
            torch.ops.duogpt.spmspv(torch.ones(b, 70, dtype=dtype), every_bit, values, bw.offsets, 300)
        print(isa, dtype, "ok")
"""


def test_a_bitmap_with_more_bits_than_values_never_reads_past_them():
    """A corrupted bitmap (every bit set, far more than the values it claims) gives a wrong y but
    no read outside values, on every CPU code path (run in a child: a stray read would crash)."""
    run = run_python(_GUARDED_SPMSPV)
    assert run.returncode == 0, f"exit {run.returncode}\n{run.stdout}{run.stderr}"
    assert run.stdout.count("ok") == 3 * len(_native.lib().supported_cpu_isas())


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_validated_weight_path_equals_the_op(dtype, rule):
    """SparseLinear's direct CPU call gives the op's result bit for bit."""
    w = sparse_weight(300, 70, 0.5, dtype)
    bw = BitmapWeight.from_dense(w)
    x = torch.randn(3, 70).to(dtype)
    kwargs = rule_kwargs(RULES[rule], 70)
    args = (x, bw.bitmap, bw.values, bw.offsets, 300, kwargs.get("threshold"), kwargs.get("topk_fraction"))
    assert torch.equal(spmspv_validated(*args), torch.ops.duogpt.spmspv(*args))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_validated_dense_path_equals_the_op(dtype):
    """DenseGemvLinear's direct CPU call gives the op's result bit for bit."""
    w = torch.randn(300, 70).to(dtype)
    x = torch.randn(3, 70).to(dtype)
    assert torch.equal(dense_gemv_validated(x, w), torch.ops.duogpt.dense_gemv(x, w))


def test_the_ops_refuse_inputs_that_autograd_records():
    w = sparse_weight(16, 8, 0.5, torch.float32)
    bw = BitmapWeight.from_dense(w)
    x = torch.randn(1, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="spmspv has no backward, but x requires grad"):
        ops.spmspv(x, bw)
    with pytest.raises(RuntimeError, match="dense_gemv has no backward, but x requires grad"):
        ops.dense_gemv(x, w)
    with pytest.raises(RuntimeError, match="dense_gemv has no backward, but w requires grad"):
        ops.dense_gemv(x.detach(), w.requires_grad_())
    with torch.no_grad():  # nothing recorded: the kernels run
        assert ops.spmspv(x, bw).shape == ops.dense_gemv(x, w).shape == (1, 16)


def test_cpu_only_build_explains_how_to_get_cuda(monkeypatch):
    # Every CUDA implementation asks cuda_lib for the kernels. CI's build has them, so a build
    # without them is stood in for by the native module answering that it has none.
    cpu_only = types.SimpleNamespace(cuda_compiled=lambda: False)
    monkeypatch.setattr(_native, "_C", cpu_only)
    assert not _native.cuda_compiled()
    with pytest.raises(RuntimeError, match="no CUDA kernels.*DUOGPT_CUDA=ON"):
        _native.cuda_lib(torch.device("cuda"))


def test_opcheck():
    w = sparse_weight(40, 24, 0.5, torch.float16)
    bitmap, values, offsets = torch.ops.duogpt.bitmap_pack(w)
    x = torch.randn(3, 24, dtype=torch.float16)
    torch.library.opcheck(torch.ops.duogpt.spmspv, (x, bitmap, values, offsets, 40, None, 0.5))
    torch.library.opcheck(torch.ops.duogpt.spmspv, (x, bitmap, values, offsets, 40, torch.rand(24), None))
    torch.library.opcheck(torch.ops.duogpt.dense_gemv, (x, w))
