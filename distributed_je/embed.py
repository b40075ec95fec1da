"""``dje embed``: a trained model's latent in ``obsm["X_je_scvi"]``, streamed block by block.

An h5ad input is copied and the latent added to the copy; a store input becomes an h5ad with
its counts, obs and var. Either way rows are read, embedded and written in blocks, so data
larger than memory can be embedded; the output appears only when complete.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import h5py
import numpy as np

from distributed_je.artifact import TrainedModel, load_model

OBSM_KEY = "X_je_scvi"
EMBED_BLOCK_ROWS = 8192


def _new_latent(f: h5py.File, n_cells: int, n_latent: int) -> h5py.Dataset:
    obsm = f.require_group("obsm")
    obsm.attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})
    if OBSM_KEY in obsm:
        del obsm[OBSM_KEY]
    latent = obsm.create_dataset(OBSM_KEY, shape=(n_cells, n_latent), dtype=np.float32,
                                 chunks=(min(max(n_cells, 1), EMBED_BLOCK_ROWS), n_latent))
    latent.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
    return latent


def embed_h5ad(model: TrainedModel, src: Path, tmp: Path) -> None:
    """A copy of ``src`` with the latent added; X is read in blocks from ``src``."""
    import anndata

    shutil.copyfile(src, tmp)
    adata = anndata.read_h5ad(src, backed="r")
    try:
        with h5py.File(tmp, "r+") as f:
            latent = _new_latent(f, adata.n_obs, model.module.model_config.n_latent)
            for start, _, values in model.latent_blocks(adata, block_rows=EMBED_BLOCK_ROWS):
                latent[start : start + len(values)] = values
    finally:
        adata.file.close()


def embed_store(model: TrainedModel, location: str, tmp: Path) -> None:
    """An h5ad holding the store's counts, obs and var, and the latent."""
    from anndata.io import read_elem, write_elem

    from distributed_je.store import open_store

    store = open_store(location)
    with h5py.File(tmp, "w") as f:
        f.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        write_elem(f, "obs", read_elem(store.group["obs"]))
        write_elem(f, "var", read_elem(store.group["var"]))
        for empty in ("layers", "obsp", "varm", "varp", "uns"):
            write_elem(f, empty, {})
        x = f.create_group("X")
        x.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0",
                        "shape": [store.n_cells, store.n_genes]})
        data = x.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.float32, chunks=(1 << 16,))
        indices = x.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(1 << 16,))
        indptr = [np.zeros(1, dtype=np.int64)]
        latent = _new_latent(f, store.n_cells, model.module.model_config.n_latent)
        for start, counts, values in model.latent_blocks(location, block_rows=EMBED_BLOCK_ROWS):
            nnz = len(data)
            data.resize((nnz + counts.nnz,))
            indices.resize((nnz + counts.nnz,))
            data[nnz:], indices[nnz:] = counts.data, counts.indices
            indptr.append(counts.indptr[1:] + nnz)
            latent[start : start + len(values)] = values
        x.create_dataset("indptr", data=np.concatenate(indptr))


def embed(model_path: str, data: str, out: str) -> None:
    """Write ``out`` (.h5ad): ``data`` with the model's latent in ``obsm["X_je_scvi"]``."""
    if not str(out).endswith(".h5ad"):
        raise ValueError(f"output {out} must end in .h5ad")
    model = load_model(model_path)
    out_path = Path(out)
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    try:
        if str(data).endswith(".h5ad"):
            embed_h5ad(model, Path(data), tmp)
        else:
            embed_store(model, str(data), tmp)
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)


