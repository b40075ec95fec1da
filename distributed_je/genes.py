"""Highly variable genes, seurat_v3 flavour, from statistics accumulated over row blocks.

Two passes over the counts, each a stream of CSR row blocks, so a matrix larger than
memory can be ranked: pass 1 gives each gene's mean and variance, pass 2 the variance of
counts clipped at mean + sqrt(n_cells) * (expected std from a LOESS fit of var on mean).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import scipy.sparse as sp

LOESS_SPAN = 0.3       # as in Seurat v3 and scanpy
LOESS_GRID_POINTS = 200  # the fit is evaluated on a grid and interpolated: exact enough for ranking


def gene_moments(blocks: Iterable[sp.csr_matrix]) -> tuple[np.ndarray, np.ndarray, int]:
    """Mean and unbiased variance of every gene, and the number of cells, over all blocks."""
    total = total_sq = None
    n_cells = 0
    for block in blocks:
        block = block.astype(np.float64)
        s = np.asarray(block.sum(0)).ravel()
        sq = np.asarray(block.multiply(block).sum(0)).ravel()
        total = s if total is None else total + s
        total_sq = sq if total_sq is None else total_sq + sq
        n_cells += block.shape[0]
    if n_cells < 2:
        raise ValueError(f"highly variable genes need at least 2 cells, got {n_cells}")
    mean = total / n_cells
    var = (total_sq - n_cells * mean**2) / (n_cells - 1)
    return mean, np.maximum(var, 0.0), n_cells


def loess_fit(x: np.ndarray, y: np.ndarray, span: float = LOESS_SPAN) -> np.ndarray:
    """Local quadratic regression of y on x (tricube weights over the nearest span*n points)."""
    k = max(int(np.ceil(span * len(x))), 3)
    grid = np.linspace(x.min(), x.max(), LOESS_GRID_POINTS)
    fitted = np.empty_like(grid)
    for i, x0 in enumerate(grid):
        dx = x - x0
        dist = np.abs(dx)
        near = np.argpartition(dist, k - 1)[:k]
        radius = max(dist[near].max(), 1e-12) * 1.0001
        w = (1 - (dist[near] / radius) ** 3) ** 3
        design = np.stack([np.ones(k), dx[near], dx[near] ** 2], axis=1)
        sw = np.sqrt(w)[:, None]
        coef, *_ = np.linalg.lstsq(design * sw, y[near] * sw[:, 0], rcond=None)
        fitted[i] = coef[0]
    return np.interp(x, grid, fitted)


def highly_variable_genes(blocks: Callable[[], Iterable[sp.csr_matrix]], n_top_genes: int,
                          moments: tuple[np.ndarray, np.ndarray, int] | None = None) -> np.ndarray:
    """Indices (sorted) of the ``n_top_genes`` most variable genes; ``blocks()`` restarts the stream.

    ``moments`` (from ``gene_moments``) saves the first pass when the caller already made it.
    """
    mean, var, n_cells = moments if moments is not None else gene_moments(blocks())
    n_genes = len(mean)
    if not 1 <= n_top_genes <= n_genes:
        raise ValueError(f"n_top_genes={n_top_genes} is out of range: allowed [1, {n_genes}] for this matrix")
    varying = var > 0
    reg_std = np.zeros(n_genes)
    reg_std[varying] = np.sqrt(10 ** loess_fit(np.log10(mean[varying]), np.log10(var[varying])))
    clip = mean + np.sqrt(n_cells) * reg_std

    clipped_sum = np.zeros(n_genes)
    clipped_sq = np.zeros(n_genes)
    for block in blocks():
        block = block.tocsr().astype(np.float64)
        values = np.minimum(block.data, clip[block.indices])
        clipped_sum += np.bincount(block.indices, weights=values, minlength=n_genes)
        clipped_sq += np.bincount(block.indices, weights=values**2, minlength=n_genes)
    norm_var = np.zeros(n_genes)
    r = reg_std[varying]
    norm_var[varying] = (
        n_cells * mean[varying] ** 2 + clipped_sq[varying] - 2 * clipped_sum[varying] * mean[varying]
    ) / ((n_cells - 1) * r**2)
    # stable sort on -variance: ties keep gene order, so the choice is deterministic
    top = np.argsort(-norm_var, kind="stable")[:n_top_genes]
    return np.sort(top)
