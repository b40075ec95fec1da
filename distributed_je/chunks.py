"""Fast contiguous reads from 1-D zarr v3 arrays: raw chunk bytes, decoded with numcodecs.

zarr-python spends about 1.7 ms of Python per ``array[a:b]`` call (plus about 1 ms per extra
chunk), against about 0.25 ms to decompress a 256k-element blosc chunk. The loader reads a few
chunks per 4,096-cell block, so it reads the bytes itself: each chunk (or each inner chunk of a
shard, located through the shard's index) is fetched with one ranged read and decoded by
numcodecs. This covers the layouts this package writes, 1-D arrays with

    [bytes]  or  [bytes, blosc | zstd]          (obs columns, X/indptr)
    [sharding_indexed(inner [bytes, blosc | zstd], index [bytes, crc32c] at the end)]   (X/data, X/indices)

on a local path or any fsspec URL. Anything else reads through zarr, so results never differ,
only speed (tests compare both, layout by layout, gaps of never-written chunks included).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import numcodecs
import numpy as np
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation

_MISSING = np.iinfo(np.uint64).max  # a shard index entry of an inner chunk that was never written


def _decoder(codecs: tuple) -> Callable[[bytes], bytes] | None:
    """bytes -> decoded bytes for [bytes] or [bytes, blosc|zstd] (little-endian); None otherwise."""
    if not codecs or not isinstance(codecs[0], BytesCodec):
        return None
    if codecs[0].endian is not None and codecs[0].endian.value != "little":
        return None
    if len(codecs) == 1:
        return lambda raw: raw
    if len(codecs) == 2 and isinstance(codecs[1], BloscCodec):
        return numcodecs.blosc.decompress
    if len(codecs) == 2 and isinstance(codecs[1], ZstdCodec):
        return numcodecs.Zstd().decode
    return None


class StoreFiles:
    """Ranged reads of a store's files (keys relative to the store root), local or fsspec."""

    def __init__(self, location: str) -> None:
        location = str(location)
        if "://" in location and not location.startswith("file://"):
            import fsspec

            self.fs, self.root = fsspec.core.url_to_fs(location)
        else:
            self.fs, self.root = None, location.removeprefix("file://")

    def read(self, key: str, start: int | None = None, stop: int | None = None) -> bytes | None:
        """Bytes [start, stop) of a file (negative start: from its end); None if it does not exist."""
        path = f"{self.root.rstrip('/')}/{key}"
        try:
            if self.fs is not None:
                if start is not None and start < 0:
                    start = self.fs.size(path) + start
                return self.fs.cat_file(path, start=start, end=stop)
            with open(path, "rb") as handle:
                if start is None:
                    return handle.read()
                handle.seek(start, os.SEEK_END if start < 0 else os.SEEK_SET)
                return handle.read(-1 if stop is None else stop - start)
        except FileNotFoundError:
            return None


class VectorReader:
    """Contiguous slices ``[start, stop)`` of one 1-D array of a store."""

    def __init__(self, array: zarr.Array, files: StoreFiles) -> None:
        self.array, self.files = array, files
        dtype = np.dtype(array.dtype)
        self.dtype = dtype.newbyteorder("<") if dtype.kind in "biuf" else dtype
        self.fill = array.metadata.fill_value
        self.prefix = array.store_path.path
        (self.outer,) = array.metadata.chunk_grid.chunk_shape
        codecs = array.metadata.codecs
        self.inner, self.decode = self.outer, None
        if len(codecs) == 1 and isinstance(codecs[0], ShardingCodec):
            shard = codecs[0]
            index_ok = (shard.index_location == ShardingCodecIndexLocation.end and len(shard.index_codecs) == 2
                        and isinstance(shard.index_codecs[1], Crc32cCodec))
            if index_ok:
                (self.inner,) = shard.chunk_shape
                self.decode = _decoder(shard.codecs)
            self.sharded = True
        else:
            self.decode, self.sharded = _decoder(codecs), False
        if self.dtype.kind not in "biuf":  # strings and the like: zarr decodes them
            self.decode = None
        self._shard_index: dict[int, np.ndarray | None] = {}

    @property
    def fast(self) -> bool:
        return self.decode is not None

    def __getitem__(self, bounds: slice) -> np.ndarray:
        start, stop, _ = bounds.indices(self.array.shape[0])
        return self.read(start, stop)

    def read(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Values [start, stop), written into ``out`` (of any numeric dtype, converted) when given."""
        stop = max(start, min(stop, self.array.shape[0]))
        if out is None:
            out = np.empty(stop - start, dtype=self.dtype)
        if not self.fast:
            out[:] = self.array[start:stop]
            return out
        n_chunks = -(-stop // self.inner) - start // self.inner if stop > start else 0
        for chunk, raw in self._encoded(start // self.inner, n_chunks):
            lo, hi = chunk * self.inner, min((chunk + 1) * self.inner, self.array.shape[0])
            if raw is None:  # never written: all fill value
                values = np.full(hi - lo, self.fill, dtype=self.dtype)
            else:
                values = np.frombuffer(self.decode(raw), dtype=self.dtype)
            out[max(lo, start) - start : min(hi, stop) - start] = values[max(lo, start) - lo : min(hi, stop) - lo]
        return out

    def _encoded(self, first: int, n_chunks: int) -> Iterator[tuple[int, memoryview | None]]:
        """(chunk, its encoded bytes or None where never written) for ``n_chunks`` chunks from ``first``.

        Inside a shard the chunks' bytes are fetched in one ranged read.
        """
        if not self.sharded:
            for chunk in range(first, first + n_chunks):
                raw = self.files.read(self._key(chunk))
                yield chunk, None if raw is None else memoryview(raw)
            return
        per_shard = self.outer // self.inner
        chunk, stop = first, first + n_chunks
        while chunk < stop:
            shard, position = divmod(chunk, per_shard)
            chunks = range(chunk, min(stop, (shard + 1) * per_shard))
            index = self._index(shard, per_shard)
            entries = (np.full((len(chunks), 2), _MISSING) if index is None
                       else index[position : position + len(chunks)])
            written = entries[entries[:, 0] != _MISSING]
            if len(written):
                span_start = int(written[:, 0].min())
                span = memoryview(self.files.read(self._key(shard), span_start, int(written.sum(axis=1).max())))
            for chunk_id, (offset, length) in zip(chunks, entries.tolist()):
                yield chunk_id, None if offset == _MISSING else span[offset - span_start : offset - span_start + length]
            chunk = chunks.stop

    def _index(self, shard: int, per_shard: int) -> np.ndarray | None:
        if shard not in self._shard_index:
            raw = self.files.read(self._key(shard), -(per_shard * 16 + 4))  # (offset, nbytes) uint64 pairs + crc32c
            self._shard_index[shard] = None if raw is None else np.frombuffer(raw[:-4], "<u8").reshape(per_shard, 2)
        return self._shard_index[shard]

    def _key(self, chunk: int) -> str:
        return f"{self.prefix}/{self.array.metadata.encode_chunk_key((chunk,))}" if self.prefix \
            else self.array.metadata.encode_chunk_key((chunk,))
