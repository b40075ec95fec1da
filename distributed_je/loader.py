"""Out-of-core, sharded, chunk-shuffled minibatches from a count store.

Per epoch:
1. The store's contiguous row blocks (``block_rows`` cells) are permuted with a seed from
   (seed, epoch), the same permutation on every rank.
2. The cells of the split (train or validation, fixed by a hash of each cell's name) are
   laid end to end in that block order and cut into ``world_size`` contiguous shares that
   differ by at most one cell: rank r reads only the blocks its share touches.
3. A rank reads ``blocks_per_buffer`` to ``2 * blocks_per_buffer - 1`` blocks into a buffer (a
   background thread reads the next buffer meanwhile), shuffles the buffer's cells with a seed from (seed, rank, epoch),
   and cuts minibatches; the cells left over open the next buffer's first batch.
4. Every rank yields exactly ``batches_per_epoch`` batches, so collectives never hang: a
   training epoch drops fewer than one batch of cells per rank; a validation pass drops none
   (its batches differ in size by at most one cell instead).

A buffer is one set of CSR rows (``store.CsrRows``: float32 values decoded straight from the
store's chunks), so cutting a batch is a row selection in compiled code. Batches are torch tensors: dense float32
counts, or (with ``dense=False``, what training uses) a sparse CSR tensor that the model reads
at its non-zeros on CPU and the training loop densifies on a GPU.
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
from distributed_je.sparse import csr
from distributed_je.split import validation_threshold
from distributed_je.store import LIBRARY_SIZE, NAME_HASH, CountStore, CsrRows

SPLITS = ("train", "val", "all")


@dataclass(frozen=True)
class Segment:
    """Cells [lo, hi) of block ``block``, counted among that block's cells of the split."""

    block: int
    lo: int
    hi: int


@dataclass
class _Buffer:
    """Whole blocks as CSR rows with per-cell covariates, and which of its cells to serve."""

    counts: CsrRows
    batch_index: np.ndarray
    library: np.ndarray
    labels: np.ndarray | None
    rows: np.ndarray  # each cell's row in the store
    serve: np.ndarray  # buffer rows of this rank's share of the split, in block order


_Part = dict  # a batch, or a piece of one, before it becomes tensors: key -> CsrRows or array


def _stack(first: _Part, second: _Part) -> _Part:
    """The cells carried over from one buffer followed by cells of the next: one batch."""
    return {key: first[key].stack(second[key]) if key == COUNTS else np.concatenate([first[key], second[key]])
            for key in first}


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
        self._spent: _Buffer | None = None  # a consumed buffer whose memory the next read reuses
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
                   seed=seed, dense=not data.sparse_batches)

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

    def _read_buffer(self, segments: list[Segment], reuse: _Buffer | None = None) -> _Buffer:
        ranges = [(s.block * self.block_rows, min((s.block + 1) * self.block_rows, self.store.n_cells))
                  for s in segments]
        serve, offset = [], 0
        for segment, (start, stop) in zip(segments, ranges):
            in_split = np.flatnonzero(self._in_split(self.store.obs_values(NAME_HASH, start, stop)))
            serve.append(offset + in_split[segment.lo : segment.hi])
            offset += stop - start

        def column(read) -> np.ndarray:
            return np.concatenate([read(start, stop) for start, stop in ranges])

        if self.batch_key is not None:
            batch_index = column(lambda start, stop: self.store.obs_codes(self.batch_key, start, stop)[0])
        else:
            batch_index = np.zeros(offset, dtype=np.int64)
        labels = (column(lambda start, stop: self.store.obs_codes(self.labels_key, start, stop)[0])
                  if self.labels_key is not None else None)
        library = column(lambda start, stop: self.store.obs_values(LIBRARY_SIZE, start, stop)).astype(np.float32)
        rows = column(lambda start, stop: np.arange(start, stop, dtype=np.int64))
        counts = self.store.read_csr(ranges, reuse=None if reuse is None else reuse.counts)
        return _Buffer(counts, batch_index, library, labels, rows, np.concatenate(serve))

    def epoch(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        segments = self.segments(epoch)
        # buffers of at least blocks_per_buffer blocks each (fewer only if the share has fewer): every batch
        # mixes that many blocks, the last buffer of an epoch included
        n_buffers = max(1, len(segments) // self.blocks_per_buffer)
        cuts = [len(segments) * i // n_buffers for i in range(n_buffers + 1)]
        groups = [segments[start:stop] for start, stop in zip(cuts, cuts[1:])]
        rng = numpy_generator(self.seed, self.rank, epoch)
        sizes = self._batch_sizes()
        n_yielded, carry = 0, None
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dje-prefetch") as pool:

            def read_ahead(group: list[Segment]) -> Future:
                spent, self._spent = self._spent, None  # its memory is written over
                return pool.submit(self._read_buffer, group, spent)

            pending = read_ahead(groups[0]) if groups else None
            for next_group in range(1, len(groups) + 1):
                buffer = pending.result()
                pending = read_ahead(groups[next_group]) if next_group < len(groups) else None
                serve = buffer.serve[rng.permutation(len(buffer.serve))] if self.shuffle else buffer.serve
                offset = 0
                while n_yielded < len(sizes):
                    n_new = sizes[n_yielded] - (0 if carry is None else len(carry[LIBRARY]))
                    if offset + n_new > len(serve):
                        break
                    part = self._take(buffer, serve[offset : offset + n_new])
                    yield self._to_tensors(part if carry is None else _stack(carry, part))
                    offset, carry, n_yielded = offset + n_new, None, n_yielded + 1
                if n_yielded < len(sizes):
                    rest = self._take(buffer, serve[offset:])
                    carry = rest if carry is None else _stack(carry, rest)
                self._spent = buffer  # batches and carry are copies: nothing refers to its memory any more
                if n_yielded == len(sizes):
                    break
        if n_yielded != len(sizes):
            raise RuntimeError(f"rank {self.rank} yielded {n_yielded} of {len(sizes)} batches in epoch {epoch}")

    def _batch_sizes(self) -> list[int]:
        if self.split == "train":
            return [self.batch_size] * self.batches_per_epoch
        lo, hi = self._share()
        base, extra = divmod(hi - lo, self.batches_per_epoch)
        return [base + (i < extra) for i in range(self.batches_per_epoch)]

    def _take(self, buffer: _Buffer, rows: np.ndarray) -> _Part:
        part = {COUNTS: buffer.counts.take(rows), BATCH_INDEX: buffer.batch_index[rows], LIBRARY: buffer.library[rows]}
        if buffer.labels is not None:
            part[LABELS] = buffer.labels[rows]
        if self.with_rows:
            part[ROW] = buffer.rows[rows]
        return part

    def _to_tensors(self, part: _Part) -> dict[str, torch.Tensor]:
        batch = {key: torch.from_numpy(value) for key, value in part.items() if key != COUNTS}
        counts = part[COUNTS]
        if self.dense:
            batch[COUNTS] = torch.from_numpy(counts.dense(self.store.n_genes))
        else:
            batch[COUNTS] = csr(torch.from_numpy(counts.indptr), torch.from_numpy(counts.indices),
                                torch.from_numpy(counts.data), (counts.n_cells, self.store.n_genes))
        return batch

    def __len__(self) -> int:
        return self.batches_per_epoch
