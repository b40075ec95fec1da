"""``dje convert``: counts from h5ad / 10x h5 / 10x mtx into a store, validated, out of core, atomically.

Passes over the source, each in row blocks: (1) validate every value and gather gene
moments and the largest count; (2) only with --n-top-genes, the clipped variances of
seurat_v3; (3) write the chosen genes of the non-empty cells.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm import tqdm

from distributed_je.counts import CountsError, check_counts
from distributed_je.genes import gene_moments, highly_variable_genes
from distributed_je.sources import Source, SourceError, fingerprint, open_source
from distributed_je.store import LIBRARY_SIZE, TOTAL_COUNTS, StoreError, StoreWriter, store_exists


@dataclass(frozen=True)
class ConversionReport:
    dest: str
    n_cells: int
    n_genes: int
    n_empty_dropped: int


def _check_names(source: Source) -> None:
    genes = pd.Index(source.gene_names)
    if len(genes) == 0 or source.n_cells == 0:
        raise CountsError(f"the matrix is empty: {source.n_cells} cells x {len(genes)} genes")
    if genes.has_duplicates:
        duplicated = genes[genes.duplicated()].unique()[:5].tolist()
        raise CountsError(f"duplicate gene names, e.g. {duplicated}: gene names must be unique "
                          "(make them unique, e.g. with anndata's var_names_make_unique)")
    if source.obs.index.has_duplicates:
        duplicated = source.obs.index[source.obs.index.duplicated()].unique()[:5].tolist()
        raise CountsError(f"duplicate cell names, e.g. {duplicated}: cell names must be unique")


def _select_genes_from_file(path: Path, gene_names: np.ndarray) -> np.ndarray:
    wanted = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not wanted:
        raise CountsError(f"--genes {path} lists no genes")
    if len(set(wanted)) != len(wanted):
        raise CountsError(f"--genes {path} lists a gene more than once")
    position = {name: i for i, name in enumerate(gene_names)}
    missing = [g for g in wanted if g not in position]
    if missing:
        raise CountsError(f"--genes {path}: {len(missing)} genes are not in the source, e.g. {missing[:5]}")
    return np.array([position[g] for g in wanted])


def _prepare_obs(obs: pd.DataFrame, batch_key: str | None, labels_key: str | None) -> pd.DataFrame:
    obs = obs.copy()
    for key in (batch_key, labels_key):
        if key is not None and key not in obs.columns:
            raise KeyError(f"obs column {key!r} does not exist; available: {', '.join(map(str, obs.columns)) or '(none)'}")
    if batch_key is not None and obs[batch_key].isna().any():
        raise CountsError(f"obs column {batch_key!r} is missing in {int(obs[batch_key].isna().sum())} cells: "
                          "every cell needs a batch")
    for column in obs.columns:
        if column in (batch_key, labels_key) or obs[column].dtype == object:
            obs[column] = obs[column].astype("category")
    return obs


def _validation_pass(source: Source, cell_names: np.ndarray, progress: tqdm):
    """Check every value; return the gene moments (None for a single cell) and the largest count."""
    largest = 0.0

    def validated_blocks() -> Iterator[sp.csr_matrix]:
        nonlocal largest
        with progress:
            for start, block in source.blocks():
                check_counts(block, cell_names, source.gene_names, row_offset=start)
                largest = max(largest, float(block.data.max())) if block.nnz else largest
                progress.update(block.shape[0])
                yield block

    if source.n_cells < 2:
        for _ in validated_blocks():
            pass
        return None, largest
    return gene_moments(validated_blocks()), largest


def convert(src: str | Path, dest: str, *, layer: str | None = None, n_top_genes: int | None = None,
            genes_file: Path | None = None, batch_key: str | None = None, labels_key: str | None = None,
            keep_empty: bool = False, overwrite: bool = False, progress: bool = True) -> ConversionReport:
    if n_top_genes is not None and genes_file is not None:
        raise CountsError("give either --n-top-genes or --genes, not both")
    if store_exists(dest) and not overwrite:
        raise StoreError(f"{dest} already exists: pass --overwrite to replace it")
    source = open_source(src, layer)
    _check_names(source)
    obs = _prepare_obs(source.obs, batch_key, labels_key)
    cell_names = source.obs.index.to_numpy(dtype=str)

    def bar(desc: str) -> tqdm:
        return tqdm(total=source.n_cells, desc=desc, unit=" cells", disable=not progress, file=sys.stderr)

    moments, largest = _validation_pass(source, cell_names, bar("validate"))
    if largest == 0:
        raise CountsError(f"the matrix is empty: all {source.n_cells} cells have zero counts")

    if n_top_genes is not None:
        def blocks():
            with bar("select genes") as pbar:
                for _, block in source.blocks():
                    pbar.update(block.shape[0])
                    yield block
        genes = highly_variable_genes(blocks, n_top_genes, moments=moments)
        selection = {"method": "seurat_v3", "n_top_genes": n_top_genes}
    elif genes_file is not None:
        genes = _select_genes_from_file(genes_file, source.gene_names)
        selection = {"method": "file", "file": str(genes_file)}
    else:
        genes = np.arange(len(source.gene_names))
        selection = {"method": "all"}

    n_dropped = 0
    with StoreWriter(dest, gene_names=source.gene_names[genes], max_count=largest, overwrite=overwrite) as writer:
        with bar("write") as pbar:
            for start, block in source.blocks():
                total_counts = np.asarray(block.sum(1)).ravel()
                block = block[:, genes].tocsr()
                block.sort_indices()
                library = np.asarray(block.sum(1)).ravel()
                keep = np.ones(len(library), bool) if keep_empty else library > 0
                n_dropped += int((~keep).sum())
                block = block[keep]
                rows = obs.iloc[start : start + len(library)][keep].copy()
                rows[LIBRARY_SIZE] = library[keep].astype(np.float64)
                rows[TOTAL_COUNTS] = total_counts[keep].astype(np.float64)
                writer.append(block.data, block.indices, block.indptr, rows)
                pbar.update(len(library))
        n_cells = source.n_cells - n_dropped
        if n_cells == 0:
            raise CountsError("every cell has zero counts on the selected genes: nothing to write")
        writer.commit({
            "synthetic": False, "source": str(src), "source_fingerprint": fingerprint(source.files),
            "layer": layer, "gene_selection": selection, "batch_key": batch_key, "labels_key": labels_key,
            "n_empty_dropped": n_dropped,
        })
    if n_dropped:
        print(f"dropped {n_dropped} cells with zero counts on the selected genes (keep them with --keep-empty)",
              file=sys.stderr)
    return ConversionReport(dest=str(dest), n_cells=n_cells, n_genes=len(genes), n_empty_dropped=n_dropped)


__all__ = ["ConversionReport", "SourceError", "convert"]
