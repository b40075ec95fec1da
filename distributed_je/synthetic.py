"""A synthetic count dataset with cell types, batches and a wide, realistic depth distribution.

For the demo and tests on machines without real data. Counts are negative binomial
(gamma-Poisson) around type- and batch-specific gene profiles times a log-normal depth.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from distributed_je.counts import CountMatrix

MARKER_FRACTION = 0.05  # share of genes that mark each cell type
INVERSE_DISPERSION = 5.0


def synthetic_counts(n_cells: int = 3000, n_genes: int = 1000, *, n_types: int = 8, n_batches: int = 2,
                     median_library: float = 1500.0, log10_depth_sd: float = 0.45, seed: int = 0) -> CountMatrix:
    """Counts whose labels are cell types and whose batches scale genes; depth spans ~2 decades."""
    if n_cells < 1 or n_genes < 2 or n_types < 1 or n_batches < 1:
        raise ValueError("synthetic_counts needs n_cells >= 1, n_genes >= 2, n_types >= 1 and n_batches >= 1")
    rng = np.random.default_rng(seed)
    base = rng.gamma(0.4, 1.0, n_genes)  # a few highly expressed genes, a long tail of rare ones
    type_profiles = np.empty((n_types, n_genes))
    n_markers = max(1, int(MARKER_FRACTION * n_genes))
    for t in range(n_types):
        fold = np.ones(n_genes)
        fold[rng.choice(n_genes, n_markers, replace=False)] = np.exp(rng.normal(1.0, 0.4, n_markers))
        type_profiles[t] = base * fold
    batch_scale = np.exp(rng.normal(0.0, 0.25, (n_batches, n_genes)))

    types = rng.integers(0, n_types, n_cells)
    batches = rng.integers(0, n_batches, n_cells)
    library = np.clip(10 ** rng.normal(np.log10(median_library), log10_depth_sd, n_cells), 20, None)
    profiles = type_profiles[types] * batch_scale[batches]
    rate = library[:, None] * profiles / profiles.sum(1, keepdims=True)
    counts = rng.poisson(rng.gamma(INVERSE_DISPERSION, rate / INVERSE_DISPERSION)).astype(np.float32)

    return CountMatrix(
        counts=sp.csr_matrix(counts),
        cell_names=np.array([f"cell{i}" for i in range(n_cells)]),
        gene_names=np.array([f"gene{j}" for j in range(n_genes)]),
        batch_codes=batches.astype(np.int64),
        batch_categories=tuple(f"batch{b}" for b in range(n_batches)),
        label_codes=types.astype(np.int64),
        label_categories=tuple(f"type{t}" for t in range(n_types)),
    )
