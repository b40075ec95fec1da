import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from distributed_je.config import load_config
from distributed_je.convert import convert
from distributed_je.keys import BATCH_INDEX, COUNTS, LABELS, LIBRARY, ROW
from distributed_je.loader import StoreLoader
from distributed_je.split import validation_mask
from distributed_je import store as store_module
from distributed_je.store import open_store

N_CELLS, N_GENES = 1003, 30


@pytest.fixture(scope="module")
def store_and_counts(tmp_path_factory):
    """A store whose label column is each cell's own index, so batches can be traced to cells."""
    rng = np.random.default_rng(0)
    x = rng.poisson(2.0, (N_CELLS, N_GENES)).astype(np.float32)
    x[:, 0] += 1  # no empty cells
    names = [f"cell{i}" for i in range(N_CELLS)]
    obs = pd.DataFrame({"idx": pd.Categorical([str(i) for i in range(N_CELLS)], categories=[str(i) for i in range(N_CELLS)]),
                        "batch": ["a", "b", "c"] * (N_CELLS // 3) + ["a"] * (N_CELLS % 3)}, index=names)
    path = tmp_path_factory.mktemp("store") / "s.h5ad"
    anndata.AnnData(X=sp.csr_matrix(x), obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(N_GENES)])).write_h5ad(path)
    dest = str(path.parent / "s.zarr")
    with pytest.MonkeyPatch.context() as patch:  # small chunks and shards: blocks span several of each
        patch.setattr(store_module, "CHUNK_ELEMENTS", 64)
        patch.setattr(store_module, "SHARD_CHUNKS", 4)
        convert(path, dest, batch_key="batch", labels_key="idx", progress=False)
    return open_store(dest), x, np.array(names)


def loader(store, **kwargs):
    defaults = dict(batch_size=32, block_rows=50, blocks_per_buffer=3, labels_key="idx", batch_key="batch")
    return StoreLoader(store, **{**defaults, **kwargs})


def cells_of(batches):
    return np.concatenate([b[LABELS].numpy() for b in batches])


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_sharding_disjoint_equal_batch_counts_and_at_most_one_batch_dropped(store_and_counts, world_size):
    store, _, names = store_and_counts
    train_cells = set(np.flatnonzero(~validation_mask(names, 0.1)))
    per_rank = []
    for rank in range(world_size):
        batches = list(loader(store, rank=rank, world_size=world_size).epoch(0))
        assert len(batches) == len(loader(store, rank=rank, world_size=world_size))
        assert all(len(b[COUNTS]) == 32 for b in batches)
        per_rank.append(cells_of(batches))
    assert len({len(cells) for cells in per_rank}) == 1, "every rank must yield the same number of batches"
    everything = np.concatenate(per_rank)
    assert len(everything) == len(set(everything)), "a cell appeared twice in one epoch"
    assert set(everything) <= train_cells
    shares = [len(train_cells) * (r + 1) // world_size - len(train_cells) * r // world_size for r in range(world_size)]
    for share, cells in zip(shares, per_rank):
        assert share - len(cells) < 32 + 1  # at most one batch's worth dropped per rank


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_validation_pass_covers_every_held_out_cell_once(store_and_counts, world_size):
    store, _, names = store_and_counts
    held_out = set(np.flatnonzero(validation_mask(names, 0.1)))
    loaders = [loader(store, split="val", rank=r, world_size=world_size) for r in range(world_size)]
    assert len({len(shard) for shard in loaders}) == 1
    cells = np.concatenate([cells_of(shard.epoch(0)) for shard in loaders])
    assert sorted(cells) == sorted(held_out)


def test_batches_hold_the_store_rows(store_and_counts):
    """Every batch of two epochs, all kept until the end: buffers reuse their memory, batches must not share it."""
    store, x, _ = store_and_counts
    shuffled = loader(store, split="all", with_rows=True, blocks_per_buffer=1)
    batches = list(shuffled.epoch(3)) + list(shuffled.epoch(4))
    for batch in batches:
        rows = batch[LABELS].numpy()
        np.testing.assert_array_equal(batch[ROW].numpy(), rows)  # the label column is the row index
        np.testing.assert_array_equal(batch[COUNTS].numpy(), x[rows])
        np.testing.assert_array_equal(batch[LIBRARY].numpy(), x[rows].sum(1))
        np.testing.assert_array_equal(batch[BATCH_INDEX].numpy(), rows % 3)  # batches a, b, c in turn
    assert batches[0][COUNTS].dtype == torch.float32 and batches[0][BATCH_INDEX].dtype == torch.int64


def test_csr_mode_matches_dense(store_and_counts):
    store, _, _ = store_and_counts
    dense = list(loader(store).epoch(1))
    csr = list(loader(store, dense=False).epoch(1))
    assert csr[0][COUNTS].layout == torch.sparse_csr
    for a, b in zip(dense, csr):
        assert torch.equal(a[COUNTS], b[COUNTS].to_dense())


def test_deterministic_per_seed_and_reshuffled_per_epoch(store_and_counts):
    store, _, _ = store_and_counts
    first = cells_of(loader(store, seed=4).epoch(0))
    assert np.array_equal(first, cells_of(loader(store, seed=4).epoch(0)))
    assert not np.array_equal(first, cells_of(loader(store, seed=4).epoch(1)))
    assert not np.array_equal(first, cells_of(loader(store, seed=5).epoch(0)))


def test_every_batch_mixes_many_blocks(store_and_counts):
    store, _, _ = store_and_counts
    for batch in loader(store, blocks_per_buffer=8, batch_size=64).epoch(0):
        blocks = np.unique(batch[LABELS].numpy() // 50)
        assert len(blocks) >= 6


def test_from_config_and_clear_errors(store_and_counts):
    store, _, _ = store_and_counts
    data = load_config(None, ["data.batch_size=16", "data.block_rows=100", "data.batch_key=batch"]).data
    built = StoreLoader.from_config(store, data, split="train", seed=0, rank=1, world_size=2)
    assert built.batch_size == 16 and built.block_rows == 100 and built.world_size == 2
    with pytest.raises(ValueError, match="give no batch of data.batch_size=5000"):
        loader(store, batch_size=5000)
    with pytest.raises(ValueError, match=r"rank=2 is out of range: allowed \[0, 1\]"):
        loader(store, rank=2, world_size=2)
    with pytest.raises(KeyError, match="obs column 'donor' does not exist"):
        loader(store, batch_key="donor")


@pytest.mark.parametrize("sparse_batches", ["true", "false"])
def test_training_loop_runs_on_the_store_loader(store_and_counts, sparse_batches):
    from distributed_je.loop import build_model, build_optimizer, fit

    store, _, _ = store_and_counts
    config = load_config(None, ["train.max_epochs=2", "data.batch_size=64", "data.block_rows=100",
                                "data.batch_key=batch", f"data.sparse_batches={sparse_batches}"])
    train = StoreLoader.from_config(store, config.data, split="train", seed=0)
    val = StoreLoader.from_config(store, config.data, split="val", seed=0)
    model = build_model(config, store.n_genes, 3)
    state = fit(model, build_optimizer(model, config.optim), config=config, train_batches=train.epoch,
                val_batches=lambda: val.epoch(0))
    assert state.history[-1]["train_cells"] == len(train) * 64
    assert state.history[-1]["val_cells"] == val.n_split_cells
    assert np.isfinite(state.history[-1]["val_recon_nll"])
