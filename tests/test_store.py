import gzip

import anndata
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from distributed_je.convert import convert
from distributed_je.counts import CountsError
from distributed_je.sources import SourceError
from distributed_je.split import name_hashes
from distributed_je.store import LIBRARY_SIZE, NAME_HASH, StoreError, StoreWriter, open_store


def small_counts(n_cells=40, n_genes=12, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.poisson(1.5, (n_cells, n_genes)).astype(np.float32)
    x[rng.random((n_cells, n_genes)) < 0.5] = 0
    x[3] = 0  # an empty cell
    return x


def write_h5ad(path, x, *, sparse=True, obs=None, layer=None):
    n_cells, n_genes = x.shape
    obs = obs if obs is not None else pd.DataFrame(
        {"batch": ["a", "b"] * (n_cells // 2), "cell_type": ["t0", "t1", "t2", "t3"] * (n_cells // 4)},
        index=[f"cell{i}" for i in range(n_cells)])
    matrix = sp.csr_matrix(x) if sparse else x
    adata = anndata.AnnData(X=None if layer else matrix, obs=obs,
                            var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)]))
    if layer:
        adata.X = sp.csr_matrix(x.shape, dtype=np.float32)
        adata.layers[layer] = matrix
    adata.write_h5ad(path)
    return path


def leftovers(directory, keep):
    return sorted(p.name for p in directory.iterdir() if p.name not in keep)


@pytest.mark.parametrize("sparse", [True, False])
def test_h5ad_round_trip_equals_source_without_empty_cells(tmp_path, sparse):
    x = small_counts()
    src = write_h5ad(tmp_path / "src.h5ad", x, sparse=sparse)
    report = convert(src, str(tmp_path / "out.zarr"), batch_key="batch", labels_key="cell_type", progress=False)
    assert report.n_empty_dropped == 1 and report.n_cells == 39
    back = anndata.read_zarr(tmp_path / "out.zarr")
    keep = x.sum(1) > 0
    np.testing.assert_array_equal(back.X.toarray(), x[keep])
    assert list(back.obs_names) == [f"cell{i}" for i in np.flatnonzero(keep)]
    assert list(back.var_names) == [f"g{j}" for j in range(12)]
    np.testing.assert_array_equal(back.obs[LIBRARY_SIZE], x[keep].sum(1))
    np.testing.assert_array_equal(back.obs[NAME_HASH], name_hashes(back.obs_names))
    assert list(back.obs["cell_type"].cat.categories) == ["t0", "t1", "t2", "t3"]
    attrs = open_store(str(tmp_path / "out.zarr")).attrs
    assert attrs["genes"] == list(back.var_names) and attrs["format_version"] == 1
    assert len(attrs["source_fingerprint"]) == 32 and attrs["synthetic"] is False


def test_layer_keep_empty_and_gene_file(tmp_path):
    x = small_counts()
    src = write_h5ad(tmp_path / "src.h5ad", x, layer="counts")
    genes = tmp_path / "genes.txt"
    genes.write_text("g5\ng1\ng7\n")
    convert(src, str(tmp_path / "out.zarr"), layer="counts", genes_file=genes, keep_empty=True, progress=False)
    back = anndata.read_zarr(tmp_path / "out.zarr")
    assert list(back.var_names) == ["g5", "g1", "g7"]
    np.testing.assert_array_equal(back.X.toarray(), x[:, [5, 1, 7]])


def test_highly_variable_genes_are_recorded(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.poisson(rng.gamma(2.0, 1.0, 50), (300, 50)).astype(np.float32)
    x[:, 7] = 0
    x[:30, 7] = 20  # mean 2 like its neighbours, variance far above theirs
    src = write_h5ad(tmp_path / "src.h5ad", x, obs=pd.DataFrame(index=[f"c{i}" for i in range(300)]))
    convert(src, str(tmp_path / "out.zarr"), n_top_genes=5, progress=False)
    store = open_store(str(tmp_path / "out.zarr"))
    assert store.n_genes == 5 and "g7" in store.attrs["genes"]
    assert store.attrs["gene_selection"] == {"method": "seurat_v3", "n_top_genes": 5}


def write_10x_h5(path, x, *, extra_feature=True):
    n_cells, n_genes = x.shape
    names = [f"g{j}" for j in range(n_genes)]
    types = ["Gene Expression"] * n_genes
    if extra_feature:  # an antibody-capture feature that conversion must drop
        x = np.concatenate([x, np.full((n_cells, 1), 7, np.float32)], axis=1)
        names.append("CD3_TotalSeqB")
        types.append("Antibody Capture")
    csc = sp.csc_matrix(x.T)  # genes x cells, CSC: one column per cell
    with h5py.File(path, "w") as f:
        m = f.create_group("matrix")
        m["data"], m["indices"], m["indptr"] = csc.data.astype(np.int32), csc.indices, csc.indptr
        m["shape"] = np.array(csc.shape)
        m["barcodes"] = np.array([f"AAAC-{i}" for i in range(n_cells)], dtype="S")
        feats = m.create_group("features")
        feats["name"] = np.array(names, dtype="S")
        feats["id"] = np.array([f"ENSG{j}" for j in range(len(names))], dtype="S")
        feats["feature_type"] = np.array(types, dtype="S")
    return path


def test_10x_h5_input(tmp_path):
    x = small_counts()
    src = write_10x_h5(tmp_path / "filtered_feature_bc_matrix.h5", x)
    convert(src, str(tmp_path / "out.zarr"), progress=False)
    back = anndata.read_zarr(tmp_path / "out.zarr")
    keep = x.sum(1) > 0
    np.testing.assert_array_equal(back.X.toarray(), x[keep])
    assert "CD3_TotalSeqB" not in back.var_names and back.obs_names[0] == "AAAC-0"


def write_mtx_dir(directory, x, *, shuffle_entries=False):
    directory.mkdir()
    coo = sp.coo_matrix(x.T)  # genes x cells
    order = np.lexsort((coo.row, coo.col))  # by cell, as Cell Ranger writes
    if shuffle_entries:
        order = np.random.default_rng(0).permutation(len(order))
    lines = ["%%MatrixMarket matrix coordinate integer general", "%", f"{x.shape[1]} {x.shape[0]} {coo.nnz}"]
    lines += [f"{coo.row[k] + 1} {coo.col[k] + 1} {int(coo.data[k])}" for k in order]
    with gzip.open(directory / "matrix.mtx.gz", "wt") as f:
        f.write("\n".join(lines) + "\n")
    with gzip.open(directory / "features.tsv.gz", "wt") as f:
        f.writelines(f"ENSG{j}\tg{j}\tGene Expression\n" for j in range(x.shape[1]))
    with gzip.open(directory / "barcodes.tsv.gz", "wt") as f:
        f.writelines(f"AAAC-{i}\n" for i in range(x.shape[0]))
    return directory


@pytest.mark.parametrize("shuffle_entries", [False, True])
def test_10x_mtx_directory_input(tmp_path, monkeypatch, shuffle_entries):
    monkeypatch.setattr("distributed_je.sources.SOURCE_BLOCK_ROWS", 7)  # several blocks
    x = small_counts(n_cells=44)
    src = write_mtx_dir(tmp_path / "mtx", x, shuffle_entries=shuffle_entries)
    convert(src, str(tmp_path / "out.zarr"), progress=False)
    back = anndata.read_zarr(tmp_path / "out.zarr")
    np.testing.assert_array_equal(back.X.toarray(), x[x.sum(1) > 0])


@pytest.mark.parametrize(("value", "message"), [
    (-2.0, r"-2\.0 \(negative\) at cell 'cell5' \(row 5\), gene 'g2'"),
    (0.5, r"0\.5 \(not an integer\) at cell 'cell5'"),
    (np.nan, r"nan \(NaN\) at cell 'cell5'"),
    (np.inf, r"inf \(infinite\) at cell 'cell5'"),
])
def test_bad_values_fail_naming_cell_and_gene_and_leave_nothing(tmp_path, value, message):
    x = small_counts()
    x[5, 2] = value
    src = write_h5ad(tmp_path / "src.h5ad", x)
    with pytest.raises(CountsError, match=message):
        convert(src, str(tmp_path / "out.zarr"), progress=False)
    assert leftovers(tmp_path, {"src.h5ad"}) == []


def test_structural_problems_fail_clearly_and_leave_nothing(tmp_path):
    x = small_counts()
    dup = write_h5ad(tmp_path / "dup.h5ad", x)
    adata = anndata.read_h5ad(dup)
    adata.var_names = ["g0", "g0"] + [f"g{j}" for j in range(2, 12)]
    adata.write_h5ad(dup)
    with pytest.raises(CountsError, match=r"duplicate gene names, e\.g\. \['g0'\]"):
        convert(dup, str(tmp_path / "out.zarr"), progress=False)
    empty = write_h5ad(tmp_path / "empty.h5ad", np.zeros((4, 3), np.float32),
                       obs=pd.DataFrame(index=list("abcd")))
    with pytest.raises(CountsError, match="all 4 cells have zero counts"):
        convert(empty, str(tmp_path / "out.zarr"), progress=False)
    with pytest.raises(KeyError, match="obs column 'donor' does not exist; available: batch, cell_type"):
        convert(write_h5ad(tmp_path / "ok.h5ad", x), str(tmp_path / "out.zarr"), batch_key="donor", progress=False)
    with pytest.raises(SourceError, match="layer 'raw' does not exist"):
        convert(tmp_path / "ok.h5ad", str(tmp_path / "out.zarr"), layer="raw", progress=False)
    with pytest.raises(SourceError, match="expected a .h5ad file, a 10x .h5 file or a 10x mtx directory"):
        (tmp_path / "x.loom").write_text("")
        convert(tmp_path / "x.loom", str(tmp_path / "out.zarr"), progress=False)
    mtx = write_mtx_dir(tmp_path / "mtx", x)
    (mtx / "barcodes.tsv.gz").unlink()
    with gzip.open(mtx / "barcodes.tsv.gz", "wt") as f:
        f.write("only-one\n")
    with pytest.raises(SourceError, match=r"matrix is 12 genes x 40 cells but features.tsv.gz lists 12 and barcodes.tsv.gz 1"):
        convert(mtx, str(tmp_path / "out.zarr"), progress=False)
    assert not (tmp_path / "out.zarr").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_existing_destination_needs_overwrite(tmp_path):
    src = write_h5ad(tmp_path / "src.h5ad", small_counts())
    convert(src, str(tmp_path / "out.zarr"), progress=False)
    with pytest.raises(StoreError, match="already exists: pass --overwrite"):
        convert(src, str(tmp_path / "out.zarr"), progress=False)
    convert(src, str(tmp_path / "out.zarr"), keep_empty=True, overwrite=True, progress=False)
    assert open_store(str(tmp_path / "out.zarr")).n_cells == 40


def test_interrupted_conversion_leaves_no_half_written_store(tmp_path, monkeypatch):
    src = write_h5ad(tmp_path / "src.h5ad", small_counts())
    calls = []

    def interrupt(self, *args):
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(StoreWriter, "append", interrupt)
    with pytest.raises(KeyboardInterrupt):
        convert(src, str(tmp_path / "out.zarr"), progress=False)
    assert calls and leftovers(tmp_path, {"src.h5ad"}) == []


def test_incomplete_store_is_refused(tmp_path):
    import zarr

    zarr.open_group(str(tmp_path / "half.zarr"), mode="w", zarr_format=3)
    with pytest.raises(StoreError, match="not a complete distributed_je store"):
        open_store(str(tmp_path / "half.zarr"))
    with pytest.raises(StoreError, match="does not exist"):
        open_store(str(tmp_path / "none.zarr"))


def test_memory_url_store(tmp_path):
    x = small_counts()
    src = write_h5ad(tmp_path / "src.h5ad", x)
    convert(src, "memory://stores/pbmc.zarr", labels_key="cell_type", progress=False)
    store = open_store("memory://stores/pbmc.zarr")
    block = store.read_rows(0, 10)
    dense = sp.csr_matrix((block.data, block.indices, block.indptr), shape=(10, 12)).toarray()
    np.testing.assert_array_equal(dense, x[x.sum(1) > 0][:10])
    assert store.obs_codes("cell_type")[1] == ["t0", "t1", "t2", "t3"]
    with pytest.raises(StoreError, match="already exists"):
        convert(src, "memory://stores/pbmc.zarr", progress=False)


def test_indices_of_any_width_read_back(tmp_path):
    x = small_counts(n_cells=8, n_genes=70000 // 1000)  # uint16 indices
    src = write_h5ad(tmp_path / "src.h5ad", x * 1000)  # counts above 255
    convert(src, str(tmp_path / "out.zarr"), progress=False)
    store = open_store(str(tmp_path / "out.zarr"))
    assert store.read_rows(0, 2).indices.dtype == np.uint16
    big = np.zeros((2, 3), np.float32)
    big[0, 1], big[1, 2] = 70000, 1  # above uint16: stored as uint32
    convert(write_h5ad(tmp_path / "big.h5ad", big, obs=pd.DataFrame(index=["a", "b"])),
            str(tmp_path / "big.zarr"), progress=False)
    block = open_store(str(tmp_path / "big.zarr")).read_rows(0, 2)
    assert block.data.dtype == np.uint32 and block.data.tolist() == [70000, 1]


@pytest.mark.data
def test_real_pbmc3k_round_trip_on_selected_genes(tmp_path, pbmc3k_path):
    convert(pbmc3k_path, str(tmp_path / "pbmc.zarr"), n_top_genes=500, labels_key="cell_type", progress=False)
    back = anndata.read_zarr(tmp_path / "pbmc.zarr")
    source = anndata.read_h5ad(pbmc3k_path)
    subset = source[back.obs_names, back.var_names]
    np.testing.assert_array_equal(back.X.toarray(), subset.X.toarray())
    assert back.obs["cell_type"].isna().sum() == source.obs.loc[back.obs_names, "cell_type"].isna().sum()
