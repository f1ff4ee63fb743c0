import pytest
import torch

from optimum_msp.plan import LayerTarget
from optimum_msp.pruners import PRUNERS, get_pruner
from optimum_msp.pruners.wanda import InputNorms


def _layer_data(seed=0, rows=16, cols=64, tokens=256):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator)
    # correlated inputs with uneven feature scales, as real activations have
    x = torch.randn(tokens, cols, generator=generator) @ torch.randn(cols, cols, generator=generator) * 0.3
    x = x * torch.linspace(0.1, 3.0, cols)[torch.randperm(cols, generator=generator)]
    return weight, x


def _stats(pruner, x, chunks=4):
    stats = pruner.new_statistics(x.shape[1])
    for part in x.chunk(chunks):
        stats.add_batch(part)
    return stats


def test_registry_lists_methods():
    assert {"magnitude", "wanda", "sparsegpt"} <= set(PRUNERS)
    with pytest.raises(ValueError, match="Unknown pruning method 'nope'"):
        get_pruner("nope")


def test_wanda_scores_equal_hand_computation():
    weight, x = _layer_data()
    pruner = get_pruner("wanda")
    stats = _stats(pruner, x)
    by_hand = torch.zeros_like(weight)
    for i in range(weight.shape[0]):
        for j in range(weight.shape[1]):
            by_hand[i, j] = abs(weight[i, j]) * torch.sqrt(sum(x[t, j] ** 2 for t in range(x.shape[0])))
    torch.testing.assert_close(pruner.scores(weight, stats), by_hand, rtol=1e-4, atol=1e-5)


def test_wanda_prunes_lowest_score_per_row():
    weight, x = _layer_data(1)
    pruner = get_pruner("wanda")
    stats = _stats(pruner, x)
    pruned = pruner.prune(weight, stats, LayerTarget(0.5))
    scores = weight.abs() * x.norm(dim=0)
    for row in range(weight.shape[0]):
        kept = pruned[row] != 0
        assert kept.sum() == 32
        assert scores[row][kept].min() >= scores[row][~kept].max()


def test_magnitude_needs_no_data():
    weight, _ = _layer_data(2)
    pruner = get_pruner("magnitude")
    assert not pruner.needs_calibration
    pruned = pruner.prune(weight, None, LayerTarget.nm(2, 4))
    ranks = weight.abs().reshape(16, -1, 4).argsort(dim=2).argsort(dim=2)
    assert torch.equal(pruned != 0, (ranks >= 2).reshape(16, 64))


def _reconstruction_error(weight, pruned, x):
    return torch.linalg.norm(x @ weight.t() - x @ pruned.t()).item()


@pytest.mark.parametrize("target", [LayerTarget(0.5), LayerTarget(0.75), LayerTarget.nm(2, 4), LayerTarget.nm(2, 8)])
def test_sparsegpt_reconstructs_better_than_wanda_at_same_density(target):
    weight, x = _layer_data(3)
    wanda, sparsegpt = get_pruner("wanda"), get_pruner("sparsegpt")  # default 128-column blocks
    w_pruned = wanda.prune(weight, _stats(wanda, x), target)
    s_pruned = sparsegpt.prune(weight, _stats(sparsegpt, x), target)
    assert (s_pruned == 0).sum() == (w_pruned == 0).sum()
    assert _reconstruction_error(weight, s_pruned, x) < _reconstruction_error(weight, w_pruned, x)
    if target.is_nm:
        groups = (s_pruned != 0).reshape(16, -1, target.m).sum(dim=2)
        assert torch.all(groups <= target.n)


def test_sparsegpt_survives_singular_hessian(caplog):
    weight, _ = _layer_data(4)
    x = torch.zeros(64, 64)
    x[:, 0] = 1.0  # rank-one inputs, many dead features
    x[:, 1] = 1.0  # two identical features: singular even after removing dead ones
    pruner = get_pruner("sparsegpt", block_size=16, dampening=0.0)
    pruned = pruner.prune(weight, _stats(pruner, x), LayerTarget(0.5))
    assert torch.isfinite(pruned).all()
    assert "not positive definite" in caplog.text


def test_input_statistics_accumulate_over_batches():
    _, x = _layer_data(5)
    stats = InputNorms(x.shape[1])
    for part in x.chunk(3):
        stats.add_batch(part)
    torch.testing.assert_close(stats.norms, x.norm(dim=0), rtol=1e-5, atol=1e-5)
    hessian = get_pruner("sparsegpt").new_statistics(x.shape[1])
    for part in x.chunk(3):
        hessian.add_batch(part)
    torch.testing.assert_close(hessian.hessian, 2 * x.t() @ x / x.shape[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("in_features", [1, 255, 256, 600])
def test_block_triangular_hessian_equals_full_product(in_features):
    # 600 inputs span three column blocks: off-diagonal blocks are computed once and mirrored
    torch.manual_seed(0)
    x = torch.randn(40, in_features, dtype=torch.float64).float()
    hessian = get_pruner("sparsegpt").new_statistics(in_features)
    for part in x.chunk(2):
        hessian.add_batch(part)
    expected = 2 * x.double().t() @ x.double() / x.shape[0]
    torch.testing.assert_close(hessian.hessian.double(), expected, rtol=1e-5, atol=1e-4)
    assert torch.equal(hessian.hessian, hessian.hessian.t())


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7, 0.8])
def test_sparsegpt_block_mask_prunes_the_lowest_saliencies_ties_to_the_lower_flat_index(sparsity):
    from optimum_msp.pruners.sparsegpt import SparseGPTPruner

    generator = torch.Generator().manual_seed(3)
    block = torch.randn(24, 16, generator=generator)
    block[::3, ::2] = 0.5  # many equal saliencies, so the tie-break decides part of the mask
    diag = torch.rand(16, generator=generator) + 0.5
    saliency = (block**2 / diag**2).flatten()
    count = round(saliency.numel() * sparsity)
    pruned = SparseGPTPruner._unstructured_block_mask(block, diag, count)
    expected = torch.zeros(saliency.numel(), dtype=torch.bool)
    expected[torch.sort(saliency, stable=True).indices[:count]] = True  # a stable sort: the reference
    assert int(pruned.sum()) == count
    assert torch.equal(pruned.flatten(), expected)


@pytest.mark.parametrize("block_size", [16, 7, 128])
def test_sparsegpt_prunes_the_layers_nearest_count_over_several_blocks(block_size):
    # 12 x 16 at 0.6 is 115.2 per block: rounding each block alone loses a weight every few blocks
    weight, x = _layer_data(seed=6, rows=12, cols=48, tokens=256)
    pruner = get_pruner("sparsegpt", block_size=block_size)
    pruned = pruner.prune(weight, _stats(pruner, x), LayerTarget(0.6))
    assert int((pruned == 0).sum()) == round(0.6 * 12 * 48)


def test_wanda_off_the_row_grid_prunes_the_layers_nearest_count():
    weight, x = _layer_data(7, rows=16, cols=64)
    pruner = get_pruner("wanda")
    pruned = pruner.prune(weight, _stats(pruner, x), LayerTarget(0.755))  # 48.32 per row
    assert int((pruned == 0).sum()) == round(0.755 * 16 * 64)


def _textbook_sparsegpt(weight, hessian, target, block_size, dampening=0.01):
    """SparseGPT as the paper's pseudo-code writes it: one column at a time, masks from w^2 / [H^-1]_jj^2."""
    W = weight.clone().double()
    H = hessian.double() + dampening * torch.diag(hessian).mean() * torch.eye(hessian.shape[0], dtype=torch.float64)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    cols = W.shape[1]
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        if not target.is_nm:
            saliency = (W[:, start:end] ** 2 / torch.diag(U)[start:end] ** 2).flatten()
            pruned = torch.zeros_like(saliency, dtype=torch.bool)
            # the layer's count split over the blocks with the remainder carried on (the paper rounds per block)
            count = round(target.sparsity * W.shape[0] * end) - round(target.sparsity * W.shape[0] * start)
            pruned[torch.sort(saliency, stable=True).indices[:count]] = True
            pruned = pruned.reshape(W.shape[0], end - start)
        else:
            pruned = torch.zeros(W.shape[0], end - start, dtype=torch.bool)
        for j in range(start, end):
            if target.is_nm and (j - start) % target.m == 0:
                group = W[:, j : j + target.m] ** 2 / torch.diag(U)[j : j + target.m] ** 2
                drop = torch.sort(group, dim=1, stable=True).indices[:, : target.m - target.n]
                pruned[:, j - start : j - start + target.m].scatter_(1, drop, True)
            err = torch.where(pruned[:, j - start], W[:, j], torch.zeros_like(W[:, j])) / U[j, j]
            W[:, j:] -= err.unsqueeze(1) * U[j, j:].unsqueeze(0)  # column j itself ends at its pruned value
            W[pruned[:, j - start], j] = 0.0
    return W.float()


@pytest.mark.parametrize("target", [LayerTarget(0.6), LayerTarget.nm(2, 4), LayerTarget.nm(3, 8)])
def test_sparsegpt_matches_the_textbook_column_loop(target):
    weight, x = _layer_data(seed=5, rows=12, cols=48, tokens=512)
    pruner = get_pruner("sparsegpt", block_size=16)
    stats = _stats(pruner, x)
    ours = pruner.prune(weight, stats, target)
    reference = _textbook_sparsegpt(weight, stats.hessian, target, block_size=16)
    assert torch.equal(ours == 0, reference == 0)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)
