"""Binomial thinning: the augmentation that makes a low-depth view of a cell."""

from __future__ import annotations

import torch

from distributed_je.sparse import csr_rows, nonzero_positions

# Counts up to this are drawn as sums of Bernoulli units (see _draw): fastest of 3, 4, 6, 8, 16 on CPU.
MAX_SUMMED_COUNT = 4


def binomial_thin(x: torch.Tensor, p: torch.Tensor, *, generator: torch.Generator | None = None,
                  nonzero: torch.Tensor | None = None) -> torch.Tensor:
    """Draw y* ~ Binomial(y, p) elementwise, with one success probability per cell.

    ``x`` holds counts, dense (n_cells, n_genes) or a sparse CSR tensor (the result then stores
    only its own non-zeros); ``p`` has shape (n_cells,) or (n_cells, 1). Only the non-zeros are
    drawn, in row-major order, so a dense and a sparse copy of the same counts give the same
    draw from the same generator.
    ``nonzero``: the flat positions of a dense ``x``'s non-zeros in increasing order, if already
    known (a superset is fine).
    """
    n_cells = x.shape[0]
    p = p.reshape(-1).to(dtype=x.dtype, device=x.device)
    if p.shape[0] != n_cells:
        raise ValueError(f"p has {p.shape[0]} entries for {n_cells} cells: expected one per cell")
    if bool(((p < 0) | (p > 1)).any()):
        raise ValueError("p must lie in [0, 1] for every cell")
    if x.layout == torch.sparse_csr:
        drawn, entries = _draw(x.values(), csr_rows(x.crow_indices()), p, generator)
        survived = nonzero_positions(drawn)
        drawn, entries = drawn.index_select(0, survived), entries.index_select(0, survived)
        # the surviving entries before each row boundary give the result's row pointers
        crow = torch.searchsorted(entries, x.crow_indices(), out_int32=x.crow_indices().dtype == torch.int32)
        return torch.sparse_csr_tensor(crow, x.col_indices().index_select(0, entries), drawn, x.shape)
    if x.layout != torch.strided:
        raise ValueError(f"binomial_thin takes dense or sparse CSR counts, got layout {x.layout}")
    positions = nonzero_positions(x) if nonzero is None else nonzero
    drawn, entries = _draw(x.reshape(-1).index_select(0, positions), positions // x.shape[1], p, generator)
    return torch.zeros_like(x).view(-1).index_copy_(0, positions.index_select(0, entries), drawn).view(x.shape)


def _draw(counts: torch.Tensor, rows: torch.Tensor, p: torch.Tensor, generator: torch.Generator | None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Binomial(counts, p[rows]) for a count matrix's stored entries (``rows``: each entry's cell).

    Returns the draws of the entries above 0 and those entries' indices, in storage order.
    Entries of 0 take no random numbers, so explicitly stored zeros leave the other draws
    unchanged. Each UMI survives with probability p: every entry's first UMI is decided by one
    uniform, which settles a count of 1 (73% of pbmc3k's entries, 2,000 genes); the other
    UMIs of a count up to MAX_SUMMED_COUNT (91% of entries) by one uniform each, and those of
    larger counts by torch.binomial, several times dearer per entry.
    """
    stored = nonzero_positions(counts > 0)
    n, p = counts.index_select(0, stored), p.index_select(0, rows.index_select(0, stored))
    drawn = (torch.rand(n.shape, generator=generator, dtype=p.dtype, device=p.device) < p).to(counts.dtype)
    small = nonzero_positions((n > 1) & (n <= MAX_SUMMED_COUNT))
    other_units = torch.arange(1, MAX_SUMMED_COUNT, device=n.device)
    uniforms = torch.rand((small.shape[0], MAX_SUMMED_COUNT - 1), generator=generator, dtype=p.dtype, device=p.device)
    survivors = (uniforms < p.index_select(0, small)[:, None]) & (other_units < n.index_select(0, small)[:, None])
    drawn.index_add_(0, small, survivors.sum(1).to(counts.dtype))
    large = nonzero_positions(n > MAX_SUMMED_COUNT)
    # the UMIs after the first; torch.binomial wants float inputs, exact for counts up to 2**24
    drawn.index_add_(0, large, torch.binomial(n.index_select(0, large).float() - 1, p.index_select(0, large).float(),
                                              generator=generator).to(counts.dtype))
    return drawn, stored


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
