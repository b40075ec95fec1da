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
from distributed_je.store import LIBRARY_SIZE, NAME_HASH, StoreWriter, open_store, take_rows

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
    categorical = {}
    for column in reference.obs_columns:
        if column in (LIBRARY_SIZE, NAME_HASH):
            continue
        try:
            categorical[column] = reference.obs_codes(column)
        except ValueError:
            continue  # numeric obs columns do not carry over
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
            values = rng.binomial(rows.data[positions].astype(np.int64), p)
            kept = values > 0
            counts_per_row = np.bincount(row_of[kept], minlength=size)
            nonempty = np.flatnonzero(np.bincount(row_of, weights=values, minlength=size) > 0)[: n_cells - made]
            new_indptr = np.concatenate([[0], np.cumsum(counts_per_row)])
            positions, out_indptr = take_rows(new_indptr, nonempty)
            data, indices = values[kept][positions], genes[kept][positions]
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
