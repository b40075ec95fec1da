"""Binomial thinning: the augmentation that makes a low-depth view of a cell."""

from __future__ import annotations

import torch

from distributed_je.sparse import csr_rows, drop_zeros, nonzero_positions


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
        values = _draw(x.values(), csr_rows(x.crow_indices()), p, generator)
        return drop_zeros(torch.sparse_csr_tensor(x.crow_indices(), x.col_indices(), values, x.shape))
    if x.layout != torch.strided:
        raise ValueError(f"binomial_thin takes dense or sparse CSR counts, got layout {x.layout}")
    positions = nonzero_positions(x) if nonzero is None else nonzero
    drawn = _draw(x.reshape(-1).index_select(0, positions), positions // x.shape[1], p, generator)
    return torch.zeros_like(x).view(-1).index_copy_(0, positions, drawn).view(x.shape)


def _draw(counts: torch.Tensor, rows: torch.Tensor, p: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Binomial(counts, p[rows]) for a count matrix's stored entries (``rows``: each entry's cell).

    Entries of 0 draw nothing and take no random numbers, so explicitly stored zeros leave the
    other draws unchanged.
    """
    stored = (counts > 0).nonzero().squeeze(1)
    # torch.binomial wants float inputs; counts are exact integers in float32 up to 2**24
    kept = torch.binomial(counts.index_select(0, stored).float(),
                          p.index_select(0, rows.index_select(0, stored)).float(), generator=generator)
    return torch.zeros_like(counts).index_copy_(0, stored, kept.to(counts.dtype))


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
