import pytest
import torch

from optimum_msp.masks import (
    lowest_mask, measure_layer, nm_mask, nm_violations, row_prune_counts, unstructured_mask,
)


@pytest.mark.parametrize("n,m", [(0, 4), (1, 4), (2, 4), (3, 4), (4, 4), (2, 8), (3, 8), (5, 8)])
def test_nm_mask_keeps_exactly_n_per_group(n, m):
    scores = torch.randn(16, 64, generator=torch.Generator().manual_seed(n * 10 + m))
    mask = nm_mask(scores, n, m)
    kept = mask.reshape(16, 64 // m, m).sum(dim=2)
    assert torch.all(kept == n)
    assert nm_violations(scores * mask, n, m) == 0
    # the kept weights are the group's n largest
    groups = scores.reshape(16, -1, m)
    kept_min = torch.where(mask.reshape(16, -1, m), groups, torch.full_like(groups, float("inf"))).amin(dim=2)
    dropped_max = torch.where(~mask.reshape(16, -1, m), groups, torch.full_like(groups, -float("inf"))).amax(dim=2)
    assert torch.all(kept_min >= dropped_max)


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.6, 0.75, 1.0])
def test_unstructured_mask_exact_per_row(sparsity):
    scores = torch.rand(8, 40, generator=torch.Generator().manual_seed(1))
    mask = unstructured_mask(scores, sparsity)
    expected_pruned = round(40 * sparsity)
    assert torch.all((~mask).sum(dim=1) == expected_pruned)
    for row in range(8):
        if 0 < expected_pruned < 40:
            assert scores[row][mask[row]].min() >= scores[row][~mask[row]].max()


@pytest.mark.parametrize("rows,cols,sparsity",
                         [(8, 40, 0.537), (7, 64, 0.755), (5, 63, 0.5), (16, 64, 0.7), (3, 10, 1 / 3)])
def test_unstructured_mask_off_the_row_grid_prunes_the_layers_nearest_count(rows, cols, sparsity):
    """A target off the 1/cols grid: the layer loses round(sparsity * numel) weights (not round(sparsity * cols) in
    every row, which is up to half a weight per row off), rows differ by at most one, each row's lowest."""
    scores = torch.rand(rows, cols, generator=torch.Generator().manual_seed(rows * cols))
    scores[:, ::5] = 0.5  # ties, so the tie-break decides part of the mask
    mask = unstructured_mask(scores, sparsity)
    pruned = (~mask).sum(dim=1)
    assert int(pruned.sum()) == round(sparsity * rows * cols)
    assert int(pruned.max()) - int(pruned.min()) <= 1
    for row in range(rows):  # each row prunes its lowest scores, ties to the lower index (a stable sort)
        expected = torch.ones(cols, dtype=torch.bool)
        expected[torch.sort(scores[row], stable=True).indices[: int(pruned[row])]] = False
        assert torch.equal(mask[row], expected)


def test_row_counts_on_the_grid_are_the_same_in_every_row():
    for cols, sparsity in ((40, 0.6), (64, 0.75), (10, 0.7), (64, 0.0), (64, 1.0)):
        counts = row_prune_counts(9, cols, sparsity)
        assert counts.tolist() == [round(sparsity * cols)] * 9


def test_lowest_mask_refuses_counts_that_differ_by_more_than_one():
    with pytest.raises(ValueError, match="at most one"):
        lowest_mask(torch.rand(2, 8), torch.tensor([1, 3]))


def test_ties_break_deterministically_towards_lower_index():
    scores = torch.ones(2, 8)
    mask = unstructured_mask(scores, 0.5)
    assert mask.tolist() == [[False] * 4 + [True] * 4] * 2
    mask = nm_mask(scores, 2, 4)
    assert mask[0].tolist() == [False, False, True, True, False, False, True, True]


@pytest.mark.parametrize("n,m", [(5, 4), (-1, 4)])
def test_nm_rejects_bad_n(n, m):
    with pytest.raises(ValueError, match="0 <= N <= M"):
        nm_mask(torch.rand(2, 8), n, m)


@pytest.mark.parametrize("m", [0, -4])
def test_nm_rejects_bad_m(m):
    with pytest.raises(ValueError, match="M >= 1"):
        nm_mask(torch.rand(2, 8), 1, m)


def test_nm_rejects_indivisible_width():
    with pytest.raises(ValueError, match="divisible"):
        nm_mask(torch.rand(2, 10), 2, 4)


def test_checker_counts_violations_and_zeros():
    weight = torch.tensor([[1.0, 0.0, 2.0, 0.0, 1.0, 1.0, 1.0, 0.0]])
    report = measure_layer(weight, (2, 4))
    assert report.zeros == 3 and report.numel == 8
    assert report.nm_violations == 1  # second group keeps 3
    assert report.sparsity == pytest.approx(3 / 8)
