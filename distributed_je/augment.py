"""Binomial thinning: the augmentation that makes a low-depth view of a cell."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from distributed_je.sparse import Entries, csr, csr_rows, nonzero_positions, repeat_positions, stored_entries

# Counts up to this are drawn as sums of Bernoulli units (see _draw): of 8, 16 and 32, 16 was
# fastest in a training step on CPU, and of 16, 32 and 64 it takes the fewest instructions.
MAX_SUMMED_COUNT = 16


def binomial_thin(x: torch.Tensor, p: torch.Tensor, *, generator: torch.Generator | None = None,
                  entries: Entries | None = None) -> torch.Tensor:
    """Draw y* ~ Binomial(y, p) elementwise, with one success probability per cell.

    ``x`` holds counts, dense (n_cells, n_genes) or a sparse CSR tensor (the result then stores
    only its own non-zeros); ``p`` has shape (n_cells,) or (n_cells, 1). Only the non-zeros are
    drawn, in row-major order, so a dense and a sparse copy of the same counts give the same
    draw from the same generator.
    ``entries``: ``stored_entries(x)``, if already known; for a dense ``x``, entries covering a
    superset of its non-zeros are fine.
    """
    n_cells = x.shape[0]
    p = p.reshape(-1).to(dtype=x.dtype, device=x.device)
    if p.shape[0] != n_cells:
        raise ValueError(f"p has {p.shape[0]} entries for {n_cells} cells: expected one per cell")
    if bool(((p < 0) | (p > 1)).any()):
        raise ValueError("p must lie in [0, 1] for every cell")
    return _thin(x, entries, lambda counts, rows: _draw(counts, rows, p, generator))


def thin_to_random_depth(x: torch.Tensor, library: torch.Tensor, min_library_size: float, *,
                         generator: torch.Generator | None = None, entries: Entries | None = None) -> torch.Tensor:
    """``binomial_thin(x, sample_thinning_probability(library, min_library_size))``: each cell
    thinned to a depth drawn log-uniformly in [min_library_size, its library].

    On CPU, p and the draw come from one numpy generator in one burst of numpy calls, without
    the ~10 torch calls that draw p and check its range: ~3 points off JE's cost over scvi at
    batch 128 (docs/benchmarks.md, session 12). Other devices take the two torch functions.
    """
    if x.device.type != "cpu":
        p = sample_thinning_probability(library, min_library_size, generator=generator)
        return binomial_thin(x, p, generator=generator, entries=entries)
    rng = _numpy_generator(generator)
    u = rng.random(library.shape[0], dtype=np.float32)
    p = _thinning_probability(library.numpy().reshape(-1), min_library_size, u, np)
    return _thin(x, entries, lambda counts, rows: _draw_on_cpu(counts, rows, p, rng))


# (values of the stored entries, their rows) -> (the draws above 0, their entries' indices); see _draw
Draw = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _thin(x: torch.Tensor, entries: Entries | None, draw: Draw) -> torch.Tensor:
    """The thinned copy of dense or CSR counts ``x``, given ``draw(counts, rows) -> (drawn, kept)``
    over its stored entries (see ``_draw``)."""
    if x.layout == torch.sparse_csr:
        rows = csr_rows(x.crow_indices()) if entries is None else entries.rows
        drawn, kept = draw(x.values(), rows)
        # the surviving entries before each row boundary give the result's row pointers
        crow = torch.searchsorted(kept, x.crow_indices(), out_int32=x.crow_indices().dtype == torch.int32)
        return csr(crow, x.col_indices().index_select(0, kept), drawn, x.shape)
    if x.layout != torch.strided:
        raise ValueError(f"counts to thin must be dense or sparse CSR, got layout {x.layout}")
    entries = stored_entries(x) if entries is None else entries
    drawn, kept = draw(x.reshape(-1).index_select(0, entries.flat), entries.rows)
    return torch.zeros_like(x).view(-1).index_copy_(0, entries.flat.index_select(0, kept), drawn).view(x.shape)


def _numpy_generator(generator: torch.Generator | None) -> np.random.Generator:
    """A numpy PCG64 generator seeded by one draw from ``generator``."""
    return np.random.default_rng(int(torch.randint(2**62, (), generator=generator)))


def _draw(counts: torch.Tensor, rows: torch.Tensor, p: torch.Tensor, generator: torch.Generator | None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Binomial(counts, p[rows]) for a count matrix's stored entries (``rows``: each entry's cell).

    Returns the draws above 0 and their entries' indices, in storage order. Entries of 0 take
    no random numbers, so explicitly stored zeros leave the other draws unchanged. Each UMI
    survives with probability p: an entry's first UMI by one uniform (which settles a count of
    1, ~72% of pbmc3k's entries over 2,000 genes), the others of a count up to MAX_SUMMED_COUNT
    by one uniform each, and the rest of larger counts by one binomial draw, which costs as
    much as ~25 uniforms. On CPU the draw runs in numpy (one PCG64 generator seeded from
    ``generator``), whose calls cost less than torch's on arrays of ~25k entries.
    """
    if counts.device.type != "cpu":
        return _draw_torch(counts, rows, p, generator)
    return _draw_on_cpu(counts, rows, p.numpy(), _numpy_generator(generator))


def _draw_on_cpu(counts: torch.Tensor, rows: torch.Tensor, p: np.ndarray, rng: np.random.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    drawn, kept = _draw_numpy(counts.numpy(), rows.numpy(), p, rng)
    return torch.from_numpy(drawn), torch.from_numpy(kept)


def _draw_numpy(counts: np.ndarray, rows: np.ndarray, p: np.ndarray, rng: np.random.Generator
                ) -> tuple[np.ndarray, np.ndarray]:
    """``_draw`` in numpy. A UMI survives when a uniform integer in [0, 2**31) lies below
    p * 2**31: exact at p = 0 and p = 1, within 2**-31 elsewhere (float32 uniforms: 2**-24).
    On a batch of 128 pbmc3k cells this takes 0.59 ms against 1.05 for float uniforms summed
    by ``bincount``, whose larger temporaries, run alone, faulted in fresh pages on every call."""
    stored = None
    if counts.size and counts.min() <= 0:
        stored = np.flatnonzero(counts > 0)
        counts, rows = counts[stored], rows[stored]
    cell_threshold = np.floor(p.astype(np.float64) * 2.0**31).astype(np.uint32)
    threshold = np.take(cell_threshold, rows)
    drawn = (_uniform_integers(rng, counts.size) < threshold).astype(counts.dtype)  # every entry's first UMI
    summed = np.flatnonzero((counts > 1) & (counts <= MAX_SUMMED_COUNT))
    if summed.size:
        rest = np.take(counts, summed).astype(np.intp) - 1  # the UMIs after the first
        survived = _uniform_integers(rng, int(rest.sum())) < np.repeat(np.take(threshold, summed), rest)
        # each entry's UMIs are one run of ``survived``: add up the runs
        drawn[summed] += np.add.reduceat(survived.view(np.uint8), np.cumsum(rest) - rest)
    large = np.flatnonzero(counts > MAX_SUMMED_COUNT)
    if large.size:
        rest = np.take(counts, large).astype(np.intp) - 1
        drawn[large] += rng.binomial(rest, np.take(p, np.take(rows, large))).astype(counts.dtype)
    kept = np.flatnonzero(drawn > 0)
    return drawn[kept], kept if stored is None else stored[kept]


def _uniform_integers(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` uniform integers in [0, 2**31) as uint32: two from each raw 64-bit draw."""
    halves = rng.bit_generator.random_raw((n + 1) // 2).view(np.uint32)[:n]
    return np.right_shift(halves, 1, out=halves)


def _draw_torch(counts: torch.Tensor, rows: torch.Tensor, p: torch.Tensor, generator: torch.Generator | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``_draw`` in torch, on any device (GPUs)."""
    stored = nonzero_positions(counts > 0)
    if stored.shape[0] < counts.shape[0]:
        counts, rows = counts.index_select(0, stored), rows.index_select(0, stored)
    p = p.index_select(0, rows)
    drawn = (torch.rand(counts.shape, generator=generator, dtype=p.dtype, device=p.device) < p).to(counts.dtype)
    rest = (counts - 1).long()  # the UMIs after the first
    summed = rest < MAX_SUMMED_COUNT
    owners = repeat_positions(torch.where(summed, rest, 0))  # the entry of each summed UMI
    uniforms = torch.rand(owners.shape, generator=generator, dtype=p.dtype, device=p.device)
    drawn.index_add_(0, owners, (uniforms < p.index_select(0, owners)).to(counts.dtype))
    large = nonzero_positions(~summed)
    # torch.binomial wants float inputs, exact for counts up to 2**24
    binomial = torch.binomial(rest.index_select(0, large).float(), p.index_select(0, large).float(),
                              generator=generator)
    drawn.index_add_(0, large, binomial.to(counts.dtype))
    kept = nonzero_positions(drawn)
    return drawn.index_select(0, kept), stored.index_select(0, kept)


def sample_thinning_probability(library: torch.Tensor, min_library_size: float, *,
                                generator: torch.Generator | None = None) -> torch.Tensor:
    """Per cell, p = L*/L with a target library L* drawn log-uniformly in [min_library_size, L].

    ``library`` has shape (n_cells, 1) or (n_cells,); the result has the same shape. A cell
    whose library is already at or below ``min_library_size`` keeps p = 1.
    """
    u = torch.rand(library.shape, generator=generator, device=library.device)
    return _thinning_probability(library.float(), min_library_size, u, torch)


def _thinning_probability(library, min_library_size: float, u, xp):
    """``sample_thinning_probability`` given its uniforms ``u``, in numpy or torch (``xp``)."""
    library = library.clip(min=1.0)
    low, high = xp.log(library.clip(max=max(min_library_size, 1.0))), xp.log(library)
    return (xp.exp(low + (high - low) * u) / library).clip(max=1.0)
