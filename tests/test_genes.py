import numpy as np
import pytest
import scipy.sparse as sp

from distributed_je.genes import gene_moments, highly_variable_genes, loess_fit


def blocks_of(matrix, rows=37):
    return lambda: (matrix[i : i + rows] for i in range(0, matrix.shape[0], rows))


def test_moments_over_blocks_equal_numpy():
    rng = np.random.default_rng(0)
    dense = rng.poisson(1.0, (200, 30)).astype(np.float32)
    mean, var, n = gene_moments(blocks_of(sp.csr_matrix(dense))())
    assert n == 200
    exact = dense.astype(np.float64)
    np.testing.assert_allclose(mean, exact.mean(0), rtol=1e-9)
    np.testing.assert_allclose(var, exact.var(0, ddof=1), rtol=1e-9)


def test_loess_recovers_a_smooth_curve():
    x = np.linspace(-2, 2, 2000)
    y = 0.5 * x**2 - x + 1
    np.testing.assert_allclose(loess_fit(x, y), y, atol=1e-3)


def test_overdispersed_genes_are_chosen_over_poisson_genes():
    rng = np.random.default_rng(1)
    n_cells, n_genes = 2000, 300
    means = rng.gamma(1.0, 2.0, n_genes)
    counts = rng.poisson(means, (n_cells, n_genes)).astype(np.float32)
    variable = np.arange(0, n_genes, 30)  # 10 genes switched on in a tenth of the cells
    on = rng.random(n_cells) < 0.1
    counts[np.ix_(on, variable)] += rng.poisson(20.0, (on.sum(), len(variable)))
    chosen = highly_variable_genes(blocks_of(sp.csr_matrix(counts)), 10)
    assert set(chosen) == set(variable)
    assert np.all(np.diff(chosen) > 0)


def test_n_top_genes_out_of_range():
    counts = sp.csr_matrix(np.random.default_rng(0).poisson(1.0, (10, 5)).astype(np.float32))
    with pytest.raises(ValueError, match=r"n_top_genes=6 is out of range: allowed \[1, 5\]"):
        highly_variable_genes(blocks_of(counts), 6)
