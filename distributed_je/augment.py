"""Binomial thinning: the augmentation that makes a low-depth view of a cell."""

from __future__ import annotations

import torch

from distributed_je.sparse import Entries, csr_rows, nonzero_positions, repeat_positions, stored_entries

# Counts up to this are drawn as sums of Bernoulli units (see _draw): of 8, 16 and 32, 16 was
# fastest in a training step on CPU.
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
    if x.layout == torch.sparse_csr:
        rows = csr_rows(x.crow_indices()) if entries is None else entries.rows
        drawn, kept = _draw(x.values(), rows, p, generator)
        survived = nonzero_positions(drawn)
        drawn, kept = drawn.index_select(0, survived), kept.index_select(0, survived)
        # the surviving entries before each row boundary give the result's row pointers
        crow = torch.searchsorted(kept, x.crow_indices(), out_int32=x.crow_indices().dtype == torch.int32)
        return torch.sparse_csr_tensor(crow, x.col_indices().index_select(0, kept), drawn, x.shape)
    if x.layout != torch.strided:
        raise ValueError(f"binomial_thin takes dense or sparse CSR counts, got layout {x.layout}")
    entries = stored_entries(x) if entries is None else entries
    drawn, kept = _draw(x.reshape(-1).index_select(0, entries.flat), entries.rows, p, generator)
    return torch.zeros_like(x).view(-1).index_copy_(0, entries.flat.index_select(0, kept), drawn).view(x.shape)


def _draw(counts: torch.Tensor, rows: torch.Tensor, p: torch.Tensor, generator: torch.Generator | None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Binomial(counts, p[rows]) for a count matrix's stored entries (``rows``: each entry's cell).

    Returns the draws of the entries above 0 and those entries' indices, in storage order.
    Entries of 0 take no random numbers, so explicitly stored zeros leave the other draws
    unchanged. Each UMI survives with probability p: those of a count up to MAX_SUMMED_COUNT
    (98% of pbmc3k's entries over 2,000 genes) by one uniform each, in storage order; larger
    counts by torch.binomial, which costs as much per entry as ~25 uniforms.
    """
    stored = nonzero_positions(counts > 0)
    if stored.shape[0] < counts.shape[0]:
        counts, rows = counts.index_select(0, stored), rows.index_select(0, stored)
    p = p.index_select(0, rows)
    summed = counts <= MAX_SUMMED_COUNT
    owners = repeat_positions(torch.where(summed, counts, 0).long())  # the entry of each summed UMI
    uniforms = torch.rand(owners.shape, generator=generator, dtype=p.dtype, device=p.device)
    survived = uniforms < p.index_select(0, owners)
    drawn = torch.zeros_like(counts).index_add_(0, owners, survived.to(counts.dtype))
    large = nonzero_positions(~summed)
    # torch.binomial wants float inputs, exact for counts up to 2**24
    binomial = torch.binomial(counts.index_select(0, large).float(), p.index_select(0, large).float(),
                              generator=generator)
    return drawn.index_copy_(0, large, binomial.to(counts.dtype)), stored


def sample_thinning_probability(library: torch.Tensor, min_library_size: float, *,
                                generator: torch.Generator | None = None) -> torch.Tensor:
    """Per cell, p = L*/L with a target library L* drawn log-uniformly in [min_library_size, L].

    ``library`` has shape (n_cells, 1) or (n_cells,); the result has the same shape. A cell
    whose library is already at or below ``min_library_size`` keeps p = 1.
    """
    library = library.float().clamp(min=1.0)
    low, high = library.clamp(max=max(min_library_size, 1.0)).log(), library.log()
    u = torch.rand(library.shape, generator=generator, device=library.device)
    return (torch.lerp(low, high, u).exp() / library).clamp(max=1.0)
