"""``dje synth``: atlas-scale stores made from a reference store's real cells.

Each synthetic cell is a reference cell drawn with replacement and binomially thinned to a
target depth from a wide log-normal distribution (so the atlas spans shallow and deep
cells, as real atlases do); optional synthetic batches thin genes by batch-specific factors.
Labels and every categorical obs column carry over from the reference cell. The output
streams to disk block by block; the reference itself is read into memory (it is real data,
small next to the atlas made from it).
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
from tqdm import tqdm

from distributed_je.seeding import numpy_generator
from distributed_je.store import LIBRARY_SIZE, NAME_HASH, TOTAL_COUNTS, StoreWriter, open_store, take_rows

SYNTH_BLOCK_CELLS = 1 << 16
DEPTH_LOG10_SD = 0.5      # target depths spread over about two decades
MIN_TARGET_DEPTH = 20.0   # the shallowest target, in UMIs
BATCH_LOG_SCALE_SD = 0.3  # gene-wise log-scale of a synthetic batch


def synthesize(ref: str, dest: str, *, n_cells: int, n_batches: int = 1, seed: int = 0,
               overwrite: bool = False, progress: bool = True) -> None:
    if n_cells < 1:
        raise ValueError(f"--cells {n_cells} is out of range: allowed [1, inf)")
    if n_batches < 1:
        raise ValueError(f"--n-batches {n_batches} is out of range: allowed [1, inf)")
    reference = open_store(ref)
    rows = reference.read_rows(0, reference.n_cells)
    library = reference.obs_values(LIBRARY_SIZE).astype(np.float64)
    ref_names = reference.cell_names()
    categorical = _categorical_columns(reference)
    rng = numpy_generator(seed, 0, 0)
    median_depth = float(np.median(library))
    # Thinning can only remove counts, so each batch's gene factors are scaled to max 1.
    gene_factor = np.exp(rng.normal(0.0, BATCH_LOG_SCALE_SD, (n_batches, reference.n_genes)))
    gene_factor /= gene_factor.max(axis=1, keepdims=True)
    if n_batches == 1:
        gene_factor[:] = 1.0

    with StoreWriter(dest, gene_names=reference.gene_names, max_count=float(rows.data.max()),
                     overwrite=overwrite) as writer, \
            tqdm(total=n_cells, desc="synthesize", unit=" cells", disable=not progress, file=sys.stderr) as bar:
        made = 0
        while made < n_cells:
            size = min(SYNTH_BLOCK_CELLS, n_cells - made)
            picks = rng.integers(0, reference.n_cells, size)
            batches = rng.integers(0, n_batches, size)
            target = np.maximum(10 ** rng.normal(np.log10(median_depth), DEPTH_LOG10_SD, size), MIN_TARGET_DEPTH)
            p_cell = np.minimum(1.0, target / np.maximum(library[picks], 1.0))
            positions, indptr = take_rows(rows.indptr, picks)
            genes = rows.indices[positions]
            row_of = np.repeat(np.arange(size), np.diff(indptr))
            p = p_cell[row_of] * gene_factor[batches[row_of], genes]
            values, library_thinned = _thin(rows.data[positions], indptr, p, rng)
            nonempty = np.flatnonzero(library_thinned > 0)[: n_cells - made]
            data, indices, out_indptr = _take_nonzero_rows(values, genes, indptr, nonempty)
            obs = pd.DataFrame(index=pd.Index([f"synth{made + i}" for i in range(len(nonempty))]))
            obs["reference_cell"] = ref_names[picks[nonempty]]
            for column, (codes, names) in categorical.items():
                obs[column] = pd.Categorical.from_codes(codes[picks[nonempty]], categories=names)
            if n_batches > 1:
                obs["synthetic_batch"] = pd.Categorical.from_codes(batches[nonempty],
                                                                   categories=[f"batch{b}" for b in range(n_batches)])
            obs[LIBRARY_SIZE] = np.add.reduceat(data.astype(np.float64), out_indptr[:-1])  # no row is empty
            writer.append(data, indices, out_indptr, obs)
            made += len(nonempty)
            bar.update(len(nonempty))
        writer.commit({
            "synthetic": True, "reference": str(ref),
            "reference_fingerprint": reference.attrs.get("source_fingerprint"),
            "synthesis": {"seed": seed, "n_batches": n_batches, "median_depth": median_depth,
                          "depth_log10_sd": DEPTH_LOG10_SD, "min_target_depth": MIN_TARGET_DEPTH},
            "batch_key": "synthetic_batch" if n_batches > 1 else None,
            "labels_key": reference.attrs.get("labels_key"),
        })


def _categorical_columns(store) -> dict[str, tuple[np.ndarray, list[str]]]:
    """Every categorical obs column of ``store`` as (codes, categories); numeric ones do not carry over."""
    columns = {}
    for column in store.obs_columns:
        if column in (LIBRARY_SIZE, NAME_HASH, TOTAL_COUNTS):
            continue
        try:
            columns[column] = store.obs_codes(column)
        except ValueError:
            continue
    return columns


def _thin(values: np.ndarray, indptr: np.ndarray, p: np.ndarray, rng: np.random.Generator
          ) -> tuple[np.ndarray, np.ndarray]:
    """Binomially thin the non-zeros of CSR rows (one probability each): the new values and row sums."""
    thinned = rng.binomial(values.astype(np.int64), p)
    row_of = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    return thinned, np.bincount(row_of, weights=thinned, minlength=len(indptr) - 1)


def _take_nonzero_rows(values: np.ndarray, genes: np.ndarray, indptr: np.ndarray, rows: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR (data, indices, indptr) of ``rows``, without the entries thinning set to zero."""
    kept = values > 0
    row_of = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    kept_indptr = np.concatenate([[0], np.cumsum(np.bincount(row_of[kept], minlength=len(indptr) - 1))])
    positions, out_indptr = take_rows(kept_indptr, rows)
    return values[kept][positions], genes[kept][positions], out_indptr


DIVERSIFY_LOG10_MEAN, DIVERSIFY_LOG10_SD = -1.0, 1.0  # the reference tutorial's thinning factor 10^N(-1, 1)
DIVERSIFY_MIN_UMIS = 20


def diversify_depth(src: str, dest: str, *, seed: int = 0, overwrite: bool = False) -> int:
    """The reference tutorial's depth-diversified copy of a store: each cell binomially thinned by
    min(1, 10^N(-1, 1)) drawn per cell, cells left with fewer than 20 UMIs dropped.

    A cell's UMIs count all of its source genes (``total_counts``), not just the store's: the
    UMIs thinning keeps on the genes left out at conversion are drawn as Binomial(total -
    library, factor), exactly their distribution. Cells keep their names (so the validation
    split by name hash is unchanged) and their categorical obs columns. Streams block by
    block; returns the number of cells kept.
    """
    source = open_store(src)
    categorical = _categorical_columns(source)
    has_totals = TOTAL_COUNTS in source.obs_columns
    rng = numpy_generator(seed, 0, 0)
    kept_cells = 0
    with StoreWriter(dest, gene_names=source.gene_names, max_count=float(np.iinfo(np.uint32).max),
                     overwrite=overwrite) as writer:
        for start in range(0, source.n_cells, SYNTH_BLOCK_CELLS):
            stop = min(start + SYNTH_BLOCK_CELLS, source.n_cells)
            block = source.read_rows(start, stop)
            factor = np.minimum(1.0, 10 ** rng.normal(DIVERSIFY_LOG10_MEAN, DIVERSIFY_LOG10_SD, stop - start))
            values, library = _thin(block.data, block.indptr, np.repeat(factor, np.diff(block.indptr)), rng)
            total = library.copy()
            if has_totals:  # stores converted before total_counts existed count the store's genes only
                left_out = source.obs_values(TOTAL_COUNTS, start, stop) - source.obs_values(LIBRARY_SIZE, start, stop)
                total += rng.binomial(np.round(left_out).astype(np.int64), factor)
            rows = np.flatnonzero((total >= DIVERSIFY_MIN_UMIS) & (library > 0))
            data, indices, indptr = _take_nonzero_rows(values, block.indices, block.indptr, rows)
            obs = pd.DataFrame(index=pd.Index(source.cell_names(start, stop)[rows]))
            for column, (codes, names) in categorical.items():
                obs[column] = pd.Categorical.from_codes(codes[start:stop][rows], categories=names)
            obs["depth_factor"] = factor[rows]
            obs[TOTAL_COUNTS] = total[rows]
            obs[LIBRARY_SIZE] = np.add.reduceat(data.astype(np.float64), indptr[:-1]) if len(rows) else []
            writer.append(data, indices, indptr, obs)
            kept_cells += len(rows)
        writer.commit({**{k: v for k, v in source.attrs.items() if k not in ("format_version", "n_cells", "n_genes",
                                                                              "genes")},
                       "depth_diversified": {"source": str(src), "seed": seed, "log10_mean": DIVERSIFY_LOG10_MEAN,
                                             "log10_sd": DIVERSIFY_LOG10_SD, "min_umis": DIVERSIFY_MIN_UMIS}})
    return kept_cells
