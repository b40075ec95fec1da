import numpy as np
import pytest

from distributed_je.cli import main
from distributed_je.convert import convert
from distributed_je.store import LIBRARY_SIZE, StoreError, open_store
from distributed_je.synth import synthesize


@pytest.fixture(scope="module")
def reference(tmp_path_factory, request):
    from conftest import shared_data

    path = shared_data("pbmc3k_labeled.h5ad")
    dest = str(tmp_path_factory.mktemp("ref") / "pbmc3k.zarr")
    convert(path, dest, n_top_genes=1000, labels_key="cell_type", progress=False)
    return dest


@pytest.mark.data
def test_synthetic_store_matches_its_reference(reference, tmp_path):
    dest = str(tmp_path / "atlas.zarr")
    assert main(["synth", reference, dest, "--cells", "20000", "--n-batches", "2", "--seed", "3"]) == 0
    ref, synth = open_store(reference), open_store(dest)
    assert synth.n_cells == 20000 and list(synth.gene_names) == list(ref.gene_names)
    assert synth.attrs["synthetic"] is True and synth.attrs["reference"] == reference
    # labels carry over in the reference's proportions
    ref_codes, ref_names = ref.obs_codes("cell_type")
    codes, names = synth.obs_codes("cell_type")
    assert names == ref_names
    ref_share = np.bincount(ref_codes[ref_codes >= 0], minlength=len(names)) / (ref_codes >= 0).sum()
    share = np.bincount(codes[codes >= 0], minlength=len(names)) / (codes >= 0).sum()
    assert np.abs(share - ref_share).max() < 0.02
    # a wide depth distribution, never deeper than the reference cell it came from
    library = synth.obs_values(LIBRARY_SIZE)
    assert np.log10(np.percentile(library, 95) / np.percentile(library, 5)) > 0.8
    assert library.min() >= 1 and np.median(library) <= np.median(ref.obs_values(LIBRARY_SIZE))
    block = synth.read_rows(0, 1000)
    np.testing.assert_array_equal(np.add.reduceat(block.data.astype(float), block.indptr[:-1]), library[:1000])
    assert len(synth.obs_codes("synthetic_batch")[1]) == 2


@pytest.mark.data
def test_synth_is_seeded_and_validates(reference, tmp_path):
    a, b = str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr")
    synthesize(reference, a, n_cells=500, seed=1, progress=False)
    synthesize(reference, b, n_cells=500, seed=1, progress=False)
    assert np.array_equal(open_store(a).read_rows(0, 500).data, open_store(b).read_rows(0, 500).data)
    with pytest.raises(StoreError, match="already exists"):
        synthesize(reference, a, n_cells=10, progress=False)
    with pytest.raises(ValueError, match=r"--cells 0 is out of range"):
        synthesize(reference, str(tmp_path / "c.zarr"), n_cells=0, progress=False)


@pytest.mark.data
def test_depth_diversified_store_follows_the_protocol(reference, tmp_path):
    from distributed_je.store import TOTAL_COUNTS
    from distributed_je.synth import DIVERSIFY_MIN_UMIS, diversify_depth

    dest = str(tmp_path / "diversified.zarr")
    kept = diversify_depth(reference, dest, seed=0)
    source, diversified = open_store(reference), open_store(dest)
    assert diversified.n_cells == kept and 0.6 * source.n_cells < kept < source.n_cells
    total, library = diversified.obs_values(TOTAL_COUNTS), diversified.obs_values(LIBRARY_SIZE)
    assert total.min() >= DIVERSIFY_MIN_UMIS and (library <= total).all() and library.min() > 0
    # each kept cell is a thinned copy of the source cell of the same name
    names = list(source.cell_names())
    rows = np.array([names.index(n) for n in diversified.cell_names()])
    assert (total <= source.obs_values(TOTAL_COUNTS)[rows]).all()
    factor = diversified.obs_values("depth_factor")
    assert np.median(np.log10(factor)) > -1.0  # log10 factors are N(-1, 1) capped at 0; deep-enough cells survive
    assert diversified.obs_codes("cell_type")[0].tolist() == source.obs_codes("cell_type")[0][rows].tolist()
    assert diversify_depth(reference, str(tmp_path / "again.zarr"), seed=0) == kept  # seeded
