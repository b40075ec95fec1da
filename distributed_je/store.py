"""Zarr count stores: AnnData-compatible zarr v3 with raw counts as CSR, written and read in row blocks.

Layout (``anndata.read_zarr`` opens it):
    X/{data,indices,indptr}  CSR counts; data uint16 when every count fits, else uint32; indices
                             uint16 up to 65,536 genes; 1-D arrays in CHUNK_ELEMENTS chunks
                             grouped into shards of SHARD_CHUNKS chunks (see README)
    obs                      the source's columns + library_size (UMIs over the stored genes)
                             + name_hash (fixes the validation split)
    var                      gene names
    attrs["distributed_je"]  format version, genes, fingerprint, provenance; written last, so a
                             store without it is incomplete and is refused

Any fsspec URL works (local path, file://, s3://, gs://, memory://).
"""

from __future__ import annotations

import os
import shutil
import uuid
import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from scipy.sparse import _sparsetools  # the kernels behind csr_matrix row indexing and toarray
import zarr
from zarr.codecs import BloscCodec

from distributed_je.chunks import StoreFiles, VectorReader
from distributed_je.split import name_hashes

FORMAT_VERSION = 1
ATTRS_KEY = "distributed_je"
CHUNK_ELEMENTS = 1 << 16   # non-zeros per chunk: a 4,096-cell block decodes little beyond its own rows
SHARD_CHUNKS = 64          # chunks per shard file: ~300 files per array for a 10M-cell atlas
OBS_CHUNK_ROWS = 1 << 14  # cells per chunk of X/indptr and of every obs column
COMPRESSOR = BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")  # decompresses at ~2 GB/s per core
LIBRARY_SIZE = "library_size"
TOTAL_COUNTS = "total_counts"  # obs: UMIs over all of the source's genes, before gene selection
NAME_HASH = "name_hash"


class StoreError(ValueError):
    """A store that is missing, incomplete, of another format version, or would be overwritten."""


def _is_url(location: str) -> bool:
    return "://" in str(location) and not str(location).startswith("file://")


def _local_path(location: str) -> str:
    return str(location)[len("file://"):] if str(location).startswith("file://") else str(location)


def store_exists(location: str) -> bool:
    if _is_url(location):
        import fsspec

        fs, path = fsspec.core.url_to_fs(location)
        return fs.exists(path)
    return os.path.exists(_local_path(location))


def _remove(location: str) -> None:
    if _is_url(location):
        import fsspec

        fs, path = fsspec.core.url_to_fs(location)
        if fs.exists(path):
            fs.rm(path, recursive=True)
    elif os.path.exists(_local_path(location)):
        shutil.rmtree(_local_path(location))


def _move(source: str, dest: str) -> None:
    if _is_url(source):
        import fsspec

        fs, src_path = fsspec.core.url_to_fs(source)
        fs.mv(src_path, fsspec.core.url_to_fs(dest)[1], recursive=True)
    else:
        os.replace(_local_path(source), _local_path(dest))


class _ShardedVector:
    """A growing 1-D zarr array written in whole shards (each shard exactly once)."""

    def __init__(self, group: zarr.Group, name: str, dtype: np.dtype) -> None:
        self.shard = CHUNK_ELEMENTS * SHARD_CHUNKS
        self.array = group.create_array(name, shape=(0,), dtype=dtype, chunks=(CHUNK_ELEMENTS,),
                                        shards=(self.shard,), compressors=COMPRESSOR)
        self.pending: list[np.ndarray] = []
        self.n_pending = 0
        self.n_written = 0

    def append(self, values: np.ndarray) -> None:
        self.pending.append(np.asarray(values, dtype=self.array.dtype))
        self.n_pending += len(values)
        if self.n_pending >= self.shard:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        buffer = np.concatenate(self.pending) if self.pending else np.empty(0, self.array.dtype)
        n = len(buffer) if final else len(buffer) // self.shard * self.shard
        if n:
            self.array.resize((self.n_written + n,))
            self.array[self.n_written : self.n_written + n] = buffer[:n]
            self.n_written += n
        self.pending, self.n_pending = [buffer[n:]], len(buffer) - n

    def close(self) -> int:
        self._flush(final=True)
        return self.n_written


class StoreWriter:
    """Write a store atomically: into a hidden sibling, renamed onto ``dest`` only when complete.

    Use as a context manager; an exception (Ctrl-C included) removes the sibling and leaves
    ``dest`` as it was.
    """

    def __init__(self, dest: str, *, gene_names, max_count: float, overwrite: bool = False) -> None:
        dest = str(dest).rstrip("/")
        if store_exists(dest) and not overwrite:
            raise StoreError(f"{dest} already exists: pass --overwrite to replace it")
        self.dest, self.overwrite = dest, overwrite
        parent, _, name = dest.rpartition("/")
        self.tmp = f"{parent + '/' if parent else ''}.{name}.tmp-{uuid.uuid4().hex[:8]}"
        self.gene_names = np.asarray(gene_names, dtype=str)
        n_genes = len(self.gene_names)
        self.group = zarr.open_group(self.tmp if _is_url(self.tmp) else _local_path(self.tmp), mode="w",
                                     zarr_format=3)
        x = self.group.create_group("X")
        data_dtype = np.uint16 if max_count <= np.iinfo(np.uint16).max else np.uint32
        self.data = _ShardedVector(x, "data", data_dtype)
        self.indices = _ShardedVector(x, "indices", np.uint16 if n_genes <= 1 << 16 else np.uint32)
        self.row_nnz: list[np.ndarray] = []
        self.obs_parts: list[pd.DataFrame] = []

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            _remove(self.tmp)

    def append(self, data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, obs: pd.DataFrame) -> None:
        """Append CSR rows (``indptr`` starting at 0) and their obs rows (index = cell names)."""
        if len(obs) != len(indptr) - 1:
            raise ValueError(f"obs has {len(obs)} rows for {len(indptr) - 1} cells")
        self.data.append(data)
        self.indices.append(indices)
        self.row_nnz.append(np.diff(indptr))
        self.obs_parts.append(obs)

    def commit(self, attrs: Mapping[str, Any]) -> None:
        """Finish every array, write obs, var and the attributes, then move into place."""
        from anndata.io import write_elem

        nnz = self.data.close()
        self.indices.close()
        row_nnz = np.concatenate(self.row_nnz) if self.row_nnz else np.zeros(0, np.int64)
        indptr = np.concatenate([[0], np.cumsum(row_nnz)]).astype(np.int64)
        assert indptr[-1] == nnz
        n_cells, n_genes = len(row_nnz), len(self.gene_names)
        x = self.group["X"]
        x.create_array("indptr", data=indptr, chunks=(OBS_CHUNK_ROWS,), compressors=COMPRESSOR)
        x.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": [n_cells, n_genes]})

        obs = pd.concat(self.obs_parts) if self.obs_parts else pd.DataFrame(index=pd.Index([], dtype=str))
        obs.index = pd.Index(obs.index.astype(str), name=None)
        obs[NAME_HASH] = name_hashes(obs.index)
        with warnings.catch_warnings():  # anndata's element writer names zarr's coming defaults
            warnings.filterwarnings("ignore", message=".*autosharding.*")
            # row-block chunks: a loader reading a block must not decompress a whole column
            write_elem(self.group, "obs", obs, dataset_kwargs={"chunks": (OBS_CHUNK_ROWS,)})
            write_elem(self.group, "var", pd.DataFrame(index=pd.Index(self.gene_names, name=None)))
            for empty in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
                write_elem(self.group, empty, {})
        self.group.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        self.group.attrs[ATTRS_KEY] = {
            "format_version": FORMAT_VERSION, "n_cells": n_cells, "n_genes": n_genes,
            "genes": self.gene_names.tolist(), **attrs,
        }
        if self.overwrite:
            _remove(self.dest)
        _move(self.tmp, self.dest)


def take_rows(indptr: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For CSR ``rows`` (in that order): the positions of their non-zeros and their new indptr.

    One vectorised gather; ``data[positions]`` and ``indices[positions]`` are the rows' values.
    """
    starts = indptr[rows]
    lengths = indptr[rows + 1] - starts
    new_indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=new_indptr[1:])
    # each kept non-zero: its row's start + its offset inside the row
    positions = np.repeat(starts - new_indptr[:-1], lengths) + np.arange(new_indptr[-1], dtype=np.int64)
    return positions, new_indptr


def _room(previous: np.ndarray | None, n: int, dtype) -> np.ndarray:
    """An array of ``n`` elements: inside ``previous``'s memory when it fits, else new with 25% to spare."""
    memory = None if previous is None else previous if previous.base is None else previous.base
    if memory is not None and memory.dtype == dtype and memory.ndim == 1 and len(memory) >= n:
        return memory[:n]
    return np.empty(n + n // 4, dtype)[:n]


class CsrRows(NamedTuple):
    """CSR rows as bare arrays (``indptr`` starts at 0). Rows are selected and densified by
    scipy's compiled kernels, called directly: at 512 cells the Python-level checks of
    ``csr_matrix`` indexing cost a third of the work. Those kernels want indices of the
    indptr's dtype (int32 or int64)."""

    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray

    @property
    def n_cells(self) -> int:
        return len(self.indptr) - 1

    def take(self, rows: np.ndarray) -> CsrRows:
        rows = rows.astype(self.indptr.dtype, copy=False)
        indptr = np.zeros(len(rows) + 1, dtype=self.indptr.dtype)
        np.cumsum(self.indptr[rows + 1] - self.indptr[rows], out=indptr[1:])
        taken = CsrRows(indptr, np.empty(indptr[-1], self.indices.dtype), np.empty(indptr[-1], self.data.dtype))
        _sparsetools.csr_row_index(len(rows), rows, self.indptr, self.indices, self.data, taken.indices, taken.data)
        return taken

    def stack(self, other: CsrRows) -> CsrRows:
        dtype = np.result_type(self.indptr, other.indptr)
        return CsrRows(np.concatenate([self.indptr.astype(dtype), other.indptr[1:] + dtype.type(self.indptr[-1])]),
                       np.concatenate([self.indices, other.indices.astype(self.indices.dtype)]),
                       np.concatenate([self.data, other.data]))

    def dense(self, n_genes: int) -> np.ndarray:
        out = np.zeros((self.n_cells, n_genes), dtype=self.data.dtype)
        _sparsetools.csr_todense(self.n_cells, n_genes, self.indptr, self.indices, self.data, out)
        return out


class CountStore:
    """A read-only view of a complete store; rows are read in blocks, never all at once."""

    def __init__(self, location: str) -> None:
        location = str(location)
        if not store_exists(location):
            raise StoreError(f"store {location} does not exist")
        self.location = location
        self.group = zarr.open_group(location if _is_url(location) else _local_path(location), mode="r")
        attrs = self.group.attrs.get(ATTRS_KEY)
        if attrs is None:
            raise StoreError(f"{location} is not a complete distributed_je store (no '{ATTRS_KEY}' attributes)")
        if attrs["format_version"] != FORMAT_VERSION:
            raise StoreError(f"{location} has format version {attrs['format_version']}; "
                             f"this version reads {FORMAT_VERSION}")
        self.attrs: dict[str, Any] = dict(attrs)
        self.n_cells, self.n_genes = int(attrs["n_cells"]), int(attrs["n_genes"])
        self.gene_names = np.asarray(attrs["genes"], dtype=str)
        self._files = StoreFiles(location)
        x = self.group["X"]
        self._data, self._indices, self._indptr = (VectorReader(x[name], self._files)
                                                   for name in ("data", "indices", "indptr"))
        self._obs_cache: dict[str, VectorReader | tuple[VectorReader, list[str]]] = {}

    def read_rows(self, start: int, stop: int) -> CsrRows:
        """Rows [start, stop) with the store's own dtypes (uint16/uint32 counts and indices)."""
        indptr = self._indptr[start : stop + 1]
        data = self._data[indptr[0] : indptr[-1]]
        indices = self._indices[indptr[0] : indptr[-1]]
        return CsrRows((indptr - indptr[0]).astype(np.int64), indices, data)

    def read_csr(self, ranges: list[tuple[int, int]], reuse: CsrRows | None = None) -> CsrRows:
        """The rows of several ranges [start, stop), stacked, ready for ``take`` and ``dense``.

        Values are decoded straight into one float32 array and indices into one int32 array
        (int64 beyond 2**31 non-zeros). ``reuse``: an earlier result that is no longer needed;
        its memory is written over (touching fresh pages costs several times more than
        decoding into them).
        """
        bounds = [self._indptr[start : stop + 1] for start, stop in ranges]
        nnz = [int(b[-1] - b[0]) for b in bounds]
        index_dtype = np.int32 if sum(nnz) < np.iinfo(np.int32).max else np.int64
        data = _room(None if reuse is None else reuse.data, sum(nnz), np.float32)
        indices = _room(None if reuse is None else reuse.indices, sum(nnz), index_dtype)
        indptr, offset = [np.zeros(1, index_dtype)], 0
        for b, n in zip(bounds, nnz):
            self._data.read(int(b[0]), int(b[-1]), out=data[offset : offset + n])
            self._indices.read(int(b[0]), int(b[-1]), out=indices[offset : offset + n])
            indptr.append((b[1:] - b[0] + offset).astype(index_dtype))
            offset += n
        return CsrRows(np.concatenate(indptr), indices, data)

    @property
    def obs_columns(self) -> list[str]:
        return list(self.group["obs"].attrs.get("column-order", []))

    def _obs_element(self, column: str) -> VectorReader | tuple[VectorReader, list[str]]:
        """An obs column's array, or a categorical's (codes, categories); cached: opening reads metadata."""
        if column not in self._obs_cache:
            if column not in self.obs_columns:
                raise KeyError(f"obs column {column!r} does not exist; available: {', '.join(self.obs_columns)}")
            element = self.group["obs"][column]
            if isinstance(element, zarr.Group):  # anndata encodes a categorical as codes + categories
                self._obs_cache[column] = (VectorReader(element["codes"], self._files),
                                           [str(c) for c in element["categories"][:]])
            else:
                self._obs_cache[column] = VectorReader(element, self._files)
        return self._obs_cache[column]

    def obs_codes(self, column: str, start: int = 0, stop: int | None = None) -> tuple[np.ndarray, list[str]]:
        """Integer codes (-1 for missing) and category names of a categorical obs column."""
        element = self._obs_element(column)
        if not isinstance(element, tuple):
            raise StoreError(f"obs column {column!r} is not categorical: convert again naming it with "
                             "--batch-key or --labels-key")
        codes, categories = element
        return codes[start:stop].astype(np.int64), categories

    def categories(self, column: str) -> list[str]:
        """Category names of a categorical obs column (no codes are read)."""
        return self.obs_codes(column, 0, 0)[1]

    def obs_values(self, column: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        element = self._obs_element(column)
        if isinstance(element, tuple):
            raise StoreError(f"obs column {column!r} is categorical: read it with obs_codes")
        return np.asarray(element[start:stop])

    def obs_strings(self, column: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Any obs column as strings; a missing category reads as "nan", as pandas writes it."""
        element = self._obs_element(column)
        if not isinstance(element, tuple):
            return self.obs_values(column, start, stop).astype(str)
        codes, categories = self.obs_codes(column, start, stop)
        return np.append(np.asarray(categories, dtype=object), "nan")[codes].astype(str)

    def cell_names(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        names = self.group["obs"][self.group["obs"].attrs["_index"]][start:stop]
        return np.array([str(name) for name in names], dtype=object)


def open_store(location: str) -> CountStore:
    return CountStore(location)
