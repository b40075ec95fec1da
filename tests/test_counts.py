import numpy as np
import pytest
import scipy.sparse as sp

from distributed_je.counts import CountsError, check_counts, minibatches, read_h5ad
from distributed_je.keys import BATCH_INDEX, COUNTS, LABELS
from distributed_je.split import validation_mask
from distributed_je.synthetic import synthetic_counts

CELLS = [f"c{i}" for i in range(3)]
GENES = ["g0", "g1", "g2"]


@pytest.mark.parametrize(("value", "problem"), [(-1.0, "negative"), (1.5, "not an integer"),
                                                (np.nan, "NaN"), (np.inf, "infinite")])
def test_bad_counts_name_the_first_cell_and_gene(value, problem):
    dense = np.ones((3, 3), dtype=np.float32)
    dense[2, 1] = value
    dense[2, 2] = -5  # a later bad value: the first one is reported
    with pytest.raises(CountsError, match=rf"{problem}\) at cell 'c2' \(row 2\), gene 'g1'"):
        check_counts(sp.csr_matrix(dense), CELLS, GENES)


def test_good_counts_pass_and_row_offset_is_applied():
    check_counts(sp.csr_matrix(np.eye(3, dtype=np.float32) * 4), CELLS, GENES)
    block = sp.csr_matrix(np.array([[0, -1, 0]], dtype=np.float32))
    with pytest.raises(CountsError, match=r"cell 'c2' \(row 2\)"):
        check_counts(block, CELLS, GENES, row_offset=2)


def test_validation_split_is_fixed_by_cell_name():
    names = [f"cell{i}" for i in range(20000)]
    mask = validation_mask(names, 0.1)
    assert abs(mask.mean() - 0.1) < 0.01
    reordered = names[::-1]
    assert np.array_equal(validation_mask(reordered, 0.1), mask[::-1])
    assert np.array_equal(validation_mask(names[:500], 0.1), mask[:500])
    assert not validation_mask(names, 0.0).any()


def test_minibatches_cover_every_cell_once_and_are_seeded():
    matrix = synthetic_counts(103, 20, seed=0)
    batches = list(minibatches(matrix, batch_size=25, rng=np.random.default_rng(0), with_labels=True))
    assert [len(b[COUNTS]) for b in batches] == [25, 25, 25, 25, 3]
    total = sum(float(b[COUNTS].sum()) for b in batches)
    assert total == pytest.approx(float(matrix.counts.sum()))
    assert set(batches[0]) == {COUNTS, BATCH_INDEX, LABELS}
    again = list(minibatches(matrix, batch_size=25, rng=np.random.default_rng(0)))
    assert all(np.array_equal(a[COUNTS], b[COUNTS]) for a, b in zip(batches, again))
    dropped = list(minibatches(matrix, batch_size=25, rng=np.random.default_rng(0), drop_last=True))
    assert len(dropped) == 4


def test_read_h5ad_refuses_a_missing_obs_column(tmp_path):
    import anndata

    path = tmp_path / "x.h5ad"
    anndata.AnnData(X=sp.csr_matrix(np.ones((4, 3), dtype=np.float32)), obs={"tissue": list("abab")}).write_h5ad(path)
    with pytest.raises(KeyError, match="obs column 'cell_type' does not exist; available: tissue"):
        read_h5ad(path, labels_key="cell_type")


def test_read_h5ad_refuses_non_counts(tmp_path):
    import anndata

    path = tmp_path / "x.h5ad"
    anndata.AnnData(X=np.full((4, 3), 0.5, dtype=np.float32)).write_h5ad(path)
    with pytest.raises(CountsError, match="not an integer"):
        read_h5ad(path)


@pytest.mark.data
def test_read_real_pbmc3k_with_labels_and_genes(pbmc3k_path):
    matrix = read_h5ad(pbmc3k_path, labels_key="cell_type", n_top_genes=500)
    assert matrix.counts.shape == (2700, 500)
    assert len(matrix.label_categories) == 9
    assert (matrix.label_codes == -1).sum() == 62  # cells that failed QC have no label
    assert {"CD14+ Mono", "B"} <= set(matrix.label_categories) or len(matrix.label_categories) == 9
