"""The pruning solvers on synthetic layers: docs/algorithm.md 3.4's identities, the SparseGPT special
case, exact per-block sparsity, valid N:M masks, dampening retries, and native == reference."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from duogpt.ops import reference
from duogpt.solver import MagnitudePruner, OBSSolver, WandaPruner, WeightSparsity
from duogpt.solver.masks import nm_lowest
from duogpt.solver.obs import compensation, inverse_factor
from duogpt.sparsity import ThresholdHistogram

HALF = WeightSparsity.of(0.5)


def _streams(k: int, m: int, p_a: float = 0.5, dtype=torch.float32):
    """Dense inputs `X_tilde [m, k]` (tokens x channels, correlated, with outliers) and their
    per-token top-k sparsified version plus noise `X_hat` (standing in for upstream pruning)."""
    mix = torch.randn(k, k, dtype=dtype) / k**0.5 + torch.eye(k, dtype=dtype)
    X_tilde = torch.randn(m, k, dtype=dtype) @ mix * (1 + 3 * torch.rand(k, dtype=dtype))
    X_hat = reference.sparsify(X_tilde, topk_fraction=p_a) + 0.01 * torch.randn(m, k, dtype=dtype)
    return X_hat, X_tilde


def _solve(W, X_hat, X_tilde=None, sparsity=HALF, **kwargs):
    solver = OBSSolver(W.shape[1], sparsity, two_stream=X_tilde is not None, **kwargs)
    solver.add_batch(X_hat, X_tilde)
    return solver.prune(W)


def _pruner(method: str, k: int, sparsity=HALF, **kwargs):
    """A fresh pruner of `k` input channels: duogpt, sparsegpt, wanda or magnitude."""
    if method == "wanda":
        return WandaPruner(k, sparsity)
    if method == "magnitude":
        return MagnitudePruner(sparsity)
    return OBSSolver(k, sparsity, two_stream=method == "duogpt", **kwargs)


def test_paper_identities_hold_for_the_solver_factors():
    """docs/algorithm.md 3.4 in float64: with alpha = 1 the score is the energy of the part of
    `w_p X̃_p` the later sparse inputs cannot reproduce, and the update is its least-squares fit."""
    k, m = 12, 400
    X_hat, X_tilde = _streams(k, m, dtype=torch.float64)
    dX = X_tilde - X_hat
    H, Delta, a = X_hat.T @ X_hat / m, dX.T @ X_hat / m, dX.square().sum(0) / m
    U = inverse_factor(H, percdamp=0.0)
    P, coef = compensation(U, Delta, a, alpha=1.0)
    w = torch.randn(k, dtype=torch.float64)
    for p in range(k - 1):
        z = w[p] * X_tilde[:, p]  # the dense contribution of weight p
        later = X_hat[:, p + 1:]
        fit = torch.linalg.lstsq(later, z[:, None]).solution[:, 0]
        residual = (z - later @ fit).square().sum() / m
        torch.testing.assert_close(w[p] ** 2 * coef[p], residual, rtol=1e-8, atol=1e-10)
        update = -(w[p] / U[p, p]) * U[p, p + 1:] + w[p] * P[p, p + 1:]
        torch.testing.assert_close(update, fit, rtol=1e-8, atol=1e-10)


def test_add_batch_accumulates_the_closed_form_statistics():
    k = 40
    X_hat, X_tilde = _streams(k, 300)
    solver = OBSSolver(k, HALF, two_stream=True)
    for chunk in (slice(0, 7), slice(7, 150), slice(150, 300)):  # uneven batches
        solver.add_batch(X_hat[chunk], X_tilde[chunk])
    dX = X_tilde - X_hat
    torch.testing.assert_close(solver.H, X_hat.T @ X_hat / 300, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(solver.Delta, dX.T @ X_hat / 300, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(solver.a, dX.square().sum(0) / 300, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 0.125])
@pytest.mark.parametrize("sparsity", [HALF, WeightSparsity.of((2, 4))], ids=["unstructured", "2:4"])
def test_equal_streams_reproduce_sparsegpt_exactly(alpha, sparsity):
    X, _ = _streams(256, 600)
    W = torch.randn(96, 256)
    act_order = not sparsity.is_nm
    duo = _solve(W, X, X.clone(), sparsity, alpha=alpha, act_order=act_order)
    sparsegpt = _solve(W, X, None, sparsity, act_order=act_order)
    assert torch.equal(duo.weight, sparsegpt.weight)


def _sparsegpt_transcription(W, H, fraction, blocksize=128, percdamp=0.01):
    """IST-DASLab/sparsegpt `fasterprune` (unstructured, no act_order), transcribed in float64,
    with the per-block mask selecting exactly floor(numel * p) weights."""
    W, H = W.double().clone(), H.double().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H.diagonal().add_(percdamp * H.diagonal().mean())
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    for i1 in range(0, W.shape[1], blocksize):
        i2 = min(i1 + blocksize, W.shape[1])
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        scores = W1.square() / Hinv1.diagonal().square()
        order = scores.flatten().argsort()[: int(scores.numel() * fraction)]
        mask = torch.zeros(scores.numel(), dtype=torch.bool)
        mask[order] = True
        mask = mask.view_as(W1)
        for i in range(i2 - i1):
            w = W1[:, i]
            q = torch.where(mask[:, i], torch.zeros_like(w), w)
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:]
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W


def test_one_stream_solver_is_sparsegpt():
    X, _ = _streams(200, 800)
    X[:, ::4] = 0  # dead inputs, a quarter of them
    W = torch.randn(48, 200)
    ours = _solve(W, X, None, act_order=False).weight
    theirs = _sparsegpt_transcription(W, X.double().T @ X.double() / 800, 0.5)
    assert torch.equal(ours == 0, theirs == 0)
    torch.testing.assert_close(ours.double(), theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("two_stream", [True, False], ids=["duogpt", "sparsegpt"])
@pytest.mark.parametrize("fraction", [0.5, 0.3])
def test_every_block_reaches_the_target_sparsity(two_stream, fraction):
    k, n = 300, 64  # blocks of 128, 128 and 44 columns
    X_hat, X_tilde = _streams(k, 500)
    solver = OBSSolver(k, WeightSparsity.of(fraction), two_stream=two_stream)
    solver.add_batch(X_hat, X_tilde if two_stream else None)
    pruned = solver.prune(torch.randn(n, k)).weight[:, solver.factors().perm]  # processing order
    for i1 in range(0, k, 128):
        block = pruned[:, i1:i1 + 128]
        assert int((block == 0).sum()) == int(block.numel() * fraction)


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8)])
@pytest.mark.parametrize("method", ["duogpt", "sparsegpt", "wanda", "magnitude"])
def test_nm_masks_are_valid(method, n, m):
    k = 128
    X_hat, X_tilde = _streams(k, 300)
    pruner = _pruner(method, k, WeightSparsity.of((n, m)), act_order=False)
    pruner.add_batch(X_hat, X_tilde)
    pruned = pruner.prune(torch.randn(40, k)).weight
    zeros_per_group = (pruned == 0).view(40, k // m, m).sum(-1)
    assert bool((zeros_per_group == n).all())


@pytest.mark.parametrize("two_stream", [True, False], ids=["duogpt", "sparsegpt"])
def test_the_lazy_update_carries_every_term_across_blocks(two_stream):
    """N:M masks are chosen inside the column loop, so how the columns are cut into blocks must
    not matter: between blocks the lazy update applies both the error term (`Err1 U`) and, with two
    streams, the compensation term (`Wpre1 P`) to every later column."""
    X_hat, X_tilde = _streams(256, 600)
    W = torch.randn(64, 256)
    two_four = WeightSparsity.of((2, 4))
    X_tilde = X_tilde if two_stream else None
    whole = _solve(W, X_hat, X_tilde, two_four, act_order=False, blocksize=256).weight
    blocks = _solve(W, X_hat, X_tilde, two_four, act_order=False, blocksize=32).weight
    assert torch.equal(whole == 0, blocks == 0)
    torch.testing.assert_close(blocks, whole, rtol=1e-4, atol=1e-4)


def test_act_order_processes_inputs_by_descending_hessian_diagonal():
    X_hat, _ = _streams(96, 300)
    solver = OBSSolver(96, HALF, two_stream=False)
    solver.add_batch(X_hat)
    diagonal = solver.H.diagonal().clone()
    assert torch.equal(solver.factors().perm, torch.argsort(diagonal, descending=True))


@pytest.mark.parametrize("method, kwargs", [
    ("duogpt", {}), ("duogpt", {"act_order": False}), ("sparsegpt", {}),
    ("sparsegpt", {"act_order": False}), ("wanda", {}), ("magnitude", {}),
], ids=["duogpt", "duogpt-in-order", "sparsegpt", "sparsegpt-in-order", "wanda", "magnitude"])
def test_pruning_leaves_the_callers_weight_as_it_was(method, kwargs):
    X_hat, X_tilde = _streams(64, 200)
    pruner = _pruner(method, 64, **kwargs)
    pruner.add_batch(X_hat, X_tilde)
    W = torch.randn(16, 64)
    before = W.clone()
    pruner.prune(W)
    assert torch.equal(W, before)


@pytest.mark.parametrize("method", ["wanda", "magnitude"])
def test_mask_only_baselines_return_float32_with_the_kept_weights_unchanged(method):
    pruner = _pruner(method, 64)
    pruner.add_batch(torch.randn(200, 64))
    W = torch.randn(16, 64).bfloat16()
    pruned = pruner.prune(W).weight
    assert pruned.dtype == torch.float32
    assert torch.equal(pruned, W.float() * (pruned != 0))


@pytest.mark.parametrize("sparsity", [HALF, WeightSparsity.of((2, 4))], ids=["unstructured", "2:4"])
@pytest.mark.parametrize("two_stream", [True, False], ids=["duogpt", "sparsegpt"])
def test_dead_inputs_are_always_pruned_and_few_samples_give_finite_weights(sparsity, two_stream):
    k = 160
    X_hat, X_tilde = _streams(k, 50)  # 50 tokens < 160 inputs: H is singular before dampening
    dead = torch.zeros(k, dtype=torch.bool)
    dead[::9] = dead[4:7] = True  # inputs that top-k never kept; three in one 2:4 group
    X_hat[:, dead] = 0
    result = _solve(torch.randn(32, k), X_hat, X_tilde if two_stream else None, sparsity,
                    act_order=not sparsity.is_nm)
    assert result.weight.isfinite().all()
    assert bool((result.weight[:, dead] == 0).all())


def _solver_with_hessian(H: torch.Tensor, percdamp: float = 0.01) -> OBSSolver:
    solver = OBSSolver(H.shape[0], HALF, two_stream=False, act_order=False, label="test group",
                       percdamp=percdamp)
    solver.H = H.clone()
    return solver


# Eigenvalues 4 and -2 with mean diag 1: positive definite only once percdamp > 2.
INDEFINITE_H = torch.block_diag(*[torch.tensor([[1.0, 3.0], [3.0, 1.0]])] * 32)


def test_failed_cholesky_escalates_dampening(caplog):
    W = torch.randn(8, 64)
    with caplog.at_level(logging.WARNING, logger="duogpt.solver.obs"):
        result = _solver_with_hessian(INDEFINITE_H).prune(W)
    assert result.percdamp == pytest.approx(10.0)  # 0.01, 0.1 and 1 failed
    assert "Cholesky failed" in caplog.text and "test group" in caplog.text
    # Each retry damps the undamped H: the result is that of a solver started at 10.
    assert torch.equal(result.weight, _solver_with_hessian(INDEFINITE_H, percdamp=10.0).prune(W).weight)


def test_inverse_factor_refuses_a_factor_that_overflows_float32():
    """`H` may pass its Cholesky and still have an inverse beyond float32 (a pivot below ~3e-39):
    that is no usable factor either, so the solver gets None (and damps more), not an infinite U."""
    H = torch.ones(4).diag()
    H[3, 3] = 1e-40
    assert torch.linalg.cholesky_ex(H).info.item() == 0
    assert inverse_factor(H, percdamp=0.0) is None
    assert inverse_factor(H, percdamp=0.01) is not None


def test_inverse_factor_leaves_H_as_it_was():
    H = INDEFINITE_H + 3 * torch.eye(64)
    before = H.clone()
    assert inverse_factor(H, percdamp=0.5) is not None
    assert torch.equal(H, before)


@pytest.mark.parametrize("H, percdamp", [
    (torch.block_diag(*[torch.tensor([[1.0, 30.0], [30.0, 1.0]])] * 32), 0.01),
    (INDEFINITE_H, 1.5),  # the next step, 15, would pass MAX_PERCDAMP = 10
    (INDEFINITE_H, 1.05),  # so would 10.5, just past it
], ids=["hopeless", "past-the-cap", "just-past-the-cap"])
def test_hessian_that_needs_more_than_the_maximum_dampening_names_the_fix(H, percdamp):
    with pytest.raises(ValueError, match="nsamples"):
        _solver_with_hessian(H, percdamp).prune(torch.randn(8, 64))


@pytest.mark.parametrize("stream", ["X_hat", "X_tilde"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_calibration_inputs_are_named_not_blamed_on_dampening(stream, value):
    X_hat, X_tilde = _streams(32, 200)
    {"X_hat": X_hat, "X_tilde": X_tilde}[stream][3, 10] = value
    with pytest.raises(ValueError, match="NaN or Inf.*float32"):
        _solve(torch.randn(8, 32), X_hat, X_tilde, blocksize=32)


@pytest.mark.parametrize("act_order, blocksize", [(True, 128), (False, 130)],
                         ids=["act-order", "blocks-split-groups"])
def test_nm_solver_refuses_act_order_and_blocks_that_split_its_groups(act_order, blocksize):
    with pytest.raises(ValueError, match="N:M pruning needs act_order off"):
        OBSSolver(256, WeightSparsity.of((2, 4)), two_stream=True, act_order=act_order,
                  blocksize=blocksize)


@pytest.mark.parametrize("act_order", [True, False], ids=["act-order", "in-order"])
@pytest.mark.parametrize("two_stream", [True, False], ids=["duogpt", "sparsegpt"])
def test_half_precision_inputs_and_weights_are_solved_in_float32(two_stream, act_order):
    """A bfloat16 model calibrates and prunes as its float32 cast would: the statistics accumulate
    in float32 and the pruned weight comes back float32."""
    X_hat, X_tilde = (x.bfloat16() for x in _streams(64, 200))
    W = torch.randn(16, 64).bfloat16()
    X_tilde = X_tilde if two_stream else None
    half = _solve(W, X_hat, X_tilde, act_order=act_order).weight
    full = _solve(W.float(), X_hat.float(), None if X_tilde is None else X_tilde.float(),
                  act_order=act_order).weight
    assert half.dtype == torch.float32
    assert torch.equal(half, full)


def test_factorising_consumes_the_statistics():
    """A group holds its statistics or its factors, never both (the memory of `H` is freed)."""
    X_hat, X_tilde = _streams(32, 100)
    solver = OBSSolver(32, HALF, two_stream=True)
    solver.add_batch(X_hat, X_tilde)
    solver.prune(torch.randn(4, 32))
    assert solver.H is None and solver.Delta is None and solver.a is None


@pytest.mark.parametrize("sparsity", [HALF, WeightSparsity.of((2, 4))], ids=["unstructured", "2:4"])
def test_native_and_reference_block_loops_agree(sparsity):
    X_hat, X_tilde = _streams(256, 400)
    W = torch.randn(80, 256)
    kwargs = {"sparsity": sparsity, "act_order": not sparsity.is_nm}
    native = _solve(W, X_hat, X_tilde, **kwargs).weight
    ref = _solve(W, X_hat, X_tilde, block_kernel=reference.obs_prune_block, **kwargs).weight
    assert torch.equal(native, ref)


def test_duogpt_fits_the_dense_output_better_than_sparsegpt():
    """The point of the method: with activation-sparse inputs, DuoGPT's pruned layer is closer to
    the dense layer on dense inputs than SparseGPT's (the objective of docs/algorithm.md 2)."""
    X_hat, X_tilde = _streams(256, 2000)
    W = torch.randn(128, 256)
    target = X_tilde @ W.T
    duo = _solve(W, X_hat, X_tilde, alpha=0.5).weight
    sparsegpt = _solve(W, X_hat).weight
    assert (X_hat @ duo.T - target).square().mean() < (X_hat @ sparsegpt.T - target).square().mean()


def test_wanda_prunes_the_lowest_scores_of_each_row():
    X = torch.randn(100, 16) * torch.linspace(0.1, 2.0, 16)
    pruner = WandaPruner(16, HALF)
    pruner.add_batch(X)
    W = torch.randn(6, 16)
    pruned = pruner.prune(W).weight
    scores = W.abs() * X.square().mean(0).sqrt()
    assert torch.equal(pruned == 0, scores <= scores.median(dim=1, keepdim=True).values)


def test_wanda_accumulates_the_mean_square_over_uneven_half_precision_batches():
    X = (torch.randn(300, 16) * 300).half()  # squares overflow float16
    pruner = WandaPruner(16, HALF)
    for chunk in (X[:7], X[7:150], X[150:]):
        pruner.add_batch(chunk)
    torch.testing.assert_close(pruner.scaler_row, X.float().square().mean(0))


def test_magnitude_prunes_the_smallest_weights_of_the_whole_matrix():
    W = torch.randn(12, 40)
    pruned = MagnitudePruner(WeightSparsity.of(0.3)).prune(W).weight
    assert int((pruned == 0).sum()) == int(W.numel() * 0.3)
    assert pruned[pruned != 0].abs().min() > W.abs()[pruned == 0].max()


def test_nm_ties_prune_the_lower_columns_first():
    assert torch.equal(nm_lowest(torch.zeros(3, 64), 32, 64), (torch.arange(64) < 32).expand(3, 64))


@pytest.mark.parametrize("method", ["duogpt", "wanda"])
def test_free_releases_every_tensor(method):
    X_hat, X_tilde = _streams(32, 50)
    pruner = _pruner(method, 32)
    pruner.add_batch(X_hat, X_tilde)
    pruner.prune(torch.randn(4, 32))
    pruner.free()
    assert [name for name, v in vars(pruner).items() if isinstance(v, (torch.Tensor, tuple))] == []


@pytest.mark.parametrize("value", [0.0, 0.99, (1, 2), (2, 4), (63, 64)])
def test_weight_sparsity_round_trips_through_its_spec(value):
    sparsity = WeightSparsity.of(value)
    assert sparsity.spec() == value and WeightSparsity.of(sparsity.spec()) == sparsity


def test_weight_sparsity_prints_and_records_its_kind():
    assert (str(HALF), str(WeightSparsity.of((2, 4)))) == ("0.5 unstructured", "2:4")
    assert HALF.to_json() == {"type": "unstructured", "fraction": 0.5}
    assert WeightSparsity.of((2, 4)).to_json() == {"type": "nm", "n": 2, "m": 4}


@pytest.mark.parametrize("args", [(1.0,), (-0.1,), (0.5, 2, 0), (0.5, 0, 4), (0.5, 3, 2), (0.5, 1, 65)])
def test_weight_sparsity_refuses_what_no_pruner_can_reach(args):
    with pytest.raises(ValueError, match="weight sparsity must be in|0 < N < M <= 64"):
        WeightSparsity(*args)


def test_threshold_histogram_interpolates_inside_its_bins():
    histogram = ThresholdHistogram(bins=10)  # coarse: a quantile falls inside a bin
    histogram.add(torch.rand(200_000))
    for fraction in (0.05, 0.15, 0.35, 0.5, 0.85):  # 0.05: inside the first bin
        threshold = histogram.threshold(fraction)
        assert isinstance(threshold, float) and threshold == pytest.approx(fraction, abs=0.01)


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_threshold_histogram_refuses_a_fraction_outside_0_1(fraction):
    histogram = ThresholdHistogram()
    histogram.add(torch.rand(100))
    with pytest.raises(ValueError, match=r"a fraction in \(0, 1\)"):
        histogram.threshold(fraction)


def test_threshold_histogram_finds_the_quantile():
    x = torch.randn(64, 256, 512)
    histogram = ThresholdHistogram()
    for chunk in x:
        histogram.add(chunk)
    t = histogram.threshold(0.5)
    assert (x.abs() <= t).float().mean().item() == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("scale", [1e-3, 1e3])
def test_threshold_histogram_finds_the_quantile_at_any_scale(scale):
    """The bins span the first batch's own range, whatever the activations' magnitude."""
    x = torch.randn(200_000) * scale
    histogram = ThresholdHistogram()
    histogram.add(x)
    t = histogram.threshold(0.5)
    assert (x.abs() <= t).float().mean().item() == pytest.approx(0.5, abs=1e-3)


def test_threshold_histogram_counts_half_precision_activations_as_their_float32_values():
    x = torch.randn(64, 512).bfloat16()
    half, full = ThresholdHistogram(), ThresholdHistogram()
    half.add(x)
    full.add(x.float())
    assert half.threshold(0.5) == full.threshold(0.5)


def test_threshold_histogram_takes_later_batches_inside_the_first_ones_range():
    x = torch.rand(2, 100_000) * torch.tensor([[1.0], [0.5]])  # the second reaches no outlier bin
    histogram = ThresholdHistogram()
    for batch in x:
        histogram.add(batch)
    t = histogram.threshold(0.5)
    assert (x.abs() <= t).float().mean().item() == pytest.approx(0.5, abs=1e-3)


def test_threshold_histogram_starting_with_zeros_spans_zero_to_one():
    """A first batch that is (almost) all zeros, as a dead input gives, has no range of its own:
    the bins span [0, 1] instead (later activations past 1 would fall in the overflow bin)."""
    x = torch.cat([torch.zeros(100_000), torch.rand(100_000)])
    histogram = ThresholdHistogram()
    for batch in x.chunk(2):
        histogram.add(batch)
    t = histogram.threshold(0.75)
    assert (x <= t).float().mean().item() == pytest.approx(0.75, abs=1e-3)


def test_threshold_histogram_counts_nan_and_inf_activations_as_the_largest():
    x = torch.rand(100_000)
    x[:3000], x[3000:5000] = math.nan, math.inf  # 5 % non-finite: past the first batch's q99
    histogram = ThresholdHistogram()
    histogram.add(x)
    t = histogram.threshold(0.5)
    assert math.isfinite(t) and (x.abs() <= t).float().mean().item() == pytest.approx(0.5, abs=1e-3)


def test_threshold_histogram_keeps_every_outlier_when_the_quantile_lies_among_them():
    """Past the first batch's 99th percentile the histogram cannot resolve: the threshold is that
    percentile, not an extrapolation beyond it."""
    x = torch.rand(100_000)
    histogram = ThresholdHistogram()
    histogram.add(x)
    assert histogram.threshold(0.995) == x.kthvalue(99_000).values.item()
