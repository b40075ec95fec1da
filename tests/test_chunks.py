import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, BytesCodec, GzipCodec, ZstdCodec

from distributed_je.chunks import StoreFiles, VectorReader
from distributed_je.store import COMPRESSOR

N = 1000


def values_with_gaps() -> np.ndarray:
    """Counts with zero runs long enough that whole chunks, and a whole shard, are never written."""
    values = np.random.default_rng(0).integers(1, 60_000, N).astype(np.uint16)
    values[70:140] = 0  # chunks 10-19 of 7 elements: inner chunks of shard 3 (63-83) and all of shard 4 (84-104)
    values[-5:] = 0  # the partial last chunk
    return values


LAYOUTS = {
    "sharded blosc": dict(chunks=(7,), shards=(21,), compressors=COMPRESSOR),
    "plain zstd": dict(chunks=(16,), compressors=ZstdCodec(level=1)),
    "plain uncompressed": dict(chunks=(16,), compressors=None),
    "sharded zstd": dict(chunks=(5,), shards=(50,), compressors=ZstdCodec(level=1)),
}


@pytest.fixture(params=["local", "memory"])
def location(request, tmp_path):
    return str(tmp_path / "g.zarr") if request.param == "local" else f"memory://chunks-{id(request)}.zarr"


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_fast_reads_equal_zarr(location, layout):
    group = zarr.open_group(location, mode="w", zarr_format=3)
    array = group.create_array("x/values", shape=(N,), dtype=np.uint16, fill_value=0, **LAYOUTS[layout])
    array[:] = values_with_gaps()
    reader = VectorReader(group["x/values"], StoreFiles(location))
    assert reader.fast
    if layout == "sharded blosc":  # the gaps are real: zarr wrote neither the zero shard nor the zero chunks
        assert StoreFiles(location).read("x/values/c/4") is None
        assert StoreFiles(location).read("x/values/c/3") is not None
    rng = np.random.default_rng(1)
    bounds = [(0, N), (0, 0), (995, N), (70, 140), (83, 106), (N - 3, N + 10)]
    bounds += [tuple(sorted(rng.integers(0, N, 2))) for _ in range(30)]
    for start, stop in bounds:
        np.testing.assert_array_equal(reader[start:stop], array[start:stop], err_msg=f"[{start}:{stop}]")
    into = np.full(50, -1.0, dtype=np.float32)
    reader.read(60, 110, out=into)
    np.testing.assert_array_equal(into, array[60:110].astype(np.float32))


def test_unsupported_codecs_read_through_zarr(tmp_path):
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w", zarr_format=3)
    gzip = group.create_array("gzip", shape=(N,), dtype=np.uint16, chunks=(16,), compressors=GzipCodec())
    gzip[:] = values_with_gaps()
    text = group.create_array("names", shape=(3,), dtype=str, chunks=(2,))
    text[:] = np.array(["a", "bb", "ccc"])
    files = StoreFiles(str(tmp_path / "g.zarr"))
    reader = VectorReader(group["gzip"], files)
    assert not reader.fast
    np.testing.assert_array_equal(reader[13:400], gzip[13:400])
    assert not VectorReader(group["names"], files).fast
    assert VectorReader(group["names"], files)[0:3].tolist() == ["a", "bb", "ccc"]


def test_big_endian_chunks_read_through_zarr(tmp_path):
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w", zarr_format=3)
    array = group.create_array("big", shape=(N,), dtype=np.uint16, chunks=(16,), compressors=BloscCodec(),
                               serializer=BytesCodec(endian="big"))
    array[:] = values_with_gaps()
    reader = VectorReader(group["big"], StoreFiles(str(tmp_path / "g.zarr")))
    assert not reader.fast
    np.testing.assert_array_equal(reader[5:700], array[5:700])
