"""Binomial thinning: the augmentation that makes a low-depth view of a cell."""

from __future__ import annotations

import torch

from distributed_je.distributions import nonzero_indices


def binomial_thin(x: torch.Tensor, p: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw y* ~ Binomial(y, p) elementwise, with one success probability per cell.

    ``x`` holds counts, dense (n_cells, n_genes) or a sparse CSR tensor; ``p`` has shape
    (n_cells,) or (n_cells, 1). Only the non-zeros are drawn, in row-major order, so a
    dense and a sparse copy of the same counts give the same draw from the same generator.
    """
    n_cells = x.shape[0]
    p = p.reshape(-1).to(dtype=x.dtype, device=x.device)
    if p.shape[0] != n_cells:
        raise ValueError(f"p has {p.shape[0]} entries for {n_cells} cells: expected one per cell")
    if bool(((p < 0) | (p > 1)).any()):
        raise ValueError("p must lie in [0, 1] for every cell")
    if x.layout == torch.sparse_csr:
        crow = x.crow_indices()
        rows = torch.repeat_interleave(torch.arange(n_cells, device=x.device), crow[1:] - crow[:-1])
        values = _draw(x.values(), p[rows], generator)
        return torch.sparse_csr_tensor(crow, x.col_indices(), values, x.shape)
    if x.layout != torch.strided:
        raise ValueError(f"binomial_thin takes dense or sparse CSR counts, got layout {x.layout}")
    rows, cols = nonzero_indices(x)
    thinned = torch.zeros_like(x)
    thinned[rows, cols] = _draw(x[rows, cols], p[rows], generator)
    return thinned


def _draw(counts: torch.Tensor, p: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    if counts.numel() == 0:
        return counts.clone()
    # torch.binomial wants float inputs; counts are exact integers in float32 up to 2**24.
    return torch.binomial(counts.float(), p.float(), generator=generator).to(counts.dtype)


def sample_thinning_probability(library: torch.Tensor, min_library_size: float, *,
                                generator: torch.Generator | None = None) -> torch.Tensor:
    """Per cell, p = L*/L with a target library L* drawn log-uniformly in [min_library_size, L].

    ``library`` has shape (n_cells, 1) or (n_cells,); the result has the same shape. A cell
    whose library is already at or below ``min_library_size`` keeps p = 1.
    """
    library = library.float()
    low = torch.log(torch.clamp(torch.minimum(library, torch.full_like(library, min_library_size)), min=1.0))
    high = torch.log(torch.clamp(library, min=1.0))
    u = torch.rand(library.shape, generator=generator, device=library.device)
    target = torch.exp(low + u * (high - low))
    return torch.clamp(target / torch.clamp(library, min=1.0), max=1.0)
