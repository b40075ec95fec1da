"""Out-of-core, sharded, chunk-shuffled minibatches from a count store.

Per epoch:
1. The store's contiguous row blocks (``block_rows`` cells) are permuted with a seed from
   (seed, epoch), the same permutation on every rank.
2. The cells of the split (train or validation, fixed by a hash of each cell's name) are
   laid end to end in that block order and cut into ``world_size`` contiguous shares that
   differ by at most one cell: rank r reads only the blocks its share touches.
3. A rank reads ``blocks_per_buffer`` blocks into a buffer (a background thread reads the
   next buffer meanwhile), shuffles the buffer's cells with a seed from (seed, rank, epoch),
   and cuts minibatches; the remainder carries into the next buffer.
4. Every rank yields exactly ``batches_per_epoch`` batches, so collectives never hang: a
   training epoch drops fewer than one batch of cells per rank; a validation pass drops none
   (its batches differ in size by at most one cell instead).

Batches hold numpy-decoded rows turned into torch tensors: dense float32 counts, or (with
``dense=False``) a sparse CSR tensor that the training loop densifies on its device.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from distributed_je.config import DataConfig
from distributed_je.keys import BATCH_INDEX, COUNTS, LABELS, LIBRARY, ROW
from distributed_je.seeding import numpy_generator
from distributed_je.split import validation_threshold
from distributed_je.store import LIBRARY_SIZE, NAME_HASH, CountStore, take_rows

SPLITS = ("train", "val", "all")


@dataclass(frozen=True)
class Segment:
    """Cells [lo, hi) of block ``block``, counted among that block's cells of the split."""

    block: int
    lo: int
    hi: int


@dataclass
class _Buffer:
    """Decoded CSR rows of several blocks with their per-cell covariates."""

    data: np.ndarray
    indices: np.ndarray
    indptr: np.ndarray
    batch_index: np.ndarray
    library: np.ndarray
    labels: np.ndarray | None
    rows: np.ndarray  # each cell's row in the store

    @property
    def n_cells(self) -> int:
        return len(self.indptr) - 1


def _take_rows(buffer: _Buffer, rows: np.ndarray) -> _Buffer:
    positions, indptr = take_rows(buffer.indptr, rows)
    return _Buffer(
        buffer.data[positions], buffer.indices[positions], indptr, buffer.batch_index[rows],
        buffer.library[rows], None if buffer.labels is None else buffer.labels[rows], buffer.rows[rows],
    )


def _concat(parts: list[_Buffer]) -> _Buffer:
    offsets = np.cumsum([0] + [len(p.data) for p in parts[:-1]])
    indptr = np.concatenate([[0]] + [p.indptr[1:] + o for p, o in zip(parts, offsets)])
    labels = None if parts[0].labels is None else np.concatenate([p.labels for p in parts])
    return _Buffer(
        np.concatenate([p.data for p in parts]), np.concatenate([p.indices for p in parts]), indptr,
        np.concatenate([p.batch_index for p in parts]), np.concatenate([p.library for p in parts]), labels,
        np.concatenate([p.rows for p in parts]),
    )


class StoreLoader:
    """Minibatches of one rank's share of a store's split; ``epoch(e)`` iterates one epoch."""

    def __init__(self, store: CountStore, *, batch_size: int, split: str = "train", validation_fraction: float = 0.1,
                 block_rows: int = 4096, blocks_per_buffer: int = 32, batch_key: str | None = None,
                 labels_key: str | None = None, rank: int = 0, world_size: int = 1, seed: int = 0,
                 dense: bool = True, with_rows: bool = False, shuffle: bool | None = None) -> None:
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is not allowed: choose one of {', '.join(SPLITS)}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is out of range: allowed [0, {world_size - 1}] for world_size={world_size}")
        self.store, self.split = store, split
        self.batch_size, self.block_rows, self.blocks_per_buffer = batch_size, block_rows, blocks_per_buffer
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.dense, self.with_rows = dense, with_rows
        self.shuffle = split == "train" if shuffle is None else shuffle  # validation passes keep store order
        self.batch_key, self.labels_key = batch_key, labels_key
        self.n_batches_store = len(store.categories(batch_key)) if batch_key is not None else 1
        self.threshold = validation_threshold(validation_fraction)
        self.n_blocks = math.ceil(store.n_cells / block_rows)
        self.block_counts = self._count_split_cells()
        self.n_split_cells = int(self.block_counts.sum())
        share = self.n_split_cells // world_size  # the smallest rank share
        if split == "train":
            self.batches_per_epoch = share // batch_size
        else:
            self.batches_per_epoch = math.ceil((share + (self.n_split_cells % world_size > 0)) / batch_size)
        if self.batches_per_epoch == 0 or share == 0:
            raise ValueError(f"{self.n_split_cells} {split} cells over {world_size} workers give no batch of "
                             f"data.batch_size={batch_size}: lower the batch size or the worker count")

    @classmethod
    def from_config(cls, store: CountStore, data: DataConfig, *, split: str, seed: int, rank: int = 0,
                    world_size: int = 1, with_labels: bool = False) -> StoreLoader:
        return cls(store, batch_size=data.batch_size, split=split, validation_fraction=data.validation_fraction,
                   block_rows=data.block_rows, blocks_per_buffer=data.blocks_per_buffer, batch_key=data.batch_key,
                   labels_key=data.labels_key if with_labels else None, rank=rank, world_size=world_size,
                   seed=seed, dense=not data.densify_on_device)

    def _in_split(self, hashes: np.ndarray) -> np.ndarray:
        if self.split == "all":
            return np.ones(len(hashes), dtype=bool)
        held_out = hashes < self.threshold
        return held_out if self.split == "val" else ~held_out

    def _count_split_cells(self) -> np.ndarray:
        counts = np.zeros(self.n_blocks, dtype=np.int64)
        step = self.block_rows * max(1, (1 << 20) // self.block_rows)  # read the hashes in ~1M-cell slices
        for start in range(0, self.store.n_cells, step):
            stop = min(start + step, self.store.n_cells)
            keep = self._in_split(self.store.obs_values(NAME_HASH, start, stop))
            blocks = np.arange(start, stop) // self.block_rows
            counts += np.bincount(blocks[keep], minlength=self.n_blocks)
        return counts

    def _share(self) -> tuple[int, int]:
        """This rank's cells [lo, hi) of the split laid end to end: shares differ by at most one cell."""
        n = self.n_split_cells
        return self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size

    def segments(self, epoch: int) -> list[Segment]:
        """This rank's share of the epoch: pieces of blocks in the epoch's block order."""
        order = numpy_generator(self.seed, 0, epoch).permutation(self.n_blocks)
        ends = np.cumsum(self.block_counts[order])
        starts = ends - self.block_counts[order]
        lo, hi = self._share()
        segments = []
        for block, start, end in zip(order, starts, ends):
            if end > lo and start < hi:
                segments.append(Segment(int(block), int(max(lo, start) - start), int(min(hi, end) - start)))
        return segments

    def _read_block(self, segment: Segment) -> _Buffer:
        start = segment.block * self.block_rows
        stop = min(start + self.block_rows, self.store.n_cells)
        rows = self.store.read_rows(start, stop)
        keep = np.flatnonzero(self._in_split(self.store.obs_values(NAME_HASH, start, stop)))[segment.lo : segment.hi]
        batch_index = (self.store.obs_codes(self.batch_key, start, stop)[0] if self.batch_key is not None
                       else np.zeros(stop - start, dtype=np.int64))
        labels = self.store.obs_codes(self.labels_key, start, stop)[0] if self.labels_key is not None else None
        library = self.store.obs_values(LIBRARY_SIZE, start, stop).astype(np.float32)
        block = _Buffer(rows.data, rows.indices, rows.indptr, batch_index, library, labels,
                        np.arange(start, stop, dtype=np.int64))
        return _take_rows(block, keep)

    def _read_buffer(self, segments: list[Segment]) -> _Buffer:
        return _concat([self._read_block(s) for s in segments])

    def epoch(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        segments = self.segments(epoch)
        groups = [segments[i : i + self.blocks_per_buffer] for i in range(0, len(segments), self.blocks_per_buffer)]
        rng = numpy_generator(self.seed, self.rank, epoch)
        sizes = self._batch_sizes()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dje-prefetch") as pool:
            pending: Future | None = pool.submit(self._read_buffer, groups[0]) if groups else None
            carry: _Buffer | None = None
            n_yielded, next_group = 0, 1
            while n_yielded < len(sizes) and pending is not None:
                buffer = pending.result()
                pending = pool.submit(self._read_buffer, groups[next_group]) if next_group < len(groups) else None
                next_group += 1
                buffer = buffer if carry is None else _concat([carry, buffer])
                order = rng.permutation(buffer.n_cells) if self.shuffle else np.arange(buffer.n_cells)
                offset = 0
                while n_yielded < len(sizes) and buffer.n_cells - offset >= sizes[n_yielded]:
                    stop = offset + sizes[n_yielded]
                    yield self._batch(buffer, order[offset:stop])
                    offset, n_yielded = stop, n_yielded + 1
                carry = _take_rows(buffer, order[offset:])
        if n_yielded != len(sizes):
            raise RuntimeError(f"rank {self.rank} yielded {n_yielded} of {len(sizes)} batches in epoch {epoch}")

    def _batch_sizes(self) -> list[int]:
        if self.split == "train":
            return [self.batch_size] * self.batches_per_epoch
        lo, hi = self._share()
        base, extra = divmod(hi - lo, self.batches_per_epoch)
        return [base + (i < extra) for i in range(self.batches_per_epoch)]

    def _batch(self, buffer: _Buffer, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """The buffer's ``rows`` as one minibatch: a gather of their non-zeros, then (dense) a scatter."""
        positions, crow = take_rows(buffer.indptr, rows)
        values, columns = buffer.data[positions], buffer.indices[positions]
        n_cells, n_genes = len(rows), self.store.n_genes
        if self.dense:
            counts = np.zeros(n_cells * n_genes, dtype=np.float32)
            counts[np.repeat(np.arange(0, n_cells * n_genes, n_genes), np.diff(crow)) + columns] = values
            counts_tensor = torch.from_numpy(counts).view(n_cells, n_genes)
        else:
            counts_tensor = torch.sparse_csr_tensor(
                torch.from_numpy(crow), torch.from_numpy(columns.astype(np.int64)),
                torch.from_numpy(values.astype(np.float32)), (n_cells, n_genes))
        batch = {
            COUNTS: counts_tensor,
            BATCH_INDEX: torch.from_numpy(buffer.batch_index[rows]),
            LIBRARY: torch.from_numpy(buffer.library[rows]),
        }
        if buffer.labels is not None:
            batch[LABELS] = torch.from_numpy(buffer.labels[rows])
        if self.with_rows:
            batch[ROW] = torch.from_numpy(buffer.rows[rows])
        return batch

    def __len__(self) -> int:
        return self.batches_per_epoch
