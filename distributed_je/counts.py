"""Count matrices held in memory: reading h5ad, validating counts, seeded minibatches.

The zarr store and its streaming loader are for data larger than memory; this module serves
small data (tests, benchmarks, evaluation sets) with the same batch format.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from distributed_je.genes import highly_variable_genes
from distributed_je.keys import BATCH_INDEX, COUNTS, LABELS

HVG_BLOCK_ROWS = 4096


class CountsError(ValueError):
    """Input that is not a matrix of raw counts; the message names the first bad cell and gene."""


@dataclass(frozen=True)
class CountMatrix:
    """Raw counts (CSR float32, cells x genes) with names and integer-coded covariates."""

    counts: sp.csr_matrix
    cell_names: np.ndarray
    gene_names: np.ndarray
    batch_codes: np.ndarray                # (n_cells,) int64; all 0 without a batch key
    batch_categories: tuple[str, ...]
    label_codes: np.ndarray | None = None  # (n_cells,) int64, -1 where the label is missing
    label_categories: tuple[str, ...] = ()

    @property
    def n_cells(self) -> int:
        return self.counts.shape[0]

    @property
    def n_genes(self) -> int:
        return self.counts.shape[1]

    @property
    def n_batches(self) -> int:
        return len(self.batch_categories)

    def to_anndata(self, *, batch_key: str = "batch", labels_key: str = "cell_type"):
        """An AnnData with the counts in X and batches and labels as categorical obs columns."""
        import anndata
        import pandas as pd

        obs = pd.DataFrame({batch_key: pd.Categorical.from_codes(self.batch_codes, categories=self.batch_categories)},
                           index=pd.Index(self.cell_names))
        if self.label_codes is not None:
            obs[labels_key] = pd.Categorical.from_codes(self.label_codes, categories=self.label_categories)
        return anndata.AnnData(X=self.counts, obs=obs, var=pd.DataFrame(index=pd.Index(self.gene_names)))

    def subset_genes(self, gene_indices: np.ndarray) -> CountMatrix:
        return _replace(self, counts=self.counts[:, gene_indices].tocsr(), gene_names=self.gene_names[gene_indices])

    def subset_cells(self, cell_indices: np.ndarray) -> CountMatrix:
        labels = None if self.label_codes is None else self.label_codes[cell_indices]
        return _replace(self, counts=self.counts[cell_indices].tocsr(), cell_names=self.cell_names[cell_indices],
                        batch_codes=self.batch_codes[cell_indices], label_codes=labels)


def _replace(matrix: CountMatrix, **changes) -> CountMatrix:
    return CountMatrix(**{**matrix.__dict__, **changes})


def check_counts(block: sp.csr_matrix, cell_names: Sequence[str], gene_names: Sequence[str],
                 row_offset: int = 0) -> None:
    """Raise ``CountsError`` naming the first cell and gene whose value is not a raw count."""
    values = block.data
    bad = ~np.isfinite(values) | (values < 0) | (values != np.round(values))
    if not bad.any():
        return
    position = int(np.argmax(bad))
    row = int(np.searchsorted(block.indptr, position, side="right") - 1)
    value = values[position]
    problem = ("NaN" if np.isnan(value) else "infinite" if not np.isfinite(value)
               else "negative" if value < 0 else "not an integer")
    cell, gene = str(cell_names[row_offset + row]), str(gene_names[block.indices[position]])
    raise CountsError(
        f"X holds {float(value)} ({problem}) at cell '{cell}' (row {row_offset + row}), gene '{gene}': "
        "raw UMI counts must be non-negative integers"
    )


def read_h5ad(path: str | Path, *, batch_key: str | None = None, labels_key: str | None = None,
              layer: str | None = None, n_top_genes: int | None = None) -> CountMatrix:
    """Read raw counts from an h5ad file, validate them, and optionally keep the most variable genes."""
    import anndata

    adata = anndata.read_h5ad(path)
    x = adata.layers[layer] if layer is not None else adata.X
    counts = sp.csr_matrix(x, dtype=np.float32)
    cell_names = np.asarray(adata.obs_names, dtype=str)
    gene_names = np.asarray(adata.var_names, dtype=str)
    check_counts(counts, cell_names, gene_names)
    batch_codes, batch_categories = _codes(adata.obs, batch_key, missing_allowed=False)
    label_codes, label_categories = (None, ()) if labels_key is None else _codes(adata.obs, labels_key)
    matrix = CountMatrix(counts, cell_names, gene_names, batch_codes, batch_categories, label_codes, label_categories)
    if n_top_genes is not None:
        def blocks():
            for start in range(0, matrix.n_cells, HVG_BLOCK_ROWS):
                yield matrix.counts[start : start + HVG_BLOCK_ROWS]
        matrix = matrix.subset_genes(highly_variable_genes(blocks, n_top_genes))
    return matrix


def read_store(location: str, *, batch_key: str | None = None, labels_key: str | None = None) -> CountMatrix:
    """A whole (small) store in memory, for evaluation; training streams with ``loader.StoreLoader``."""
    from distributed_je.store import open_store

    store = open_store(location)
    rows = store.read_rows(0, store.n_cells)
    counts = sp.csr_matrix((rows.data.astype(np.float32), rows.indices, rows.indptr),
                           shape=(store.n_cells, store.n_genes))
    batch_codes, batch_categories = ((np.zeros(store.n_cells, dtype=np.int64), ["0"]) if batch_key is None
                                     else store.obs_codes(batch_key))
    label_codes, label_categories = (None, []) if labels_key is None else store.obs_codes(labels_key)
    return CountMatrix(counts, np.asarray(store.cell_names(), dtype=str), store.gene_names, batch_codes,
                       tuple(batch_categories), label_codes, tuple(label_categories))


def _codes(obs, key: str | None, missing_allowed: bool = True) -> tuple[np.ndarray, tuple[str, ...]]:
    """Integer codes (-1 for missing) and category names of an obs column."""
    if key is None:
        return np.zeros(len(obs), dtype=np.int64), ("0",)
    if key not in obs.columns:
        raise KeyError(f"obs column {key!r} does not exist; available: {', '.join(map(str, obs.columns)) or '(none)'}")
    column = obs[key].astype("category")
    codes = column.cat.codes.to_numpy().astype(np.int64)
    if not missing_allowed and (codes < 0).any():
        raise ValueError(f"obs column {key!r} has missing values in {(codes < 0).sum()} cells: every cell needs a batch")
    return codes, tuple(str(c) for c in column.cat.categories)


def minibatches(matrix: CountMatrix, *, batch_size: int, rng: np.random.Generator | None = None,
                drop_last: bool = False, with_labels: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Yield dense minibatches; shuffled when ``rng`` is given, in order otherwise."""
    order = rng.permutation(matrix.n_cells) if rng is not None else np.arange(matrix.n_cells)
    stop = matrix.n_cells - matrix.n_cells % batch_size if drop_last else matrix.n_cells
    for start in range(0, stop, batch_size):
        rows = np.sort(order[start : start + batch_size])
        batch = {
            COUNTS: torch.from_numpy(matrix.counts[rows].toarray()),
            BATCH_INDEX: torch.from_numpy(matrix.batch_codes[rows]),
        }
        if with_labels and matrix.label_codes is not None:
            batch[LABELS] = torch.from_numpy(matrix.label_codes[rows])
        yield batch
