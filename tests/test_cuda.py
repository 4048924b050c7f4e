"""The CUDA kernels against `duogpt.ops.reference` (computed on the CPU), and against the CPU kernels.

Every test needs a CUDA GPU and a build with the CUDA kernels; elsewhere they are collected and
skipped. Covered: bitmap pack/unpack (bit-exact), spmspv (odd sizes, b = 1..8, all dtypes, weight
sparsity 0/50/90/100 %, threshold and top-k rules, NaN/Inf, a corrupted bitmap), dense_gemv (vector
and scalar paths), obs_prune_block (bit-exact, mask and N:M), CUDA-graph capture and replay,
determinism, opcheck.
"""

from __future__ import annotations

import pytest
import torch
from oracles import assert_close_to_exact, assert_dropped_channels_are_never_read, block_problem

from duogpt import BitmapWeight, _native, ops
from duogpt.ops import reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available() or not _native.cuda_compiled(),
                       reason="needs a CUDA GPU and a duogpt build with the CUDA kernels"),
]

DEV = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
PACK_SHAPES = [(1, 1), (1, 77), (31, 5), (33, 64), (1023, 3), (1025, 17), (2100, 9), (4095, 40)]
GEMV_SHAPES = [(1, 1), (1, 300), (7, 33), (33, 129), (257, 64), (1025, 40), (2049, 7),
               (4095, 1000), (3000, 2100)]  # (out, in): none a multiple of every tile size
SPARSITIES = [0.0, 0.5, 0.9, 1.0]
RULES = ["none", "topk50", "topk0", "topk90", "threshold"]


def sparse_weight(n, k, sparsity, dtype):
    w = torch.randn(n, k)
    w[torch.rand(n, k) < sparsity] = 0
    return w.to(dtype)


def rule_kwargs(rule, k, device="cpu"):
    if rule == "threshold":
        return {"threshold": torch.rand(k, device=device)}
    return {"none": {}, "topk50": {"topk_fraction": 0.5}, "topk0": {"topk_fraction": 0.0},
            "topk90": {"topk_fraction": 0.9}}[rule]


def on(kwargs, device):
    return {key: v.to(device) if isinstance(v, torch.Tensor) else v for key, v in kwargs.items()}


def same_bits(a, b):
    a, b = a.cpu(), b.cpu()
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


# ---- bitmap pack / unpack ----------------------------------------------------------------------

@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", PACK_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_pack_matches_reference_and_cpu(shape, dtype, sparsity):
    w = sparse_weight(*shape, sparsity, dtype)
    got = torch.ops.duogpt.bitmap_pack(w.to(DEV))
    want = reference.bitmap_pack(w)
    cpu = torch.ops.duogpt.bitmap_pack(w)
    for g, r, c in zip(got, want, cpu):
        assert g.device.type == "cuda"
        assert same_bits(g, r) and same_bits(g, c)
    back = torch.ops.duogpt.bitmap_unpack(*got, shape[0])
    assert same_bits(back, w)


def test_pack_special_values():
    w = torch.tensor([[-0.0, float("nan"), 1.0], [float("inf"), 0.0, -2.0]] * 700)
    for dtype in DTYPES:
        wd = w.to(dtype)
        got = torch.ops.duogpt.bitmap_pack(wd.to(DEV))
        for g, r in zip(got, reference.bitmap_pack(wd)):
            assert same_bits(g, r)  # NaN payloads included
        back = torch.ops.duogpt.bitmap_unpack(*got, wd.shape[0]).cpu()
        assert torch.equal(back.isnan(), wd.isnan())
        finite = ~wd.isnan()
        assert torch.equal(back[finite], wd[finite])  # -0.0 comes back as +0.0, which == -0.0


def test_unpack_of_cpu_packed_weight():
    w = sparse_weight(3000, 70, 0.7, torch.bfloat16)
    bw = BitmapWeight.from_dense(w).to(DEV)
    assert same_bits(bw.to_dense(), w)


# ---- spmspv ------------------------------------------------------------------------------------

@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("b", [1, 3, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", GEMV_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_spmspv_matches_reference(shape, dtype, b, sparsity, rule):
    n, k = shape
    w = sparse_weight(n, k, sparsity, dtype)
    x = torch.randn(b, k).to(dtype)
    kwargs = rule_kwargs(rule, k)
    bw = BitmapWeight.from_dense(w)
    got = ops.spmspv(x.to(DEV), bw.to(DEV), **on(kwargs, DEV))
    assert got.shape == (b, n) and got.dtype == dtype and got.device.type == "cuda"
    want = reference.spmspv(x, bw.bitmap, bw.values, bw.offsets, n, **kwargs)
    assert_close_to_exact(got, want, x, w, kwargs)
    assert_close_to_exact(ops.spmspv(x, bw, **kwargs), want, x, w, kwargs)  # the CPU kernel agrees too


@pytest.mark.parametrize("b", range(1, 9))
@pytest.mark.parametrize("values_dtype", DTYPES, ids=str)
def test_spmspv_every_token_count_and_mixed_dtypes(b, values_dtype):
    n, k = 1100, 517
    w = sparse_weight(n, k, 0.5, values_dtype)
    bw = BitmapWeight.from_dense(w)
    for x_dtype in DTYPES:
        x = torch.randn(b, k).to(x_dtype)
        got = ops.spmspv(x.to(DEV), bw.to(DEV), topk_fraction=0.5)
        assert got.dtype == x_dtype
        want = reference.spmspv(x, bw.bitmap, bw.values, bw.offsets, n, topk_fraction=0.5)
        assert_close_to_exact(got, want, x, w, {"topk_fraction": 0.5})


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 0.7, 0.999])
def test_topk_keep_set_is_exact_with_ties_and_specials(fraction):
    """With W = I, y = sparsify(x) exactly: the radix select must pick the reference's threshold,
    with ties, +-0, subnormals, +-inf and NaN (ranked as +inf) in x."""
    k = 3000
    x = torch.randn(4, k)
    x[:, ::7] = 0.5                       # many ties
    x[:, 1::11] = -0.5
    x[0, 3::13] = -0.0
    x[1, 5::17] = 1e-40                   # subnormal
    x[2, 100:140] = float("inf")
    x[2, 140:150] = float("-inf")
    x[3, 7::19] = float("nan")
    x[3, 8::19] = float("inf")
    eye = torch.eye(k)
    got = ops.spmspv(x.to(DEV), BitmapWeight.from_dense(eye).to(DEV), topk_fraction=fraction).cpu()
    want = reference.sparsify(x, topk_fraction=fraction)
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(want))


def test_threshold_keep_set_is_exact():
    k = 2500
    x = torch.randn(3, k)
    x[1, ::5] = float("nan")
    x[2, ::9] = float("inf")
    threshold = torch.rand(k)
    threshold[::13] = float("inf")        # |inf| > inf is false: dropped
    threshold[1::13] = -1.0               # keeps everything, zeros included (they stay zero)
    got = ops.spmspv(x.to(DEV), BitmapWeight.from_dense(torch.eye(k)).to(DEV),
                     threshold=threshold.to(DEV)).cpu()
    want = reference.sparsify(x, threshold=threshold)
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(want))


def test_channels_without_kept_activations_are_never_read():
    assert_dropped_channels_are_never_read(DEV, 3000, 640)


@pytest.mark.parametrize("rule", ["none", "topk50", "threshold"])
def test_all_zero_and_all_kept_activations(rule):
    n, k = 2049, 333
    w = sparse_weight(n, k, 0.5, torch.float16)
    bw = BitmapWeight.from_dense(w).to(DEV)
    kwargs = on(rule_kwargs(rule, k), DEV)
    y = ops.spmspv(torch.zeros(3, k, dtype=torch.float16, device=DEV), bw, **kwargs)
    assert torch.equal(y.cpu(), torch.zeros(3, n, dtype=torch.float16))
    x = torch.randn(5, k, dtype=torch.float16)
    keep_all = {"threshold": torch.full((k,), -1.0, device=DEV)}
    got = ops.spmspv(x.to(DEV), bw, **keep_all)
    assert_close_to_exact(got, reference.dense_gemv(x, w), x, w)


def test_non_finite_activations_propagate_through_non_zero_weights():
    w = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    x = torch.tensor([[float("inf"), 1.0], [float("nan"), 1.0]])
    y = ops.spmspv(x.to(DEV), BitmapWeight.from_dense(w).to(DEV), topk_fraction=0.5).cpu()
    assert y[0, 0] == float("inf") and y[0, 1] == 0.0 and y[0, 2] == float("inf")
    assert y[1, 0].isnan() and y[1, 1] == 0.0 and y[1, 2].isnan()


def test_spmspv_is_deterministic():
    n, k = 11008, 4096
    bw = BitmapWeight.from_dense(sparse_weight(n, k, 0.5, torch.float16)).to(DEV)
    x = torch.randn(8, k, dtype=torch.float16, device=DEV)
    first = ops.spmspv(x, bw, topk_fraction=0.5)
    for _ in range(5):
        assert same_bits(ops.spmspv(x, bw, topk_fraction=0.5), first)


def test_spmspv_on_a_side_stream():
    n, k = 1500, 700
    w = sparse_weight(n, k, 0.5, torch.bfloat16)
    bw = BitmapWeight.from_dense(w).to(DEV)
    x = torch.randn(2, k, dtype=torch.bfloat16)
    want = ops.spmspv(x.to(DEV), bw).cpu()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = ops.spmspv(x.to(DEV), bw)
    torch.cuda.current_stream().wait_stream(side)
    assert same_bits(got, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_bitmap_with_more_bits_than_values_reads_nothing_past_them(dtype):
    """A corrupted bitmap (every bit set, far more than the values it claims) gives a wrong y but
    no read outside values: they are the head of a buffer whose tail is NaN, which any read past
    them would carry into y."""
    bw = BitmapWeight.from_dense(sparse_weight(300, 70, 0.9, dtype))
    buffer = torch.full((bw.values.numel() + 4096,), float("nan"), dtype=dtype, device=DEV)
    values = buffer[: bw.values.numel()]
    values.copy_(bw.values)
    every_bit = torch.full_like(bw.bitmap, -1).to(DEV)  # 320 bits a channel, about 30 values
    for b in (1, 3):
        y = torch.ops.duogpt.spmspv(torch.ones(b, 70, dtype=dtype, device=DEV), every_bit, values,
                                    bw.offsets.to(DEV), 300)
        assert y.isfinite().all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_spmspv_reads_values_at_any_alignment(dtype):
    """values need not start on a 16-byte boundary: a view 1 or 3 elements into a NaN buffer gives
    the same bits as the packed tensor itself, so no copy strays outside values."""
    bw = BitmapWeight.from_dense(sparse_weight(1500, 90, 0.5, dtype)).to(DEV)
    x = torch.randn(3, 90, dtype=dtype, device=DEV)
    want = torch.ops.duogpt.spmspv(x, bw.bitmap, bw.values, bw.offsets, 1500)
    for shift in (1, 3):
        buffer = torch.full((bw.values.numel() + shift + 8,), float("nan"), dtype=dtype, device=DEV)
        values = buffer[shift: shift + bw.values.numel()]
        values.copy_(bw.values)
        assert same_bits(torch.ops.duogpt.spmspv(x, bw.bitmap, values, bw.offsets, 1500), want)


# ---- dense_gemv --------------------------------------------------------------------------------

@pytest.mark.parametrize("b", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("w_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("x_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", GEMV_SHAPES + [(100, 4096), (65, 8)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_dense_gemv_matches_reference(shape, x_dtype, w_dtype, b):
    w = torch.randn(*shape).to(w_dtype)
    x = torch.randn(b, shape[1]).to(x_dtype)
    got = ops.dense_gemv(x.to(DEV), w.to(DEV))
    assert got.dtype == x_dtype
    assert_close_to_exact(got, reference.dense_gemv(x, w), x, w)


def test_dense_gemv_unaligned_inputs_take_the_scalar_path():
    k = 64
    buf = torch.randn(2 * k + 1, dtype=torch.float16, device=DEV)
    x = buf[1:].view(2, k)                # contiguous, but 2 bytes past a 16-byte boundary
    w = torch.randn(300, k, dtype=torch.float16)
    got = ops.dense_gemv(x, w.to(DEV))
    xc = x.cpu()
    assert_close_to_exact(got, reference.dense_gemv(xc, w), xc, w)


# ---- obs_prune_block ---------------------------------------------------------------------------

def run_cuda_and_reference(W1, U1, P1, mask=None, nm=None, score_coef=None):
    prunen, prunem = nm if nm is not None else (0, 0)
    A = W1.to(DEV)
    got = ops.obs_prune_block(A, U1.to(DEV), None if P1 is None else P1.to(DEV),
                              mask=None if mask is None else mask.to(DEV), nm=nm,
                              score_coef=None if score_coef is None else score_coef.to(DEV))
    R = W1.clone()
    want = reference.obs_prune_block(R, U1, P1, mask, prunen, prunem, score_coef)
    return (A.cpu(), *(t.cpu() for t in got)), (R, *want)


def assert_bit_equal(got, want):
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("with_P", [False, True], ids=["sparsegpt", "duogpt"])
@pytest.mark.parametrize("n, B", [(1, 1), (1, 128), (37, 5), (300, 128), (64, 200), (33, 256),
                                  (1000, 33), (9, 64)])
def test_obs_mask_rule_is_bit_exact(n, B, with_P):
    W1, U1, P1 = block_problem(n, B, with_P)
    mask = torch.rand(n, B) < 0.5
    got, want = run_cuda_and_reference(W1, U1, P1, mask=mask)
    assert_bit_equal(got, want)
    assert (got[0][mask] == 0).all()


@pytest.mark.parametrize("with_P", [False, True], ids=["sparsegpt", "duogpt"])
@pytest.mark.parametrize("B, nm", [(128, (2, 4)), (128, (4, 8)), (128, (1, 4)), (128, (16, 32)),
                                   (128, (40, 64)), (96, (20, 48)), (256, (2, 4)), (12, (3, 6))],
                         ids=lambda v: str(v))
def test_obs_nm_rule_is_bit_exact(B, nm, with_P):
    n = 70
    W1, U1, P1 = block_problem(n, B, with_P)
    W1[:, 5] = W1[:, 4]                   # exact score ties: lower index first
    coef = 1 / U1.diag() ** 2
    got, want = run_cuda_and_reference(W1, U1, P1, nm=nm, score_coef=coef)
    assert_bit_equal(got, want)
    zeros = (got[0].view(n, B // nm[1], nm[1]) == 0).sum(-1)
    assert (zeros == nm[0]).all()


def test_obs_nan_scores_rank_last_like_the_reference():
    W1, U1, _ = block_problem(16, 32, with_P=False)
    W1[3, 1] = float("nan")
    W1[4, 0] = float("inf")
    got, want = run_cuda_and_reference(W1, U1, None, nm=(2, 4), score_coef=1 / U1.diag() ** 2)
    assert_bit_equal(got, want)


def test_obs_rejects_blocks_wider_than_256():
    W1, U1, _ = block_problem(4, 260, with_P=False)
    with pytest.raises(ValueError, match="at most 256"):
        ops.obs_prune_block(W1.to(DEV), U1.to(DEV), mask=torch.zeros(4, 260, dtype=torch.bool,
                                                                       device=DEV))


def test_cpu_and_cuda_obs_agree():
    W1, U1, P1 = block_problem(257, 128, with_P=True)
    mask = torch.rand(257, 128) < 0.6
    A = W1.clone()
    cpu = ops.obs_prune_block(A, U1, P1, mask=mask)
    got, _ = run_cuda_and_reference(W1, U1, P1, mask=mask)
    assert_bit_equal(got, (A, *cpu))


# ---- CUDA graphs -------------------------------------------------------------------------------

def capture(fn):
    """Warm fn up on a side stream, then capture it; returns (graph, outputs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


@pytest.mark.parametrize("rule", ["topk50", "threshold", "none"])
def test_spmspv_graph_capture_and_replay(rule):
    n, k, b = 4097, 1100, 3
    w = sparse_weight(n, k, 0.5, torch.float16)
    bw = BitmapWeight.from_dense(w).to(DEV)
    kwargs = on(rule_kwargs(rule, k), DEV)
    x = torch.zeros(b, k, dtype=torch.float16, device=DEV)
    graph, y = capture(lambda: ops.spmspv(x, bw, **kwargs))
    for _ in range(3):
        fresh = torch.randn(b, k, dtype=torch.float16)
        x.copy_(fresh)
        graph.replay()
        torch.cuda.synchronize()
        assert same_bits(y, ops.spmspv(x, bw, **kwargs))
        want = reference.spmspv(fresh, *(t.cpu() for t in (bw.bitmap, bw.values, bw.offsets)), n,
                                **on(kwargs, "cpu"))
        assert_close_to_exact(y, want, fresh, w, on(kwargs, "cpu"))


def test_obs_graph_capture_and_replay():
    n, B = 500, 128
    _, U1, P1 = block_problem(n, B, with_P=True)
    U1d, P1d = U1.to(DEV), P1.to(DEV)
    W1 = torch.zeros(n, B, device=DEV)
    mask = torch.zeros(n, B, dtype=torch.bool, device=DEV)
    graph, (err, wpre) = capture(lambda: ops.obs_prune_block(W1, U1d, P1d, mask=mask))
    for _ in range(2):
        fresh, fresh_mask = torch.randn(n, B), torch.rand(n, B) < 0.5
        W1.copy_(fresh)
        mask.copy_(fresh_mask)
        graph.replay()
        torch.cuda.synchronize()
        R = fresh.clone()
        want = reference.obs_prune_block(R, U1, P1, fresh_mask)
        assert_bit_equal((W1.cpu(), err.cpu(), wpre.cpu()), (R, *want))


# ---- opcheck -----------------------------------------------------------------------------------

def test_opcheck_on_cuda_inputs():
    w = sparse_weight(1030, 48, 0.5, torch.float16).to(DEV)
    bitmap, values, offsets = torch.ops.duogpt.bitmap_pack(w)
    x = torch.randn(3, 48, dtype=torch.float16, device=DEV)
    torch.library.opcheck(torch.ops.duogpt.spmspv, (x, bitmap, values, offsets, 1030, None, 0.5))
    torch.library.opcheck(torch.ops.duogpt.spmspv,
                          (x, bitmap, values, offsets, 1030, torch.rand(48, device=DEV), None))
    torch.library.opcheck(torch.ops.duogpt.dense_gemv, (x, w))
    torch.library.opcheck(torch.ops.duogpt.bitmap_unpack, (bitmap, values, offsets, 1030))
    torch.library.opcheck(torch.ops.duogpt.bitmap_pack, (w,),
                          test_utils=("test_schema", "test_autograd_registration"))
    W1, U1, P1 = (t.to(DEV) for t in block_problem(12, 16, with_P=True))
    mask = torch.rand(12, 16, device=DEV) < 0.5
    torch.library.opcheck(torch.ops.duogpt.obs_prune_block, (W1, U1, P1, mask, 0, 0, None))
    torch.library.opcheck(torch.ops.duogpt.obs_prune_block,
                          (W1, U1, None, None, 2, 4, 1 / U1.diag() ** 2))


def test_mixed_devices_are_rejected():
    bw = BitmapWeight.from_dense(torch.randn(8, 16)).to(DEV)
    with pytest.raises(ValueError, match="device"):
        ops.spmspv(torch.randn(1, 16), bw)


def test_workspace_size_is_positive_and_grows_with_tokens():
    C = _native.cuda_lib(torch.device(DEV))
    one, eight = C.spmspv_cuda_workspace_bytes(1, 4096, 4096), C.spmspv_cuda_workspace_bytes(8, 4096, 4096)
    assert 0 < one < eight
