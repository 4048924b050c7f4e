"""`obs_prune_block`, the solver's fused column loop: bit-for-bit equal to its reference."""

from __future__ import annotations

import pytest
import torch
from oracles import block_problem

from duogpt import ops
from duogpt.ops import reference


def run_both(W1, U1, P1, **rule):
    """(native, reference) results: (pruned W1, Err1, Wpre1) of each."""
    mask, (prunen, prunem), coef = rule.get("mask"), rule.get("nm", (0, 0)), rule.get("score_coef")
    A, R = W1.clone(), W1.clone()
    native = ops.obs_prune_block(A, U1, P1, **rule)
    ref = reference.obs_prune_block(R, U1, P1, mask, prunen, prunem, coef)
    return (A, *native), (R, *ref)


@pytest.mark.parametrize("density", [0.0, 0.5, 0.9, 1.0], ids=lambda d: f"prune{int(d * 100)}")
@pytest.mark.parametrize("with_P", [False, True], ids=["sparsegpt", "duogpt"])
@pytest.mark.parametrize("n, B", [(1, 1), (1, 128), (37, 5), (300, 128), (64, 200)])
def test_mask_rule_matches_reference_bit_for_bit(n, B, with_P, density):
    W1, U1, P1 = block_problem(n, B, with_P)
    mask = torch.rand(n, B) < density
    native, ref = run_both(W1, U1, P1, mask=mask)
    for got, want in zip(native, ref):  # pruned W1, Err1 and Wpre1 (which feeds the lazy update)
        assert torch.equal(got, want)
    pruned = native[0]
    assert (pruned[mask] == 0).all() and (pruned[~mask] != 0).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_weight_stays_in_its_row(bad):
    # Rows are independent: a NaN/Inf weight spoils the later columns of its own row only, exactly
    # as in the reference.
    W1, U1, P1 = block_problem(6, 16, with_P=True)
    W1[2, 3] = bad
    native, ref = run_both(W1, U1, P1, mask=torch.rand(6, 16) < 0.5)
    for got, want in zip(native, ref):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    others = torch.arange(6) != 2
    assert native[0][others].isfinite().all() and not native[0][2, 3:].isfinite().all()


@pytest.mark.parametrize("with_P", [False, True], ids=["sparsegpt", "duogpt"])
@pytest.mark.parametrize("nm", [(2, 4), (4, 8), (1, 4)], ids=lambda nm: f"{nm[0]}of{nm[1]}")
def test_nm_rule_matches_reference_and_is_valid(nm, with_P):
    n, B = 70, 128
    W1, U1, P1 = block_problem(n, B, with_P)
    coef = 1 / U1.diag() ** 2
    native, ref = run_both(W1, U1, P1, nm=nm, score_coef=coef)
    for got, want in zip(native, ref):
        assert torch.equal(got, want)
    zeros_per_group = (native[0].view(n, B // nm[1], nm[1]) == 0).sum(-1)
    assert (zeros_per_group == nm[0]).all()


@pytest.mark.parametrize("nm", [(2, 4), (16, 32), (24, 64)], ids=lambda nm: f"{nm[0]}of{nm[1]}")
def test_nm_ties_prune_the_lower_columns_first(nm):
    # Every weight of a row has the same magnitude and U1 = I compensates nothing, so all scores
    # of a group tie: each group prunes its first N columns, in the kernel as in the reference,
    # also for M > 16, where an unstable sort reorders ties.
    n, B = 3, 64
    W1 = torch.tensor([1.0, -2.0, 0.5])[:, None].expand(n, B).contiguous()
    native, ref = run_both(W1, torch.eye(B), None, nm=nm, score_coef=torch.ones(B))
    for got, want in zip(native, ref):
        assert torch.equal(got, want)
    assert torch.equal(native[0] == 0, (torch.arange(B) % nm[1] < nm[0]).expand(n, B))


def test_pruning_nothing_changes_nothing():
    W1, U1, _ = block_problem(10, 16, with_P=False)
    native, _ = run_both(W1, U1, None, mask=torch.zeros(10, 16, dtype=torch.bool))
    assert torch.equal(native[0], W1) and (native[1] == 0).all()


@pytest.mark.parametrize("kwargs, message", [
    ({"mask": torch.zeros(5, 8, dtype=torch.bool)}, "mask must be"),
    ({"mask": torch.zeros(4, 8, dtype=torch.uint8)}, "mask must have dtype"),
    ({"nm": (2, 3), "score_coef": torch.ones(8)}, "M dividing"),
    ({"nm": (4, 4), "score_coef": torch.ones(8)}, "0 < N < M"),
    ({"nm": (0, 4), "score_coef": torch.ones(8)}, "0 < N < M"),
    ({"nm": (2, 4), "score_coef": torch.ones(8, dtype=torch.float64)}, "score_coef must have dtype"),
    ({"nm": (2, 4)}, "score_coef"),
    ({"mask": torch.zeros(4, 8, dtype=torch.bool), "nm": (2, 4)}, "either a mask or"),
    ({}, "got neither"),
], ids=["mask-shape", "mask-dtype", "m-not-dividing", "n-equals-m", "n-zero", "coef-dtype", "no-coef", "both",
        "neither"])
def test_bad_rules_are_rejected(kwargs, message):
    W1, U1, _ = block_problem(4, 8, with_P=False)
    with pytest.raises((ValueError, TypeError), match=message):
        ops.obs_prune_block(W1, U1, **kwargs)


def test_n_m_groups_wider_than_64_are_rejected():
    W1, U1, _ = block_problem(2, 128, with_P=False)
    with pytest.raises(ValueError, match="M <= 64"):
        ops.obs_prune_block(W1, U1, nm=(2, 128), score_coef=torch.ones(128))


def test_bad_blocks_and_factors_are_rejected():
    W1, U1, _ = block_problem(4, 8, with_P=False)
    mask = torch.zeros(4, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"U1 must be \[8, 8\] for a block of 8 columns"):
        ops.obs_prune_block(W1, U1[:4, :4].contiguous(), mask=mask)
    with pytest.raises(TypeError, match="W1 must have dtype"):
        ops.obs_prune_block(W1.double(), U1, mask=mask)
    with pytest.raises(ValueError, match="contiguous"):
        ops.obs_prune_block(W1, U1.t(), mask=mask)
    with pytest.raises(ValueError, match="W1 must be contiguous"):
        ops.obs_prune_block(torch.randn(8, 4).t(), U1, mask=mask)
    with pytest.raises(TypeError, match="U1 must have dtype"):
        ops.obs_prune_block(W1, U1.half(), mask=mask)
    with pytest.raises(ValueError, match=r"P1 must be \[8, 8\]"):
        ops.obs_prune_block(W1, U1, torch.zeros(8, 4), mask=mask)
    with pytest.raises(TypeError, match="P1 must have dtype"):
        ops.obs_prune_block(W1, U1, torch.zeros(8, 8, dtype=torch.float64), mask=mask)
    with pytest.raises(ValueError, match="P1 must be contiguous"):
        ops.obs_prune_block(W1, U1, torch.zeros(8, 8).t(), mask=mask)
    with pytest.raises(ValueError, match="score_coef must have 8 entries"):
        ops.obs_prune_block(W1, U1, nm=(2, 4), score_coef=torch.ones(4))
    # Empty tensors all report address 0: a block without rows is not mistaken for aliasing.
    with pytest.raises(ValueError, match="block must have positive sizes, got 0 x 8"):
        ops.obs_prune_block(torch.empty(0, 8), U1, mask=torch.zeros(0, 8, dtype=torch.bool))


@pytest.mark.parametrize("diagonal", [0.0, -1.0, float("nan"), float("inf")])
def test_a_factor_without_a_positive_finite_diagonal_is_rejected_on_cpu(diagonal):
    W1, U1, _ = block_problem(4, 8, with_P=False)
    U1[3, 3] = diagonal
    before = W1.clone()
    with pytest.raises(ValueError, match=r"U1\[3, 3\] is .*positive finite diagonal"):
        ops.obs_prune_block(W1, U1, mask=torch.zeros(4, 8, dtype=torch.bool))
    assert torch.equal(W1, before)  # refused before the block is touched


def test_opcheck():
    W1, U1, P1 = block_problem(12, 16, with_P=True)
    mask = torch.rand(12, 16) < 0.5
    torch.library.opcheck(torch.ops.duogpt.obs_prune_block, (W1, U1, P1, mask, 0, 0, None))
    torch.library.opcheck(torch.ops.duogpt.obs_prune_block,
                          (W1, U1, None, None, 2, 4, 1 / U1.diag() ** 2))


@pytest.mark.parametrize("alias", ["U1", "P1"])
def test_an_input_sharing_memory_with_the_updated_block_is_refused(alias):
    W1, U1, P1 = block_problem(8, 8, with_P=True)
    inputs = {"U1": U1, "P1": P1} | {alias: W1}  # an [8, 8] W1 fits where U1 or P1 goes
    with pytest.raises(ValueError, match=f"{alias} shares memory with W1"):
        ops.obs_prune_block(W1, inputs["U1"], inputs["P1"], mask=torch.zeros(8, 8, dtype=torch.bool))


def test_inputs_on_two_devices_are_refused():
    """The meta device stands in for a second device."""
    W1, U1, P1 = block_problem(4, 8, with_P=True)
    mask = torch.zeros(4, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match="U1 is on meta but W1 is on cpu"):
        ops.obs_prune_block(W1, U1.to("meta"), P1, mask=mask)
    with pytest.raises(ValueError, match="mask is on meta but W1 is on cpu"):
        ops.obs_prune_block(W1, U1, P1, mask=mask.to("meta"))


@pytest.mark.parametrize("B, kwargs, message", [
    (8, {"mask": torch.zeros(5, 8, dtype=torch.bool)}, "mask must be"),
    (8, {"nm": (2, 3)}, "M dividing the block width 8"),
    (8, {"nm": (4, 4)}, "0 < N < M"),
    (8, {"nm": (0, 4)}, "0 < N < M"),
    (65, {"nm": (1, 65)}, "M <= 64"),
], ids=["mask-shape", "m-not-dividing", "n-equals-m", "n-zero", "m-65"])
def test_the_fake_kernel_refuses_what_the_cpu_kernel_refuses(B, kwargs, message):
    """torch.compile traces the op through its fake kernel (run here on the meta device), which
    states the op's contract as the CPU kernel does."""
    meta = {"device": "meta"}
    if "nm" in kwargs:
        kwargs = kwargs | {"score_coef": torch.ones(B, **meta)}
    else:
        kwargs = {"mask": kwargs["mask"].to("meta")}
    with pytest.raises(ValueError, match=message):
        ops.obs_prune_block(torch.zeros(4, B, **meta), torch.zeros(B, B, **meta), **kwargs)
