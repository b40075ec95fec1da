"""Count sources read in row blocks: h5ad (backed), 10x Cell Ranger v3 .h5, and 10x mtx directories.

Each source knows its cells (obs), its genes, and yields (start, CSR rows) blocks on demand,
so conversion passes over a matrix larger than memory.
"""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

SOURCE_BLOCK_ROWS = 8192
FINGERPRINT_BYTES = 1 << 20


class SourceError(ValueError):
    """A source that cannot be read as counts; the message says what was found."""


def fingerprint(paths: list[Path]) -> str:
    """blake2b over each file's name, size and first and last MiB: cheap, and changes with the content."""
    digest = hashlib.blake2b(digest_size=16)
    for path in sorted(paths):
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as f:
            digest.update(f.read(FINGERPRINT_BYTES))
            f.seek(max(size - FINGERPRINT_BYTES, 0))
            digest.update(f.read(FINGERPRINT_BYTES))
    return digest.hexdigest()


class Source:
    """Cells x genes counts with ``obs`` (index: cell names) and ``gene_names``."""

    obs: pd.DataFrame
    gene_names: np.ndarray
    files: list[Path]

    @property
    def n_cells(self) -> int:
        return len(self.obs)

    def blocks(self, rows: int = SOURCE_BLOCK_ROWS) -> Iterator[tuple[int, sp.csr_matrix]]:
        for start in range(0, self.n_cells, rows):
            yield start, self.read(start, min(start + rows, self.n_cells))

    def read(self, start: int, stop: int) -> sp.csr_matrix:
        raise NotImplementedError


class H5adSource(Source):
    def __init__(self, path: Path, layer: str | None = None) -> None:
        from anndata.io import read_elem, sparse_dataset

        self.files = [path]
        self.file = h5py.File(path, "r")
        self.obs = read_elem(self.file["obs"])
        self.gene_names = np.asarray(read_elem(self.file["var"]).index, dtype=str)
        if layer is None:
            element = self.file["X"]
        elif "layers" in self.file and layer in self.file["layers"]:
            element = self.file["layers"][layer]
        else:
            available = list(self.file["layers"]) if "layers" in self.file else []
            raise SourceError(f"layer {layer!r} does not exist in {path}; available: {', '.join(available) or '(none)'}")
        where = "X" if layer is None else f"layers/{layer}"
        if isinstance(element, h5py.Group):
            encoding = element.attrs.get("encoding-type")
            if encoding != "csr_matrix":
                raise SourceError(f"{where} in {path} is {encoding}: rows can only be streamed from CSR or dense")
            self.matrix = sparse_dataset(element)
        else:
            self.matrix = element
        shape = tuple(self.matrix.shape)
        if shape != (len(self.obs), len(self.gene_names)):
            raise SourceError(f"{where} in {path} has shape {shape} but obs has {len(self.obs)} cells "
                              f"and var {len(self.gene_names)} genes")

    def read(self, start: int, stop: int) -> sp.csr_matrix:
        return sp.csr_matrix(self.matrix[start:stop])


class TenxH5Source(Source):
    """Cell Ranger v3 ``filtered_feature_bc_matrix.h5``: matrix/{data,indices,indptr,shape,barcodes,features}.

    The matrix is stored genes x cells in CSC, which is cells x genes in CSR; only features of
    type "Gene Expression" are kept.
    """

    def __init__(self, path: Path) -> None:
        self.files = [path]
        self.file = h5py.File(path, "r")
        if "matrix" not in self.file:
            raise SourceError(f"{path} has no 'matrix' group: not a Cell Ranger v3 .h5 file")
        m = self.file["matrix"]
        features = m["features"]
        types = features["feature_type"][:].astype(str) if "feature_type" in features else None
        self.keep = np.ones(len(features["name"]), bool) if types is None else types == "Gene Expression"
        self.remap = np.cumsum(self.keep) - 1
        self.gene_names = features["name"][:].astype(str)[self.keep]
        barcodes = m["barcodes"][:].astype(str)
        self.obs = pd.DataFrame(index=pd.Index(barcodes))
        n_features, n_cells = (int(v) for v in m["shape"][:])
        if n_cells != len(barcodes) or n_features != len(self.keep):
            raise SourceError(f"{path}: matrix shape {(n_features, n_cells)} does not match "
                              f"{len(self.keep)} features and {len(barcodes)} barcodes")
        self.data, self.indices, self.indptr = m["data"], m["indices"], m["indptr"]

    def read(self, start: int, stop: int) -> sp.csr_matrix:
        ptr = self.indptr[start : stop + 1].astype(np.int64)
        data, indices = self.data[ptr[0] : ptr[-1]], self.indices[ptr[0] : ptr[-1]]
        rows = np.repeat(np.arange(stop - start), np.diff(ptr))
        kept = self.keep[indices]
        return sp.csr_matrix((data[kept], (rows[kept], self.remap[indices[kept]])),
                             shape=(stop - start, len(self.gene_names)))


def _open_text(path: Path):
    return gzip.open(path, "rt") if path.suffix == ".gz" else open(path)


def _first_existing(directory: Path, names: tuple[str, ...]) -> Path:
    for name in names:
        for candidate in (directory / name, directory / f"{name}.gz"):
            if candidate.exists():
                return candidate
    raise SourceError(f"{directory} has none of {', '.join(names)} (optionally .gz): not a 10x mtx directory")


class MtxSource(Source):
    """A 10x mtx directory: matrix.mtx[.gz] (genes x cells), features.tsv or genes.tsv, barcodes.tsv.

    Cell Ranger writes entries ordered by cell, so blocks stream; a file that is not ordered
    by cell is read whole into memory instead (said on stderr).
    """

    def __init__(self, directory: Path) -> None:
        self.matrix_path = _first_existing(directory, ("matrix.mtx",))
        features = _first_existing(directory, ("features.tsv", "genes.tsv"))
        barcodes = _first_existing(directory, ("barcodes.tsv",))
        self.files = [self.matrix_path, features, barcodes]
        genes = pd.read_csv(features, sep="\t", header=None)
        self.gene_names = genes[1 if genes.shape[1] > 1 else 0].astype(str).to_numpy()
        barcode_names = pd.read_csv(barcodes, sep="\t", header=None)[0].astype(str).to_numpy()
        self.obs = pd.DataFrame(index=pd.Index(barcode_names))
        with _open_text(self.matrix_path) as f:
            header = f.readline()
            if not header.startswith("%%MatrixMarket matrix coordinate"):
                raise SourceError(f"{self.matrix_path} is not a MatrixMarket coordinate file")
            self.header_lines = 1
            line = f.readline()
            while line.startswith("%"):
                line, self.header_lines = f.readline(), self.header_lines + 1
            self.header_lines += 1  # the "genes cells entries" line
            n_genes, n_cells, _ = (int(v) for v in line.split())
        if (n_genes, n_cells) != (len(self.gene_names), len(self.obs)):
            raise SourceError(f"{self.matrix_path}: matrix is {n_genes} genes x {n_cells} cells but "
                              f"{features.name} lists {len(self.gene_names)} and {barcodes.name} {len(self.obs)}")

    def _entries(self) -> Iterator[pd.DataFrame]:
        return pd.read_csv(self.matrix_path, sep=" ", header=None, skiprows=self.header_lines,
                           names=["gene", "cell", "value"], dtype={"gene": np.int64, "cell": np.int64,
                                                                   "value": np.float64}, chunksize=1 << 20)

    def blocks(self, rows: int = SOURCE_BLOCK_ROWS) -> Iterator[tuple[int, sp.csr_matrix]]:
        n_genes = len(self.gene_names)
        pending: list[pd.DataFrame] = []
        start, last_cell = 0, -1
        for chunk in self._entries():
            cells = chunk["cell"].to_numpy() - 1
            if len(cells) and (cells[0] < last_cell or np.any(np.diff(cells) < 0)):
                yield from self._blocks_in_memory(rows)
                return
            last_cell = cells[-1] if len(cells) else last_cell
            pending.append(chunk)
            while last_cell >= start + rows:  # every entry of block [start, start+rows) has arrived
                entries = pd.concat(pending)
                c = entries["cell"].to_numpy() - 1
                done = c < start + rows
                yield start, self._csr(entries[done], start, rows, n_genes)
                pending, start = [entries[~done]], start + rows
        entries = pd.concat(pending) if pending else pd.DataFrame(columns=["gene", "cell", "value"])
        while start < self.n_cells:
            stop = min(start + rows, self.n_cells)
            c = entries["cell"].to_numpy() - 1
            done = c < stop
            yield start, self._csr(entries[done], start, stop - start, n_genes)
            entries, start = entries[~done], stop

    def _blocks_in_memory(self, rows: int) -> Iterator[tuple[int, sp.csr_matrix]]:
        import sys

        print(f"{self.matrix_path}: entries are not ordered by cell; reading the whole matrix into memory",
              file=sys.stderr)
        entries = pd.concat(self._entries())
        matrix = self._csr(entries, 0, self.n_cells, len(self.gene_names))
        for start in range(0, self.n_cells, rows):
            yield start, matrix[start : start + rows]

    @staticmethod
    def _csr(entries: pd.DataFrame, start: int, n_rows: int, n_genes: int) -> sp.csr_matrix:
        rows = entries["cell"].to_numpy() - 1 - start
        cols = entries["gene"].to_numpy() - 1
        return sp.csr_matrix((entries["value"].to_numpy(np.float64), (rows, cols)), shape=(n_rows, n_genes))


def open_source(src: str | Path, layer: str | None = None) -> Source:
    path = Path(src)
    if not path.exists():
        raise FileNotFoundError(f"source {src} does not exist")
    if path.is_dir():
        return MtxSource(path)
    if layer is not None and path.suffix != ".h5ad":
        raise SourceError(f"--layer applies to .h5ad sources only, not {path.name}")
    if path.suffix == ".h5ad":
        return H5adSource(path, layer)
    if path.suffix == ".h5":
        return TenxH5Source(path)
    raise SourceError(f"cannot read {path.name}: expected a .h5ad file, a 10x .h5 file or a 10x mtx directory")
